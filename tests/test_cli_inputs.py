"""`specprune compress` on the inputs and outputs models really have, and on bad input by category: each
a clear message, its documented exit code, and nothing written."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import TESTS, make_cnn, write_npz
from helpers import warm_batchnorm
from models_io import Flat, HubEncoder, MultiHead, Sequence1d, TextCNN, TutorialLM
from specprune_cli import __version__, compress, load_config
from specprune_cli.errors import GateError
from test_cli import _failure, fake_prune, invoke  # noqa: F401 - fake_prune is a fixture

IO = TESTS / "models_io.py"


def _trained(model: torch.nn.Module, shape: tuple[int, ...], path: Path) -> Path:
    """Seeded BatchNorm statistics, saved as a state_dict."""
    torch.manual_seed(0)
    torch.save(warm_batchnorm(model, shape).state_dict(), path)
    return path


def _compress_json(ckpt: Path, cfg: Path, out: Path) -> dict:
    """Run compress --json and return the report, after checking it succeeded."""
    result = invoke("compress", ckpt, "-c", cfg, "-o", out, "--json", "-q")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _npz(path: Path) -> dict:
    """A data section reading all of ``path`` in batches of 8."""
    return {"format": "npz", "path": str(path), "num_samples": None, "batch_size": 8}


def _config(tmp_path: Path, arch: str, shape: list[int], **sections) -> Path:
    cfg = {"model": {"arch": arch, "input_shape": shape},
           "data": {"calibration": {"format": "synthetic", "num_samples": 16, "batch_size": 8}},
           "prune": {"target": {"flops": 0.6}, "round_to": 1, "min_channels": 2, "max_positions": 16},
           "evaluate": {"latency": False}, "export": {"formats": ["pt"]}}
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# ------------------------------------------------------------------------------- inputs of any rank

@pytest.mark.parametrize("cls, shape", [(Flat, [64]), (Sequence1d, [40, 100])], ids=["1d", "2d"])
def test_one_and_two_dimensional_samples_end_to_end(tmp_path, cls, shape):
    ckpt = _trained(cls(), tuple(shape), tmp_path / "m.pt")
    npz = write_npz(tmp_path / "d.npz", n=24, shape=tuple(shape), y=np.arange(24) % 5)
    cfg = _config(tmp_path, f"{IO}:{cls.__name__}", shape,
                  data={"calibration": _npz(npz)},
                  export={"formats": ["pt", "onnx"]})
    report = _compress_json(ckpt, cfg, tmp_path / "out")
    assert report["input_shape"] == shape and report["exports"]["onnx"]["verified"]
    assert report["evaluation"]["labelled"] and report["evaluation"]["samples"] == 24
    if cls is Flat:  # the MLP's hidden Linears are units; the Conv1d model's conv is left alone today
        assert report["prune"]["flops_after"] < report["prune"]["flops_before"]


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint16])
def test_token_ids_in_an_npz_end_to_end(tmp_path, dtype):
    """Integer inputs other than uint8 are token ids: given to the model as int64, never scaled."""
    ckpt = tmp_path / "m.pt"
    torch.manual_seed(0)
    torch.save(TextCNN().state_dict(), ckpt)
    rng = np.random.default_rng(0)
    npz = write_npz(tmp_path / "d.npz", x=rng.integers(0, 100, (24, 12)).astype(dtype), y=np.arange(24) % 4)
    cfg = _config(tmp_path, f"{IO}:TextCNN", [12], data={"calibration": _npz(npz)},
                  export={"formats": ["pt", "onnx", "onnx-int8"]})
    report = _compress_json(ckpt, cfg, tmp_path / "out")
    assert report["prune"]["flops_after"] < report["prune"]["flops_before"]
    assert [u["type"] for u in report["prune"]["units"]] == ["concat", "concat"]
    assert report["exports"]["onnx"]["verified"] and report["evaluation"]["samples"] == 24
    assert report["exports"]["onnx-int8"]["verified"]  # calibrated on the token ids, not floats


def test_the_tutorial_language_model_end_to_end(tmp_path):
    """torch's encoder layers with a causal mask built in forward: their feed-forward layers are pruned,
    and the ONNX file (sequence-first inside, token ids in) is verified."""
    torch.manual_seed(0)
    torch.save(TutorialLM().state_dict(), tmp_path / "m.pt")
    rng = np.random.default_rng(0)
    npz = write_npz(tmp_path / "d.npz", labels=False, x=rng.integers(0, 50, (32, 10)).astype(np.int64))
    cfg = _config(tmp_path, f"{IO}:TutorialLM", [10], data={"calibration": _npz(npz)},
                  export={"formats": ["pt", "onnx"]}, prune={"target": {"flops": 0.8}, "round_to": 1})
    report = _compress_json(tmp_path / "m.pt", cfg, tmp_path / "out")
    assert [u["name"] for u in report["prune"]["units"]] == ["encoder.layers.0.linear1",
                                                            "encoder.layers.1.linear1"]
    assert report["prune"]["flops_after"] < report["prune"]["flops_before"]
    assert report["exports"]["onnx"]["verified"]


def test_a_model_written_as_hugging_face_writes_them(tmp_path):
    """A decorated forward with ``**kwargs``, buffers expanded to proxy sizes, an output class registered
    with pytree, GPT-2's GELU: the feed-forward layer is pruned, and the ONNX and int8 files verified."""
    torch.manual_seed(0)
    torch.save(HubEncoder().state_dict(), tmp_path / "m.pt")
    rng = np.random.default_rng(0)
    npz = write_npz(tmp_path / "d.npz", labels=False, x=rng.integers(0, 50, (32, 12)).astype(np.int64))
    cfg = _config(tmp_path, f"{IO}:HubEncoder", [12], data={"calibration": _npz(npz)},
                  export={"formats": ["pt", "onnx", "onnx-int8"]}, prune={"target": {"flops": 0.7}})
    report = _compress_json(tmp_path / "m.pt", cfg, tmp_path / "out")
    assert [(u["name"], u["width"]) for u in report["prune"]["units"]] == [("fc1", 64)]
    assert report["prune"]["units"][0]["kept"] < 64
    assert report["prune"]["flops_after"] <= 0.7 * report["prune"]["flops_before"] * 1.02
    assert report["exports"]["onnx"]["verified"] and report["exports"]["onnx-int8"]["verified"]
    assert report["exports"]["onnx"]["outputs"] == ["logits", "pooled"]


