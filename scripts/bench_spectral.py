#!/usr/bin/env python
"""Time greedy selection on the CPU for growing (m, k); writes docs/bench_spectral.md.

Sigma comes from random data of rank m/2 plus noise; z (the consumers' weights) has 2m rows, the
worst case for the output-aware term. Each size is timed once after a warm-up on a small problem;
the plain transcription of SPEC §3 (full R and G updated every step) is timed where it finishes in
reasonable time, for the ratio.

Usage: python scripts/bench_spectral.py [--sizes 512:256,2048:1024,4096:2048] [--reference-up-to 512]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import cpu_name, format_table  # noqa: E402
from specprune_cli.spectral import _greedy_select_reference, greedy_select  # noqa: E402


def problem(m: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * m, m // 2, generator=g) @ torch.randn(m // 2, m, generator=g) + 0.1 * torch.randn(2 * m, m, generator=g)
    sigma = (x.T @ x).double() / x.shape[0]
    return sigma, torch.randn(2 * m, m, generator=g, dtype=torch.float64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="512:256,2048:1024,4096:2048")
    ap.add_argument("--reference-up-to", type=int, default=512, help="largest m to time the plain greedy on")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_spectral.md")
    args = ap.parse_args()
    sizes = [tuple(int(v) for v in s.split(":")) for s in args.sizes.split(",")]
    greedy_select(*problem(64)[:1], 32)  # warm-up
    rows = []
    for m, k in sizes:
        sigma, z = problem(m)
        t = time.perf_counter()
        keep_in, _ = greedy_select(sigma, k, theta=0.0)
        t_in = time.perf_counter() - t
        t = time.perf_counter()
        gram = z.T @ z
        keep, _ = greedy_select(sigma, k, theta=0.5, z_gram=gram)
        t_out = time.perf_counter() - t
        ref, same = "-", "-"
        if m <= args.reference_up_to:
            t = time.perf_counter()
            picked = _greedy_select_reference(sigma, k, theta=0.5, z_gram=gram)
            ref = f"{time.perf_counter() - t:.2f}"
            same = "yes" if sorted(picked) == keep.tolist() else "NO"
        rows.append([m, k, f"{t_in:.2f}", f"{t_out:.2f}", ref, same])
        print(f"m={m} k={k}: input-aware {t_in:.2f}s, with z ({2 * m}x{m}) {t_out:.2f}s, plain {ref}s", flush=True)
    table = format_table(["m", "k", "input-aware (s)", "theta=0.5 with z_gram (s)", "plain greedy (s)",
                          "same picks"], rows)
    header = (f"# Greedy selection time\n\nProduced by `python scripts/bench_spectral.py` on {cpu_name()}, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}, "
              f"load average {os.getloadavg()[0]:.1f} at the end of the run.\n"
              "Seconds for one call of `greedy_select`, A_J included (statistics not included; z has 2m rows "
              "and is passed as Z^T Z). The machine's cores may be shared: treat single numbers as rough.\n\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(header + table + "\n")
    tmp.replace(args.out)  # never a half-written file
    print(table)


if __name__ == "__main__":
    main()
