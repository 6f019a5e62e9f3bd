#!/usr/bin/env python
"""Pruning time of this version's defaults against one plain forward pass, and what each default costs.

For vgg_small, resnet_small and mobilenetv2_small (trained, from scripts/fashion_common.reference_model)
on the same 1,024 calibration images (training split, seed 0, batches of 64): the seconds of
``prune_model`` at 50% of FLOPs divided by the seconds of one forward pass (eval, ``torch.no_grad``)
over the same batches, timed in the same process right before it, so that a busy machine slows both.
Rows: the defaults, then the defaults without the kernel refit, then also with ``target_signal:
pruned``, then also in oneshot order. Each cell is the median over the rounds, with the range; the
variants are interleaved round by round. Writes a section of docs/benchmarks.md.

Usage:
  python scripts/bench_prune_time.py [--rounds 3] [--threads 1] [--out docs/benchmarks.md]
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import cpu_name, format_table, keep_freed_memory_mapped, write_section  # noqa: E402
from fashion_common import ROOT, load_split, normalise, reference_model  # noqa: E402
from quality_cache import library_commit  # noqa: E402
from specprune_cli import prune_model  # noqa: E402
from specprune_cli.config import PruneConfig  # noqa: E402

MODELS = ("vgg_small", "resnet_small", "mobilenetv2_small")
VARIANTS = {
    "defaults": {},
    "kernel_refit: false": {"kernel_refit": False},
    "+ target_signal: pruned": {"kernel_refit": False, "target_signal": "pruned"},
    "+ order: oneshot": {"kernel_refit": False, "target_signal": "pruned", "order": "oneshot"},
}


def main() -> None:
    mapped = keep_freed_memory_mapped()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    xtr, _ = load_split("train")
    perm = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(0))
    calib = normalise(xtr[perm[:1024]])
    batches = [calib[i:i + 64] for i in range(0, len(calib), 64)]
    rows = []
    for name in MODELS:
        model, _ = reference_model(name)
        ratios: dict[str, list[float]] = {v: [] for v in VARIANTS}
        seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
        forward: list[float] = []
        for _ in range(args.rounds):
            for label, change in VARIANTS.items():
                t = time.perf_counter()
                with torch.no_grad():
                    for b in batches:
                        model(b)
                fw = time.perf_counter() - t
                forward.append(fw)
                t = time.perf_counter()
                prune_model(model, batches, example_input=calib[:1], progress=False,
                            cfg=PruneConfig(target={"flops": 0.5}, **change))
                seconds[label].append(time.perf_counter() - t)
                ratios[label].append(seconds[label][-1] / fw)
        for label in VARIANTS:
            r = ratios[label]
            rows.append([name, label, f"{statistics.median(seconds[label]):.2f}",
                         f"{statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})"])
        print(f"{name}: forward pass median {statistics.median(forward):.2f}s", flush=True)
    load = os.getloadavg()[0]
    text = (f"### Pruning time of this version's defaults (`scripts/bench_prune_time.py`)\n\n"
            f"{cpu_name()}, {args.threads} thread(s), load average {load:.1f} at the end, {args.rounds} "
            f"rounds, freed memory {'kept mapped (glibc mallopt)' if mapped else 'returned to the system'}; "
            "prune_model at 50% of FLOPs on 1,024 calibration images, divided by one forward pass over the "
            "same batches timed just before it (median, range). Each row adds one change to the row above "
            "it, so the differences are what the kernel refit, the original-signal target and the "
            f"sequential order cost. specprune at commit {library_commit()[:12]} (the last change to "
            f"specprune_cli/), {datetime.date.today()}. Section (A) of bench_speed was measured with earlier "
            "defaults; these rows supersede its pruning times.\n\n"
            + format_table(["model", "settings", "prune s", "x one forward pass"], rows))
    write_section(args.out, "prune-time", text)
    print(text)


if __name__ == "__main__":
    main()
