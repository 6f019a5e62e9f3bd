"""Where a unit's channels sit in each tensor that carries them, and the operations that keep them.

A ``Layout`` says which dimension of a tensor carries the unit's channels and, when that dimension
also holds other coordinates (after ``flatten``, ``permute`` + ``reshape`` to time-major order, ...),
which channel each index along it belongs to. Operations that move data around (view, reshape,
flatten, permute, transpose, squeeze, unsqueeze, slicing, chunk, ...) are not modelled case by case:
they are run on an index-labelled tensor (each element holds its channel number, a second one its
sample number) and the result is read off. So a Linear after any chain of them knows exactly which
of its input columns belong to which channel, and a chain that scatters a channel over several
dimensions, merges it with the batch, or drops some channels is recognised and refused.

Every other operation that keeps channel identity is listed in a registry keyed by module class,
function or tensor-method name (``channel_op``); what is not listed is not followed (the unit is
skipped with the reason), never guessed.
"""
from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torchvision.ops import stochastic_depth


class Unsupported(Exception):
    """The channels cannot be followed through this operation; the message is the skip reason."""


@dataclass(eq=False)
class Layout:
    """Where the channels of a unit sit in one tensor (shapes as in the capture, batch of 2).

    Attributes:
        cdim: the one dimension that carries the channel coordinate.
        labels: channel of each index along ``cdim``; None when index i is channel i.
        bdim: the dimension that carries the batch coordinate.
        blabels: sample of each index along ``bdim``; None when index i is sample i.
        parts: for a tuple or list of tensors (``chunk``, ``split``), the layout of each element; the
            other fields are then unused.
    """

    cdim: int
    labels: torch.Tensor | None = None
    bdim: int = 0
    blabels: torch.Tensor | None = None
    parts: tuple["Layout", ...] | None = field(default=None)

    @property
    def plain(self) -> bool:
        """Channel i at index i of ``cdim``, nothing else merged into it."""
        return self.labels is None and self.parts is None

    def channels(self, size: int) -> torch.Tensor:
        """Channel of each of the ``size`` indices along ``cdim``."""
        return torch.arange(size) if self.labels is None else self.labels

    def keep(self, value: Any, keep: torch.Tensor) -> Any:
        """``value`` with only the channels ``keep`` (sorted): what the pruned network computes there."""
        if self.parts is not None:
            return type(value)(p.keep(v, keep) for p, v in zip(self.parts, value))
        if self.labels is None:
            return value.index_select(self.cdim, keep)
        index = torch.isin(self.labels, keep).nonzero().flatten()
        return value.index_select(self.cdim, index)

    def tensors(self, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Full tensors of ``shape`` holding each element's channel and sample number."""
        def full(dim: int, labels: torch.Tensor | None) -> torch.Tensor:
            vec = torch.arange(shape[dim]) if labels is None else labels
            view = [1] * len(shape)
            view[dim] = -1
            return vec.to(torch.int32).view(view).expand(*shape).contiguous()
        return full(self.cdim, self.labels), full(self.bdim, self.blabels)

    def shifted(self, by: int) -> "Layout":
        """The same layout in a tensor with ``by`` more leading dimensions (broadcasting)."""
        return Layout(self.cdim + by, self.labels, self.bdim + by, self.blabels)


def locate(channels: torch.Tensor, batch: torch.Tensor, width: int, what: str) -> Layout:
    """Read a Layout off labelled tensors (see ``Layout.tensors``).

    Raises:
        Unsupported: the channels are spread over several dimensions, merged with the batch, or not
            all present.
    """
    cdims = _varying(channels)
    bdims = _varying(batch)
    if width > 1 and len(cdims) != 1:
        raise Unsupported(f"{what} spreads each channel over {len(cdims) or 'no'} dimensions")
    if len(bdims) != 1:
        raise Unsupported(f"{what} does not keep the batch in one dimension")
    cdim = cdims[0] if cdims else channels.dim() - 1
    if cdim == bdims[0]:
        raise Unsupported(f"{what} merges the channels with the batch dimension")
    labels = _along(channels, cdim).to(torch.long)
    counts = torch.bincount(labels, minlength=width)
    if counts.numel() != width or bool((counts == 0).any()):
        raise Unsupported(f"{what} keeps only some of the channels")
    blabels = _along(batch, bdims[0]).to(torch.long)
    return Layout(cdim, None if torch.equal(labels, torch.arange(width)) else labels, bdims[0],
                  None if torch.equal(blabels, torch.arange(blabels.numel())) else blabels)


def _varying(t: torch.Tensor) -> list[int]:
    return [d for d in range(t.dim()) if t.shape[d] > 1 and bool((t.diff(dim=d) != 0).any())]


def _along(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.movedim(dim, 0).reshape(t.shape[dim], -1)[:, 0] if t.numel() else t.new_zeros(0)


@dataclass
class OpCall:
    """One use of a channel-carrying tensor ``src`` by ``node``, as a rule sees it.

    Attributes:
        shape_entries: filled by rules that take sizes: (size argument as written in the graph, or a
            ``ModuleEntry``; channels' share of that size per channel) for the dimension that carries
            the channels, which must follow a pruned width.
    """

    node: fx.Node
    src: fx.Node
    layout: Layout
    width: int
    module: nn.Module | None = None
    shape_entries: list[tuple[Any, int]] = field(default_factory=list)

    @property
    def label(self) -> str:
        t = self.node.target
        if self.module is not None:
            return f"{t} ({type(self.module).__name__})"
        return f"`{t if isinstance(t, str) else getattr(t, '__name__', str(t))}`"

    @property
    def in_shape(self) -> tuple[int, ...]:
        return shape_of(self.src)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return shape_of(self.node)

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        """Argument ``index`` (counting ``src`` as 0 for functions and methods) or keyword ``name``,
        as a concrete value."""
        args = self.node.args
        raw = args[index] if index < len(args) else self.node.kwargs.get(name, default)
        return concrete(raw)


@dataclass(frozen=True)
class ModuleEntry:
    """A size held by a module attribute (``nn.Unflatten.unflattened_size[index]``)."""

    module: str
    attr: str
    index: int | None


def is_tensor(node: Any) -> bool:
    """True if the graph node's value in the capture was one tensor."""
    return isinstance(node, fx.Node) and hasattr(node.meta.get("tensor_meta"), "shape")


def is_tensors(node: Any) -> bool:
    """True if the graph node's value in the capture was a tuple or list of tensors."""
    return isinstance(node, fx.Node) and type(node.meta.get("tensor_meta")) is tuple


def shape_of(node: Any) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(meta, "shape", None)
    if shape is None:
        raise Unsupported(f"the shape of `{getattr(node, 'name', node)}` is unknown")
    return tuple(shape)


def concrete(a: Any) -> Any:
    """The value of a graph argument in the capture: recorded Python values, and for tensors other
    than the channels a zero tensor of their shape (only shapes matter to the rules that take one)."""
    if isinstance(a, fx.Node):
        if "value" in a.meta:
            return a.meta["value"]
        if not is_tensor(a):
            raise Unsupported(f"the value of `{a.name}` is unknown")
        return torch.zeros(shape_of(a), dtype=torch.int32)
    if isinstance(a, (tuple, list)):
        return type(a)(concrete(x) for x in a)
    if isinstance(a, dict):
        return {k: concrete(v) for k, v in a.items()}
    if isinstance(a, slice):
        return slice(concrete(a.start), concrete(a.stop), concrete(a.step))
    return a


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
        return next((RULES[c] for c in type(module).__mro__ if c in RULES), None)
    if node.op == "call_method":
        return RULES.get(f"Tensor.{node.target}")
    try:
        return RULES.get(node.target)
    except TypeError:  # an unhashable target
        return None


def supported() -> list[str]:
    """Names of every registered operation, for messages and docs."""
    return sorted(k if isinstance(k, str) else getattr(k, "__name__", str(k)) for k in RULES)


def _methods(*names: str) -> tuple[str, ...]:
    return tuple(f"Tensor.{n}" for n in names)


# -- element-wise: the layout is unchanged ----------------------------------------------------------

_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
                        nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softplus, nn.Softsign, nn.Identity, nn.Dropout,
                        nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
                        nn.Hardtanh, nn.SELU, nn.CELU, nn.LogSigmoid, nn.Tanhshrink, nn.Softshrink,
                        nn.Hardshrink, nn.Threshold)
_ELEMENTWISE_FUNCTIONS = (F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu, F.mish,
                          F.softplus, F.softsign, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
                          F.alpha_dropout, F.feature_alpha_dropout, F.hardtanh, F.selu, F.celu, F.logsigmoid,
                          F.tanhshrink, F.threshold, F.sigmoid, F.tanh, F.relu_, F.leaky_relu_, F.elu_,
                          F.hardtanh_, torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.abs, torch.exp,
                          torch.log, torch.sqrt, torch.rsqrt, torch.square, torch.neg, torch.clamp, torch.clip,
                          torch.sin, torch.cos, torch.erf, torch.sign, torch.log1p, torch.expm1,
                          torch.nan_to_num, operator.neg, operator.pos, operator.abs, stochastic_depth)
_ELEMENTWISE_METHODS = _methods("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "clone",
                                "detach", "float", "double", "half", "bfloat16", "to", "type", "type_as", "abs",
                                "abs_", "exp", "exp_", "log", "sqrt", "rsqrt", "square", "neg", "clamp", "clamp_",
                                "clip", "clip_", "sign", "erf", "nan_to_num", "log1p", "expm1", "sin", "cos",
                                "requires_grad_")


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
        return Layout(lay.cdim - sum(d < lay.cdim for d in dims), lay.labels,
                      lay.bdim - sum(d < lay.bdim for d in dims), lay.blabels)
    out = call.out_shape
    if len(out) != ndim or out[lay.cdim] != call.in_shape[lay.cdim]:
        raise Unsupported(f"{call.label} changes the channels' dimension")
    return lay


def _last(n: int) -> Callable[[OpCall], list[int]]:
    return lambda call: list(range(len(call.in_shape) - n, len(call.in_shape)))


def _spatial(call: OpCall) -> list[int]:
    return list(range(2, len(call.in_shape)))


_POOLS = {1: (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool1d, F.max_pool1d,
              F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d, F.lp_pool1d),
          2: (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d,
              nn.FractionalMaxPool2d, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
              F.lp_pool2d),
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


_REDUCTIONS = ("mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp", "prod", "median",
               "nanmean", "nansum")


@channel_op(*(getattr(torch, n) for n in _REDUCTIONS), *_methods(*_REDUCTIONS))
def reduction(call: OpCall) -> Layout:
    """mean / sum / max ... over explicit dimensions (with or without keepdim)."""
    name = call.node.target if isinstance(call.node.target, str) else call.node.target.__name__
    dim_index = 2 if name == "norm" else 1
    node = call.node
    raw = node.args[dim_index] if len(node.args) > dim_index else node.kwargs.get("dim", node.kwargs.get("axis"))
    if is_tensor(raw):
        raise Unsupported(f"{call.label} between two tensors")  # torch.max(a, b): graph.py treats it as binary
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

_MOVEMENT_METHODS = ("view", "reshape", "flatten", "unflatten", "permute", "transpose", "swapaxes", "swapdims",
                     "movedim", "moveaxis", "squeeze", "unsqueeze", "t", "narrow", "select", "chunk", "split",
                     "tensor_split", "unbind", "flip", "roll", "repeat", "expand", "expand_as", "view_as",
                     "reshape_as", "unfold")
_MOVEMENT_FUNCTIONS = (torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.swapaxes, torch.swapdims,
                       torch.movedim, torch.moveaxis, torch.squeeze, torch.unsqueeze, torch.t, torch.narrow,
                       torch.select, torch.chunk, torch.split, torch.tensor_split, torch.unbind, torch.flip,
                       torch.roll, operator.getitem)
#: where the size list starts in the arguments (after the tensor), for ops whose sizes must follow the channels
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
    per_channel = size // call.width
    if isinstance(call.module, nn.Unflatten):
        index = out.cdim - call.module.dim % len(call.in_shape)
        if 0 <= index < len(call.module.unflattened_size):
            call.shape_entries.append((ModuleEntry(str(node.target), "unflattened_size", index), per_channel))
        return
    key = node.target if node.op == "call_function" else str(node.target)
    start = _SIZED.get(key) if not isinstance(key, str) or node.op == "call_method" else None
    if start is None:
        return
    sizes = list(node.args[start:]) or [node.kwargs.get("shape", node.kwargs.get("size", node.kwargs.get("sizes")))]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = list(sizes[0])
    index = out.cdim
    if key == "unflatten":
        index = out.cdim - int(concrete(node.args[1])) % len(call.in_shape)
        if not 0 <= index < len(sizes):
            return
    if index < len(sizes):
        call.shape_entries.append((sizes[index], per_channel))


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
#: tensor of the same width is a join (graph.py decides).
BINARY = {operator.add, operator.mul, operator.sub, operator.truediv, operator.floordiv, operator.pow,
          operator.iadd, operator.imul, operator.isub, operator.itruediv, torch.add, torch.mul, torch.sub,
          torch.div, torch.true_divide, torch.pow, torch.maximum, torch.minimum, torch.masked_fill,
          "add", "add_", "mul", "mul_", "sub", "sub_", "div", "div_", "truediv", "pow", "maximum", "minimum",
          "masked_fill", "masked_fill_", "__radd__", "__rmul__", "__rsub__", "__rtruediv__"}
#: joins of whole tensors: group-aware handling is not supported yet.
JOINS = {torch.cat, torch.stack, torch.concat, torch.concatenate, torch.hstack, torch.vstack, torch.dstack,
         torch.where}
#: methods whose second tensor only lends its shape or dtype.
SHAPE_FROM_OTHER = {"view_as", "reshape_as", "expand_as", "type_as"}
#: reading these gives shapes or dtypes, not channels.
SHAPE_READS = {"size", "dim", "ndimension", "numel", "nelement", "element_size", "get_device"}
SHAPE_ATTRIBUTES = {"shape", "ndim", "dtype", "device", "is_cuda", "layout", "requires_grad"}
#: layers written as functions of parameters: they cannot be sliced with a module.
FUNCTIONAL_LAYERS = {F.conv1d: "nn.Conv1d", F.conv2d: "nn.Conv2d", F.conv3d: "nn.Conv3d", F.linear: "nn.Linear",
                     F.conv_transpose1d: "nn.ConvTranspose1d", F.conv_transpose2d: "nn.ConvTranspose2d",
                     F.conv_transpose3d: "nn.ConvTranspose3d", F.batch_norm: "nn.BatchNorm", torch.matmul:
                     "nn.Linear", torch.mm: "nn.Linear", torch.bmm: "nn.Linear", torch.einsum: "nn.Linear",
                     operator.matmul: "nn.Linear", F.group_norm: "nn.GroupNorm", F.instance_norm:
                     "nn.InstanceNorm", "matmul": "nn.Linear", "mm": "nn.Linear", "bmm": "nn.Linear",
                     "__matmul__": "nn.Linear"}
