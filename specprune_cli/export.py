"""Export writers (pt, ONNX, int8 ONNX, TorchScript, whole module), each verified by loading it back.

Every file is written under a temporary name, loaded back, run on two batch sizes and compared with the
in-memory model, every output tensor of it; only then is it renamed into place. A failure raises
``ExportError`` and leaves no file. Formats are a registry (``@register``), so a new format is one
function; ``export.formats`` names the ones to write. The int8 file is the exception to the comparison:
quantization changes the outputs by design, so it is run back at both batch sizes for shapes and finite
values, and judged on data by agreement and accuracy (``quantize.evaluate_int8``).

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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from specprune_cli.config import ExportConfig
from specprune_cli.errors import ConfigError, ExportError, reason, user_code
from specprune_cli.model_io import ModelCall, eval_mode, named_tensors, random_batch, tensors
from specprune_cli.pruned_file import Architecture, load_pruned, save_pruned

EXPORT_BATCH = 2  # not 1: exporters specialise size-1 dimensions
CHECK_BATCH = 3  # a batch size the export never saw proves the batch dimension is dynamic
_TAIL = 1500
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the dynamo exporter colours its messages


@dataclass
class _Job:
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
                    f"the {fmt} export loaded back but fails on a batch of {b}: {_message(exc)}")):
                got = tensors(loaded(x))
            worst = max(worst, _compare(fmt, got, self.refs[b], self.cfg.onnx_tolerance, b, self.names))
        return worst


Writer = Callable[[_Job, Path], dict]
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


@register("pt", "model.pt")
def _pt(job: _Job, path: Path) -> dict:
    """state_dict + plan + architecture (``pruned_file``): loads without unpickling code."""
    if job.plan is None or job.source is None:
        raise ConfigError("export format 'pt' needs the plan and the architecture: pass plan= and source= "
                          "to export_model")
    save_pruned(path, job.model, job.plan, job.source)
    if job.source.arch is None:
        return {"max_abs_diff": None, "verified": False,
                "note": "model.arch is not set (the checkpoint was a pickled module), so model.pt cannot be "
                        "rebuilt with load_pruned; export formats: [module] for a loadable file"}
    loaded = load_pruned(path)
    return {"max_abs_diff": job.compare("pt", lambda x: job.call(loaded, x))}


def _write_onnx(job: _Job, path: Path) -> dict:
    """Write one self-contained ONNX file with a dynamic batch dimension and named outputs.

    Returns:
        ``{"exporter": "dynamo"}``, or ``{"exporter": "legacy", "dynamo_error": ...}`` after a fallback.
    """
    model, x = job.call.bound(job.model), job.inputs[EXPORT_BATCH]
    common = dict(opset_version=job.cfg.opset, input_names=["input"], output_names=job.names)
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
    # The legacy exporter needs to be told which outputs have a batch dimension: those that grow with it.
    batched = {n: {0: "batch"} for n, a, b in zip(job.names, job.refs[EXPORT_BATCH], job.refs[CHECK_BATCH])
               if a.dim() and a.shape[0] == EXPORT_BATCH and b.shape[0] == CHECK_BATCH}
    with _quiet() as captured:
        try:
            torch.onnx.export(model, (x,), str(path), dynamo=False,
                              dynamic_axes={"input": {0: "batch"}, **batched}, **common)
            return {"exporter": "legacy", "dynamo_error": first}
        except Exception as legacy_error:
            raise ExportError(f"ONNX export failed with both exporters.\ndynamo: {first}\nlegacy "
                              f"(TorchScript): {_message(legacy_error)}{captured.tail()}\n"
                              "Drop 'onnx' from export.formats, or make the model traceable by "
                              "torch.export") from legacy_error


@register("onnx", "model.onnx")
def _onnx(job: _Job, path: Path) -> dict:
    """One ONNX file, checked by onnx.checker and run in ONNX Runtime."""
    import onnx
    import onnxruntime as ort

    info = _write_onnx(job, path)
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the exported ONNX file fails onnx.checker: {exc}") from exc
    proto = onnx.load(str(path), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        raise ExportError("the ONNX export put weights in an external file; model.onnx must be one file")
    info["opset"] = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if info["opset"] != job.cfg.opset:
        info["note"] = (f"export.opset {job.cfg.opset} was not honoured: the exporter wrote opset "
                        f"{info['opset']} (it could not convert this model); the file was verified as "
                        "written")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    if len(inputs) != 1:
        raise ExportError(f"the ONNX model has inputs {inputs}; exports support a single input tensor")

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        try:
            return [torch.from_numpy(g) for g in session.run(None, {inputs[0]: x.detach().cpu().numpy()})]
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ExportError(f"ONNX Runtime cannot run the export at batch size {x.shape[0]}: {exc}\nIf the "
                              "model fixes its batch size (e.g. x.view(2, -1)), use x.flatten(1) or "
                              "x.view(x.size(0), -1)") from exc

    info["outputs"] = [o.name for o in session.get_outputs()]
    return {**info, "max_abs_diff": job.compare("onnx", run)}


@register("onnx-int8", "model.int8.onnx")
def _onnx_int8(job: _Job, path: Path) -> dict:
    """model.onnx quantized to int8 (``quantize.quantize_onnx``), run back in ONNX Runtime at both batch
    sizes: the output tensors must come back with the float model's shapes and finite. ``max_abs_diff``
    (on random inputs) is recorded, not held to a tolerance."""
    import onnxruntime as ort

    from specprune_cli.quantize import ort_outputs, quantize_onnx

    with _quiet() as captured:
        try:
            info = quantize_onnx(job.written["onnx"], path, job.calibration, job.cfg.int8,
                                 module_names=[n for n, _ in job.model.named_modules() if n],
                                 prefix="model." if job.call.forward_kwargs else "")  # call.bound's wrapper
        except ExportError as exc:
            raise ExportError(f"{exc}{captured.tail()}") from exc
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for b, x in job.inputs.items():
        try:
            got = ort_outputs(session, x)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ExportError(f"ONNX Runtime cannot run the int8 model at batch size {b}: {exc}") from exc
        if [tuple(g.shape) for g in got] != [tuple(w.shape) for w in job.refs[b]]:
            raise ExportError(f"the int8 model returns shapes {[tuple(g.shape) for g in got]} at batch size "
                              f"{b}, the model {[tuple(w.shape) for w in job.refs[b]]}; drop onnx-int8")
        if not all(bool(torch.isfinite(g).all()) for g in got):
            raise ExportError(f"the int8 model returns NaN or Inf at batch size {b}; exclude the layer that "
                              "overflows (export.int8.exclude) or try export.int8.method percentile")
        worst = max([worst, *(float((g.double() - w.double().cpu()).abs().max()) for g, w in
                              zip(got, job.refs[b]) if w.numel())])
    return {**info, "max_abs_diff": worst, "outputs": [o.name for o in session.get_outputs()]}


class _Flat(nn.Module):
    """A model whose output tensors come out as one flat tuple (TorchScript cannot trace nested dicts)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(tensors(self.model(x)))