def test_token_ids_are_not_normalised(tmp_path):
    torch.manual_seed(0)
    torch.save(TextCNN().state_dict(), tmp_path / "m.pt")
    npz = write_npz(tmp_path / "d.npz", labels=False, x=np.zeros((8, 12), dtype=np.int64))
    cfg = _config(tmp_path, f"{IO}:TextCNN", [12],
                  data={"calibration": {**_npz(npz), "mean": [0.5], "std": [0.2]}})
    result = invoke("compress", tmp_path / "m.pt", "-c", cfg, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 1, result.output
    assert (f"data.calibration: the inputs x in {npz} are integers (dtype int64), read as token ids, which "
            "are not normalised: remove data.calibration.mean and data.calibration.std") in result.output
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- outputs of any structure

@pytest.mark.parametrize("kind, output", [("tuple", None), ("dict", "logits"), ("namedtuple", "logits"),
                                          ("namedtuple", 0), ("dataclass", "logits"), ("dataclass", None)])
def test_structured_outputs_through_checks_evaluation_finetune_and_export(tmp_path, fake_prune, kind, output):
    """Pruning itself is replaced by a keep-all run here: what is checked is everything around it."""
    ckpt = _trained(MultiHead(kind), (3, 8, 8), tmp_path / "m.pt")
    npz = write_npz(tmp_path / "d.npz", n=16)
    cfg = _config(tmp_path, f"{IO}:MultiHead", [3, 8, 8], model={"kwargs": {"kind": kind}},
                  data={"calibration": _npz(npz)},
                  finetune={"epochs": 1}, evaluate={"latency": True, "latency_repeats": 3, "output": output},
                  export={"formats": ["pt", "onnx"]})
    report = _compress_json(ckpt, cfg, tmp_path / "out")
    assert report["evaluation"]["labelled"] and report["finetune"]["steps"] == 2
    assert report["exports"]["onnx"]["outputs"] == {"tuple": ["output_0", "output_1"],
                                                    "dict": ["aux.embedding", "logits"],
                                                    "namedtuple": ["logits", "embedding"],
                                                    "dataclass": ["logits", "embedding"]}[kind]
    assert set(report["latency"]["torch"]["speedup"]) == {"1", "32"}


def test_an_output_key_the_model_does_not_have(tmp_path, fake_prune):
    ckpt = _trained(MultiHead("dict"), (3, 8, 8), tmp_path / "m.pt")
    out = tmp_path / "out"
    cfg = _config(tmp_path, f"{IO}:MultiHead", [3, 8, 8], evaluate={"output": "logit"})
    assert _failure(invoke("compress", ckpt, "-c", cfg, "-o", out), out) == (
        2, "Error: evaluate.output is 'logit' but the model returns dict "
           "{aux: dict {embedding: tensor (1, 8)}, "
           "logits: tensor (1, 10)}; set evaluate.output to the tensor to evaluate: aux, logits", [])
    assert fake_prune == []


def test_evaluate_output_on_a_single_tensor_model(tmp_path, cnn_checkpoint, write_config, fake_prune):
    out = tmp_path / "out"
    result = invoke("compress", cnn_checkpoint, "-c", write_config(evaluate={"output": 0}), "-o", out)
    assert _failure(result, out) == (
        2, "Error: evaluate.output is 0 but the model returns a single tensor; remove evaluate.output (it "
           "picks "
           "one tensor of a tuple, list or dict output)", [])


# --------------------------------------------------------------------------- the model's own code

@pytest.mark.parametrize("cls, message", [
    ("TwoInputs", "TwoInputs.forward needs 2 arguments (x, lengths); specprune calls it with one input "
                  "tensor. "
                  "Several input tensors are not supported: wrap the model in a module whose forward takes "
                  "one "
                  "tensor, or give the others fixed values in model.forward_kwargs"),
    ("ExitsInForward", "the model fails on the first calibration batch (SystemExit: 5); it ran on zeros of "
                       "model.input_shape [64], so check the data's shape and values"),
    ("NaNModel", "the original model already produces NaN or Inf on the first calibration batch (25 of 25 "
                 "values), before any pruning; fix the model or the data (check data.calibration.mean and "
                 "std) "
                 "first"),
])
def test_models_that_misbehave_before_pruning(tmp_path, fake_prune, cls, message):
    model = {"TwoInputs": lambda: torch.nn.Linear(12, 4)}.get(cls, Flat)()
    ckpt = tmp_path / "m.pt"
    state = model.state_dict()
    torch.save(state if cls != "TwoInputs" else {"fc." + k: v for k, v in state.items()}, ckpt)
    out = tmp_path / "out"
    cfg = _config(tmp_path, f"{IO}:{cls}", [12] if cls == "TwoInputs" else [64],
                  data={"calibration": {"format": "synthetic", "num_samples": 5, "batch_size": 5}})
    assert _failure(invoke("compress", ckpt, "-c", cfg, "-o", out), out) == (1, "Error: " + message, [])
    assert fake_prune == []


def test_a_model_that_exits_later_in_the_run(tmp_path, fake_prune):
    ckpt, out = _trained(Flat(), (64,), tmp_path / "m.pt"), tmp_path / "out"
    cfg = _config(tmp_path, f"{IO}:ExitsWhenTraining", [64], finetune={"epochs": 1})
    assert _failure(invoke("compress", ckpt, "-c", cfg, "-o", out), out) == (
        1, "Error: the model's code called sys.exit('no training here') while specprune ran it; remove the "
           "exit from the model's module or forward", [])


def test_a_model_file_that_exits_at_import(tmp_path, cnn_checkpoint):
    net = tmp_path / "net.py"
    net.write_text("import sys\nsys.exit(0)\n")
    out = tmp_path / "out"
    cfg = _config(tmp_path, f"{net}:Net", [3, 8, 8])
    assert _failure(invoke("compress", cnn_checkpoint, "-c", cfg, "-o", out), out) == (
        2, f"Error: model.arch '{net}:Net' could not be imported (SystemExit: 0); check that the module is "
           "installed (or the file exists, relative to the working directory) and that it defines the "
           "callable "
           "after the ':'", [])


def test_forward_kwargs_that_forward_does_not_take(tmp_path, cnn_checkpoint):
    out = tmp_path / "out"
    cfg = _config(tmp_path, str(TESTS / "models_small.py") + ":SmallCNN", [3, 8, 8],
                  model={"forward_kwargs": {"embed": False}})
    assert _failure(invoke("compress", cnn_checkpoint, "-c", cfg, "-o", out), out) == (
        2, "Error: model.forward_kwargs names embed, which SmallCNN.forward does not take (it takes x)", [])


def test_what_the_model_prints_does_not_spoil_the_json(tmp_path, fake_prune):
    ckpt = _trained(Flat(), (64,), tmp_path / "m.pt")
    out = tmp_path / "out"
    cfg = _config(tmp_path, f"{IO}:Chatty", [64])
    result = invoke("compress", ckpt, "-c", cfg, "-o", out, "--json", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["input_shape"] == [64]
    assert "forward called with (1, 64)" in result.stderr


# ------------------------------------------------------------------------------- files and places

def test_a_garbage_checkpoint(tmp_path, write_config, fake_prune):
    bad, out = tmp_path / "bad.pt", tmp_path / "out"
    bad.write_bytes(os.urandom(2048))
    code, last, left = _failure(invoke("compress", bad, "-c", write_config(), "-o", out), out)
    assert (code, left) == (1, []) and last.startswith(f"Error: cannot read checkpoint {bad} (")


def test_outdir_that_cannot_be_created(tmp_path, cnn_checkpoint, write_config, fake_prune):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / "out"
    result = invoke("compress", cnn_checkpoint, "-c", write_config(), "-o", out)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: cannot create the output directory {out} (Not a directory); choose a --output where you "
        f"can write")


def test_overwrite_refuses_to_delete_the_checkpoint(tmp_path, write_config, fake_prune):
    out = tmp_path / "out"
    out.mkdir()
    ckpt = out / "cnn.pt"
    torch.save(make_cnn().state_dict(), ckpt)
    result = invoke("compress", ckpt, "-c", write_config(), "-o", out, "--overwrite")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: --output {out} holds {ckpt}, an input of this run, and --overwrite would delete it; write "
        f"the "
        "results to another directory")
    assert ckpt.is_file() and fake_prune == []


