"""The int8 rows of scripts/bench_speed.py and scripts/bench_quality.py (issue 15): pruning and ONNX
Runtime static int8 together.

For each reference model, six ONNX files: the original in float32 and in int8, and specprune's default
pruning at 50% and 30% of FLOPs, each after the same 1-epoch distillation as scripts/bench_quality.py
(``bench_quality.finetuned``: KL at T=4 on 5,000 unlabelled training images), in float32 and int8.
Every file is written by ``specprune_cli.export.export_model`` (formats onnx and onnx-int8, so the int8
file is exactly what ``compress`` writes: QDQ, per-channel weights, minmax calibration on the first 256
of the 1,024 calibration images). Accuracy is ONNX Runtime's on the full 10,000-image test split;
latency is ``specprune_cli.latency.time_onnx_models``: the six files timed in the same interleaved
rounds (order reversed every other round, warm-up first, freed memory kept mapped), medians over rounds,
and speed-up = the median of the per-round ratios to the original float32, with their interquartile
range over the median as its spread.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_common import format_table
from fashion_common import normalise
from specprune_cli import models, prune_model
from specprune_cli.config import ExportConfig, PruneConfig
from specprune_cli.export import export_model
from specprune_cli.flops import count_flops
from specprune_cli.latency import keep_memory_mapped, time_onnx_models

BUDGETS = (0.5, 0.3)
EXAMPLE = torch.zeros(1, 1, 28, 28)
TARGET_SPEEDUP = 3.0   # pruned 50% + int8 against the original float32, batch 64
TARGET_DROP = 1.0      # accuracy points below the original float32


def _onnx_accuracy(path: Path, x: torch.Tensor, y: torch.Tensor, threads: int, batch: int = 500) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    correct = 0
    for i in range(0, len(x), batch):
        logits = session.run(None, {name: normalise(x[i:i + batch]).numpy()})[0]
        correct += int((np.argmax(logits, 1) == y[i:i + batch].numpy()).sum())
    return correct / len(x)


def int8_case(case: dict) -> dict:
    """bench_speed's worker case ``int8/<arch>``: the reference model and data it names, then
    ``int8_variants``."""
    from bench_quality import load_data

    model = getattr(models, case["arch"])()
    model.load_state_dict(torch.load(case["state"], weights_only=True))
    data = load_data(case["samples"], case["finetune_samples"], 0, case.get("test_samples"))
    return int8_variants(model.eval(), data, case["batches"], case["repeats"])


def int8_variants(model: torch.nn.Module, data, batches: list[int], repeats: int) -> dict:
    """Accuracy, size, FLOPs and ORT latency of the six files of one reference model.

    Args:
        model: the trained reference model (eval mode).
        data: ``bench_quality.Data``: its calibration images prune and calibrate int8, its fine-tuning
            images distil, its test split scores.
        batches, repeats: batch sizes timed, and interleaved rounds per batch size.

    Returns:
        ``variants`` (name -> flops, bytes, accuracy, prune_and_finetune_s), ``latency_ms`` (batch ->
        name -> ms per round), the image counts, and ``threads`` and ``repeats`` as timed.
    """
    from bench_quality import finetuned

    keep_memory_mapped()
    threads = torch.get_num_threads()
    calib = [data.calib_x[i:i + 64] for i in range(0, len(data.calib_x), 64)]
    variants = {"original": model}
    seconds = {}
    for budget in BUDGETS:
        start = time.perf_counter()
        pruned = prune_model(model, calib, example_input=EXAMPLE, cfg=PruneConfig(target={"flops": budget}),
                             progress=False).model
        variants[f"pruned {budget:.0%}"] = finetuned(pruned, model, data, progress=False)
        seconds[f"pruned {budget:.0%}"] = time.perf_counter() - start
    files = {}
    out = {"variants": {}, "test_images": len(data.test_x), "finetune_images": len(data.finetune_x),
           "int8_calibration": min(ExportConfig().int8.num_samples, len(data.calib_x)),
           "threads": threads, "repeats": repeats}
    with tempfile.TemporaryDirectory(prefix="int8_bench-") as tmp:
        for name, m in variants.items():
            written = export_model(m, EXAMPLE, Path(tmp) / name.replace(" ", "_").replace("%", ""),
                                   ExportConfig(formats=("onnx", "onnx-int8")), calibration=calib)
            for fmt, precision in (("onnx", "fp32"), ("onnx-int8", "int8")):
                key = f"{name} {precision}"
                files[key] = Path(written[fmt]["path"])
                out["variants"][key] = {
                    "flops": count_flops(m, EXAMPLE), "bytes": written[fmt]["bytes"],
                    "accuracy": _onnx_accuracy(files[key], data.test_x, data.test_y, threads),
                    "prune_and_finetune_s": seconds.get(name)}
        timed = time_onnx_models(files, EXAMPLE, batches, repeats, threads=threads)
    out["latency_ms"] = {str(b): t for b, t in timed.items()}
    return out


def _ratio(original: list[float], other: list[float]) -> tuple[float, float]:
    """Median of the per-round ratios original / other, and their interquartile range over it (nan below
    three rounds)."""
    ratios = [o / p for o, p in zip(original, other)]
    median = statistics.median(ratios)
    if len(ratios) < 3:
        return median, float("nan")
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return median, (q3 - q1) / median


def target_verdict(arch: str, result: dict) -> str:
    """One line: does pruned 50% + int8 meet the target against the original float32, at the largest
    batch timed (the target names 64; a quick run times less)?"""
    top = max(result["latency_ms"], key=int)
    times = result["latency_ms"][top]
    speedup, spread = _ratio(times["original fp32"], times["pruned 50% int8"])
    # Rounded as shown: accuracies on 10,000 images step by 0.01 points, and the float difference of two
    # of them can land a hair above the target where the points shown equal it.
    drop = round(100 * (result["variants"]["original fp32"]["accuracy"]
                        - result["variants"]["pruned 50% int8"]["accuracy"]), 2)
    short = [what for what, bad in (("speed", speedup < TARGET_SPEEDUP), ("accuracy", drop > TARGET_DROP))
             if bad]
    return (f"- {arch}: pruned 50% + int8 runs {speedup:.2f}x (spread {spread:.2f}) as fast as the original "
            f"float32 at batch {top}, accuracy {-drop:+.2f} points against it: "
            + (f"missed ({' and '.join(short)})" if short else "met"))


def int8_report(results: dict[str, dict], heading: str,
                distillation: str = "the same 1-epoch distillation as bench_quality") -> str:
    """The Markdown section: one table row per (model, variant), then the target, met or missed.

    Args:
        results: model name -> ``int8_variants``'s result, in table order.
        heading: the section's heading line.
        distillation: which fine-tune the pruned variants had, as the prose names it.
    """
    rows = []
    first = next(iter(results.values()))
    batches = sorted(map(int, first["latency_ms"]))
    for arch, r in results.items():
        base = r["variants"]["original fp32"]
        for name, v in r["variants"].items():
            row = [arch, name, f"{v['flops'] / 1e6:.1f}", f"{v['bytes'] / 1024:.0f}",
                   f"{100 * v['accuracy']:.2f}", f"{100 * (v['accuracy'] - base['accuracy']):+.2f}"]
            for b in batches:
                times = r["latency_ms"][str(b)]
                speedup, spread = _ratio(times["original fp32"], times[name])
                row += [f"{statistics.median(times[name]):.3f}", f"{speedup:.2f} ± {spread:.2f}"]
            rows.append(row)
    headers = ["model", "variant", "MFLOPs", "file (KiB)", "accuracy (%)", "vs original (pts)"]
    for b in batches:
        headers += [f"ORT ms @ {b}", f"speed-up @ {b}"]
    return "\n".join([
        heading, "",
        "Each reference model as six ONNX files: the original in float32 and int8, and specprune's default "
        f"pruning at 50% and 30% of FLOPs after {distillation} (KL at T=4 "
        f"on {first['finetune_images']:,} unlabelled training images), in float32 and int8. The int8 files "
        "are what `compress` writes for `onnx-int8` (ONNX Runtime static quantization, QDQ, per-channel "
        f"weights, minmax calibration on the first {first['int8_calibration']} calibration images). "
        f"Accuracy: ONNX Runtime on {first['test_images']:,} test images. Latency: ONNX Runtime, "
        f"{first['threads']} intra-op thread(s), the six files in the same "
        f"{first['repeats']} interleaved rounds after warm-up; median ms, and the speed-up over the original "
        "float32 as the median of the per-round ratios ± their interquartile range over that median.", "",
        format_table(headers, rows), "",
        f"Target: pruned 50% + int8 at least {TARGET_SPEEDUP:g}x faster than the original float32 at batch "
        f"64 (here: {max(batches)}), and within {TARGET_DROP:g} point of its accuracy:", "",
        *(target_verdict(arch, r) for arch, r in results.items()),
    ])
