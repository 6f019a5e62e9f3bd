"""The export formats, one registered writer each: pt, onnx, onnx-int8, torchscript and module.

Each writer writes its file, loads it back and compares it with the in-memory model (``Job.compare``);
``export.export_model`` runs the ones ``export.formats`` names. The int8 file is the exception to the
comparison: quantization changes the outputs by design, so it is run back at both batch sizes for
shapes and finite values, and judged on data by agreement and accuracy (``quantize.evaluate_int8``).
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from specprune_cli.errors import ConfigError, ExportError, reason
from specprune_cli.export_job import CHECK_BATCH, EXPORT_BATCH, Job, message, quiet, register, remove
from specprune_cli.model_io import tensors
from specprune_cli.pruned_file import load_pruned, save_pruned


@register("pt", "model.pt")
def _pt(job: Job, path: Path) -> dict:
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


def _write_onnx(job: Job, path: Path) -> dict:
    """Write one self-contained ONNX file with a dynamic batch dimension and named outputs.

    Returns:
        ``{"exporter": "dynamo"}``, or ``{"exporter": "legacy", "dynamo_error": ...}`` after a fallback.
    """
    model, x = job.call.bound(job.model), job.inputs[EXPORT_BATCH]
    # torch.export takes only outputs registered with pytree, not a model's own output dataclass: the
    # exporters see the output tensors as one flat tuple (through a hook, so that the modules keep their
    # names in the file, which export.int8.exclude reads)
    with _flat_outputs(model):
        return _export_onnx(job, model, x, path)


def _export_onnx(job: Job, model: nn.Module, x: torch.Tensor, path: Path) -> dict:
    common = dict(opset_version=job.cfg.opset, input_names=["input"], output_names=job.names)
    with quiet():
        try:
            # torch >= 2.9 defaults to the dynamo exporter: weights go to a side .data file unless
            # external_data=False, and every dimension is fixed unless dynamic_shapes names it.
            batch = torch.export.Dim("batch", min=1)
            torch.onnx.export(model, (x,), str(path), dynamo=True, external_data=False,
                              dynamic_shapes=({0: batch},), **common)
            return {"exporter": "dynamo"}
        except Exception as dynamo_error:  # any exporter failure: try the TorchScript-based one
            first = message(dynamo_error)
            remove(path, path.with_name(path.name + ".data"))
    # The legacy exporter needs to be told which outputs have a batch dimension: those that grow with it.
    batched = {n: {0: "batch"} for n, a, b in zip(job.names, job.refs[EXPORT_BATCH], job.refs[CHECK_BATCH])
               if a.dim() and a.shape[0] == EXPORT_BATCH and b.shape[0] == CHECK_BATCH}
    with quiet() as captured:
        try:
            torch.onnx.export(model, (x,), str(path), dynamo=False,
                              dynamic_axes={"input": {0: "batch"}, **batched}, **common)
            return {"exporter": "legacy", "dynamo_error": first}
        except Exception as legacy_error:
            raise ExportError(f"ONNX export failed with both exporters.\ndynamo: {first}\nlegacy "
                              f"(TorchScript): {message(legacy_error)}{captured.tail()}\n"
                              "Drop 'onnx' from export.formats, or make the model traceable by "
                              "torch.export") from legacy_error


@register("onnx", "model.onnx")
def _onnx(job: Job, path: Path) -> dict:
    """One ONNX file, checked by onnx.checker and run in ONNX Runtime."""
    import onnx
    import onnxruntime as ort

    from specprune_cli.ort_run import ort_feed

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
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        doubles = any(x.dtype == torch.float64 for x in job.inputs.values())
        hint = ("; ONNX Runtime has no float64 kernel for some operators (the one named): cast the model "
                "with model.float() and give float32 inputs" if doubles else
                "; drop onnx from export.formats")
        raise ExportError(f"ONNX Runtime cannot load the exported file ({reason(exc)}){hint}") from exc
    inputs = [i.name for i in session.get_inputs()]
    if len(inputs) != 1:
        raise ExportError(f"the ONNX model has inputs {inputs}; exports support a single input tensor")

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        try:
            return [torch.from_numpy(g) for g in session.run(None, ort_feed(session, x))]
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ExportError(f"ONNX Runtime cannot run the export at batch size {x.shape[0]}: {exc}\nIf the "
                              "model fixes its batch size (e.g. x.view(2, -1)), use x.flatten(1) or "
                              "x.view(x.size(0), -1)") from exc

    info["outputs"] = [o.name for o in session.get_outputs()]
    return {**info, "max_abs_diff": job.compare("onnx", run)}


@register("onnx-int8", "model.int8.onnx")
def _onnx_int8(job: Job, path: Path) -> dict:
    """model.onnx quantized to int8 (``quantize.quantize_onnx``), run back in ONNX Runtime at both batch
    sizes: the output tensors must come back with the float model's shapes and finite. ``max_abs_diff``
    (on random inputs) is recorded, not held to a tolerance."""
    import onnxruntime as ort

    from specprune_cli.ort_run import ort_outputs
    from specprune_cli.quantize import quantize_onnx

    with quiet() as captured:
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


@contextlib.contextmanager
def _flat_outputs(model: nn.Module) -> Iterator[None]:
    """While the block runs, ``model`` returns its output tensors as one flat tuple."""
    handle = model.register_forward_hook(lambda _module, _args, out: tuple(tensors(out)))
    try:
        yield
    finally:
        handle.remove()


class _Flat(nn.Module):
    """A model whose output tensors come out as one flat tuple (TorchScript cannot trace nested dicts)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(tensors(self.model(x)))


@register("torchscript", "model.torchscript.pt")
def _torchscript(job: Job, path: Path) -> dict:
    """A traced TorchScript module (forward keyword arguments fixed at their configured values). A model
    with several output tensors returns them as one tuple, in the order of ``outputs``."""
    single = job.names == ["output"]
    module = job.call.bound(job.model) if single else _Flat(job.call.bound(job.model))
    with quiet() as captured:
        try:
            # check_trace=False: the comparison below is the check, on two batch sizes.
            traced = torch.jit.trace(module, (job.inputs[EXPORT_BATCH],), check_trace=False)
            torch.jit.save(traced, str(path))
        except Exception as exc:
            raise ExportError(f"TorchScript tracing failed: {message(exc)}{captured.tail()}\n"
                              "Drop 'torchscript' from export.formats") from exc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; loading still works
        loaded = torch.jit.load(str(path), map_location=job.inputs[EXPORT_BATCH].device)
    loaded.eval()
    return {**({} if single else {"outputs": job.names}), "max_abs_diff": job.compare("torchscript", loaded)}


@register("module", "model.module.pt")
def _module(job: Job, path: Path) -> dict:
    """The whole module, pickled: loading it runs code, so only open files you trust."""
    try:
        torch.save(job.model, path)
    except Exception as exc:  # pickling errors come in several types
        raise ExportError(f"the whole-module file cannot be pickled ({reason(exc)}); its classes must be "
                          "importable at module level. Use format 'pt' instead") from exc
    loaded = torch.load(path, map_location=job.inputs[EXPORT_BATCH].device, weights_only=False).eval()
    return {"pickled": True, "max_abs_diff": job.compare("module", lambda x: job.call(loaded, x))}
