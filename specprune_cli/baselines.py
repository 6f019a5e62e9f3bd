"""Reference selections without statistics: the criteria specprune is measured against.

``prune_by_criterion`` keeps, for the same units and widths as a spectral run, the channels a
data-free criterion prefers and slices the consumers without reconstruction: L1-norm of filters
(Li et al. 2017), L2-norm, or random. Benchmarks and tests use it so that only the selection and
the reconstruction differ between methods, never the architecture.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from specprune_cli.graph import find_units
from specprune_cli.surgery import prune_unit, selection_matrix

CRITERIA = ("l1", "l2", "random")


def channel_scores(model: nn.Module, producer: str, criterion: str, *,
                   generator: torch.Generator) -> torch.Tensor:
    """Importance of each output channel of ``producer`` under ``criterion`` (higher = keep)."""
    w = model.get_submodule(producer).weight.detach()
    flat = w.reshape(w.shape[0], -1)
    if criterion == "l1":
        return flat.abs().sum(1)
    if criterion == "l2":
        return flat.pow(2).sum(1).sqrt()
    if criterion == "random":
        return torch.rand(w.shape[0], generator=generator)
    raise ValueError(f"unknown criterion {criterion!r}; supported: {', '.join(CRITERIA)}")


def prune_by_criterion(model: nn.Module, example_input: torch.Tensor, widths: Mapping[str, int], *,
                       criterion: str = "l1", seed: int = 0) -> nn.Module:
    """A pruned deep copy of ``model`` with ``widths[unit]`` channels per unit chosen by ``criterion``.

    Args:
        model: the original network (not modified).
        example_input: a batch it accepts (for tracing).
        widths: unit name -> kept channels, e.g. ``{u["name"]: u["kept"] for u in plan["units"]}``.
        criterion: "l1", "l2" or "random".
        seed: for "random".

    Returns:
        The pruned copy.
    """
    model = copy.deepcopy(model).eval()
    graph = find_units(model, example_input[:1])
    generator = torch.Generator().manual_seed(seed)
    for unit in graph.units:
        k = widths.get(unit.name, unit.width)
        if k >= unit.width:
            continue
        scores = channel_scores(model, unit.name, criterion, generator=generator)
        keep = torch.sort(torch.topk(scores, k).indices).values
        prune_unit(model, unit, keep, {t: selection_matrix(unit.width, keep) for t in unit.taps})
    return model