@register("torchscript", "model.torchscript.pt")
def _torchscript(job: _Job, path: Path) -> dict:
    """A traced TorchScript module (forward keyword arguments fixed at their configured values). A model
    with several output tensors returns them as one tuple, in the order of ``outputs``."""
    single = job.names == ["output"]
    module = job.call.bound(job.model) if single else _Flat(job.call.bound(job.model))
    with _quiet() as captured:
        try:
            # check_trace=False: the comparison below is the check, on two batch sizes.
            traced = torch.jit.trace(module, (job.inputs[EXPORT_BATCH],), check_trace=False)
            torch.jit.save(traced, str(path))
        except Exception as exc:
            raise ExportError(f"TorchScript tracing failed: {_message(exc)}{captured.tail()}\n"
                              "Drop 'torchscript' from export.formats") from exc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; loading still works
        loaded = torch.jit.load(str(path), map_location=job.inputs[EXPORT_BATCH].device)
    loaded.eval()
    return {**({} if single else {"outputs": job.names}), "max_abs_diff": job.compare("torchscript", loaded)}


@register("module", "model.module.pt")
def _module(job: _Job, path: Path) -> dict:
    """The whole module, pickled: loading it runs code, so only open files you trust."""
    try:
        torch.save(job.model, path)
    except Exception as exc:  # pickling errors come in several types
        raise ExportError(f"the whole-module file cannot be pickled ({reason(exc)}); its classes must be "
                          "importable at module level. Use format 'pt' instead") from exc
    loaded = torch.load(path, map_location=job.inputs[EXPORT_BATCH].device, weights_only=False).eval()
    return {"pickled": True, "max_abs_diff": job.compare("module", lambda x: job.call(loaded, x))}


def _remove(*paths: Path) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def export_model(model: nn.Module, example_input: torch.Tensor, out_dir: str | os.PathLike, cfg: ExportConfig,
                 *, call: ModelCall | None = None, plan: dict | None = None,
                 source: Architecture | None = None, calibration: Iterable | None = None) -> dict[str, dict]:
    """Write ``model`` in each of ``cfg.formats`` to ``out_dir`` and verify each file by loading it back.

    Each file is compared with the in-memory model (eval mode), every output tensor, on random batches
    of 2 (the export batch) and 3 (proving the batch dimension is dynamic). Files: model.pt (state_dict
    + plan), model.onnx (one file, weights inside, outputs named as ``model_io.named_tensors``),
    model.int8.onnx (model.onnx quantized, written after it; see the module docstring for its check),
    model.torchscript.pt, model.module.pt (a pickled module: loading it runs code).

    Args:
        model: the model to export; put in eval mode for the export, its mode restored afterwards.
        example_input: one batch; its shape after dim 0, dtype and device are used.
        out_dir: existing or new directory.
        cfg: ``formats``, ``opset`` and ``onnx_tolerance`` (see the module docstring for how it scales).
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
    unknown = [f for f in cfg.formats if f not in _WRITERS]
    if unknown:
        raise ConfigError(f"export format(s) {unknown} cannot be written by this version; supported: "
                          f"{', '.join(_WRITERS)}")
    if "onnx-int8" in cfg.formats and calibration is None:
        raise ConfigError("export format onnx-int8 needs calibration data: pass calibration= to export_model")
    call = call or ModelCall()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with eval_mode(model):
        inputs, refs, names = _references(model, example_input, call)
        job = _Job(model, call, inputs, refs, names, cfg, plan, source, calibration)
        results: dict[str, dict] = {}
        for fmt in sorted(cfg.formats, key=lambda f: f == "onnx-int8"):  # it reads model.onnx
            filename, write = _WRITERS[fmt]
            final = out / filename
            stem, suffix = final.name.split(".", 1)
            tmp = out / f"{stem}.tmp-{os.getpid()}.{suffix}"
            try:
                info = {"verified": True, **write(job, tmp)}
                os.replace(tmp, final)
                job.written[fmt] = final
            finally:
                _remove(tmp, tmp.with_name(tmp.name + ".data"))
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
