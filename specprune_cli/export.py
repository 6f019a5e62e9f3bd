"""Export writers (pt, ONNX, TorchScript, whole module), each verified by loading the file back.

Every file is written under a temporary name, loaded back, run on two batch sizes and compared with the
in-memory model; only then is it renamed into place. A failure raises ``ExportError`` and leaves no file.

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
import os
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from specprune_cli.errors import ConfigError, ExportError

FORMATS = ("pt", "onnx", "torchscript", "module")
FILENAMES = {"pt": "model.pt", "onnx": "model.onnx", "torchscript": "model.torchscript.pt",
             "module": "model.module.pt"}
EXPORT_BATCH = 2  # not 1: exporters specialise size-1 dimensions
CHECK_BATCH = 3  # a batch size the export never saw proves the batch dimension is dynamic
_TAIL = 1500
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the dynamo exporter colours its messages


def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flatten(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flatten(v)]
    raise ExportError(f"the model returned {type(out).__name__}; exports support tensors and "
                      "lists/tuples/dicts of tensors")


def _inputs(example_input: torch.Tensor) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shape = tuple(example_input.shape[1:])
    return {b: torch.randn((b, *shape), generator=gen, dtype=example_input.dtype).to(example_input.device)
            for b in (EXPORT_BATCH, CHECK_BATCH)}


def _compare(fmt: str, got: list[torch.Tensor], want: list[torch.Tensor], tolerance: float,
             batch: int) -> float:
    if len(got) != len(want):
        raise ExportError(f"{fmt} export returns {len(got)} outputs but the model returns {len(want)}")
    worst = 0.0
    for i, (g, w) in enumerate(zip(got, want)):
        g = torch.as_tensor(g).to(w.device, torch.float64)
        w = w.to(torch.float64)
        if g.shape != w.shape:
            raise ExportError(f"{fmt} export output {i} has shape {tuple(g.shape)} at batch size {batch}, "
                              f"the model gives {tuple(w.shape)}; the batch dimension may have been fixed "
                              "at export")
        diff = float((g - w).abs().max()) if w.numel() else 0.0
        scale = max(1.0, float(w.abs().max()) if w.numel() else 0.0)
        if not diff <= tolerance * scale:  # `not <=` also catches NaN
            raise ExportError(f"{fmt} export does not match the in-memory model at batch size {batch}: "
                              f"max abs difference {diff:.3g} > {tolerance:g} * max(1, "
                              f"max|output|={scale:.3g}); the file was not written. Raise "
                              "export.onnx_tolerance only if this is rounding")
        worst = max(worst, diff)
    return worst


class _Captured:
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
def _quiet() -> Iterator[_Captured]:
    """Capture the exporters' progress prints and warnings so a successful export prints nothing."""
    captured = _Captured()
    with contextlib.redirect_stdout(captured.stream), contextlib.redirect_stderr(captured.stream), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        captured.warnings = caught
        yield captured


def _message(exc: BaseException) -> str:
    return _ANSI.sub("", f"{type(exc).__name__}: {exc}")[:_TAIL]


def _write_onnx(model: nn.Module, x: torch.Tensor, path: Path, opset: int) -> dict:
    """Write one self-contained ONNX file with a dynamic batch dimension.

    Returns:
        ``{"exporter": "dynamo"}``, or ``{"exporter": "legacy", "dynamo_error": ...}`` after a fallback.
    """
    common = dict(opset_version=opset, input_names=["input"], output_names=["output"])
    with _quiet():
        try:
            # torch >= 2.9 defaults to the dynamo exporter: weights go to a side .data file unless
            # external_data=False, and every dimension is fixed unless dynamic_shapes names it.
            batch = torch.export.Dim("batch", min=1)
            torch.onnx.export(model, (x,), str(path), dynamo=True, external_data=False,
                              dynamic_shapes=({0: batch},), **common)
            return {"exporter": "dynamo"}
        except Exception as dynamo_error:  # any exporter failure: try the TorchScript-based one
            first = _message(dynamo_error)
            _remove(path, path.with_name(path.name + ".data"))
    with _quiet() as captured:
        try:
            torch.onnx.export(model, (x,), str(path), dynamo=False,
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, **common)
            return {"exporter": "legacy", "dynamo_error": first}
        except Exception as legacy_error:
            raise ExportError(f"ONNX export failed with both exporters.\ndynamo: {first}\nlegacy "
                              f"(TorchScript): {_message(legacy_error)}{captured.tail()}\n"
                              "Drop 'onnx' from export.formats, or make the model traceable by "
                              "torch.export") from legacy_error


