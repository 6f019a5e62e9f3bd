#!/usr/bin/env python
"""Wall time of the statistics pass with 1 and 2 processes under torchrun (issue 16, part 4).

``compress`` in oneshot order (one statistics pass, then selection) on a residual CNN (tests/models_small
SmallResNet, width 64) with random weights and synthetic 3x32x32 calibration images, launched by
``python -m torch.distributed.run --standalone --nproc_per_node=N``, each process with OMP_NUM_THREADS=1.
The figure is process 0's ``report["prune"]["timings"]["statistics"]``, which includes the all-reduce of
the moments. Writes a markdown table with the machine's load average before and after into its section
of docs/benchmarks.md (and prints it); the target is a speed-up of 1.6 or more with 2 processes on 2
free cores.

Usage:
  python scripts/bench_distributed.py [--samples 1024] [--repeats 3] [--out docs/benchmarks.md]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_common import cpu_name, format_table, keep_freed_memory_mapped, write_section  # noqa: E402
from models_small import SmallResNet  # noqa: E402

TARGET_SPEEDUP = 1.6


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
    keep_freed_memory_mapped()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        torch.manual_seed(0)
        torch.save(SmallResNet(width=64).state_dict(), tmp / "ck.pt")
        cfg = {"model": {"arch": f"{ROOT / 'tests' / 'models_small.py'}:SmallResNet", "kwargs": {"width": 64},
                         "input_shape": [3, 32, 32]},
               "data": {"calibration": {"format": "synthetic", "num_samples": args.samples,
                                        "batch_size": 64}},
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
    rows = [[n, f"{t:.2f}", ", ".join(f"{v:.2f}" for v in times[n]), f"{one / t:.2f}x"]
            for n, t in ((1, one), (2, two))]
    command = " ".join(["python", "scripts/bench_distributed.py", *sys.argv[1:]])
    text = "\n".join([
        "## Statistics with 1 and 2 processes (`scripts/bench_distributed.py`)", "",
        f"Produced by `{command}` on {date.today().isoformat()}: {cpu_name()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, Python {platform.python_version()}; load average {load_before[0]:.1f} before "
        f"and {load_after[0]:.1f} after. "
        "`compress` in oneshot order under `torch.distributed.run --standalone --nproc_per_node=N`, each "
        f"process with one thread, on {args.samples} synthetic 3x32x32 images and SmallResNet(width=64) "
        "(tests/models_small.py) with random weights: process 0's seconds of the statistics stage (the "
        f"all-reduce of the moments included), median of {args.repeats} runs, 1 and 2 processes alternating "
        "so that a change in load hits both. Cores may be shared with other work.", "",
        format_table(["processes", "statistics (s, median)", "all runs (s)", "speed-up"], rows), "",
        f"Target: 2 processes at least {TARGET_SPEEDUP:g}x faster than 1 on 2 free cores: {one / two:.2f}x, "
        + ("met" if one / two >= TARGET_SPEEDUP else "missed") + ".",
    ])
    write_section(args.out, "bench_distributed", text)
    print(text)


if __name__ == "__main__":
    main()
