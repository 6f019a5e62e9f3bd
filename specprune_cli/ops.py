"""The operations that keep channel identity, in a registry keyed by module class, function or
tensor-method name (docs/method.md §1).

A rule takes an ``OpCall`` (one use of a channel-carrying tensor) and returns the layout of the
result, or raises ``Unsupported`` with the reason. Element-wise operations keep the layout;
operations along some dimensions (pooling, padding, interpolation, softmax, reductions) are fine as
long as those dimensions hold neither the channels nor the batch; data movement is run on labelled
tensors (``layout.locate``). What is not registered is not followed: the unit is skipped with the
reason, never guessed.
"""
from __future__ import annotations

import operator
from collections.abc import Callable, Collection, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torchvision.ops import stochastic_depth

from specprune_cli.probes import registered
from specprune_cli.layout import (Layout, ModuleEntry, OpCall, Unsupported, concrete, is_tensor, is_tensors,
                                  locate)

# -- the registry -------------------------------------------------------------------------------------

Rule = Callable[[OpCall], Layout]
RULES: dict[Any, Rule] = {}


def channel_op(*keys: Any) -> Callable[[Rule], Rule]:
    """Register ``rule`` for module classes, functions, or tensor-method names (``"Tensor.view"``).

    A rule takes an ``OpCall`` and returns the layout of the node's output, or raises Unsupported.
    """
    def decorate(rule: Rule) -> Rule:
        for k in keys:
            RULES[k] = rule
        return rule
    return decorate


def rule_for(node: fx.Node, module: nn.Module | None) -> Rule | None:
    """The registered rule for ``node`` (a module's class or a parent class of it), or None."""
    if module is not None:
        return registered(module, RULES)  # a subclass with a forward of its own is refused
    if node.op == "call_method":
        return RULES.get(f"Tensor.{node.target}")
    return RULES.get(node.target) if listed(node.target, RULES) else None


def listed(target: Any, table: Collection[Any]) -> bool:
    """``target in table``; False for an unhashable target (fx allows any callable), which no table holds."""
    try:
        return target in table
    except TypeError:
        return False


def supported() -> list[str]:
    """Names of every registered operation, for messages and docs."""
    return sorted(k if isinstance(k, str) else getattr(k, "__name__", str(k)) for k in RULES)


def _methods(*names: str) -> tuple[str, ...]:
    return tuple(f"Tensor.{n}" for n in names)


# -- element-wise: the layout is unchanged ----------------------------------------------------------

_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid,
                        nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softplus, nn.Softsign, nn.Identity,
                        nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                        nn.FeatureAlphaDropout, nn.Hardtanh, nn.SELU, nn.CELU, nn.LogSigmoid, nn.Tanhshrink,
                        nn.Softshrink, nn.Hardshrink, nn.Threshold)
_ELEMENTWISE_FUNCTIONS = (F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu,
                          F.mish, F.softplus, F.softsign, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
                          F.alpha_dropout, F.feature_alpha_dropout, F.hardtanh, F.selu, F.celu, F.logsigmoid,
                          F.tanhshrink, F.threshold, F.sigmoid, F.tanh, F.relu_, F.leaky_relu_, F.elu_,
                          F.hardtanh_, torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.abs,
                          torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.square, torch.neg, torch.clamp,
                          torch.clip, torch.sin, torch.cos, torch.erf, torch.sign, torch.log1p, torch.expm1,
                          torch.nan_to_num, operator.neg, operator.pos, operator.abs, stochastic_depth)
_ELEMENTWISE_METHODS = _methods("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous",
                                "clone", "detach", "float", "double", "half", "bfloat16", "to", "type",
                                "type_as", "abs", "abs_", "exp", "exp_", "log", "sqrt", "rsqrt", "square",
                                "neg", "clamp", "clamp_", "clip", "clip_", "sign", "erf", "nan_to_num",
                                "log1p", "expm1", "sin", "cos", "requires_grad_")


@channel_op(*_ELEMENTWISE_MODULES, *_ELEMENTWISE_FUNCTIONS, *_ELEMENTWISE_METHODS)
def elementwise(call: OpCall) -> Layout:
    """Activations, dropout, dtype casts: each output element is a function of the same input element."""
    if call.module is None:
        first = call.node.args[0] if call.node.args else call.node.kwargs.get("input")
        if first is not call.src:
            raise Unsupported(f"channels enter {call.label} as a secondary argument")
    if call.out_shape != call.in_shape:
        raise Unsupported(f"{call.label} changes the shape of the channels' tensor")
    return call.layout


