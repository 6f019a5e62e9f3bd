"""Exporting a model: each format in ``export.formats`` written as one file and verified by loading it back.

Every file is written under a temporary name, loaded back, run on two batch sizes and compared with the
in-memory model, every output tensor of it; only then is it renamed into place. A failure raises
``ExportError`` and leaves no file. Formats are a registry (``export_job.register``), so a new format is
one function in ``export_formats.py``; importing this module registers them all. How close counts as
equal is in ``export_job.py``, how each format is written and checked in ``export_formats.py``.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from specprune_cli import export_formats  # noqa: F401  (registers the formats)
from specprune_cli.config import ExportConfig
from specprune_cli.errors import ConfigError, ExportError, reason, user_code
from specprune_cli.export_job import CHECK_BATCH, EXPORT_BATCH, Job, formats, register, remove, writer
from specprune_cli.model_io import ModelCall, eval_mode, named_tensors, random_batch
from specprune_cli.pruned_file import Architecture

__all__ = ["export_model", "formats", "register"]


def export_model(model: nn.Module, example_input: torch.Tensor, out_dir: str | os.PathLike, cfg: ExportConfig,
                 *, call: ModelCall | None = None, plan: dict | None = None,
                 source: Architecture | None = None, calibration: Iterable | None = None) -> dict[str, dict]:
    """Write ``model`` in each of ``cfg.formats`` to ``out_dir`` and verify each file by loading it back.

    Each file is compared with the in-memory model (eval mode), every output tensor, on random batches
    of 2 (the export batch) and 3 (proving the batch dimension is dynamic). Files: model.pt (state_dict
    + plan), model.onnx (one file, weights inside, outputs named as ``model_io.named_tensors``),
    model.int8.onnx (model.onnx quantized, written after it; ``export_formats`` says how it is checked),
    model.torchscript.pt, model.module.pt (a pickled module: loading it runs code).

    Args:
        model: the model to export; put in eval mode for the export, its mode restored afterwards.
        example_input: one batch; its shape after dim 0, dtype and device are used.
        out_dir: existing or new directory.
        cfg: ``formats``, ``opset`` and ``onnx_tolerance`` (``export_job`` says how it scales).
        call: the forward keyword arguments (``model.forward_kwargs``); default none.
        plan: for 'pt': the plan from ``prune_model``.
        source: for 'pt': how to build the original architecture.
        calibration: for 'onnx-int8': batches (tensors or ``(x, y)``) that set the activation ranges.

    Returns:
        Per format: ``path``, ``bytes``, ``max_abs_diff``, ``verified``, ``batch_sizes`` checked; onnx
        adds ``exporter`` ('dynamo', or 'legacy' with the ``dynamo_error`` that caused the fallback),
        ``opset`` and ``outputs``, and a ``note`` when the opset asked for was not the one written;
        module adds ``pickled``; pt without ``source.arch`` is written but not verified (``note`` says why);
        onnx-int8 adds what ``quantize.quantize_onnx`` returns and ``outputs``.

    Raises:
        ExportError: a format could not be written or does not match; no file of that format is left.
        ConfigError: a format this version cannot write, 'pt' without plan and source, or 'onnx-int8'
            without calibration.
    """
    unknown = [f for f in cfg.formats if f not in formats()]
    if unknown:
        raise ConfigError(f"export format(s) {unknown} cannot be written by this version; supported: "
                          f"{', '.join(formats())}")
    if "onnx-int8" in cfg.formats and calibration is None:
        raise ConfigError("export format onnx-int8 needs calibration data: pass calibration= to export_model")
    call = call or ModelCall()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with eval_mode(model):
        inputs, refs, names = _references(model, example_input, call)
        job = Job(model, call, inputs, refs, names, cfg, plan, source, calibration)
        results: dict[str, dict] = {}
        for fmt in sorted(cfg.formats, key=lambda f: f == "onnx-int8"):  # it reads model.onnx
            filename, write = writer(fmt)
            final = out / filename
            stem, suffix = final.name.split(".", 1)
            tmp = out / f"{stem}.tmp-{os.getpid()}.{suffix}"
            try:
                info = {"verified": True, **write(job, tmp)}
                os.replace(tmp, final)
                job.written[fmt] = final
            finally:
                remove(tmp, tmp.with_name(tmp.name + ".data"))
            results[fmt] = {"path": str(final), "bytes": final.stat().st_size, **info,
                            "batch_sizes": sorted(inputs)}
        return results


def _references(model: nn.Module, example_input: torch.Tensor, call: ModelCall
                ) -> tuple[dict[int, torch.Tensor], dict[int, list[torch.Tensor]], list[str]]:
    """Random inputs at both batch sizes, the model's output tensors on them, and their names."""
    gen = torch.Generator().manual_seed(0)
    inputs = {b: random_batch(example_input, b, gen) for b in (EXPORT_BATCH, CHECK_BATCH)}
    refs, names = {}, []
    for b, x in inputs.items():
        with torch.no_grad(), user_code(lambda exc, b=b, x=x: ExportError(
                f"the model itself fails on a batch of {b} inputs of shape {tuple(x.shape[1:])} "
                f"({reason(exc)}); exports are checked at batch sizes 2 and 3, so the batch size must not "
                "be fixed in forward (use x.flatten(1), not x.view(2, -1))")):
            named = list(named_tensors(call(model, x)))
        if not named:
            raise ExportError("the model's output holds no tensor; there is nothing to export")
        refs[b], names = [t.detach().clone() for _, t in named], [n for n, _ in named]
    return inputs, refs, names
