"""``compress`` as a library call: checkpoint -> checks -> calibration -> prune -> outputs.

The CLI is a thin wrapper around :func:`compress`; a user can run the same steps from Python.
Outputs are written into ``OUTDIR.tmp-<pid>`` beside OUTDIR and renamed into place only when every
step succeeded, so a failed run leaves OUTDIR absent (or, with ``overwrite``, as it was).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from specprune_cli import __version__
from specprune_cli.checkpoint import load_checkpoint, load_pruned, save_pruned
from specprune_cli.config import Config, dump_resolved
from specprune_cli.data import build_loader
from specprune_cli.errors import ConfigError, ExportError, GateError, ModelError
from specprune_cli.evaluate import evaluate_model, measure_latency, measure_onnx_latency
from specprune_cli.export import export_model
from specprune_cli.finetune import distillation_loss, finetune
from specprune_cli.surgery import verify_forward

Log = Callable[[str], None]
REPORT_FORMAT = "specprune-report/1"
OUTPUT_FILES = ("model.pt", "report.json", "config.resolved.yaml")



def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


# Settings the schema accepts whose behaviour this version does not have yet: refused, never ignored.
# (key, is the setting in use?, the value that works today)
_NOT_BUILT: tuple[tuple[str, Callable[[Config], bool], str], ...] = (
    ("prune.allocation: loss", lambda c: c.prune.allocation == "loss", "dof, uniform or ratio"),
    ("prune.target_signal: pruned", lambda c: c.prune.target_signal == "pruned", "original"),
    ("prune.intercept: true", lambda c: c.prune.intercept, "false"),
    ("model.forward_kwargs", lambda c: bool(c.model.forward_kwargs), "{}"),
    ("export.formats: onnx-int8", lambda c: "onnx-int8" in c.export.formats, "pt, onnx, torchscript, module"),
    ("runtime.device: cuda", lambda c: c.runtime.device == "cuda", "auto or cpu"),
)


def refuse_unbuilt(config: Config) -> None:
    """Refuse a setting this version accepts in the config but cannot honour yet.

    Raises:
        ConfigError: naming the setting and what works instead.
    """
    for key, used, instead in _NOT_BUILT:
        if used(config):
            raise ConfigError(f"{key} is not available in specprune {__version__} yet; use {instead}")


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse to clobber results: OUTDIR may be absent or empty; non-empty needs ``overwrite``.

    Raises:
        ConfigError: OUTDIR is a file, or a non-empty directory without ``overwrite``.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"--output {output_dir} is a file, not a directory; choose another path")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ConfigError(f"--output {output_dir} already exists and is not empty; pass --overwrite to "
                          "replace it, or choose another directory")


def check_input_shape(model: nn.Module, input_shape: tuple[int, ...]) -> torch.Size:
    """Run the model once on zeros of ``(1, *input_shape)``; return the output shape.

    Raises:
        ModelError: the forward pass fails (the model's exception is quoted) or returns no tensor.
    """
    example = torch.zeros(1, *input_shape)
    try:
        with torch.no_grad():
            out = model(example)
    except Exception as exc:  # the user's forward can raise anything; quote it
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelError(f"model.input_shape {list(input_shape)} does not fit the model: a forward pass on "
                         f"zeros of shape {tuple(example.shape)} failed ({type(exc).__name__}: {reason}); "
                         "set model.input_shape to the shape of one sample the model was trained on "
                         "(channels first, without the batch dimension)") from exc
    if not isinstance(out, torch.Tensor):
        raise ModelError(f"the model returns {type(out).__name__}, not a tensor; specprune prunes models "
                         "whose forward returns one tensor (wrap the model to select the output)")
    return out.shape


def check_gates(evaluation: dict | None, *, max_accuracy_drop: float | None,
                min_agreement: float | None) -> list[dict]:
    """Compare an evaluation with the CI gates.

    Args:
        evaluation: needs ``accuracy_before`` and ``accuracy_after`` (fractions) for the accuracy gate
            and ``agreement`` (fraction of top-1 equal to the original's) for the agreement gate.
        max_accuracy_drop: largest allowed drop in percentage points, or None.
        min_agreement: smallest allowed agreement in [0, 1], or None.

    Returns:
        One entry per requested gate: name, limit, value, passed.
    """
    gates = []
    evaluation = evaluation or {}
    if max_accuracy_drop is not None:
        before, after = evaluation.get("accuracy_before"), evaluation.get("accuracy_after")
        if before is None or after is None:
            raise ConfigError("--max-accuracy-drop needs accuracy before and after pruning: set data.eval to "
                              "a labelled dataset")
        drop = 100.0 * (before - after)
        gates.append({"name": "max_accuracy_drop", "limit": max_accuracy_drop, "value": round(drop, 4),
                      "passed": drop <= max_accuracy_drop})
    if min_agreement is not None:
        agreement = evaluation.get("agreement")
        if agreement is None:
            raise ConfigError("--min-agreement needs an evaluation of the pruned model against the original")
        gates.append({"name": "min_agreement", "limit": min_agreement, "value": round(agreement, 6),
                      "passed": agreement >= min_agreement})
    return gates


def _prune(model: nn.Module, loader: Any, *, example_input: torch.Tensor, cfg: Any, progress: bool) -> Any:
    """The core run (``specprune_cli.prune.prune_model``); a seam tests replace with a fast fake."""
    from specprune_cli.prune import prune_model

    return prune_model(model, loader, example_input=example_input, cfg=cfg, progress=progress)


def _verify_saved(path: Path, model: nn.Module, example: torch.Tensor) -> None:
    """model.pt must rebuild from arch + plan and reproduce the in-memory pruned model."""
    loaded = load_pruned(path)
    with torch.no_grad():
        want, got = model(example), loaded(example)
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-5 * max(1.0, want.abs().max().item())):
        raise ExportError(f"{path.name} does not reproduce the pruned model when loaded back (max abs "
                          f"difference {(got - want).abs().max().item():.3g}); this is a bug in specprune: "
                          "please report it with the model architecture")


def _with_formats(settings: Any, formats: list[str]) -> Any:
    import dataclasses

    return dataclasses.replace(settings, formats=tuple(formats))


def _latency(original: nn.Module, pruned: nn.Module, example: torch.Tensor, tmp: Path, config: Config,
             log: Log) -> dict:
    """Median CPU latency (ms) of both models, torch eager and, when ONNX is exported, onnxruntime.

    The original is exported to ONNX in a scratch directory only to be timed; it is not an output.
    """
    sizes, repeats = list(config.evaluate.latency_batch_sizes), config.evaluate.latency_repeats
    log(f"timing latency at batch sizes {sizes} ({repeats} runs each, medians)")
    out: dict[str, Any] = {"batch_sizes": sizes, "repeats": repeats, "threads": torch.get_num_threads(),
                           "torch": {"original": _medians(measure_latency(original, example, sizes, repeats)),
                                     "pruned": _medians(measure_latency(pruned, example, sizes, repeats))}}
    if (tmp / "model.onnx").is_file():
        scratch = tmp.with_name(tmp.name + "-onnx-original")
        try:
            export_model(original, example, scratch, _with_formats(config.export, ["onnx"]))
            out["onnxruntime"] = {
                "original": _medians(measure_onnx_latency(str(scratch / "model.onnx"), example, sizes, repeats)),
                "pruned": _medians(measure_onnx_latency(str(tmp / "model.onnx"), example, sizes, repeats))}
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return out


def _medians(result: dict) -> dict:
    return {str(b): round(v["median_ms"], 4) for b, v in result.items()}


@contextlib.contextmanager
def staged_output(output_dir: Path) -> Iterator[Path]:
    """A temporary folder beside ``output_dir`` that replaces it when the block succeeds.

    On any error (or interrupt) the temporary folder is removed and ``output_dir`` is left as it was.
    """
    tmp = output_dir.with_name(f"{output_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a killed run with our pid: nothing in it is ours to keep
    try:
        tmp.mkdir(parents=True)
        yield tmp
        _commit(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _commit(tmp: Path, output_dir: Path) -> None:
    """Move the finished temp dir into place; an old OUTDIR (allowed by overwrite) goes only after."""
    old = None
    if output_dir.exists():
        old = output_dir.with_name(f"{output_dir.name}.old-{os.getpid()}")
        os.replace(output_dir, old)
    try:
        os.replace(tmp, output_dir)
    except OSError:
        if old is not None:
            os.replace(old, output_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def compress(config: Config, checkpoint_path: str | os.PathLike, output_dir: str | os.PathLike, *,
             trust_checkpoint: bool = False, overwrite: bool = False, progress: bool = True,
             max_accuracy_drop: float | None = None, min_agreement: float | None = None,
             log: Log | None = None) -> dict:
    """Prune a trained checkpoint and write model.pt, report.json and config.resolved.yaml to OUTDIR.

    Args:
        config: the validated config (``config.load_config``).
        checkpoint_path: the trained model (a state_dict, or a pickled module with ``trust_checkpoint``).
        output_dir: OUTDIR; must be absent or empty unless ``overwrite``.
        trust_checkpoint: allow unpickling arbitrary objects from the checkpoint.
        overwrite: replace a non-empty OUTDIR (only once the new results are complete).
        progress: tqdm bars on stderr.
        max_accuracy_drop: gate, percentage points; a failed gate still writes the outputs.
        min_agreement: gate, fraction of top-1 predictions equal to the original's.
        log: receives progress lines and warnings (prefixed "warning: "); default prints to stderr.

    Returns:
        The report (also written as report.json).

    Raises:
        ConfigError: bad output dir, missing data.calibration or model.arch, gates not checkable.
        CheckpointError, ModelError, DataError, BudgetError, ExportError: the run failed; OUTDIR untouched.
        GateError: a gate failed; the outputs were written.
    """
    log = log or _stderr
    started = time.perf_counter()
    output_dir = Path(output_dir)
    refuse_unbuilt(config)
    check_output_dir(output_dir, overwrite)
    if config.data.calibration is None:
        raise ConfigError("data.calibration is not set; specprune needs calibration data to measure the "
                          "layers: set data.calibration.format (npz, imagefolder, torchvision, idx or "
                          "synthetic) and data.calibration.path")
    if max_accuracy_drop is not None and (config.data.eval is None or config.data.eval.format == "synthetic"):
        raise ConfigError("--max-accuracy-drop needs accuracy before and after pruning: set data.eval to a "
                          "labelled dataset")
    input_shape = tuple(config.model.input_shape)

    log(f"loading checkpoint {checkpoint_path}")
    original = load_checkpoint(checkpoint_path, arch=config.model.arch, kwargs=config.model.kwargs,
                               trust=trust_checkpoint)
    check_input_shape(original, input_shape)
    example = torch.zeros(1, *input_shape)
    calibration = build_loader(config.data.calibration, input_shape, where="calibration", log=log)
    log(f"pruning with {calibration.num_samples} calibration samples "
        f"(target {config.prune.target_kind} {config.prune.target_value:g})")
    result = _prune(original, calibration, example_input=example, cfg=config.prune, progress=progress)
    pruned = result.model

    # Without data.eval the calibration loader is reused (same samples, warnings already shown).
    eval_loader = calibration if config.data.eval is None else build_loader(config.data.eval, input_shape,
                                                                            where="eval", log=log)
    max_eval = config.evaluate.max_eval_samples
    log(f"evaluating on {eval_loader.num_samples} samples" + ("" if config.data.eval else " (the calibration data)"))
    after_pruning = evaluate_model(pruned, original, eval_loader, max_samples=max_eval)
    finetune_report = None
    final = after_pruning
    if config.finetune.epochs > 0:
        quiet = (lambda _m: None) if config.data.finetune is None else log  # calibration warnings shown once
        ft_loader = build_loader(config.data.finetune_data(), input_shape, shuffle=True, where="finetune", log=quiet)
        kd_before = distillation_loss(pruned, original, eval_loader, config.finetune.temperature)
        log(f"fine-tuning for {config.finetune.epochs} epoch(s) on {ft_loader.num_samples} samples")
        finetune_report = finetune(pruned, original, ft_loader, config.finetune, progress=progress, log=log)
        finetune_report["distillation_loss_before"] = kd_before
        finetune_report["distillation_loss_after"] = distillation_loss(pruned, original, eval_loader,
                                                                      config.finetune.temperature)
        final = evaluate_model(pruned, original, eval_loader, max_samples=max_eval)
        verify_forward(pruned, example, check_input_shape(original, input_shape))
    evaluation = {
        "samples": final["samples"], "labelled": final["labelled_samples"] > 0,
        "accuracy_before": final["reference_top1"], "top5_before": final["reference_top5"],
        "accuracy_after_pruning": after_pruning["top1"], "agreement_after_pruning": after_pruning["agreement"],
        "relative_error_after_pruning": after_pruning["relative_error"],
        "accuracy_after": final["top1"], "top5_after": final["top5"], "agreement": final["agreement"],
        "relative_error": final["relative_error"], "finetuned": finetune_report is not None,
    }

    with staged_output(output_dir) as tmp:
        save_pruned(tmp / "model.pt", pruned, result.plan, arch=config.model.arch, kwargs=config.model.kwargs,
                    input_shape=input_shape)
        if config.model.arch is not None:
            _verify_saved(tmp / "model.pt", pruned, example)
        else:
            log("warning: model.arch is not set (the checkpoint was a pickled module), so model.pt cannot be "
                "rebuilt with load_pruned; export formats: [module] to get a loadable file")
        exports = {"pt": {"path": "model.pt", "bytes": (tmp / "model.pt").stat().st_size, "verified": True}}
        others = [f for f in config.export.formats if f != "pt"]
        if others:
            log(f"exporting {', '.join(others)} (each loaded back and compared)")
            for fmt, info in export_model(pruned, example, tmp, _with_formats(config.export, others)).items():
                exports[fmt] = {**info, "path": Path(info["path"]).name}
        latency = _latency(original, pruned, example, tmp, config, log) if config.evaluate.latency else None
        gates = check_gates(evaluation, max_accuracy_drop=max_accuracy_drop, min_agreement=min_agreement)
        report = {
            "format": REPORT_FORMAT,
            "specprune_version": __version__,
            "checkpoint": str(checkpoint_path),
            "output_dir": str(output_dir),
            "input_shape": list(input_shape),
            "target": {config.prune.target_kind: config.prune.target_value},
            "calibration_samples": calibration.num_samples,
            "checkpoint_bytes": Path(checkpoint_path).stat().st_size,
            "prune": result.report,
            "plan": result.plan,
            "finetune": finetune_report,
            "evaluation": evaluation,
            "latency": latency,
            "exports": exports,
            "gates": gates,
            "seconds": round(time.perf_counter() - started, 3),
        }
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        dump_resolved(config, tmp / "config.resolved.yaml")
    failed = [g for g in gates if not g["passed"]]
    if failed:
        detail = "; ".join(f"{g['name']} {g['value']:g} vs limit {g['limit']:g}" for g in failed)
        raise GateError(f"quality gate failed: {detail}; the outputs were written to {output_dir} for "
                        "inspection")
    return report


def summary_table(report: dict) -> str:
    """Params and FLOPs before/after, then each unit's width, as plain text."""
    from specprune_cli.report import format_table, human

    p = report["prune"]
    rows = []
    for name, key in (("params", "params"), ("FLOPs", "flops")):
        before, after = p[f"{key}_before"], p[f"{key}_after"]
        rows.append([name, human(before), human(after), f"{after / before:.3f}" if before else "-"])
    ev = report.get("evaluation") or {}
    if ev.get("accuracy_before") is not None:
        rows.append(["top-1 accuracy", f"{100 * ev['accuracy_before']:.2f}%", f"{100 * ev['accuracy_after']:.2f}%",
                     f"{100 * (ev['accuracy_after'] - ev['accuracy_before']):+.2f} pts"])
        if ev.get("finetuned"):
            rows.append(["  (before fine-tune)", "", f"{100 * ev['accuracy_after_pruning']:.2f}%", ""])
    if ev:
        rows.append(["top-1 agreement", "", f"{100 * ev['agreement']:.2f}%", ""])
        rows.append(["output rel. error", "", f"{ev['relative_error']:.4f}", ""])
    before_size = report.get("checkpoint_bytes")
    for fmt, info in (report.get("exports") or {}).items():
        rows.append([f"file {info.get('path', fmt)}", human(before_size) + "B" if before_size and fmt == "pt" else "",
                     human(info["bytes"]) + "B", ""])
    lat = report.get("latency") or {}
    for runtime in ("torch", "onnxruntime"):
        for b in (lat.get(runtime) or {}).get("original", {}):
            o, q = lat[runtime]["original"][b], lat[runtime]["pruned"][b]
            rows.append([f"{runtime} ms @ batch {b}", f"{o:.3f}", f"{q:.3f}", f"{o / q:.2f}x faster" if q else "-"])
    text = [format_table(["", "before", "after", "kept"], rows), ""]
    units = p.get("units", [])
    if units:
        text.append(format_table(["unit", "kind", "width", "kept", "dof"],
                                 [[u["name"], u.get("kind", ""), u["width"], u["kept"], u.get("dof", "")]
                                  for u in units]))
    skipped = p.get("skipped", [])
    if skipped:
        text += ["", "not pruned:"] + [f"  {s['name']}: {s['reason']}" for s in skipped]
    files = list(OUTPUT_FILES) + [i["path"] for f, i in (report.get("exports") or {}).items() if f != "pt"]
    text += ["", f"wrote {', '.join(files)} to {report['output_dir']}"]
    return "\n".join(text)


def analyze(config: Config, checkpoint_path: str | os.PathLike, output_dir: str | os.PathLike | None = None, *,
            ridges: tuple[float, ...] = (1e-4, 1e-3, 1e-2), prunability_tolerance: float | None = None,
            trust_checkpoint: bool = False, overwrite: bool = False, progress: bool = True,
            log: Log | None = None) -> dict:
    """Measure how compressible a checkpoint is, without changing it (``specprune analyze``).

    Args:
        config: the validated config; ``prune.*`` decides the suggested widths, ``data.calibration`` the data.
        checkpoint_path: the trained model.
        output_dir: if given, analysis.json, spectrum.png and dof.png are written there (atomically).
        ridges: grid of relative ridges for N(lambda).
        prunability_tolerance: if given, also bisect the smallest uniform keep fraction within it.
        trust_checkpoint, overwrite, progress, log: as for :func:`compress`.

    Returns:
        The analysis (see ``specprune_cli.analyze.analyze_model``), plus ``prunability`` and ``plots``.
    """
    from specprune_cli.analyze import analyze_model, prunability
    from specprune_cli.report import PLOT_HINT, plot_dof, plot_spectrum

    log = log or _stderr
    refuse_unbuilt(config)
    out = Path(output_dir) if output_dir is not None else None
    if out is not None:
        check_output_dir(out, overwrite)
    if config.data.calibration is None:
        raise ConfigError("data.calibration is not set; analyze needs calibration data to measure the layers: "
                          "set data.calibration.format and data.calibration.path")
    input_shape = tuple(config.model.input_shape)
    model = load_checkpoint(checkpoint_path, arch=config.model.arch, kwargs=config.model.kwargs,
                            trust=trust_checkpoint)
    check_input_shape(model, input_shape)
    example = torch.zeros(1, *input_shape)
    loader = build_loader(config.data.calibration, input_shape, where="calibration", log=log)
    batches = list(loader)
    log(f"analyzing with {loader.num_samples} calibration samples")
    analysis = analyze_model(model, batches, example_input=example, cfg=config.prune, ridges=ridges,
                             progress=progress)
    analysis["prunability"] = None
    if prunability_tolerance is not None:
        labelled = [(x, y) for x, y in batches] if loader.has_labels else [x for x, _ in batches]
        analysis["prunability"] = prunability(model, labelled, example_input=example, cfg=config.prune,
                                              tolerance=prunability_tolerance)
    analysis["plots"] = []
    if out is not None:
        with staged_output(out) as tmp:
            if plot_spectrum(analysis, tmp / "spectrum.png") and plot_dof(analysis, tmp / "dof.png"):
                analysis["plots"] = ["spectrum.png", "dof.png"]
            else:
                log(f"warning: {PLOT_HINT}; wrote analysis.json only")
            (tmp / "analysis.json").write_text(json.dumps(analysis, indent=2) + "\n", encoding="utf-8")
            dump_resolved(config, tmp / "config.resolved.yaml")
    return analysis
