#!/usr/bin/env python
"""Speed of pruning and speed of the pruned models (issue 7); writes a section of docs/benchmarks.md.

(A) The tool. Seconds of ``prune_model`` (no fine-tuning), split by stage (``report["timings"]``) and
divided by the floor: one plain forward pass (eval, ``torch.no_grad``, batches of 64) over the same
calibration set on the same model, in the same process. Both orders, default config (50% of FLOPs), on
vgg_small, resnet_small and mobilenetv2_small (1024 Fashion-MNIST training images) and torchvision's
resnet50 (random weights, BatchNorm statistics warmed, 256 random 3x224x224 images). Also the peak memory
of each run, the time against the number of calibration images, and the selection stage against layer
width on Linear(m, m) -> ReLU -> Linear(m, 10) kept at k = m/2 (greedy selection is O(m^2 k)).

(B) The result. Median CPU latency of the original over the pruned model, torch eager and ONNX Runtime,
batch 1 and 64, divided by the FLOPs ratio: the share of the theoretical speed-up that is real. The three
reference models at 50% of FLOPs, with round_to 8 (the default) and round_to 1.

(C) Pruning and int8 together: scripts/int8_bench.py. (D) Units 8,192 wide, memory and time of pruning
them and of the selection alone: scripts/width_bench.py.

Every case runs in a fresh worker process (this script with --worker), so no case inherits another's
memory or warm caches (--quick runs them all in one worker, to save the start-ups). Peak memory is the
kernel's high-water mark VmHWM (/proc/self/status), reset through /proc/self/clear_refs just before the
measured phase. Not ru_maxrss: a child started by subprocess (vfork + exec) inherits its parent's
high-water mark, so its ru_maxrss reads at least the parent's peak. Not tracemalloc: it sees Python's
allocator only, not the tensor storage torch allocates in C++. RSS includes torch's shared libraries, so
the RSS once model and data are loaded is reported too.

Weights: ``trained`` takes the reference models from scripts/fashion_common.reference_model (trained and
cached in bench_cache/ on first use); ``random`` initialises them at random and warms their BatchNorm
statistics on the calibration images (the default with --quick).

Usage:
  python scripts/bench_speed.py                  # full run, writes docs/benchmarks.md
  python scripts/bench_speed.py --quick          # smoke run: small sizes, one repeat, one process
  python scripts/bench_speed.py --threads 1      # on a busy machine (see --help)
  python scripts/bench_speed.py --width-only     # section D alone: units 8,192 wide (issue 16)
  python scripts/bench_speed.py --quick --weights trained --out /tmp/benchmarks.md
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (cpu_name, format_table, keep_freed_memory_mapped, memory_mib,  # noqa: E402
                          reset_peak, write_section)
from fashion_common import ROOT, load_split, normalise, reference_model  # noqa: E402
from int8_bench import int8_case, int8_report  # noqa: E402
from width_bench import select_case, width_cases, width_section  # noqa: E402
from specprune_cli import models, prune_model  # noqa: E402
from specprune_cli.config import ExportConfig, PruneConfig  # noqa: E402
from specprune_cli.latency import measure_latency, measure_onnx_latency  # noqa: E402
from specprune_cli.export import export_model  # noqa: E402
from specprune_cli.flops import count_flops, count_params  # noqa: E402

REFERENCE = ("vgg_small", "resnet_small", "mobilenetv2_small")
SCALING_MODEL = "resnet_small"
BATCH = 64
STAGES = ("trace", "statistics", "allocation", "replay", "selection", "verify")


@dataclass(frozen=True)
class Settings:
    """Sizes and repeats of one run."""

    samples: int = 1024                    # calibration images for the reference models
    resnet50_images: int = 256
    resnet50_size: int = 224
    sample_counts: tuple[int, ...] = (256, 512, 1024, 2048, 4096)
    widths: tuple[int, ...] = (256, 512, 1024, 2048, 4096)
    width_samples: int = 1024
    repeats: int = 3                       # prune runs per case: the first (cold) and the best of the rest
    resnet50_repeats: int = 2
    round_to: tuple[int, ...] = (8, 1)
    latency_batches: tuple[int, ...] = (1, 64)
    latency_repeats: int = 30              # timed passes per measure_latency call
    latency_rounds: int = 3                # variants measured in turn, this many times: drift hits all alike
    finetune_samples: int = 5000           # (C): bench_quality's distillation images
    test_samples: int | None = None        # (C): test images scored (None: all 10,000)
    int8_repeats: int = 60                 # (C): interleaved rounds of the six files per batch size
    wide_width: int = 8192                 # (D): the wide model's units
    wide_inputs: int = 256                 # (D): its input features
    wide_samples: int = 4096               # (D): its calibration inputs
    select_sizes: tuple[int, ...] = (4096, 8192)  # (D): greedy selection at m, k = m/2
    select_repeats: int = 3                # (D): runs of each selection (median)


FULL = Settings()
QUICK = Settings(samples=128, resnet50_images=8, resnet50_size=32, sample_counts=(64, 128, 256),
                 widths=(128, 256, 512), width_samples=256, repeats=1, resnet50_repeats=1,
                 latency_batches=(1, 16), latency_repeats=5, latency_rounds=1, finetune_samples=256,
                 test_samples=1000, int8_repeats=5, wide_width=1024, wide_inputs=64, wide_samples=512,
                 select_sizes=(512, 1024), select_repeats=1)


# ---------------------------------------------------------------------------------------------------
# Worker side: run cases, print their results as JSON.
# ---------------------------------------------------------------------------------------------------

def build_model(case: dict) -> nn.Module:
    if case["arch"] == "mlp":
        torch.manual_seed(0)
        m = case["width"]
        return nn.Sequential(nn.Linear(m, m), nn.ReLU(), nn.Linear(m, 10)).eval()
    if case["arch"] == "wide":
        torch.manual_seed(0)
        m = case["width"]
        return nn.Sequential(nn.Linear(case["inputs"], m), nn.ReLU(), nn.Linear(m, m), nn.ReLU(),
                             nn.Linear(m, 10)).eval()
    if case["arch"] == "resnet50":
        import torchvision
        model = torchvision.models.resnet50(weights=None, num_classes=1000)
    else:
        model = getattr(models, case["arch"])()
    model.load_state_dict(torch.load(case["state"], weights_only=True))
    return model.eval()


def calibration(case: dict) -> list[torch.Tensor]:
    if case["arch"] in ("mlp", "wide"):
        d = case["inputs"] if case["arch"] == "wide" else case["width"]
        x = torch.randn(case["samples"], d, generator=torch.Generator().manual_seed(1))
    else:
        x = torch.load(case["data"], weights_only=True)[:case["samples"]]
    return list(x.split(BATCH))


def forward_pass(model: nn.Module, batches: list[torch.Tensor]) -> float:
    """Seconds of one plain forward pass over ``batches``: the floor."""
    start = time.perf_counter()
    with torch.no_grad():
        for x in batches:
            model(x)
    return time.perf_counter() - start


def prune_case(case: dict) -> dict:
    """Floor, prune time by stage and peak memory for one (model, order, samples)."""
    model, batches = build_model(case), calibration(case)
    forward_pass(model, batches)  # warm-up: first-call kernel setup, allocator
    before = memory_mib("VmRSS")
    reset = reset_peak()
    floor = min(forward_pass(model, batches) for _ in range(max(3, case["repeats"])))
    forward_peak = memory_mib("VmHWM")
    reset = reset_peak() and reset
    cfg = PruneConfig(order=case["order"], **case.get("prune", {}))
    runs = []
    load = os.getloadavg()[0]
    for _ in range(case["repeats"]):
        start, cpu = time.perf_counter(), time.process_time()
        report = prune_model(model, batches, example_input=batches[0][:1], cfg=cfg, progress=False).report
        # the pruned model is dropped here
        runs.append((time.perf_counter() - start, report["timings"], time.process_time() - cpu))
    total, timings, cpu = min(runs[1:] or runs, key=lambda r: r[0])
    return {"floor_s": floor, "total_s": total, "first_s": runs[0][0], "timings": timings, "cpu_s": cpu,
            "load": [load, os.getloadavg()[0]],
            "rss_before_mib": before, "peak_forward_mib": forward_peak,
            "peak_prune_mib": memory_mib("VmHWM"), "peak_reset": reset, "samples": report["samples"],
            "dof_samples": report.get("dof_samples"),
            "kept": {u["name"]: [u["width"], u["kept"]] for u in report["units"]}}


def latency_case(case: dict) -> dict:
    """FLOPs and eager / ONNX Runtime latency of a model and of its prunings at each round_to."""
    model, batches = build_model(case), calibration(case)
    example = batches[0][:1]
    variants = {"original": model}
    for r in case["round_to"]:
        variants[f"round_to {r}"] = prune_model(model, batches, example_input=example,
                                                cfg=PruneConfig(round_to=r), progress=False).model
    sizes = {name: {"flops": count_flops(m, example), "params": count_params(m)}
             for name, m in variants.items()}
    timed: dict[str, dict[str, dict[str, list[float]]]] = {n: {"eager": {}, "onnx": {}} for n in variants}
    with tempfile.TemporaryDirectory() as tmp:
        onnx = {name: export_model(m, example, Path(tmp) / name.replace(" ", "_"),
                                   ExportConfig(formats=("onnx",)))["onnx"]["path"]
                for name, m in variants.items()}
        for _ in range(case["rounds"]):
            for name, m in variants.items():
                runs = {"eager": measure_latency(m, example, case["batches"], case["repeats"]),
                        "onnx": measure_onnx_latency(onnx[name], example, case["batches"], case["repeats"],
                                                     threads=torch.get_num_threads())}
                for runtime, by_batch in runs.items():
                    for b, r in by_batch.items():
                        timed[name][runtime].setdefault(str(b), []).append(r["median_ms"])
    latency = {name: {rt: {b: statistics.median(v) for b, v in per.items()} for rt, per in by_rt.items()}
               for name, by_rt in timed.items()}
    return {"sizes": sizes, "latency_ms": latency}


def worker(cases: dict[str, dict]) -> dict[str, dict]:
    """Run ``cases`` (id -> case) in this process, in order; id -> result."""
    results = {}
    for case_id, case in cases.items():
        start = time.perf_counter()
        run = {"prune": prune_case, "latency": latency_case, "int8": int8_case,
               "select": select_case}[case["kind"]]
        results[case_id] = run(case)
        print(f"{case_id}: {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
    return results


# ---------------------------------------------------------------------------------------------------
# Parent side: models and data on disk, workers, tables.
# ---------------------------------------------------------------------------------------------------

def warm_batchnorm(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Set BatchNorm running statistics to the exact averages over ``x`` (a random-init model's are
    mean 0 / var 1, unlike a trained model's), then eval mode."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for b in x.split(BATCH):
            model(b)
    return model.eval()


def prepare(tmp: Path, s: Settings, weights: str, resnet50: bool = True) -> dict[str, dict]:
    """Write state dicts and calibration tensors for the workers; arch -> {"state", "data"} (resnet50's
    only when ``resnet50``: section C does not use it)."""
    xtr, _ = load_split("train")
    n = max(s.samples, *s.sample_counts)
    pick = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(0))[:n]
    torch.save(normalise(xtr[pick]), tmp / "fashion.pt")  # the first k rows are a random subset of k
    files = {}
    for name in REFERENCE:
        if weights == "trained":
            model, _ = reference_model(name)
        else:
            torch.manual_seed(0)
            model = warm_batchnorm(getattr(models, name)(), normalise(xtr[pick[:s.samples]]))
        torch.save(model.state_dict(), tmp / f"{name}.pt")
        files[name] = {"state": str(tmp / f"{name}.pt"), "data": str(tmp / "fashion.pt")}
    if not resnet50:
        return files
    import torchvision
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(s.resnet50_images, 3, s.resnet50_size, s.resnet50_size, generator=gen)
    big = warm_batchnorm(torchvision.models.resnet50(weights=None, num_classes=1000), images)
    torch.save(big.state_dict(), tmp / "resnet50.pt")
    torch.save(images, tmp / "resnet50_images.pt")
    files["resnet50"] = {"state": str(tmp / "resnet50.pt"), "data": str(tmp / "resnet50_images.pt")}
    return files


def int8_cases(files: dict, s: Settings) -> dict[str, dict]:
    """The cases of section C, ids ``int8/<arch>``."""
    return {f"int8/{arch}": {"kind": "int8", "arch": arch, "state": files[arch]["state"],
                             "samples": s.samples, "finetune_samples": s.finetune_samples,
                             "test_samples": s.test_samples, "batches": list(s.latency_batches),
                             "repeats": s.int8_repeats}
            for arch in REFERENCE}


def plan_cases(files: dict, s: Settings) -> dict[str, dict]:
    """Every measurement of a run, id -> case; ids ``prune/<arch>/<order>``, ``samples/<n>``,
    ``width/<m>``, ``latency/<arch>``, ``int8/<arch>``."""
    cases = {}
    for arch in (*REFERENCE, "resnet50"):
        big = arch == "resnet50"
        for order in ("sequential", "oneshot"):
            cases[f"prune/{arch}/{order}"] = {
                "kind": "prune", "arch": arch, **files[arch], "order": order,
                "samples": s.resnet50_images if big else s.samples,
                "repeats": s.resnet50_repeats if big else s.repeats}
    for n in s.sample_counts:
        if n != s.samples:  # that one is prune/<SCALING_MODEL>/sequential
            cases[f"samples/{n}"] = {**cases[f"prune/{SCALING_MODEL}/sequential"], "samples": n}
    for m in s.widths:
        cases[f"width/{m}"] = {"kind": "prune", "arch": "mlp", "width": m, "samples": s.width_samples,
                               "order": "sequential", "repeats": s.repeats,
                               "prune": {"allocation": "ratio", "ratio": 0.5}}
    for arch in REFERENCE:
        cases[f"latency/{arch}"] = {
            "kind": "latency", "arch": arch, **files[arch], "samples": s.samples,
            "round_to": list(s.round_to), "batches": list(s.latency_batches), "repeats": s.latency_repeats,
            "rounds": s.latency_rounds}
    return {**cases, **int8_cases(files, s)}


def run_cases(cases: dict[str, dict], isolate: bool, threads: int) -> dict[str, dict]:
    """Results of ``cases``: one fresh worker process per case, or (``isolate`` False) one for all."""
    groups = [[c] for c in cases] if isolate else [list(cases)]
    results: dict[str, dict] = {}
    for group in groups:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--threads", str(threads),
                               "--worker", json.dumps({c: cases[c] for c in group})],
                              stdout=subprocess.PIPE, text=True, check=False)  # stderr: progress, errors
        if proc.returncode != 0:
            sys.exit(f"the worker for {', '.join(group)} failed with exit code {proc.returncode}")
        results.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return results


def loglog_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares exponent a in y ~ x^a."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def tool_speed(results: dict[str, dict], s: Settings, isolate: bool) -> str:
    """Section A: prune time over the floor, stages, memory, growth with samples and width."""
    summary, stages = [], []
    for arch in (*REFERENCE, "resnet50"):
        seq, one = results[f"prune/{arch}/sequential"], results[f"prune/{arch}/oneshot"]
        shape = f"3x{s.resnet50_size}x{s.resnet50_size}" if arch == "resnet50" else "1x28x28"
        summary.append([arch, shape, seq["samples"], f"{seq['floor_s']:.2f}",
                        f"{seq['total_s']:.2f}", f"{seq['total_s'] / seq['floor_s']:.2f}",
                        f"{one['total_s']:.2f}", f"{one['total_s'] / one['floor_s']:.2f}",
                        f"{seq['total_s'] / one['total_s']:.2f}", f"{seq['first_s']:.2f}",
                        "yes" if seq["total_s"] < 2 * seq["floor_s"] else "no"])
        for order, r in (("sequential", seq), ("oneshot", one)):
            t, floor = r["timings"], r["floor_s"]
            stages.append([arch, order, r.get("dof_samples") or "-",
                           *(f"{t.get(k, 0.0) / floor:.2f}" for k in STAGES),
                           f"{(r['total_s'] - sum(t.values())) / floor:.2f}", f"{r['total_s'] / floor:.2f}",
                           mib(r["rss_before_mib"]), mib(r["peak_forward_mib"]), mib(r["peak_prune_mib"])])
    met = sum(row[-1] == "yes" for row in summary)
    reset = ("reset worked" if all(r.get("peak_reset", True) for r in results.values())
             else "RESET FAILED somewhere: those peaks count from the start of the process")

    growth = [results[f"prune/{SCALING_MODEL}/sequential" if n == s.samples else f"samples/{n}"]
              for n in s.sample_counts]
    growth_rows = [[r["samples"], f"{r['floor_s']:.2f}", f"{r['total_s']:.2f}",
                    f"{r['total_s'] / r['floor_s']:.2f}", r.get("dof_samples") or "-",
                    f"{r['timings']['statistics']:.2f}", f"{r['timings'].get('replay', 0.0):.2f}",
                    f"{r['timings']['selection']:.2f}", mib(r["peak_forward_mib"]), mib(r["peak_prune_mib"])]
                   for r in growth]
    n_exp = loglog_slope(s.sample_counts, [r["total_s"] for r in growth])
    floor_exp = loglog_slope(s.sample_counts, [r["floor_s"] for r in growth])

    width = [results[f"width/{m}"] for m in s.widths]
    width_rows = []
    for m, r in zip(s.widths, width):
        k = next(iter(r["kept"].values()))[1]  # the one unit: the first Linear
        sel = r["timings"]["selection"]
        width_rows.append([m, k, f"{r['floor_s'] * 1e3:.1f}", f"{r['timings']['statistics']:.3f}",
                           f"{sel:.3f}", f"{sel / (m * m * k) * 1e9:.2f}", mib(r["peak_prune_mib"])])
    m_exp = loglog_slope(s.widths, [r["timings"]["selection"] for r in width])

    if s.repeats == s.resnet50_repeats == 1:
        runs = "Prune time is one run."
    else:
        runs = (f"Prune time is the best of runs 2..R in the process (R = {s.repeats}; resnet50: "
                f"{s.resnet50_repeats}); the first run, which also pays one-off costs (lazy imports, first "
                "calls), is shown apart.")
    process = ("Every case runs in a fresh process." if isolate else
               "All cases share one process (`--quick`): first runs are not cold, and RSS before a case "
               "includes what earlier cases left.")
    return "\n".join([
        "### (A) Speed of the tool", "",
        "Seconds of `prune_model` (no fine-tuning) with the default config (50% of FLOPs, `dof` allocation) "
        "against the floor: one plain forward pass (eval, `torch.no_grad`, batches of "
        f"{BATCH}) over the same calibration images on the same model, in the same process, after a "
        f"warm-up pass (best of {max(3, s.repeats)}). {runs} {process}", "",
        format_table(["model", "input", "images", "floor (s)", "sequential (s)", "x floor", "oneshot (s)",
                      "x floor", "sequential / oneshot", "sequential, first run (s)",
                      "sequential < 2x floor"], summary), "",
        f"Target (sequential under 2x the floor): met on {met} of {len(summary)} models.", "",
        "Stages in multiples of the floor (`report[\"timings\"]`; *other* is the rest of the call). "
        "*statistics* is the one-shot pass: in sequential order only the prefix of the calibration set "
        "that the `dof` widths need (*dof samples*: until every unit has `prune.dof_rows` = 1 row per "
        "channel, and 64 samples), in oneshot order every batch. *replay* is the sequential pass over "
        "the network (each layer once, its values sliced after each surgery), *selection* the greedy "
        "selection and the fold. Memory: "
        "RSS once the model and data are loaded, and the peak RSS (VmHWM, reset just before; "
        f"{reset}) during the floor's passes and during pruning. Not ru_maxrss, which a subprocess "
        "inherits from its parent at exec; not tracemalloc, which does not see torch's tensor storage.", "",
        format_table(["model", "order", "dof samples", *STAGES, "other", "total", "RSS after setup (MiB)",
                      "peak, forward (MiB)", "peak, pruning (MiB)"], stages), "",
        f"Growth with the number of calibration images ({SCALING_MODEL}, sequential):", "",
        format_table(["images", "floor (s)", "prune (s)", "x floor", "dof samples", "statistics (s)",
                      "replay (s)", "selection (s)",
                      "peak, forward (MiB)", "peak, pruning (MiB)"], growth_rows), "",
        f"Least-squares exponents: prune time ~ n^{n_exp:.2f}, floor ~ n^{floor_exp:.2f}.", "",
        f"Growth with layer width: Linear(m, m) -> ReLU -> Linear(m, 10) on {s.width_samples} random inputs, "
        "`allocation: ratio` 0.5, so the first Linear keeps k = m/2 and greedy selection costs O(m^2 k):", "",
        format_table(["m", "k", "floor (ms)", "statistics (s)", "selection (s)", "selection / (m^2 k) (ns)",
                      "peak, pruning (MiB)"], width_rows), "",
        f"Least-squares exponent: selection ~ m^{m_exp:.2f} (m^2 k with k = m/2 predicts 3).",
    ])


def result_speed(results: dict[str, dict], s: Settings) -> str:
    """Section B: measured latency speed-up over the FLOPs ratio, per runtime, batch and round_to."""
    variants = [f"round_to {r}" for r in s.round_to]
    size_rows, latency_rows = [], []
    for arch in REFERENCE:
        sizes, lat = results[f"latency/{arch}"]["sizes"], results[f"latency/{arch}"]["latency_ms"]
        base = sizes["original"]["flops"]
        for name in ("original", *variants):
            size_rows.append([arch, name, f"{sizes[name]['flops'] / 1e6:.1f}", f"{sizes[name]['params']:,}",
                              f"{base / sizes[name]['flops']:.2f}"])
        for runtime, label in (("eager", "torch eager"), ("onnx", "onnxruntime")):
            for b in s.latency_batches:
                orig = lat["original"][runtime][str(b)]
                row = [arch, label, b, f"{orig:.3f}"]
                for name in variants:
                    ms = lat[name][runtime][str(b)]
                    speedup = orig / ms
                    row += [f"{ms:.3f}", f"{speedup:.2f}", f"{speedup * sizes[name]['flops'] / base:.0%}"]
                latency_rows.append(row)
    return "\n".join([
        "### (B) Speed of the result", "",
        "The reference models pruned to 50% of FLOPs (sequential, `dof`) at each `round_to`. FLOPs ratio = "
        "original / pruned FLOPs, the theoretical speed-up:", "",
        format_table(["model", "variant", "MFLOPs (1 image)", "params", "FLOPs ratio"], size_rows), "",
        "CPU latency: `specprune_cli.latency.measure_latency` (torch eager, `inference_mode`) and "
        "`measure_onnx_latency` (ONNX Runtime CPUExecutionProvider with as many intra-op threads as "
        f"torch ({torch.get_num_threads()}), files from "
        f"`export_model`): medians of {s.latency_repeats} passes after warm-up, freed memory kept mapped. "
        f"The variants are measured in turn, {s.latency_rounds} round(s); the median over rounds is shown. "
        "Speed-up = original / pruned latency; share = speed-up / FLOPs ratio, how much of the theoretical "
        "speed-up is real.", "",
        format_table(["model", "runtime", "batch", "original (ms)",
                      *(h for v in variants for h in (f"{v} (ms)", "speed-up", "share"))], latency_rows),
    ])


def header(args: argparse.Namespace, load_start: float, title: str = "Speed", resnet50: bool = True,
           fashion: bool = True) -> str:
    import onnxruntime
    import torchvision
    command = shlex.join(["python", "scripts/bench_speed.py", *sys.argv[1:]])
    weights = ("trained reference models (scripts/fashion_common.py)" if args.weights == "trained" else
               "random initialisation, BatchNorm statistics warmed on the calibration images")
    lines = [
        f"## {title} (`scripts/bench_speed.py`)", "",
        f"Produced by `{command}` on {date.today().isoformat()}: {cpu_name()}, {os.cpu_count()} cores, "
        f"torch threads: {torch.get_num_threads()}, torch {torch.__version__}, torchvision "
        f"{torchvision.__version__}, onnxruntime {onnxruntime.__version__}, Python "
        f"{platform.python_version()}; load average {load_start:.1f} at the start and "
        f"{os.getloadavg()[0]:.1f} at the end."
        + (f" Fashion-MNIST models: {weights}" if fashion else "")
        + ("; resnet50: random weights, BatchNorm warmed" if resnet50 else "")
        + (". " if fashion or resnet50 else " ")
        + "Cores may be shared with other work: treat single numbers as rough.",
    ]
    if args.quick:
        lines += ["", "**Quick run (`--quick`): small sizes, one repeat, one process. A smoke test, not a "
                  "result.**"]
    return "\n".join(lines)


def main() -> None:
    keep_freed_memory_mapped()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, one repeat, one process: a smoke run")
    ap.add_argument("--weights", choices=("trained", "random"), default=None,
                    help="reference model weights (default: trained; random with --quick)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch threads (default: torch's, %(default)s here); on a busy machine, 1 avoids "
                    "threads waiting for each other's time slices")
    ap.add_argument("--int8-only", action="store_true",
                    help="only section C (pruning with int8; needs trained weights) and its section of --out")
    ap.add_argument("--width-only", action="store_true",
                    help="only section D (units 8,192 wide: pruning memory and time, selection at m = 4096 "
                    "and 8192) and its section of --out")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run JSON cases, print JSON results
    args = ap.parse_args()
    if args.int8_only and args.width_only:
        ap.error("--int8-only and --width-only each run one section: give one of them")
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    args.weights = args.weights or ("random" if args.quick else "trained")
    settings = QUICK if args.quick else FULL
    load_start = os.getloadavg()[0]
    if args.threads > 1 and load_start + args.threads > (os.cpu_count() or 1) + 0.5:
        print(f"warning: load average {load_start:.1f} on {os.cpu_count()} cores; with {args.threads} "
              "threads torch waits for busy cores and eager timings can be many times too slow "
              "(--threads 1 avoids it)", file=sys.stderr)
    wide = width_cases(settings.wide_width, settings.wide_inputs, settings.wide_samples,
                       settings.select_sizes, settings.select_repeats)
    with tempfile.TemporaryDirectory(prefix="bench_speed-") as tmp:
        if args.width_only:
            cases = wide
        else:
            files = prepare(Path(tmp), settings, args.weights, resnet50=not args.int8_only)
            cases = int8_cases(files, settings) if args.int8_only else {**plan_cases(files, settings), **wide}
        results = run_cases(cases, isolate=not args.quick, threads=args.threads)
    if not args.width_only:
        int8 = "\n\n".join([header(args, load_start, "Speed with int8", resnet50=False),
                             int8_report({arch: results[f"int8/{arch}"] for arch in REFERENCE},
                                         "### (C) Pruning and int8 together (issue 15)")])
        write_section(args.out, "bench_speed_int8", int8)
    if not (args.int8_only or args.width_only):
        body = "\n\n".join([header(args, load_start), tool_speed(results, settings, isolate=not args.quick),
                            result_speed(results, settings)])
        write_section(args.out, "bench_speed", body)
        print(body)
    if not args.width_only:
        print(int8)
    if not args.int8_only:
        width = "\n\n".join([header(args, load_start, "Speed at width", resnet50=False, fashion=False),
                              width_section(results, settings.wide_width, settings.wide_inputs,
                                            args.threads)])
        write_section(args.out, "bench_speed_width", width)
        print(width)


if __name__ == "__main__":
    main()
