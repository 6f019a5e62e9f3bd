"""Static int8 quantization of the exported float ONNX file with ONNX Runtime (export format onnx-int8).

The float ``model.onnx`` is pre-processed first (``quant_pre_process``: symbolic shape inference and
ORT's graph optimisation, as ONNX Runtime recommends before quantizing), then ``quantize_static``
writes QDQ format with per-channel int8 weights and 8-bit activations (``export.int8.activations``:
uint8 by default, the type ONNX Runtime's x86 kernels fuse everywhere) whose ranges come from the
calibration batches (the first ``export.int8.num_samples`` samples) by ``export.int8.method``.

``export.int8.exclude`` keeps nodes in float. An entry names an ONNX node, or a torch module: the
module's nodes are those the exporter recorded under its name (the node's name scopes, or the path in a
legacy exporter's node name) or that read its parameters, so ``features.0`` finds the Conv even after
the BatchNorm ``features.1`` was folded into it. A "re:" entry is a regular expression matched against
whole node and module names. An entry that matches nothing is a ConfigError naming the closest names.
"""
from __future__ import annotations

import ast
import difflib
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from specprune_cli.config import Int8Config
from specprune_cli.errors import ConfigError, ExportError, reason
from specprune_cli.evaluate import evaluate_model, split_batch
from specprune_cli.model_io import ModelCall
from specprune_cli.ort_run import OrtModel, ort_input

_SCOPES = "pkg.torch.onnx.name_scopes"  # the dynamo exporter's module path of a node


def calibration_method(name: str):
    """``export.int8.method`` -> ``onnxruntime.quantization.CalibrationMethod``."""
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


def _reader(batches: Iterable, input_name: str, limit: int, dtype: Any = None):
    """A ``CalibrationDataReader`` over the first ``limit`` samples of ``batches``, in ``dtype`` (the
    float model's declared input type)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches, self.left = iter(batches), limit

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.left <= 0:
                return None
            batch = next(self.batches, None)
            if batch is None:
                return None
            x = split_batch(batch)[0][:self.left]
            self.left -= x.shape[0]
            return {input_name: ort_input(x, dtype)}

    return Reader()


def node_modules(node, prefix: str = "") -> set[str]:
    """The torch modules a node was exported from: every module on its scope path (full dotted names).

    Args:
        node: an ``onnx.NodeProto``.
        prefix: a wrapper's attribute path to drop from the front of every name (e.g. "model.").
    """
    scopes: list[str] = []
    for prop in node.metadata_props:
        if prop.key == _SCOPES:
            try:
                scopes = [s for s in ast.literal_eval(prop.value) if isinstance(s, str)][:-1]
            except (ValueError, SyntaxError):
                scopes = []
    if not scopes and node.name.startswith("/"):  # legacy exporter: /features/features.0/Conv
        scopes = node.name.split("/")[1:-1]
    names = {s for s in scopes if s}
    return {n[len(prefix):] if prefix and n.startswith(prefix) else n for n in names}


def _parameter_owners(node, initializers: set[str], prefix: str) -> set[str]:
    """Modules whose parameters the node reads ("features.0.weight" -> "features.0")."""
    owners = set()
    for name in node.input:
        if name in initializers and "." in name:
            owner = name.rsplit(".", 1)[0]
            owners.add(owner[len(prefix):] if prefix and owner.startswith(prefix) else owner)
    return owners


def resolve_exclude(proto, patterns: Sequence[str], module_names: Iterable[str] = (), prefix: str = ""
                    ) -> dict[str, list[str]]:
    """The ONNX nodes each ``export.int8.exclude`` entry keeps in float.

    Args:
        proto: the ``onnx.ModelProto`` that will be quantized.
        patterns: node names, module names, or "re:" regular expressions (matching whole names).
        module_names: the torch model's module names, to tell a module that became no node (a Dropout,
            say) from a typo.
        prefix: see :func:`node_modules`.

    Returns:
        entry -> the node names it selects, in graph order.

    Raises:
        ConfigError: an entry selects no node.
    """
    initializers = {t.name for t in proto.graph.initializer}
    nodes = [(n.name, node_modules(n, prefix) | _parameter_owners(n, initializers, prefix))
             for n in proto.graph.node]
    known_modules = set(module_names) | {m for _, mods in nodes for m in mods}
    out: dict[str, list[str]] = {}
    for entry in patterns:
        if entry.startswith("re:"):
            rx = re.compile(entry[3:])
            hit = [name for name, mods in nodes
                   if rx.fullmatch(name) or any(rx.fullmatch(m) for m in mods)]
        else:
            hit = [name for name, mods in nodes
                   if name == entry or any(m == entry or m.startswith(entry + ".") for m in mods)]
        if not hit:
            raise ConfigError(_no_match(entry, [n for n, _ in nodes], known_modules))
        out[entry] = hit
    return out


def _no_match(entry: str, node_names: list[str], modules: set[str]) -> str:
    head = f"config key export.int8.exclude: {entry!r} matches no node of the ONNX model"
    if entry in modules:
        return (f"{head}: module {entry} left no node in the export (a Dropout or Identity is removed); "
                "remove the entry")
    close = difflib.get_close_matches(entry, sorted(modules) + node_names, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return (f"{head}{hint} Give a node name (e.g. {node_names[0]}) or a torch module name "
            f"(e.g. {sorted(modules)[0] if modules else '-'}), or 're:<regex>'")


def _preprocess(src: Path, dst: Path) -> str:
    """``quant_pre_process`` into ``dst``; without symbolic shape inference if that fails. Which ran."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst))
        return "symbolic shape inference + optimisation"
    except Exception:  # symbolic shape inference does not know every op: ONNX's own inference next
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
        return "onnx shape inference + optimisation"