def _check_onnx(path: Path, inputs: dict[int, torch.Tensor], refs: dict[int, list[torch.Tensor]],
                tolerance: float) -> float:
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the exported ONNX file fails onnx.checker: {exc}") from exc
    proto = onnx.load(str(path), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        raise ExportError("the ONNX export put weights in an external file; model.onnx must be one file")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if len(names) != 1:
        raise ExportError(f"the ONNX model has inputs {names}; exports support a single input tensor")
    worst = 0.0
    for b, x in inputs.items():
        try:
            got = session.run(None, {names[0]: x.detach().cpu().numpy()})
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ExportError(f"ONNX Runtime cannot run the export at batch size {b}: {exc}\nIf the model "
                              "fixes its batch size (e.g. x.view(2, -1)), use x.flatten(1) or "
                              "x.view(x.size(0), -1)") from exc
        worst = max(worst, _compare("onnx", [torch.from_numpy(g) for g in got], refs[b], tolerance, b))
    return worst


def _run(fmt: str, loaded: nn.Module, inputs: dict[int, torch.Tensor], refs: dict[int, list[torch.Tensor]],
         tolerance: float) -> float:
    loaded.eval()
    worst = 0.0
    with torch.no_grad():
        for b, x in inputs.items():
            try:
                out = loaded(x)
            except Exception as exc:
                raise ExportError(f"the {fmt} export loaded back but fails on a batch of {b}: "
                                  f"{type(exc).__name__}: {exc}") from exc
            worst = max(worst, _compare(fmt, _flatten(out), refs[b], tolerance, b))
    return worst


def _remove(*paths: Path) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _export_one(fmt: str, model: nn.Module, inputs: dict[int, torch.Tensor],
                refs: dict[int, list[torch.Tensor]], tmp: Path, settings: Any,
                pt_writer: Callable[[Path], None] | None,
                pt_loader: Callable[[Path], nn.Module] | None) -> dict:
    tol = float(settings.onnx_tolerance)
    x = inputs[EXPORT_BATCH]
    extra: dict = {}
    if fmt == "pt":
        if pt_writer is None or pt_loader is None:
            raise ConfigError("export format 'pt' needs pt_writer and pt_loader (save_pruned / load_pruned)")
        pt_writer(tmp)
        diff = _run(fmt, pt_loader(tmp), inputs, refs, tol)
    elif fmt == "onnx":
        extra.update(_write_onnx(model, x, tmp, int(settings.opset)))
        diff = _check_onnx(tmp, inputs, refs, tol)
    elif fmt == "torchscript":
        with _quiet() as captured:
            try:
                # check_trace=False: the comparison below is the check, on two batch sizes.
                traced = torch.jit.trace(model, (x,), check_trace=False)
                torch.jit.save(traced, str(tmp))
            except Exception as exc:
                raise ExportError(f"TorchScript tracing failed: {_message(exc)}{captured.tail()}\n"
                                  "Drop 'torchscript' from export.formats") from exc
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; loading still works
            loaded = torch.jit.load(str(tmp), map_location=x.device)
        diff = _run(fmt, loaded, inputs, refs, tol)
    else:  # module
        extra["pickled"] = True  # loading runs pickled code: only open files you trust
        try:
            torch.save(model, tmp)
        except Exception as exc:  # pickling errors come in several types
            raise ExportError(f"the whole-module file cannot be pickled ({type(exc).__name__}: {exc}); its "
                              "classes must be importable at module level. Use format 'pt' instead") from exc
        diff = _run(fmt, torch.load(tmp, map_location=x.device, weights_only=False), inputs, refs, tol)
    return {**extra, "max_abs_diff": diff}


def export_model(model: nn.Module, example_input: torch.Tensor, out_dir: str | os.PathLike, settings: Any, *,
                 pt_writer: Callable[[Path], None] | None = None,
                 pt_loader: Callable[[Path], nn.Module] | None = None) -> dict[str, dict]:
    """Write ``model`` in each of ``settings.formats`` to ``out_dir`` and verify each file by loading it back.

    Each file is compared with the in-memory model (eval mode) on random batches of 2 (the export batch)
    and 3 (proving the batch dimension is dynamic). Files: model.pt, model.onnx (one file, weights
    inside), model.torchscript.pt, model.module.pt (a pickled module: loading it runs code).

    Args:
        model: the model to export; put in eval mode for the export, its mode restored afterwards.
        example_input: one batch; its shape after dim 0, dtype and device are used.
        out_dir: existing or new directory.
        settings: has ``formats`` (subset of pt, onnx, torchscript, module), ``opset`` and
            ``onnx_tolerance`` (see the module docstring for how it scales).
        pt_writer: for 'pt': ``pt_writer(path)`` writes the state-dict + plan file.
        pt_loader: for 'pt': ``pt_loader(path)`` rebuilds the model from it.

    Returns:
        Per format: ``path``, ``bytes``, ``max_abs_diff``, ``verified`` (True), ``batch_sizes`` checked;
        onnx adds ``exporter`` ('dynamo', or 'legacy' with the ``dynamo_error`` that caused the fallback),
        module adds ``pickled``.

    Raises:
        ExportError: a format could not be written or does not match; no file of that format is left.
        ConfigError: an unknown format, or 'pt' without pt_writer/pt_loader.
    """
    unknown = [f for f in settings.formats if f not in FORMATS]
    if unknown:
        raise ConfigError(f"unknown export format(s) {unknown}; supported: {', '.join(FORMATS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    training = model.training
    model.eval()
    inputs = _inputs(example_input)
    try:
        refs = {}
        with torch.no_grad():
            for b, x in inputs.items():
                try:
                    out_b = model(x)
                except Exception as exc:  # any failure of user code: report it as an export problem
                    raise ExportError(f"the model itself fails on a batch of {b} inputs of shape "
                                      f"{tuple(x.shape[1:])} ({type(exc).__name__}: {exc}); exports are "
                                      "checked at batch sizes 2 and 3, so the batch size must not be fixed "
                                      "in forward (use x.flatten(1), not x.view(2, -1))") from exc
                refs[b] = [t.detach().clone() for t in _flatten(out_b)]
        results: dict[str, dict] = {}
        for fmt in settings.formats:
            final = out / FILENAMES[fmt]
            stem, suffix = final.name.split(".", 1)
            tmp = out / f"{stem}.tmp-{os.getpid()}.{suffix}"
            try:
                info = _export_one(fmt, model, inputs, refs, tmp, settings, pt_writer, pt_loader)
                os.replace(tmp, final)
            finally:
                _remove(tmp, tmp.with_name(tmp.name + ".data"))
            results[fmt] = {"path": str(final), "bytes": final.stat().st_size, **info, "verified": True,
                            "batch_sizes": sorted(inputs)}
        return results
    finally:
        model.train(training)
