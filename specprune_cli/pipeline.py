"""``compress`` and ``analyze`` as library calls: the steps the CLI runs, in order.

Both start with ``prepare.prepare`` (config checks, checkpoint, the model's input and output,
calibration data); ``compress`` then prunes, evaluates, fine-tunes and writes its outputs as one transaction
(``outputs.staged_output``), so a failed run leaves OUTDIR absent (or, with ``overwrite``, as it was).

Under torchrun (``distributed``) every process prunes its shard of the calibration data with the
statistics summed over all of them, and fine-tunes its shard under DistributedDataParallel; process 0
alone evaluates, times and writes the outputs, and the others return its report.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from specprune_cli import distributed
from specprune_cli._version import __version__
from specprune_cli.config import Config
from specprune_cli.config_file import dump_resolved
from specprune_cli.data import Batches, build_batches
from specprune_cli.errors import ConfigError, GateError, ModelError, SpecpruneError, reason
from specprune_cli.evaluate import check_gates, check_label_range, evaluate_model
from specprune_cli.export import export_model
from specprune_cli.finetune import NEEDS_LABELS, distillation_loss, finetune
from specprune_cli.latency import compare_latency
from specprune_cli.model_io import describe
from specprune_cli.outputs import staged_output, write_json
from specprune_cli.prepare import Log, Prepared, classes_of, prepare, stderr
from specprune_cli.pruned_file import Architecture
from specprune_cli.quantize import evaluate_int8
from specprune_cli.surgery import verify_forward

REPORT_FORMAT = "specprune-report/1"


def _prune(model: nn.Module, batches: Batches, *, example_input: torch.Tensor, config: Config,
           progress: bool) -> Any:
    """The core run (``prune.prune_model``); any failure in it that is not ours to explain is a bug."""
    from specprune_cli.prune import prune_model

    extra = {"forward_kwargs": dict(config.model.forward_kwargs)} if config.model.forward_kwargs else {}
    with _core("pruning"):
        result = prune_model(model, distributed.shard(batches), example_input=example_input, cfg=config.prune,
                             progress=progress, **extra)
    if distributed.active():
        distributed.check_same(result.plan, "plan (kept channels per unit)")
        counted = [result.report[k] for k in ("samples", "dof_samples")]  # this process's shard alone
        totals = distributed.all_sum(*(c or 0 for c in counted))
        for key, mine, total in zip(("samples", "dof_samples"), counted, totals):
            result.report[key] = None if mine is None else int(total)
    return result


@contextlib.contextmanager
def _core(step: str) -> Iterator[None]:
    """Run a core step: any failure in it that is not ours to explain is a bug, said as such."""
    try:
        yield
    except (SpecpruneError, KeyboardInterrupt):
        raise
    except Exception as exc:  # an internal exception must not reach the user as a traceback
        raise ModelError(f"{step} failed on this model ({reason(exc)}); this is a bug in specprune or a "
                         "model it does not support yet: please report it with the model "
                         "architecture") from exc


def _evaluation(after_pruning: dict, final: dict, finetuned: bool) -> dict:
    return {
        "samples": final["samples"], "labelled": final["labelled_samples"] > 0,
        "accuracy_before": final["reference_top1"], "top5_before": final["reference_top5"],
        "accuracy_after_pruning": after_pruning["top1"],
        "agreement_after_pruning": after_pruning["agreement"],
        "relative_error_after_pruning": after_pruning["relative_error"],
        "accuracy_after": final["top1"], "top5_after": final["top5"], "agreement": final["agreement"],
        "relative_error": final["relative_error"], "finetuned": finetuned,
    }


def _gates(evaluation: dict, config: Config, max_accuracy_drop: float | None,
           min_agreement: float | None) -> list[dict]:
    """The gates, judging the model ``evaluate.gate_on`` names (default: int8 when it was exported)."""
    on = config.evaluate.gate_on or ("int8" if "int8" in evaluation else "float")
    judged = evaluation
    if on == "int8":
        int8 = evaluation["int8"]
        judged = {"accuracy_before": evaluation["accuracy_before"], "accuracy_after": int8["accuracy"],
                  "agreement": int8["agreement"]}
    gates = check_gates(judged, max_accuracy_drop=max_accuracy_drop, min_agreement=min_agreement)
    return [{**g, "model": on} for g in gates]


def _latency(prep: Prepared, pruned: nn.Module, tmp: Path, config: Config, log: Log) -> dict:
    """Latency of both models (see ``latency.compare_latency``); ONNX Runtime too when ONNX is exported.

    The original is exported to ONNX in a scratch directory only to be timed; it is not an output.
    """
    ev = config.evaluate
    log(f"timing latency at batch sizes {list(ev.latency_batch_sizes)} (original and pruned alternating, "
        f"up to {ev.latency_repeats} rounds or about {ev.latency_seconds:g} s per model and batch size)")
    onnx = None
    scratch = tmp.with_name(tmp.name + "-onnx-original")
    try:
        if (tmp / "model.onnx").is_file():
            only_onnx = dataclasses.replace(config.export, formats=("onnx",))
            export_model(prep.model, prep.example, scratch, only_onnx, call=prep.call)
            onnx = {"original": scratch / "model.onnx", "pruned": tmp / "model.onnx"}
            if (tmp / "model.int8.onnx").is_file():
                onnx["int8"] = tmp / "model.int8.onnx"
        return compare_latency(prep.model, pruned, prep.example, batch_sizes=ev.latency_batch_sizes,
                               repeats=ev.latency_repeats, seconds=ev.latency_seconds, call=prep.call,
                               onnx=onnx)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def compress(config: Config, checkpoint_path: str | os.PathLike, output_dir: str | os.PathLike, *,
             trust_checkpoint: bool = False, overwrite: bool = False, progress: bool = True,
             max_accuracy_drop: float | None = None, min_agreement: float | None = None,
             log: Log | None = None) -> dict:
    """Prune a trained checkpoint and write the exports, report.json and config.resolved.yaml to OUTDIR.

    Args:
        config: the validated config (``config_file.load_config``).
        checkpoint_path: the trained model (a state_dict, or a pickled module with ``trust_checkpoint``).
        output_dir: OUTDIR; must be absent or empty unless ``overwrite``.
        trust_checkpoint: allow unpickling arbitrary objects from the checkpoint.
        overwrite: replace a non-empty OUTDIR (only once the new results are complete).
        progress: tqdm bars on stderr.
        max_accuracy_drop: gate, percentage points; a failed gate still writes the outputs. The gates
            judge the model ``evaluate.gate_on`` names: the int8 file when onnx-int8 is exported, unless
            it says float.
        min_agreement: gate, fraction of top-1 predictions equal to the original's.
        log: receives progress lines and warnings (prefixed "warning: "); default prints to stderr.

    Returns:
        The report (also written as report.json).

    Raises:
        ConfigError: bad output dir, missing data.calibration or model.arch, gates not checkable.
        CheckpointError, ModelError, DataError, BudgetError, ExportError, OutputError: the run failed;
            OUTDIR untouched.
        GateError: a gate failed; the outputs were written, and the error carries the report.
    """
    log = log or stderr
    started = time.perf_counter()
    output_dir = Path(output_dir)
    if max_accuracy_drop is not None and (config.data.eval is None or config.data.eval.format == "synthetic"):
        raise ConfigError("--max-accuracy-drop needs accuracy before and after pruning: set data.eval to a "
                          "labelled dataset")
    prep = prepare(config, checkpoint_path, trust_checkpoint=trust_checkpoint, output_dir=output_dir,
                   overwrite=overwrite, log=log)
    input_shape, classes = tuple(config.model.input_shape), classes_of(prep.output, prep.call)
    # Every data section is read before pruning, so that a problem in one costs seconds, not a pruning run.
    eval_data = prep.calibration if config.data.eval is None else build_batches(
        config.data.eval, input_shape, where="eval", log=log)  # without data.eval: the calibration data
    check_label_range(eval_data.max_label, classes, f"data.{eval_data.where}")
    ft_data = None
    if config.finetune.epochs > 0:
        quiet = (lambda _m: None) if config.data.finetune is None else log  # calibration warnings shown once
        ft_data = build_batches(config.data.finetune_data(), input_shape, shuffle=True, where="finetune",
                                batch_size=config.finetune.batch_size, log=quiet)
        if not config.finetune.distill and not ft_data.has_labels:
            raise ConfigError(NEEDS_LABELS)
        check_label_range(ft_data.max_label, classes, "data.finetune")

    log(f"pruning with {prep.calibration.num_samples} calibration samples "
        f"(target {config.prune.target_kind} {config.prune.target_value:g})")
    result = _prune(prep.model, prep.calibration, example_input=prep.example, config=config,
                    progress=progress)
    for warning in result.report.get("warnings", []):
        log(f"warning: {warning}")
    pruned, original, call = result.model, prep.model, prep.call
    max_eval = config.evaluate.max_eval_samples
    main = distributed.is_main()  # evaluation, latency and the outputs are process 0's alone
    if main:
        log(f"evaluating on {eval_data.num_samples} samples"
            + ("" if config.data.eval else " (the calibration data)"))
    after_pruning = (evaluate_model(pruned, original, eval_data, max_samples=max_eval, call=call)
                     if main else None)
    finetune_report, final = None, after_pruning
    if ft_data is not None:
        temperature = config.finetune.temperature
        kd_before = distillation_loss(pruned, original, eval_data, temperature, call=call) if main else None
        unfinetuned = {k: v.detach().clone() for k, v in pruned.state_dict().items()}
        log(f"fine-tuning for {config.finetune.epochs} epoch(s) on {ft_data.num_samples} samples")
        finetune_report = finetune(pruned, original, distributed.shard(ft_data, even=True), config.finetune,
                                   call=call, progress=progress, log=log)
        if main:
            kd_after = distillation_loss(pruned, original, eval_data, temperature, call=call)
            finetune_report.update(distillation_loss_before=kd_before, distillation_loss_after=kd_after,
                                   kept="fine-tuned")
            worse = config.finetune.distill and kd_after > kd_before
            if worse:
                # A model the pruning left close to the original can only lose from a short run at this
                # learning rate; the user gets the better of the two, and is told.
                pruned.load_state_dict(unfinetuned)
                finetune_report["kept"] = "before fine-tuning"
                log(f"warning: fine-tuning raised the distillation loss on the evaluation data "
                    f"({kd_before:.4g} -> {kd_after:.4g}); the model before fine-tuning is kept (try a "
                    "lower finetune.lr or more finetune.epochs)")
            final = after_pruning if worse else evaluate_model(
                pruned, original, eval_data, max_samples=max_eval, call=call)
        verify_forward(pruned, prep.example, prep.output, call.forward_kwargs)
    if not main:
        return distributed.broadcast_object(None)  # waits for process 0's outputs, or its failure
    evaluation = _evaluation(after_pruning, final, finetune_report is not None)

    with staged_output(output_dir) as tmp:
        if config.export.formats:
            log(f"exporting {', '.join(config.export.formats)} (each loaded back and compared)")
        source = Architecture(config.model.arch, dict(config.model.kwargs), input_shape,
                              dict(config.model.forward_kwargs),
                              str(prep.example.dtype).removeprefix("torch."))
        exports = {}
        for fmt, info in export_model(pruned, prep.example, tmp, config.export, call=call, plan=result.plan,
                                      source=source, calibration=prep.calibration).items():
            exports[fmt] = {**info, "path": Path(info["path"]).name}
            if info.get("note"):
                log(f"warning: {exports[fmt]['path']}: {info['note']}")
        if "onnx-int8" in exports:
            log(f"evaluating the int8 model on {eval_data.num_samples} samples")
            evaluation["int8"] = evaluate_int8(tmp / "model.int8.onnx", original, pruned, eval_data,
                                               template=prep.output, call=call, max_samples=max_eval)
        gates = _gates(evaluation, config, max_accuracy_drop, min_agreement)
        latency = _latency(prep, pruned, tmp, config, log) if config.evaluate.latency else None
        report = {
            "format": REPORT_FORMAT,
            "specprune_version": __version__,
            "checkpoint": str(checkpoint_path),
            "output_dir": str(output_dir),
            "input_shape": list(input_shape),
            "output": describe(prep.output),
            "target": {config.prune.target_kind: config.prune.target_value},
            "calibration_samples": prep.calibration.num_samples,
            "checkpoint_bytes": Path(checkpoint_path).stat().st_size,
            "prune": result.report,
            "plan": result.plan,
            "finetune": finetune_report,
            "evaluation": evaluation,
            "latency": latency,
            "exports": exports,
            "gates": gates,
            "seconds": round(time.perf_counter() - started, 3),
            "processes": distributed.world_size(),
        }
        write_json(tmp / "report.json", report)
        dump_resolved(config, tmp / "config.resolved.yaml")
    failed = [g for g in gates if not g["passed"]]
    if failed:
        detail = "; ".join(f"{g['name']} {g['value']:g} vs limit {g['limit']:g} ({g['model']} model)"
                           for g in failed)
        raise GateError(f"quality gate failed: {detail}; the outputs were written to {output_dir} for "
                        "inspection", report=report)
    return distributed.broadcast_object(report)


def analyze(config: Config, checkpoint_path: str | os.PathLike, output_dir: str | os.PathLike | None = None,
            *, ridges: tuple[float, ...] = (1e-4, 1e-3, 1e-2), prunability_tolerance: float | None = None,
            trust_checkpoint: bool = False, overwrite: bool = False, progress: bool = True,
            log: Log | None = None) -> dict:
    """Measure how compressible a checkpoint is, without changing it (``specprune analyze``).

    Args:
        config: the validated config; ``prune.*`` decides the suggested widths, ``data.calibration`` the data.
        checkpoint_path: the trained model.
        output_dir: if given, analysis.json, spectrum.png, dof.png and config.resolved.yaml are written
            there (atomically).
        ridges: grid of relative ridges for N(lambda).
        prunability_tolerance: if given, also bisect the smallest uniform keep fraction within it.
        trust_checkpoint, overwrite, progress, log: as for :func:`compress`.

    Returns:
        The analysis (see ``specprune_cli.analyze.analyze_model``), plus ``prunability`` and ``plots``.
    """
    from specprune_cli.analyze import analyze_model, prunability
    from specprune_cli.report import plot_dof, plot_spectrum

    log = log or stderr
    out = Path(output_dir) if output_dir is not None else None
    prep = prepare(config, checkpoint_path, trust_checkpoint=trust_checkpoint, output_dir=out,
                   overwrite=overwrite, log=log)
    if config.model.forward_kwargs and "forward_kwargs" not in inspect.signature(analyze_model).parameters:
        raise ConfigError(f"model.forward_kwargs is not available to analyze in specprune {__version__} yet; "
                          "use {}")
    batches = list(prep.calibration)
    log(f"analyzing with {prep.calibration.num_samples} calibration samples")
    with _core("the analysis"):
        analysis = analyze_model(prep.model, batches, example_input=prep.example, cfg=config.prune,
                                 ridges=ridges, progress=progress)
    analysis["prunability"] = None
    if prunability_tolerance is not None:
        labelled = batches if prep.calibration.has_labels else [x for x, _ in batches]
        with _core("the prunability search"):
            analysis["prunability"] = prunability(prep.model, labelled, example_input=prep.example,
                                                  cfg=config.prune, tolerance=prunability_tolerance)
    analysis["plots"] = []
    if out is not None:
        with staged_output(out) as tmp:
            plot_spectrum(analysis, tmp / "spectrum.png")
            plot_dof(analysis, tmp / "dof.png")
            analysis["plots"] = ["spectrum.png", "dof.png"]
            write_json(tmp / "analysis.json", analysis)
            dump_resolved(config, tmp / "config.resolved.yaml")
    return analysis
