#!/usr/bin/env python
"""Time the spectral core on the CPU; writes docs/bench_spectral.md.

Three tables:

* selection: ``greedy_select`` (x~ = x, input-aware and theta = 0.5 with Z^T Z) and ``select`` with a
  cross moment (x~ != x, theta = 0.5) for growing (m, k), with the memory of each call. S has rank
  m/2 plus a ridge of noise, x~ = x D + noise (``problem``); z (the consumers' weights) has 2m rows
  and is passed as Z^T Z, formed beforehand (its time is a column of its own). The plain
  transcription of docs/method.md §3 is timed where it finishes in reasonable time, for the ratio;
* accumulation: one ``update`` of SecondMoment and CrossMoment on a batch of 16 x 288 x 28 x 28
  (12,544 rows of 288 channels);
* degrees of freedom: ``degrees_of_freedom`` against the explicit triangular inverse it replaced.

The cores may be shared with other work: every configuration is timed ``--rounds`` times, the rounds
interleaved (each round runs every configuration once), and the median is reported with the 1-minute
load average seen at the start of each timing.

Usage: python scripts/bench_spectral.py [--sizes 512:256,2048:1024,4096:2048,8192:4096] [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import cpu_name, format_table, keep_freed_memory_mapped  # noqa: E402
from spectral_oracle import greedy_select_reference  # noqa: E402
from specprune_cli.moments import CrossMoment, SecondMoment  # noqa: E402
from specprune_cli.spectral import (Signal, degrees_of_freedom, greedy_select, relative_lambda,  # noqa: E402
                                    select)
from specprune_cli.symmetric import sym_addmm  # noqa: E402

GIB = 1 << 30


def problem(m: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """S, S~, C and Z^T Z for one size, float64.

    x has S = B B^T / r + 0.01 mean(diag) I with B (m x m/2); x~ = x D + noise, D a random diagonal
    gain, so that C = S D is not symmetric and S~ = D S D + 0.1 mean(diag) I: a generic cross moment
    at the cost of one GEMM.
    """
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(m, m // 2, generator=g)
    target = (b @ b.T).double() / (m // 2)
    target = 0.5 * (target + target.T)
    scale = float(torch.diagonal(target).mean())
    target.diagonal().add_(0.01 * scale)
    gain = 0.5 + torch.rand(m, generator=g, dtype=torch.float64)
    source = target * gain[:, None] * gain[None, :]
    source.diagonal().add_(0.1 * scale)
    out = {"target": target, "source": source, "cross": target * gain[None, :]}
    z = torch.randn(2 * m, m, generator=g, dtype=torch.float64)
    t = time.perf_counter()
    out["gram"] = sym_addmm(None, z.T, z.T)
    out["gram_seconds"] = torch.tensor(time.perf_counter() - t)
    return out


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(fn: Callable[[], object]) -> tuple[float, float, int, float]:
    """(seconds, 1-minute load average at the start, peak resident memory during the call above the
    memory before it in bytes, CPU seconds of the process: all its threads, spin-waits included)."""
    before = _rss()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], _rss())

    watcher = threading.Thread(target=sample, daemon=True)
    load = os.getloadavg()[0]
    watcher.start()
    cpu = time.process_time()
    t = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t
    cpu = time.process_time() - cpu
    done.set()
    watcher.join()
    return seconds, load, max(peak[0], _rss()) - before, cpu


def _median(runs: list[tuple[float, float, int, float]]) -> str:
    """Median wall seconds, median CPU seconds in brackets, the loads in parentheses."""
    seconds = statistics.median(r[0] for r in runs)
    cpu = statistics.median(r[3] for r in runs)
    loads = "/".join(f"{r[1]:.1f}" for r in runs)
    return f"{seconds:.2f} [{cpu:.1f}] ({loads})"


def selection_table(sizes: list[tuple[int, int]], rounds: int, reference_up_to: int) -> str:
    rows = []
    problems = {m: problem(m) for m, _ in sizes}
    jobs: dict[tuple[int, str], Callable[[], object]] = {}
    for m, k in sizes:
        p = problems[m]
        jobs[(m, "input")] = lambda p=p, k=k: greedy_select(p["target"], k, theta=0.0)
        jobs[(m, "output")] = lambda p=p, k=k: greedy_select(p["target"], k, theta=0.5, z_gram=p["gram"])
        signal = Signal(p["source"], cross=p["cross"], target=p["target"], z_gram=p["gram"])
        jobs[(m, "cross")] = lambda signal=signal, k=k: select(signal, k, theta=0.5)
    runs: dict[tuple[int, str], list] = {key: [] for key in jobs}
    for r in range(rounds):
        for key, fn in jobs.items():
            runs[key].append(measure(fn))
            seconds, load, extra, cpu = runs[key][-1]
            print(f"round {r + 1}: m={key[0]} {key[1]}: {seconds:.2f}s (cpu {cpu:.2f}s) load {load:.1f} "
                  f"memory +{extra / GIB:.2f} GiB", flush=True)
    for m, k in sizes:
        ref, same = "-", "-"
        if m <= reference_up_to:
            p = problems[m]
            t = time.perf_counter()
            picked = greedy_select_reference(p["target"], k, theta=0.5, z_gram=p["gram"])
            ref = f"{time.perf_counter() - t:.2f}"
            keep, _ = greedy_select(p["target"], k, theta=0.5, z_gram=p["gram"])
            same = "yes" if sorted(picked) == keep.tolist() else "NO"
        inputs = sum(problems[m][key].numel() * 8 for key in ("source", "cross", "target", "gram"))
        extra = max(run[2] for run in runs[(m, "cross")])
        rows.append([m, k, f"{float(problems[m]['gram_seconds']):.2f}", _median(runs[(m, "input")]),
                     _median(runs[(m, "output")]), _median(runs[(m, "cross")]), f"{inputs / GIB:.2f}",
                     f"{extra / GIB:.2f}", ref, same])
    return format_table(["m", "k", "Z^T Z (s)", "input-aware (s)", "theta=0.5 with Z^T Z (s)",
                         "cross moment, theta=0.5 (s)", "cross inputs (GiB)", "cross working memory (GiB)",
                         "plain greedy (s)", "same picks"], rows)


def accumulation_table(rounds: int, reps: int = 10) -> str:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 288, 28, 28, generator=g)
    xt = x + 0.1 * torch.randn(16, 288, 28, 28, generator=g)
    half = xt[:, :144].contiguous()
    jobs = {
        "SecondMoment.update(x)": lambda: SecondMoment(288).update(x),
        "CrossMoment.update(x, x)": lambda: CrossMoment(288, 288).update(x, x),
        "CrossMoment.update(x, x~), k0 = 288": lambda: CrossMoment(288, 288).update(x, xt),
        "CrossMoment.update(x, x~), k0 = 144": lambda: CrossMoment(288, 144).update(x, half),
    }
    runs: dict[str, list[float]] = {key: [] for key in jobs}
    loads: list[float] = []
    for _ in range(rounds):
        for key, fn in jobs.items():
            fn()  # warm-up (allocation)
            loads.append(os.getloadavg()[0])
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                runs[key].append(time.perf_counter() - t)
    base = statistics.median(runs["SecondMoment.update(x)"])
    rows = [[key, f"{statistics.median(v) * 1e3:.1f}", f"{statistics.median(v) / base:.2f}"]
            for key, v in runs.items()]
    table = format_table(["update on 16 x 288 x 28 x 28 (12,544 rows)", "ms (median)", "x SecondMoment"],
                         rows)
    return table + f"\n\nLoad average during these timings: {min(loads):.1f} to {max(loads):.1f}.\n"


def dof_table(sizes: list[int], rounds: int) -> str:
    def explicit_inverse(sigma: torch.Tensor, lam: float) -> float:
        """The former formula: m - lambda ||L^-1||_F^2 with L^-1 formed by a triangular solve."""
        eye = torch.eye(sigma.shape[0], dtype=torch.float64)
        inv = torch.linalg.solve_triangular(torch.linalg.cholesky(sigma + lam * eye), eye, upper=False)
        return sigma.shape[0] - lam * float((inv * inv).sum())

    rows = []
    for m in sizes:
        sigma = problem(m)["target"]
        lam = relative_lambda(sigma, 1e-3)
        new, old = [], []
        for _ in range(rounds):
            new.append(measure(lambda: degrees_of_freedom(sigma, lam)))
            old.append(measure(lambda: explicit_inverse(sigma, lam)))
        diff = abs(degrees_of_freedom(sigma, lam) - explicit_inverse(sigma, lam))
        rows.append([m, _median(new), _median(old), f"{diff:.1e}"])
    return format_table(["m", "degrees_of_freedom (s)", "explicit inverse, former (s)", "|difference|"], rows)


def main() -> None:
    keep_freed_memory_mapped()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="512:256,2048:1024,4096:2048,8192:4096")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; the median is reported")
    ap.add_argument("--reference-up-to", type=int, default=512, help="largest m to time the plain greedy on")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_spectral.md")
    args = ap.parse_args()
    sizes = [tuple(int(v) for v in s.split(":")) for s in args.sizes.split(",")]
    greedy_select(problem(64)["target"], 32)  # warm-up
    accumulation = accumulation_table(args.rounds)
    print(accumulation, flush=True)
    dof = dof_table([m for m, _ in sizes if m <= 4096], args.rounds)
    print(dof, flush=True)
    selection = selection_table(sizes, args.rounds, args.reference_up_to)
    print(selection, flush=True)
    intro = (f"Produced by `python scripts/bench_spectral.py --rounds {args.rounds}` on {cpu_name()}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
             f"Python {platform.python_version()}. "
             "The cores may be shared with other work: each cell is the median of "
             f"{args.rounds} interleaved runs, with the median CPU seconds of the process in brackets (all "
             "threads, spin-waits included; less sensitive to other work than wall time) and the 1-minute "
             "load average at the start of each run in parentheses.")
    about_selection = (
        "Seconds for one call, A_J included (statistics not included). input-aware and theta=0.5: "
        "`greedy_select` (x~ = x); cross moment: `select` with S~, C and S of x~ = x D + noise (D a random "
        "diagonal gain, k0 = m). z has 2m rows and is passed as Z^T Z, formed beforehand by the "
        "half-triangle product (its own column). Memory of the cross-moment call: its inputs (S~, C, S, "
        "Z^T Z) and the peak resident memory above what the process held before the call (the largest of "
        "the runs).")
    text = "\n\n".join([
        "# Spectral core timings", intro, "## Selection", about_selection, selection,
        "## Accumulation", "One update of a fresh accumulator, float32 input, float64 sums.",
        accumulation.strip(),
        "## Degrees of freedom", "N(lambda) at ridge 1e-3 for S of the selection table.", dof]) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(args.out)  # never a half-written file


if __name__ == "__main__":
    main()
