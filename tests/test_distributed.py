"""`compress` as 2 processes over gloo: the same plan and outputs as one process, and a failure in one
process ends both with its message and writes nothing.

Each test starts real processes (torchrun, or 2 plain processes with torchrun's environment), so they are
kept to a tiny residual model and 48 samples: about 10-20 s each on 2 shared cores.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import TESTS
from helpers import warm_batchnorm
from models_small import SmallMLP, SmallResNet
from specprune_cli import data, distributed
from specprune_cli.pruned_file import load_pruned

ROOT = TESTS.parent
ARCH = f"{TESTS / 'models_small.py'}:SmallResNet"


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _setup(tmp_path: Path, *, x: np.ndarray | None = None, **prune) -> tuple[Path, Path]:
    """A SmallResNet checkpoint and a config reading 48 samples in 6 batches of 8."""
    torch.manual_seed(0)
    torch.save(warm_batchnorm(SmallResNet(), (3, 8, 8)).state_dict(), tmp_path / "ck.pt")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((48, 3, 8, 8)).astype(np.float32) if x is None else x
    np.savez(tmp_path / "calib.npz", x=x, y=rng.integers(0, 10, len(x)))
    cfg = {"model": {"arch": ARCH, "input_shape": [3, 8, 8]},
           "data": {"calibration": {"format": "npz", "path": str(tmp_path / "calib.npz"), "batch_size": 8,
                                    "num_samples": None}},
           "prune": {"target": {"flops": 0.6}, "round_to": 1, "min_channels": 2, **prune},
           "evaluate": {"latency": False}, "export": {"formats": ["pt"]}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "ck.pt", tmp_path / "cfg.yaml"


def _compress_args(ck: Path, cfg: Path, out: Path) -> list[str]:
    return ["-m", "specprune_cli", "compress", str(ck), "-c", str(cfg), "-o", str(out), "-q"]


def _one_process(ck: Path, cfg: Path, out: Path) -> None:
    run = subprocess.run([sys.executable, *_compress_args(ck, cfg, out)], env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def _torchrun(ck: Path, cfg: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", *_compress_args(ck, cfg, out)], env=_env(),
                          capture_output=True, text=True, timeout=180)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(args: list[str]) -> list[subprocess.CompletedProcess]:
    """Two plain processes with the environment torchrun gives its workers (no agent to stop them)."""
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=dict(_env(), WORLD_SIZE="2", RANK=str(r), LOCAL_RANK=str(r),
                                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(2)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=180)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def _outputs(out: Path) -> tuple[dict, torch.Tensor]:
    report = json.loads((out / "report.json").read_text())
    x = torch.from_numpy(np.load(out.parent / "calib.npz")["x"])
    with torch.no_grad():
        return report, load_pruned(out / "model.pt").eval()(x)


@pytest.mark.parametrize("order", ["sequential", "oneshot"])
def test_two_processes_give_the_single_process_plan_and_outputs(tmp_path, order):
    # 16 of the 64 positions per sample: every process must draw the positions one process draws.
    ck, cfg = _setup(tmp_path, order=order, max_positions=16)
    _one_process(ck, cfg, tmp_path / "one")
    run = _torchrun(ck, cfg, tmp_path / "two")
    assert run.returncode == 0, run.stdout + run.stderr
    one, y_one = _outputs(tmp_path / "one")
    two, y_two = _outputs(tmp_path / "two")
    kept = {u["name"]: u["kept"] for u in one["plan"]["units"]}
    widths = {u["name"]: u["width"] for u in one["plan"]["units"]}
    assert len(kept) == 3 and all(0 < kept[n] < widths[n] for n in kept)  # the stream and both blocks pruned
    assert two["plan"] == one["plan"]
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["prune"]["samples"] == one["prune"]["samples"] == 48
    assert [u["rows"] for u in two["prune"]["units"]] == [u["rows"] for u in one["prune"]["units"]]
    assert float((y_two - y_one).norm() / y_one.norm()) < 1e-6
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("two")) == ["two"]  # no temp dir


def test_fine_tuning_on_two_processes_equals_one_process_at_twice_the_batch(tmp_path):
    """DistributedDataParallel with batches of 4 on each of 2 processes takes the steps one process takes
    with batches of 8 (no BatchNorm in SmallMLP, whose statistics would be per process)."""
    torch.manual_seed(0)
    torch.save(SmallMLP().state_dict(), tmp_path / "ck.pt")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((48, 12)).astype(np.float32),
             y=rng.integers(0, 4, 48))
    configs = {}
    for name, batch in (("one", 8), ("two", 4)):
        cfg = {"model": {"arch": f"{TESTS / 'models_small.py'}:SmallMLP", "input_shape": [12]},
               "data": {"calibration": {"format": "npz", "path": str(tmp_path / "calib.npz"),
                                        "batch_size": 8}},
               "prune": {"allocation": "ratio", "ratio": 0.5, "round_to": 1, "min_channels": 2},
               # Cross-entropy on the labels alone: the model written is the fine-tuned one whatever the
               # distillation loss does (only a distilling run keeps the better of before and after).
               "finetune": {"epochs": 2, "batch_size": batch, "optimizer": "sgd", "lr": 0.05,
                            "distill": False},
               "evaluate": {"latency": False}, "export": {"formats": ["pt"]}}
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(cfg))
    _one_process(tmp_path / "ck.pt", configs["one"], tmp_path / "one")
    run = _torchrun(tmp_path / "ck.pt", configs["two"], tmp_path / "two")
    assert run.returncode == 0, run.stdout + run.stderr
    one, y_one = _outputs(tmp_path / "one")
    two, y_two = _outputs(tmp_path / "two")
    assert two["plan"] == one["plan"]
    assert ([e["steps"] for e in two["finetune"]["epochs"]]
            == [e["steps"] for e in one["finetune"]["epochs"]] == [6, 6])
    trained = float((y_two - y_one).norm() / y_one.norm())
    moved = float((y_one - _outputs_without_finetune(tmp_path, configs["one"])).norm() / y_one.norm())
    assert trained < 1e-5 < moved  # the same training, and training that changed the model


def _outputs_without_finetune(tmp_path: Path, cfg: Path) -> torch.Tensor:
    plain = tmp_path / "plain.yaml"
    plain.write_text(cfg.read_text().replace("epochs: 2", "epochs: 0"))
    _one_process(tmp_path / "ck.pt", plain, tmp_path / "plain")
    return _outputs(tmp_path / "plain")[1]


def test_a_failing_process_stops_both_with_its_message_and_writes_nothing(tmp_path):
    # Samples 8-15 form batch 1, which only process 1 reads: their huge values overflow to Inf inside the
    # model, so process 1 fails while gathering statistics and process 0 is waiting for its moments.
    x = np.random.default_rng(1).standard_normal((48, 3, 8, 8)).astype(np.float32)
    x[8:16] = 3e38
    ck, cfg = _setup(tmp_path, x=x)
    out = tmp_path / "out"
    zero, one = _two_processes(_compress_args(ck, cfg, out))
    assert (zero.returncode, one.returncode) == (1, 1), zero.stderr + one.stderr
    message = one.stderr.strip().splitlines()[-1]
    assert message.startswith("Error: at the input of blocks.0.0 (unit stem.0): ")
    assert "activation values are NaN or Inf" in message
    assert (zero.stderr.strip().splitlines()[-1]
            == message.replace("Error: ", "Error: process 1 of 2 failed: ", 1))
    assert zero.stdout == one.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "cfg.yaml", "ck.pt"]


def test_one_process_leaves_every_helper_a_no_op():
    assert (distributed.world_size(), distributed.rank(), distributed.active()) == (1, 0, False)
    batches = [torch.ones(1) * i for i in range(3)]
    assert distributed.shard(batches) is batches
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.all_sum(2, 3.5) == [2.0, 3.5]


@pytest.mark.parametrize("shuffle", [False, True])
def test_shards_are_disjoint_and_together_the_single_process_batches(shuffle):
    # 7 batches of 3 (the last of 2) over 2 processes: 4 and 3 batches, or 3 and 3 with even rounds.
    dataset = torch.utils.data.TensorDataset(torch.arange(20))
    single = torch.utils.data.DataLoader(dataset, batch_size=3, shuffle=shuffle,
                                         generator=torch.Generator().manual_seed(5) if shuffle else None)
    want = [[b[0].tolist() for b in single] for _epoch in range(2)]

    def shards(even: bool) -> list[list[list[list[int]]]]:
        out = []
        for rank in range(2):
            g = torch.Generator().manual_seed(5) if shuffle else None
            sampler = data._ShardSampler(20, 3, rank, 2, g, even)
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, generator=g)
            out.append([[b[0].tolist() for b in loader] for _epoch in range(2)])
        return out

    assert (want[0] != want[1]) == shuffle  # a new permutation each epoch
    zero, one = shards(even=False)
    assert zero == [w[0::2] for w in want] and one == [w[1::2] for w in want]
    zero, one = shards(even=True)
    assert zero == [w[0:6:2] for w in want] and one == [w[1:6:2] for w in want]