# -- operations along some dimensions: fine as long as those are neither the channels nor the batch ----

def _along_dims(call: OpCall, dims: Sequence[int], *, reduce: bool = False, keepdim: bool = True) -> Layout:
    """Layout after an operation that mixes values only along ``dims`` (pool, pad, softmax, mean...)."""
    ndim = len(call.in_shape)
    dims = sorted({d % ndim for d in dims})
    lay = call.layout
    if lay.parts is not None:
        raise Unsupported(f"{call.label} applied to a tuple")
    if lay.cdim in dims:
        raise Unsupported(f"{call.label} mixes the channels (it acts along their dimension)")
    if lay.bdim in dims:
        raise Unsupported(f"{call.label} mixes the samples of the batch")
    if reduce and not keepdim:
        return replace(lay, cdim=lay.cdim - sum(d < lay.cdim for d in dims),
                       bdim=lay.bdim - sum(d < lay.bdim for d in dims))
    out = call.out_shape
    if len(out) != ndim or out[lay.cdim] != call.in_shape[lay.cdim]:
        raise Unsupported(f"{call.label} changes the channels' dimension")
    return lay


def _last(n: int) -> Callable[[OpCall], list[int]]:
    return lambda call: list(range(len(call.in_shape) - n, len(call.in_shape)))


def _spatial(call: OpCall) -> list[int]:
    return list(range(2, len(call.in_shape)))


_POOLS = {1: (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool1d,
              F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d, F.lp_pool1d),
          2: (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d,
              nn.FractionalMaxPool2d, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
              F.adaptive_max_pool2d, F.lp_pool2d),
          3: (nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d, nn.FractionalMaxPool3d,
              F.max_pool3d, F.avg_pool3d, F.adaptive_avg_pool3d, F.adaptive_max_pool3d)}
for _n, _keys in _POOLS.items():
    channel_op(*_keys)(lambda call, dims=_last(_n): _along_dims(call, dims(call)))

_PADS = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
         nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d,
         nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d)


