"""The width rows of scripts/bench_speed.py (issue 16, part 4): units 8,192 channels wide.

Two kinds of measurement, each case in a fresh worker process:

* pruning Linear(d, W) -> ReLU -> Linear(W, W) -> ReLU -> Linear(W, 10), two units W wide, with the
  default config (50% of FLOPs, ``dof`` allocation, sequential order, original-signal targets) on random
  inputs: seconds by stage, CPU seconds, and the peak resident memory (VmHWM, reset once the model and
  data are loaded) against the target of 8 GiB;
* greedy selection at m = W, k = W/2 with the output-aware term (theta = 0.5), Z^T Z of a 2m x m Z
  formed beforehand, on the S of scripts/bench_spectral.py (``problem``): wall and CPU seconds of each
  run (freed memory kept mapped), and the peak memory above what S and Z^T Z hold. Also at m = 4,096,
  k = 2,048, where the target is under 10 seconds.

Wall time with 1 and 2 processes is in scripts/bench_distributed.py's own section.
"""
from __future__ import annotations

import os
import statistics
import time

from bench_common import format_table, memory_mib, reset_peak

GIB_MIB = 1024
TARGET_PEAK_GIB = 8.0       # pruning an 8,192-wide unit
TARGET_SELECT_S = 10.0      # selection at m = 4,096, k = 2,048 with theta = 0.5
TARGET_SELECT_M = 4096


def width_cases(width: int, inputs: int, samples: int, select_sizes: tuple[int, ...], repeats: int
                ) -> dict[str, dict]:
    """The cases of the width section, ids ``wide/prune`` and ``wide/select/<m>``."""
    cases = {"wide/prune": {"kind": "prune", "arch": "wide", "width": width, "inputs": inputs,
                            "samples": samples, "order": "sequential", "repeats": 1}}
    for m in select_sizes:
        cases[f"wide/select/{m}"] = {"kind": "select", "m": m, "k": m // 2, "repeats": repeats}
    return cases


def select_case(case: dict) -> dict:
    """Wall and CPU seconds of ``greedy_select`` at (m, k), theta = 0.5 with Z^T Z, and its peak memory."""
    from bench_spectral import problem
    from specprune_cli.latency import keep_memory_mapped
    from specprune_cli.spectral import greedy_select

    keep_memory_mapped()
    p = problem(case["m"])
    sigma, gram = p["target"], p["gram"]
    del p  # only S and Z^T Z stay
    inputs = memory_mib("VmRSS")
    reset = reset_peak()
    runs = []
    for _ in range(case["repeats"]):
        load = os.getloadavg()[0]
        cpu, start = time.process_time(), time.perf_counter()
        keep, maps = greedy_select(sigma, case["k"], theta=0.5, z_gram=gram)
        runs.append({"wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu, "load": load})
        del keep, maps
    return {"runs": runs, "inputs_mib": inputs, "peak_mib": memory_mib("VmHWM"), "peak_reset": reset}


def _gib(mib: float | None) -> str:
    return "n/a" if mib is None else f"{mib / GIB_MIB:.2f}"


def width_section(results: dict[str, dict], width: int, inputs: int, threads: int) -> str:
    """The Markdown section: the wide model's pruning, the selections, and the targets."""
    prune = results["wide/prune"]
    t = prune["timings"]
    stages = ("trace", "statistics", "allocation", "replay", "selection", "verify")
    kept = ", ".join(f"unit {name}: {w} -> {k}" for name, (w, k) in prune["kept"].items())
    peak_gib = prune["peak_prune_mib"] / GIB_MIB if prune["peak_prune_mib"] is not None else float("nan")
    prune_rows = [[f"Linear({inputs}, {width}) -> ReLU -> Linear({width}, {width}) -> ReLU -> "
                   f"Linear({width}, 10)",
                   prune["samples"], f"{prune['total_s']:.1f}", f"{prune['cpu_s']:.1f}",
                   *(f"{t.get(s, 0.0):.1f}" for s in stages), _gib(prune["rss_before_mib"]),
                   _gib(prune["peak_prune_mib"]), f"{prune['load'][0]:.1f} / {prune['load'][1]:.1f}"]]
    select_rows, verdicts = [], []
    for key in sorted((k for k in results if k.startswith("wide/select/")),
                      key=lambda k: int(k.split("/")[-1])):
        r = results[key]
        m = int(key.split("/")[-1])
        walls = [run["wall_s"] for run in r["runs"]]
        cpus = [run["cpu_s"] for run in r["runs"]]
        wall = statistics.median(walls)
        select_rows.append([m, m // 2, f"{wall:.1f}", f"{min(walls):.1f} - {max(walls):.1f}",
                            f"{statistics.median(cpus):.1f}",
                            "/".join(f"{run['load']:.1f}" for run in r["runs"]),
                            _gib(r["inputs_mib"]), _gib(r["peak_mib"] - r["inputs_mib"])])
        if m == TARGET_SELECT_M:
            verdicts.append(f"- selection at m = {m}, k = {m // 2}, theta = 0.5 under {TARGET_SELECT_S:g} s: "
                            f"{wall:.1f} s (median), " + ("met" if wall < TARGET_SELECT_S else "missed"))
    verdicts.insert(0, f"- pruning {width}-wide units within {TARGET_PEAK_GIB:g} GiB: peak "
                       f"{peak_gib:.2f} GiB, " + ("met" if peak_gib <= TARGET_PEAK_GIB else "missed"))
    return "\n".join([
        f"### (D) Units {width:,} wide (issue 16)", "",
        f"Pruning a model with two {width}-wide units (`--width-only` runs this section alone): the default "
        f"config (50% of FLOPs, `dof` allocation, sequential order, original-signal targets), one run on "
        f"{prune['samples']:,} random inputs, {threads} torch thread(s). Seconds of `prune_model` by stage "
        "(`report[\"timings\"]`), CPU seconds of the process (all threads), memory once the model and data "
        "are loaded and the peak during pruning (VmHWM, reset just before), and the 1-minute load average "
        f"at the start / end. Kept: {kept}.", "",
        format_table(["model", "inputs", "prune (s)", "CPU (s)", *(f"{s} (s)" for s in stages),
                      "RSS after setup (GiB)", "peak, pruning (GiB)", "load"], prune_rows), "",
        "Greedy selection alone (`spectral.greedy_select`, A_J included) at k = m/2 with the output-aware "
        "term (theta = 0.5, Z^T Z of a 2m x m Z given), on the S of scripts/bench_spectral.py; "
        f"{len(results[next(k for k in results if k.startswith('wide/select/'))]['runs'])} run(s) in one "
        "process, freed memory kept mapped; memory: S and Z^T Z, and the peak above them.", "",
        format_table(["m", "k", "wall (s, median)", "wall range (s)", "CPU (s, median)", "load at each run",
                      "inputs (GiB)", "peak above inputs (GiB)"], select_rows), "",
        "Targets:", "", *verdicts, "",
        "Wall time of the statistics with 1 and 2 processes under torchrun: `scripts/bench_distributed.py`, "
        "in its own section of this page.",
    ])