def quantize_onnx(float_path: str | os.PathLike, out_path: str | os.PathLike, batches: Iterable,
                  cfg: Int8Config, *, module_names: Iterable[str] = (), prefix: str = "") -> dict:
    """Write the int8 QDQ model of ``float_path`` to ``out_path``, calibrated on ``batches``.

    Args:
        float_path: a float ONNX file with one input.
        out_path: where the int8 file goes (the caller renames it into place).
        batches: yields input tensors or ``(x, y)`` pairs; at most ``cfg.num_samples`` samples are read.
        cfg: ``export.int8``.
        module_names, prefix: see :func:`resolve_exclude`.

    Returns:
        ``method``, ``activations``, ``calibration_samples``, ``preprocess`` (which pre-processing ran),
        ``excluded`` (entry -> node names kept in float), ``int8_nodes`` and ``float_nodes`` (see
        :func:`int8_nodes`).

    Raises:
        ConfigError: an exclude entry that matches nothing.
        ExportError: pre-processing or quantization failed, or no calibration sample was read.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory(prefix="specprune-int8-") as tmp:
        pre = Path(tmp) / "preprocessed.onnx"
        try:
            preprocess = _preprocess(Path(float_path), pre)
        except Exception as exc:  # onnx / onnxruntime raise many types
            raise ExportError(f"int8 pre-processing (shape inference, optimisation) failed: {reason(exc)}; "
                              "drop onnx-int8 from export.formats") from exc
        proto = onnx.load(str(pre))
        excluded = resolve_exclude(proto, cfg.exclude, module_names, prefix)
        spec = proto.graph.input[0]
        reader = _reader(batches, spec.name, cfg.num_samples,
                         onnx.helper.tensor_dtype_to_np_dtype(spec.type.tensor_type.elem_type))
        try:
            quantize_static(str(pre), str(out_path), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type={"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[
                                cfg.activations], weight_type=QuantType.QInt8,
                            nodes_to_exclude=sorted({n for nodes in excluded.values() for n in nodes}),
                            calibrate_method=calibration_method(cfg.method))
        except Exception as exc:  # onnxruntime's calibrators raise their own types
            raise ExportError(f"int8 quantization failed: {reason(exc)}; try another export.int8.method, "
                              "exclude the node it names (export.int8.exclude), or drop onnx-int8") from exc
    read = cfg.num_samples - reader.left
    if read <= 0:
        raise ExportError("int8 calibration read no sample; give data.calibration at least one sample")
    int8, float_ = int8_nodes(onnx.load(str(out_path)))
    return {"method": cfg.method, "activations": cfg.activations, "calibration_samples": read,
            "preprocess": preprocess, "excluded": excluded, "int8_nodes": int8, "float_nodes": float_}


def int8_nodes(proto) -> tuple[list[str], list[str]]:
    """The compute nodes that run in int8 and those left in float, in graph order.

    In QDQ format a node runs in int8 when every float input it reads (activations and weights) comes
    from a DequantizeLinear; integer inputs (a Reshape's shape, say) do not count.
    """
    from onnx import TensorProto

    dq = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
    non_float = {t.name for t in proto.graph.initializer if t.data_type not in floats}
    int8, float_ = [], []
    for n in proto.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        read = [i for i in n.input if i and i not in non_float]
        (int8 if read and all(i in dq for i in read) else float_).append(n.name)
    return int8, float_


def evaluate_int8(path: str | os.PathLike, original: nn.Module, pruned: nn.Module, loader: Iterable, *,
                  template: Any, call: ModelCall | None = None, max_samples: int | None = None) -> dict:
    """The int8 file against the original (what the gates judge) and against the float pruned model.

    Args:
        path: the int8 ONNX file.
        original, pruned: the torch models.
        loader: the evaluation batches (``(x, y)``; ``y < 0`` unlabelled).
        template: the torch model's output structure (see :class:`OrtModel`).
        call, max_samples: as for ``evaluate.evaluate_model``.

    Returns:
        ``samples``; ``accuracy``/``top5`` of the int8 model (None without labels); ``agreement`` and
        ``relative_error`` against the original; ``agreement_with_float`` and
        ``relative_error_to_float`` against the float pruned model, whose accuracy is ``accuracy_float``.
    """
    int8 = OrtModel(path, template)
    vs_original = evaluate_model(int8, original, loader, max_samples=max_samples, call=call)
    vs_float = evaluate_model(int8, pruned, loader, max_samples=max_samples, call=call)
    return {"samples": vs_original["samples"], "accuracy": vs_original["top1"], "top5": vs_original["top5"],
            "agreement": vs_original["agreement"], "relative_error": vs_original["relative_error"],
            "agreement_with_float": vs_float["agreement"],
            "relative_error_to_float": vs_float["relative_error"],
            "accuracy_float": vs_float["reference_top1"]}