def test_labels_beyond_the_model_classes(tmp_path, cnn_checkpoint, write_config, fake_prune):
    npz, out = write_npz(tmp_path / "d.npz", n=8, y=np.full(8, 10)), tmp_path / "out"
    cfg = write_config({"format": "npz", "path": str(npz), "num_samples": None})
    assert _failure(invoke("compress", cnn_checkpoint, "-c", cfg, "-o", out), out) == (
        1, "Error: data.calibration has label 10 but the model predicts 10 classes (0 to 9); check that the "
           "labels "
           "belong to this model", [])


def test_no_labels_without_distillation_fails_before_pruning(tmp_path, cnn_checkpoint, write_config,
                                                             fake_prune):
    npz, out = write_npz(tmp_path / "d.npz", n=8, labels=False), tmp_path / "out"
    cfg = write_config(_npz(npz), finetune={"epochs": 1, "distill": False})
    assert _failure(invoke("compress", cnn_checkpoint, "-c", cfg, "-o", out), out) == (
        2, "Error: fine-tuning needs labels or distill: true; the fine-tune data has no labels (y < 0), so "
           "set "
           "finetune.distill: true or give data.finetune a labelled dataset", [])
    assert fake_prune == []  # said before any pruning, not after


def test_finetune_batch_size_is_honoured(tmp_path, cnn_checkpoint, write_config, fake_prune):
    out = tmp_path / "out"
    cfg = write_config(finetune={"epochs": 1, "batch_size": 4})  # 16 synthetic samples in batches of 8
    result = invoke("compress", cnn_checkpoint, "-c", cfg, "-o", out, "--json", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["finetune"]["steps"] == 4


def test_an_internal_failure_in_pruning_is_said_as_such(tmp_path, cnn_checkpoint, write_config, monkeypatch):
    import specprune_cli.prune as prune

    def broken(*args, **kwargs):
        raise IndexError("list index out of range")

    monkeypatch.setattr(prune, "prune_model", broken)
    out = tmp_path / "out"
    assert _failure(invoke("compress", cnn_checkpoint, "-c", write_config(), "-o", out), out) == (
        1, "Error: pruning failed on this model (IndexError: list index out of range); this is a bug in "
           "specprune or a model it does not support yet: please report it with the model architecture", [])


# ------------------------------------------------------------------------------------ library, -m

def test_a_skipped_verification_is_not_reported_as_done(tmp_path, write_config, fake_prune):
    ckpt, out = tmp_path / "whole.pt", tmp_path / "out"
    torch.save(make_cnn(), ckpt)
    cfg = write_config(model={"arch": None})
    result = invoke("compress", ckpt, "-c", cfg, "-o", out, "--trust-checkpoint", "--json", "-q")
    assert result.exit_code == 0, result.output
    pt = json.loads(result.stdout)["exports"]["pt"]
    assert pt["verified"] is False and pt["note"].startswith("model.arch is not set")
    assert "warning: model.pt: model.arch is not set" in result.stderr


def test_gate_error_carries_the_report(tmp_path, cnn_checkpoint, write_config, fake_prune):
    config = load_config(write_config())
    with pytest.raises(GateError) as exc:
        compress(config, cnn_checkpoint, tmp_path / "out", progress=False, min_agreement=1.01,
                 log=lambda m: None)
    assert exc.value.report == json.loads((tmp_path / "out" / "report.json").read_text())
    assert exc.value.report["gates"][0]["passed"] is False


def test_python_dash_m_is_the_same_cli():
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "specprune_cli", "--version"], capture_output=True,
                            text=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    assert result.returncode == 0 and result.stdout == f"specprune {__version__}\n"


def test_synthetic_float_data_for_a_token_model_says_to_give_integer_data(tmp_path):
    """Synthetic data is float; a model that takes token ids is told so, not to change its input shape."""
    torch.manual_seed(0)
    torch.save(TextCNN().state_dict(), tmp_path / "m.pt")
    cfg = _config(tmp_path, f"{IO}:TextCNN", [12], data={"calibration": {"format": "synthetic"}})
    out = tmp_path / "out"
    code, last, left = _failure(invoke("compress", tmp_path / "m.pt", "-c", cfg, "-o", out, "-q"), out)
    assert code == 1 and left == []
    assert last.startswith("Error: the model takes integer inputs (token ids or indices): a forward pass on "
                           "float zeros of shape (1, 12) failed (RuntimeError: ")
    assert last.endswith("and one on int64 zeros ran. Give calibration data as integer arrays (an npz or idx "
                         "file of int64 or int32); synthetic data is float")
