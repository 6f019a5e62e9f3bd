"""From a unit's statistics to its kept channels and the folds of its consumers (docs/method.md §3, §6).

The glue between the modules and the pure tensor math of ``spectral.py``: each tap of a unit becomes
one ``spectral.Signal`` (its moments and the Gram matrix of the consumers reading it), the selection
minimises their weighted mean loss, and the result is a reconstruction A (and, with an intercept, a
bias b) per tap.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from specprune_cli.config import PruneConfig
from specprune_cli.errors import ModelError
from specprune_cli.graph import Unit
from specprune_cli.layers import consumer_matrix, require_layer_kind
from specprune_cli.moments import CrossMoment
from specprune_cli.spectral import Signal, degrees_of_freedom, loss_curve, relative_lambda, select

TapKey = tuple[str, str]  # (unit name, tap node name)


@dataclass
class Choice:
    """A unit's selection.

    Attributes:
        keep: kept channels, sorted (None: the unit is kept whole and left untouched).
        maps: tap -> A (m x k, float64), the fold of the consumers at that tap.
        biases: tap -> b (m,), the intercept absorbed by the consumers at that tap (empty without one).
        loss: the selection's normalised loss (mean over taps), 0 for a unit kept whole.
    """

    keep: torch.Tensor | None
    maps: dict[str, torch.Tensor]
    biases: dict[str, torch.Tensor]
    loss: float = 0.0


def consumer_weights(model: nn.Module, unit: Unit, tap: str) -> torch.Tensor:
    """Z (rows x m, float64): the weights of the consumers at ``tap`` stacked, a column per channel (§3).

    Only Z^T Z enters the objective, but ``spectral`` forms it only where that is the cheaper way
    (``Signal.z``): a head Linear(m, 10) has 10 rows, and its m x m Gram matrix would cost m^2 memory and
    more than doubles the work of Q at m = 8,192.
    """
    blocks = [consumer_matrix(model.get_submodule(c.module), c) for c in unit.consumers if c.tap == tap]
    return torch.cat(blocks) if len(blocks) > 1 else blocks[0]


def consumer_gram(model: nn.Module, unit: Unit, tap: str) -> torch.Tensor:
    """Z^T Z for the consumers at ``tap``, Z being their weights with a column per channel (§3).

    Only the Gram matrix enters the objective, and it is m x m whatever the consumers' size.
    """
    blocks = [consumer_matrix(model.get_submodule(c.module), c) for c in unit.consumers if c.tap == tap]
    return sum(b.T @ b for b in blocks)


def tap_weights(model: nn.Module, unit: Unit) -> dict[str, float]:
    """Each tap's share of the unit's loss: the number of consumer weights reading it."""
    sizes = {t: 0 for t in unit.taps}
    for c in unit.consumers:
        mod = model.get_submodule(c.module)
        sizes[c.tap] += require_layer_kind(mod).input_weight_count(mod)
    return sizes


def primary_tap(model: nn.Module, unit: Unit) -> str:
    """The tap whose consumers hold the most weights."""
    sizes = tap_weights(model, unit)
    return max(unit.taps, key=lambda t: sizes[t])


def unit_dof(unit: Unit, moments: Mapping[TapKey, CrossMoment], model: nn.Module, ridge: float) -> float:
    """N(lambda) of ``unit`` at its primary tap, lambda = ``ridge`` * Tr(S) / m (§2), on the
    pruned network's signal there (the original's where nothing upstream is pruned)."""
    sigma = moments[(unit.name, primary_tap(model, unit))].source
    return degrees_of_freedom(sigma, relative_lambda(sigma, ridge))


def signal(moment: CrossMoment, z: torch.Tensor | None, target: str) -> Signal:
    """One tap's ``Signal``, ``z`` the consumers' weights there: reproduce the original network's signal
    (``target`` "original", §6) or the pruned network's own (``"pruned"``); they are the same while
    nothing upstream is pruned."""
    if moment.shared or target == "pruned":
        return Signal(moment.source, source_mean=moment.source_mean, z=z)
    return Signal(moment.source, cross=moment.cross, target=moment.target, source_mean=moment.source_mean,
                  target_mean=moment.target_mean, z=z)


def signals(model: nn.Module, unit: Unit, moments: Mapping[TapKey, CrossMoment], cfg: PruneConfig
            ) -> tuple[list[Signal], list[float]]:
    """The unit's signals, one per tap in ``unit.taps`` order, and their weights."""
    weights = tap_weights(model, unit)
    out = [signal(moments[(unit.name, t)], consumer_weights(model, unit, t) if cfg.theta > 0 else None,
                  cfg.target_signal) for t in unit.taps]
    return out, [float(weights[t]) for t in unit.taps]


def unit_curve(model: nn.Module, unit: Unit, moments: Mapping[TapKey, CrossMoment],
               cfg: PruneConfig) -> torch.Tensor:
    """The unit's normalised loss after 0, 1, ..., m greedy picks (float64, (m + 1,)), for the
    ``loss`` allocation (§5)."""
    sigs, weights = signals(model, unit, moments, cfg)
    return loss_curve(sigs, ridge=cfg.ridge, theta=cfg.theta, weights=weights)


def choose(model: nn.Module, unit: Unit, k: int, moments: Mapping[TapKey, CrossMoment], cfg: PruneConfig,
           intercept: bool = False) -> Choice:
    """Select ``k`` of the unit's channels and the fold of each tap (§3, §6).

    A unit kept whole is left untouched (a fold would only shrink it by the ridge); ``cfg.reconstruct``
    False (an ablation) slices without folding.

    Raises:
        ModelError: a reconstruction that is not finite.
    """
    if k >= unit.width:
        return Choice(None, {}, {})
    sigs, weights = signals(model, unit, moments, cfg)
    sel = select(sigs, k, ridge=cfg.ridge, theta=cfg.theta, intercept=intercept, weights=weights)
    maps = dict(zip(unit.taps, sel.maps))
    biases = {t: b for t, b in zip(unit.taps, sel.biases) if b is not None}
    if not getattr(cfg, "reconstruct", True):
        eye = torch.eye(unit.width, dtype=torch.float64)[:, sel.keep]
        maps, biases = {t: eye for t in unit.taps}, {}
    for tap in unit.taps:
        if not torch.isfinite(maps[tap]).all() or (tap in biases and not torch.isfinite(biases[tap]).all()):
            raise ModelError(f"the reconstruction for unit {unit.name} is not finite; try a larger "
                             "prune.ridge")
    return Choice(sel.keep, maps, biases, float(sel.curve[-1]))
