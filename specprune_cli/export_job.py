"""What an export format writer works with: the job, the comparison that verifies a file, the registry.

A writer is registered per format (``@register``) and gets a :class:`Job`: the model, random inputs at
two batch sizes and the model's outputs on them. It writes its file, loads it back and calls
``Job.compare``, which holds every output tensor to the tolerance. ``quiet`` keeps the exporters'
chatter to attach to an error, so a successful export prints nothing.

Tolerance: a format counts as equal when ``max|out - ref| <= onnx_tolerance * max(1, max|ref|)``. A
different runtime (ONNX Runtime, fused TorchScript kernels) sums the same float32 products in another
order; that reassociation error is relative (about n * 2^-24 times the magnitude of the terms), so for
logits of magnitude 50 an absolute 1e-4 would be a false alarm while 1e-4 * 50 is still far below any
change a real export bug makes. Below magnitude 1 the bound stays absolute, so near-zero outputs do not
demand impossible precision.
"""
from __future__ import annotations

import contextlib
import io
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from specprune_cli.config import ExportConfig
from specprune_cli.errors import ExportError, user_code
from specprune_cli.model_io import ModelCall, tensors
from specprune_cli.pruned_file import Architecture

EXPORT_BATCH = 2  # not 1: exporters specialise size-1 dimensions
CHECK_BATCH = 3  # a batch size the export never saw proves the batch dimension is dynamic
_TAIL = 1500
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the dynamo exporter colours its messages


@dataclass
class Job:
    """One model to export: what every writer needs.

    Attributes:
        model: the model (eval mode), called through ``call``.
        call: the forward keyword arguments.
        inputs: batch size -> random input batch.
        refs: batch size -> the model's output tensors on it (``model_io.tensors`` order).
        names: the output tensors' names (``model_io.named_tensors``).
        cfg: the export settings.
        plan, source: for 'pt': the plan and how to rebuild the architecture.
        calibration: for 'onnx-int8': the calibration batches.
        written: format -> the file written so far in this run (onnx-int8 quantizes the onnx one).
    """

    model: nn.Module
    call: ModelCall
    inputs: dict[int, torch.Tensor]
    refs: dict[int, list[torch.Tensor]]
    names: list[str]
    cfg: ExportConfig
    plan: dict | None
    source: Architecture | None
    calibration: Iterable | None = None
    written: dict[str, Path] = field(default_factory=dict)

    def compare(self, fmt: str, loaded: Callable[[torch.Tensor], Any]) -> float:
        """Run ``loaded`` at both batch sizes and compare every output tensor; the worst difference."""
        worst = 0.0
        for b, x in self.inputs.items():
            with torch.no_grad(), user_code(lambda exc, b=b: ExportError(
                    f"the {fmt} export loaded back but fails on a batch of {b}: {message(exc)}")):
                got = tensors(loaded(x))
            worst = max(worst, _compare(fmt, got, self.refs[b], self.cfg.onnx_tolerance, b, self.names))
        return worst


Writer = Callable[[Job, Path], dict]
_WRITERS: dict[str, tuple[str, Writer]] = {}


def register(fmt: str, filename: str) -> Callable[[Writer], Writer]:
    """Register ``fn(job, tmp_path) -> info`` as the writer of format ``fmt`` (file ``filename``).

    The writer writes ``tmp_path``, loads it back, compares it (``job.compare``) and returns what the
    report records about the file (at least ``max_abs_diff``).
    """
    def add(fn: Writer) -> Writer:
        _WRITERS[fmt] = (filename, fn)
        return fn

    return add


def formats() -> tuple[str, ...]:
    """The export formats this version can write."""
    return tuple(_WRITERS)


def writer(fmt: str) -> tuple[str, Writer]:
    """The file name and writer registered for ``fmt`` (one of ``formats()``)."""
    return _WRITERS[fmt]


def _compare(fmt: str, got: list[torch.Tensor], want: list[torch.Tensor], tolerance: float, batch: int,
             names: list[str]) -> float:
    if len(got) != len(want):
        raise ExportError(f"{fmt} export returns {len(got)} output tensors but the model returns {len(want)} "
                          f"({', '.join(names)})")
    worst = 0.0
    for name, g, w in zip(names, got, want):
        g = torch.as_tensor(g).to(w.device, torch.float64)
        w = w.to(torch.float64)
        if g.shape != w.shape:
            raise ExportError(f"{fmt} export output {name} has shape {tuple(g.shape)} at batch size {batch}, "
                              f"the model gives {tuple(w.shape)}; the batch dimension may have been fixed "
                              "at export")
        diff = float((g - w).abs().max()) if w.numel() else 0.0
        scale = max(1.0, float(w.abs().max()) if w.numel() else 0.0)
        if not diff <= tolerance * scale:  # `not <=` also catches NaN
            raise ExportError(f"{fmt} export does not match the in-memory model at batch size {batch} "
                              f"(output {name}): max abs difference {diff:.3g} > {tolerance:g} * max(1, "
                              f"max|output|={scale:.3g}); the file was not written. Raise "
                              "export.onnx_tolerance only if this is rounding")
        worst = max(worst, diff)
    return worst


class Captured:
    """Exporter chatter: stdout/stderr text and warnings, kept to attach to an error, else dropped."""

    def __init__(self) -> None:
        self.stream = io.StringIO()
        self.warnings: list[warnings.WarningMessage] = []

    def tail(self) -> str:
        lines = [self.stream.getvalue().strip()]
        lines += [f"{w.category.__name__}: {w.message}" for w in self.warnings]
        text = _ANSI.sub("", "\n".join(line for line in lines if line))
        return f"\nexporter output (last {_TAIL} chars):\n{text[-_TAIL:]}" if text else ""


@contextlib.contextmanager
def quiet() -> Iterator[Captured]:
    """Capture the exporters' progress prints and warnings so a successful export prints nothing."""
    captured = Captured()
    with contextlib.redirect_stdout(captured.stream), contextlib.redirect_stderr(captured.stream), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        captured.warnings = caught
        yield captured


def message(exc: BaseException) -> str:
    """An exporter's exception as text for an ``ExportError``: its type and message, colours removed, at
    most ``_TAIL`` characters."""
    return _ANSI.sub("", f"{type(exc).__name__}: {exc}")[:_TAIL]


def remove(*paths: Path) -> None:
    """Delete the files that exist among ``paths`` (a half-written export and its side files)."""
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
