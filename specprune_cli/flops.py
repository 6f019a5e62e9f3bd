"""FLOPs and parameter counts, measured with ``torch.utils.flop_counter`` (no hand-written counter).

Three gaps of the counter are closed, each of which counted a layer as free:
- In eval mode without gradients, nn.MultiheadAttention and nn.TransformerEncoderLayer take a fused
  "fast path" whose kernels the counter has no formula for (it counts 0 for the whole block, its Linears
  included). Counting turns the fast path off, so the same layers run as their plain operations.
- ``scaled_dot_product_attention`` on the CPU runs a kernel of its own; it is counted with the formula
  the counter has for the GPU kernels.
- nn.LSTM on the CPU runs oneDNN's fused layer (``mkldnn_rnn_layer``), which has no formula either;
  counting turns oneDNN off, and the LSTM runs as the matrix products the counter knows.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode


def _attention_flops(query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size,
                     *args: object, out_shape: object = None, **kwargs: object) -> int:
    """The counter's own formula for the GPU attention kernels (it is given the arguments' shapes)."""
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


_CPU_ATTENTION = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
#: Formulas the counter lacks (see the module docstring).
EXTRA_FORMULAS = ({_CPU_ATTENTION: _attention_flops}
                  if _CPU_ATTENTION is not None and hasattr(flop_counter, "sdpa_flop_count") else {})


@contextmanager
def _counting(model: nn.Module) -> Iterator[FlopCounterMode]:
    """A FlopCounterMode over ``model`` run without gradients, its parameters frozen meanwhile.

    The counter's module tracker hooks every tensor that requires grad, and fails on one that has no
    grad_fn, which a view of a parameter taken under ``no_grad`` is (CaiT's ``cls_token.expand``)."""
    frozen = [p for p in model.parameters() if p.requires_grad and p.is_leaf]  # (a scripted one may not be)
    counter = FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS)
    fast_path, onednn = torch.backends.mha.get_fastpath_enabled(), torch.backends.mkldnn.enabled
    try:
        for p in frozen:
            p.requires_grad_(False)
        torch.backends.mha.set_fastpath_enabled(False)
        torch.backends.mkldnn.enabled = False  # (its flags() context also resets TF32 with a warning)
        with torch.no_grad(), counter:
            yield counter
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
        torch.backends.mkldnn.enabled = onednn
        for p in frozen:
            p.requires_grad_(True)


def count_flops(model: nn.Module, example_input: torch.Tensor) -> int:
    """FLOPs of one forward pass on ``example_input`` (counted per the batch given).

    Args:
        model: the network; run in its current mode under ``torch.no_grad``.
        example_input: a batch, usually of size 1.

    Returns:
        Total FLOPs as counted by ``FlopCounterMode`` (a multiply-add counts as 2).
    """
    with _counting(model) as counter:
        model(example_input)
    return int(counter.get_total_flops())


def module_flops(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """FLOPs per leaf module name (the names of ``model.named_modules()``), for one forward pass."""
    with _counting(model) as counter:
        model(example_input)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    out: dict[str, int] = {}
    for key, per_op in counts.items():
        name = key
        if name == "Global":
            continue
        if name.startswith(root + "."):
            name = name[len(root) + 1:]
        out[name] = int(sum(per_op.values()))
    return out


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())