@channel_op(*_PADS, F.pad)
def pad(call: OpCall) -> Layout:
    """Padding along the last len(pad)/2 dimensions; a zero pad leaves a dimension alone."""
    amounts = tuple(call.module.padding) if call.module is not None else tuple(call.arg(1, "pad"))
    ndim = len(call.in_shape)
    dims = [ndim - 1 - i for i in range(len(amounts) // 2) if amounts[2 * i] or amounts[2 * i + 1]]
    return _along_dims(call, dims)


@channel_op(nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, F.interpolate, F.upsample,
            F.upsample_nearest, F.upsample_bilinear)
def resize(call: OpCall) -> Layout:
    """Interpolation resizes the dimensions after the channels (N, C, *spatial)."""
    return _along_dims(call, _spatial(call))


def _dim_arg(call: OpCall, index: int = 1, name: str = "dim") -> int:
    dim = call.module.dim if call.module is not None else call.arg(index, name)
    if dim is None:
        raise Unsupported(f"{call.label} without an explicit dim")
    return int(dim)


@channel_op(nn.Softmax, nn.LogSoftmax, nn.Softmin, F.softmax, F.log_softmax, F.softmin, torch.softmax,
            torch.log_softmax, *_methods("softmax", "log_softmax"), torch.cumsum, *_methods("cumsum"))
def along_one_dim(call: OpCall) -> Layout:
    """softmax / cumsum along one dimension."""
    return _along_dims(call, [_dim_arg(call)])


@channel_op(F.normalize)
def normalize(call: OpCall) -> Layout:
    return _along_dims(call, [int(call.arg(2, "dim", 1))])


@channel_op(nn.LayerNorm, F.layer_norm)
def layer_norm(call: OpCall) -> Layout:
    """LayerNorm normalises over its last len(normalized_shape) dims: fine unless they hold channels."""
    shape = call.module.normalized_shape if call.module is not None else call.arg(1, "normalized_shape")
    n = 1 if isinstance(shape, int) else len(shape)
    return _along_dims(call, _last(n)(call))


_REDUCTIONS = ("mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp", "prod",
               "median", "nanmean", "nansum")


@channel_op(*(getattr(torch, n) for n in _REDUCTIONS), *_methods(*_REDUCTIONS))
def reduction(call: OpCall) -> Layout:
    """mean / sum / max ... over explicit dimensions (with or without keepdim)."""
    name = call.node.target if isinstance(call.node.target, str) else call.node.target.__name__
    dim_index = 2 if name == "norm" else 1
    node = call.node
    if len(node.args) > dim_index:
        raw = node.args[dim_index]
    else:
        raw = node.kwargs.get("dim", node.kwargs.get("axis"))
    if is_tensor(raw):
        raise Unsupported(f"{call.label} between two tensors")  # torch.max(a, b) is binary: propagate.py
    dim = concrete(raw)
    if dim is None:
        raise Unsupported(f"{call.label} over all dimensions mixes the channels")
    dims = [dim] if isinstance(dim, int) else list(dim)
    keepdim = bool(call.arg(dim_index + 1, "keepdim", False))
    out = _along_dims(call, dims, reduce=True, keepdim=keepdim)
    if name in ("max", "min", "median") and is_tensors(call.node):
        return Layout(0, parts=(out, out))  # (values, indices)
    return out


# -- data movement: run on labelled tensors ---------------------------------------------------------

_MOVEMENT_METHODS = ("view", "reshape", "flatten", "unflatten", "permute", "transpose", "swapaxes",
                     "swapdims", "movedim", "moveaxis", "squeeze", "unsqueeze", "t", "narrow", "select",
                     "chunk", "split", "tensor_split", "unbind", "flip", "roll", "repeat", "expand",
                     "expand_as", "view_as", "reshape_as", "unfold")
_MOVEMENT_FUNCTIONS = (torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.swapaxes,
                       torch.swapdims, torch.movedim, torch.moveaxis, torch.squeeze, torch.unsqueeze, torch.t,
                       torch.narrow, torch.select, torch.chunk, torch.split, torch.tensor_split, torch.unbind,
                       torch.flip, torch.roll, operator.getitem)
#: ops whose sizes must follow the channels: where the size list starts in their arguments
_SIZED = {"view": 1, "reshape": 1, "expand": 1, torch.reshape: 1, "unflatten": 2}


@channel_op(nn.Flatten, nn.Unflatten, *_methods(*_MOVEMENT_METHODS), *_MOVEMENT_FUNCTIONS)
def movement(call: OpCall) -> Layout:
    """Any pure data movement: apply it to labelled tensors and read where the channels went."""
    lay = call.layout
    node = call.node
    if lay.parts is not None:
        if node.target is operator.getitem and isinstance(node.args[1], int):
            return lay.parts[node.args[1]]
        raise Unsupported(f"{call.label} on a tuple of tensors")
    if node.target is operator.getitem and node.args[0] is not call.src:
        raise Unsupported("channels are used as an index")
    labelled = lay.tensors(call.in_shape)
    outs = [_apply(call, t) for t in labelled]
    what = f"{call.label} (`{node.name}`)"
    if isinstance(outs[0], (tuple, list)):
        result = Layout(0, parts=tuple(locate(c, b, call.width, what) for c, b in zip(*outs)))
    else:
        result = locate(outs[0], outs[1], call.width, what)
        _size_entries(call, result)
    return result


def _apply(call: OpCall, labels: torch.Tensor) -> Any:
    node = call.node

    def sub(a: Any) -> Any:
        return labels if a is call.src else concrete(a)

    args = [sub(a) for a in node.args]
    kwargs = {k: sub(v) for k, v in node.kwargs.items()}
    if call.module is not None:
        return call.module(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def _size_entries(call: OpCall, out: Layout) -> None:
    """Note the size argument that fixes the channels' dimension, for ops that take sizes."""
    node, size = call.node, call.out_shape[out.cdim]
    own = out.block.own if out.block is not None else size
    per_channel, others = own // call.width, size - own
    if isinstance(call.module, nn.Unflatten):
        index = out.cdim - call.module.dim % len(call.in_shape)
        if 0 <= index < len(call.module.unflattened_size):
            call.shape_entries.append((ModuleEntry(str(node.target), "unflattened_size", index), per_channel,
                                       others))
        return
    key = node.target if node.op == "call_function" else str(node.target)
    start = _SIZED.get(key) if not isinstance(key, str) or node.op == "call_method" else None
    if start is None:
        return
    sizes = list(node.args[start:]) or [next((node.kwargs[k] for k in ("shape", "size", "sizes")
                                              if k in node.kwargs), None)]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = list(sizes[0])
    index = out.cdim
    if key == "unflatten":
        index = out.cdim - int(concrete(node.args[1])) % len(call.in_shape)
        if not 0 <= index < len(sizes):
            return
    if index < len(sizes):
        call.shape_entries.append((sizes[index], per_channel, others))


@channel_op(getattr)
def attribute(call: OpCall) -> Layout:
    """``x.T`` / ``x.mT`` move data; other attributes (shape, dtype) carry no channels and never get here."""
    name = call.node.args[1]
    if name in ("T", "mT"):
        return movement(call)
    if call.layout.parts is not None and name in ("values", "indices"):
        return call.layout.parts[0 if name == "values" else 1]  # torch.max(x, dim) and friends
    raise Unsupported(f"channels flow into the attribute `{name}`")


#: element-wise binary operations: a scalar or a tensor broadcast along the channels keeps them; a
#: tensor of the same width is a join (propagate.py records it, joins.py decides).
BINARY = {operator.add, operator.mul, operator.sub, operator.truediv, operator.floordiv, operator.pow,
          operator.iadd, operator.imul, operator.isub, operator.itruediv, torch.add, torch.mul, torch.sub,
          torch.div, torch.true_divide, torch.pow, torch.maximum, torch.minimum, torch.masked_fill, "add",
          "add_", "mul", "mul_", "sub", "sub_", "div", "div_", "truediv", "pow", "maximum", "minimum",
          "masked_fill", "masked_fill_", "__radd__", "__rmul__", "__rsub__", "__rtruediv__",
          # comparisons (a mask per entry) and the choice between entries they make, `where(x > 0, x, a * x)`
          operator.gt, operator.ge, operator.lt, operator.le, operator.eq, operator.ne, torch.gt, torch.ge,
          torch.lt, torch.le, torch.eq, torch.ne, "gt", "ge", "lt", "le", "eq", "ne", torch.where, "where"}
#: concatenations: along the channels' dimension they put a unit's channels in a block (``joins.py``).
CONCATS = {torch.cat, torch.concat, torch.concatenate}
#: other joins of whole tensors (stacking, concatenating along another dimension): not supported.
JOINS = {torch.cat, torch.stack, torch.concat, torch.concatenate, torch.hstack, torch.vstack, torch.dstack}
#: methods whose second tensor only lends its shape or dtype.
SHAPE_FROM_OTHER = {"view_as", "reshape_as", "expand_as", "type_as"}
#: methods that take only the dtype and device of the tensor they are called on (its size is given).
NEW_FROM = {"new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"}
#: reading these gives shapes or dtypes, not channels.
SHAPE_READS = {"size", "dim", "ndimension", "numel", "nelement", "element_size", "get_device",
               "is_floating_point", "is_complex", "is_contiguous"}
SHAPE_FUNCTIONS = {torch.is_floating_point, torch.is_complex, torch.numel}
SHAPE_ATTRIBUTES = {"shape", "ndim", "dtype", "device", "is_cuda", "layout", "requires_grad", "is_nested",
                    "is_sparse", "is_quantized"}
#: layers written as functions of parameters: they cannot be sliced with a module.
FUNCTIONAL_LAYERS = {F.conv1d: "nn.Conv1d", F.conv2d: "nn.Conv2d", F.conv3d: "nn.Conv3d",
                     F.linear: "nn.Linear", F.conv_transpose1d: "nn.ConvTranspose1d",
                     F.conv_transpose2d: "nn.ConvTranspose2d", F.conv_transpose3d: "nn.ConvTranspose3d",
                     F.batch_norm: "nn.BatchNorm", torch.matmul: "nn.Linear", torch.mm: "nn.Linear",
                     torch.bmm: "nn.Linear", torch.einsum: "nn.Linear", operator.matmul: "nn.Linear",
                     F.group_norm: "nn.GroupNorm", F.instance_norm: "nn.InstanceNorm", "matmul": "nn.Linear",
                     "mm": "nn.Linear", "bmm": "nn.Linear", "__matmul__": "nn.Linear"}
