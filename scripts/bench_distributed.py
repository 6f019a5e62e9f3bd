#!/usr/bin/env python
"""Wall time of the statistics pass with 1 and 2 processes under torchrun (issue 16, part 4).

``compress`` in oneshot order (one statistics pass, then selection) on a residual CNN (tests/models_small
SmallResNet, width 64) with random weights and synthetic 3x32x32 calibration images, launched by
``python -m torch.distributed.run --standalone --nproc_per_node=N``, each process with OMP_NUM_THREADS=1.
The figure is process 0's ``report["prune"]["timings"]["statistics"]``, which includes the all-reduce of
the moments. Prints a markdown table with the machine's load average before and after; the target is
a speed-up of 1.6 or more with 2 processes on 2 free cores.

Usage:
  python scripts/bench_distributed.py [--samples 1024] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from models_small import SmallResNet  # noqa: E402


def run(tmp: Path, processes: int, tag: str) -> float:
    out = tmp / f"out-{tag}"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           "-m", "specprune_cli", "compress", str(tmp / "ck.pt"), "-c", str(tmp / "cfg.yaml"), "-o", str(out),
           "-q"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(done.stdout + done.stderr)
    return json.loads((out / "report.json").read_text())["prune"]["timings"]["statistics"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        torch.manual_seed(0)
        torch.save(SmallResNet(width=64).state_dict(), tmp / "ck.pt")
        cfg = {"model": {"arch": f"{ROOT / 'tests' / 'models_small.py'}:SmallResNet", "kwargs": {"width": 64},
                         "input_shape": [3, 32, 32]},
               "data": {"calibration": {"format": "synthetic", "num_samples": args.samples, "batch_size": 64}},
               "prune": {"order": "oneshot", "max_positions": None},
               "evaluate": {"latency": False}, "export": {"formats": ["pt"]}}
        (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
        load_before = os.getloadavg()
        times = {n: [] for n in (1, 2)}
        for r in range(args.repeats):
            for n in (1, 2):  # alternating, so that a change in load hits both
                times[n].append(run(tmp, n, f"{n}-{r}"))
        load_after = os.getloadavg()
    one, two = statistics.median(times[1]), statistics.median(times[2])
    print(f"{args.samples} images 3x32x32, SmallResNet(width=64), oneshot, {args.repeats} runs each "
          f"(median), {os.cpu_count()} CPUs, load average {load_before[0]:.1f} before / {load_after[0]:.1f} after\n")
    print("| processes | statistics s (median) | all runs s | speed-up |")
    print("|---|---|---|---|")
    for n, t in ((1, one), (2, two)):
        print(f"| {n} | {t:.2f} | {', '.join(f'{v:.2f}' for v in times[n])} | {one / t:.2f}x |")


if __name__ == "__main__":
    main()
