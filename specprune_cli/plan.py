"""How many channels each unit keeps (docs/method.md §5), the FLOPs/params budget, and the JSON plan.

Widths are chosen on a cost model measured once with ``torch.utils.flop_counter``: each module's
FLOPs and parameters scale with the kept fraction of its input channels times the kept fraction of
its output channels. The achieved cost is then measured again on the pruned model (``prune.py``), so
the model only steers the search and never stands in for a reported number.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from specprune_cli.errors import BudgetError, ConfigError
from specprune_cli.flops import count_flops, count_params, module_flops
from specprune_cli.graph import Unit
from specprune_cli.layers import require_layer_kind
from specprune_cli.layout import Block
from specprune_cli.name_patterns import override_for

PLAN_FORMAT = "specprune-plan/1"


def fit_width(x: float, m: int, *, round_to: int, min_channels: int) -> int:
    """Round a desired width to a multiple of ``round_to`` within [min_channels, m] (monotone in x)."""
    if x >= m:
        return m
    r = max(1, int(round_to))
    lo = min(m, r * math.ceil(max(1, int(min_channels)) / r))
    k = r * int(math.floor(x / r + 0.5))
    return m if k >= m else max(lo, k)


Mix = tuple[tuple[str, float], ...]  # (unit, share of the channels it holds): a layer's input or output


class CostModel:
    """FLOPs and parameters of the model as a function of the units' widths.

    Each layer a unit touches costs f * a * c, with a (c) the fraction of its input (output) channels
    left: a mix of the units it reads (writes), each holding its share of the channels (several after
    a concatenation), the rest fixed.
    """

    def __init__(self, model: nn.Module, units: Sequence[Unit], example_input: torch.Tensor):
        self.units = list(units)
        self.width = {u.name: u.width for u in units}
        per_module = module_flops(model, example_input[:1])
        self.total_flops = count_flops(model, example_input[:1])
        self.total_params = count_params(model)
        # module -> ({unit it reads: share}, {unit it writes: share})
        roles: dict[str, tuple[dict[str, float], dict[str, float]]] = {}
        for u in units:
            for p in u.producers:
                roles.setdefault(p.module, ({}, {}))[1][u.name] = 1.0
            for f in u.followers:
                roles.setdefault(f.module, ({}, {}))[1][u.name] = _share(f.block)
            for c in u.consumers:
                roles.setdefault(c.module, ({}, {}))[0][u.name] = _share(c.block)
        self.terms: list[tuple[Mix, Mix, float, float, float]] = []
        fixed_flops, fixed_params = float(self.total_flops), float(self.total_params)
        for name, (fin, fout) in roles.items():
            mod = model.get_submodule(name)
            flops = float(per_module.get(name, 0))
            w = sum(p.numel() for n, p in mod.named_parameters(recurse=False) if n != "bias")
            b = sum(p.numel() for n, p in mod.named_parameters(recurse=False) if n == "bias")
            if isinstance(mod, nn.modules.conv._ConvNd) and mod.groups > 1:
                fin = {}  # depthwise: its in and out channels are the same channels, counted once
            if isinstance(mod, nn.RNNBase):
                # Only the first layer's input weights read the unit. Each weight is used once a step,
                # so their share of the weights is the share of the FLOPs that scales; the rest is fixed.
                w = require_layer_kind(mod).input_weight_count(mod)
                flops *= w / sum(p.numel() for n, p in mod.named_parameters() if n.startswith("weight"))
                b = 0
            elif not isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)):
                fin = {}  # BatchNorm / PReLU: one parameter per channel
            self.terms.append((tuple(fin.items()), tuple(fout.items()), flops, float(w), float(b)))
            fixed_flops -= flops
            fixed_params -= w + b
        self.fixed_flops, self.fixed_params = fixed_flops, fixed_params

    def _frac(self, mix: Mix, widths: Mapping[str, int]) -> float:
        return 1.0 - sum(share * (1.0 - widths.get(u, self.width[u]) / self.width[u]) for u, share in mix)

    def _term(self, term: tuple[Mix, Mix, float, float, float], widths: Mapping[str, int],
              kind: str) -> float:
        fin, fout, f, w, b = term
        a, c = self._frac(fin, widths), self._frac(fout, widths)
        return f * a * c if kind == "flops" else w * a * c + b * c

    def cost(self, widths: Mapping[str, int]) -> tuple[float, float]:
        """(FLOPs, params) predicted for ``widths`` (unit name -> kept channels; missing = full)."""
        flops = self.fixed_flops + sum(self._term(t, widths, "flops") for t in self.terms)
        params = self.fixed_params + sum(self._term(t, widths, "params") for t in self.terms)
        return flops, params

    def fraction(self, widths: Mapping[str, int], kind: str) -> float:
        flops, params = self.cost(widths)
        return flops / self.total_flops if kind == "flops" else params / self.total_params

    def neighbours(self, unit: str) -> set[str]:
        """The units whose cost terms ``unit`` shares (their ``delta`` changes when it does)."""
        out: set[str] = set()
        for fin, fout, *_ in self.terms:
            names = {u for u, _ in fin + fout}
            if unit in names:
                out.update(names)
        return out

    def delta(self, widths: Mapping[str, int], unit: str, k: int, kind: str) -> float:
        """The change of ``fraction(widths, kind)`` when ``unit`` alone goes to width ``k``."""
        trial = {**widths, unit: k}
        change = sum(self._term(t, trial, kind) - self._term(t, widths, kind) for t in self.terms
                     if any(u == unit for u, _ in t[0] + t[1]))
        return change / (self.total_flops if kind == "flops" else self.total_params)


def _share(block: Block | None) -> float:
    """The share of a layer's channels that are the unit's: all of them unless concatenated."""
    return 1.0 if block is None else block.own / (block.lead + block.own + block.trail)


def allocate_widths(units: Sequence[Unit], cost: CostModel, *, allocation: str, target_kind: str,
                    target_value: float, dof: Mapping[str, float] | None = None, ratio: float = 0.5,
                    overrides: Mapping[str, float] | None = None, round_to: int = 8,
                    min_channels: int = 8,
                    curves: Mapping[str, torch.Tensor] | None = None) -> dict[str, int]:
    """Kept width per unit.

    Args:
        units: the prunable units.
        cost: the model's cost as a function of widths.
        allocation: "dof" (widths proportional to degrees of freedom, one global factor found by
            bisection to meet the target), "uniform" (one keep ratio for all units, found by
            bisection), "loss" (the widths that minimise the sum of the units' loss curves under the
            target, see ``loss_widths``) or "ratio" (``ceil(ratio * m)``; the target is not used).
        target_kind: "flops" or "params"; target_value: the fraction to keep, in (0, 1].
        dof: degrees of freedom per unit (needed for "dof").
        curves: unit name -> normalised loss after 0..m greedy picks (needed for "loss").
        ratio: the keep ratio for "ratio".
        overrides: pattern -> ratio; a matching unit gets that ratio in every mode (first match wins).
        round_to, min_channels: see ``fit_width``.

    Returns:
        unit name -> kept width.

    Raises:
        BudgetError: the target cannot be met even with every unit at its minimum width.
    """
    overrides = dict(overrides or {})
    fixed: dict[str, int] = {}
    free: list[Unit] = []
    for u in units:
        r = override_for(u.name, overrides)
        if r is not None or allocation == "ratio":
            r = ratio if r is None else r
            fixed[u.name] = fit_width(math.ceil(r * u.width - 1e-9), u.width, round_to=round_to,
                                      min_channels=min_channels)
        else:
            free.append(u)
    if not free:
        return fixed
    if allocation == "dof":
        if dof is None:
            raise ValueError("allocation 'dof' needs degrees of freedom per unit")
        score = {u.name: max(float(dof[u.name]), 1e-6) for u in free}
    elif allocation == "uniform":
        score = {u.name: float(u.width) for u in free}
    elif allocation == "loss":
        if curves is None:
            raise ValueError("allocation 'loss' needs a loss curve per unit")
        return loss_widths(free, fixed, cost, curves, target_kind=target_kind, target_value=target_value,
                           round_to=round_to, min_channels=min_channels)
    else:
        raise ConfigError(f"prune.allocation must be one of dof, uniform, loss, ratio; got {allocation!r}")

    def widths_at(alpha: float) -> dict[str, int]:
        w = dict(fixed)
        for u in free:
            w[u.name] = fit_width(alpha * score[u.name], u.width, round_to=round_to,
                                  min_channels=min_channels)
        return w

    def frac(w: Mapping[str, int]) -> float:
        return cost.fraction(w, target_kind)

    _check_floor(frac(widths_at(0.0)), target_kind, target_value)
    lo, hi = 0.0, max(u.width / score[u.name] for u in free) * 2.0
    if frac(widths_at(hi)) <= target_value:
        return widths_at(hi)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if frac(widths_at(mid)) <= target_value:
            lo = mid
        else:
            hi = mid
    widths = widths_at(lo)
    # Rounding leaves budget unused: spend it one step at a time on the unit furthest below its share.
    step = max(1, int(round_to))
    while True:
        best, best_gap = None, -math.inf
        for u in free:
            k = widths[u.name]
            if k >= u.width:
                continue
            trial = dict(widths)
            trial[u.name] = min(u.width, k + step)
            if frac(trial) > target_value:
                continue
            gap = score[u.name] / k
            if gap > best_gap:
                best, best_gap = u.name, gap
        if best is None:
            return widths
        widths[best] = min(cost.width[best], widths[best] + step)


def _check_floor(floor: float, target_kind: str, target_value: float) -> None:
    if floor > target_value + 1e-12:
        raise BudgetError(
            f"prune.target.{target_kind}={target_value:g} cannot be met: with every prunable unit at its "
            f"minimum width the model keeps {floor:.3f} of its {target_kind} (the layers that cannot be "
            "pruned cost the rest). Raise the target to at least that, lower prune.min_channels or "
            "prune.round_to, or remove layers from prune.exclude.")


def _steps(m: int, round_to: int, min_channels: int) -> list[int]:
    """The widths ``fit_width`` can give a unit of m channels, ascending."""
    return sorted({fit_width(float(x), m, round_to=round_to, min_channels=min_channels)
                   for x in range(m + 1)})


def loss_widths(free: Sequence[Unit], fixed: Mapping[str, int], cost: CostModel,
                curves: Mapping[str, torch.Tensor], *, target_kind: str, target_value: float, round_to: int,
                min_channels: int) -> dict[str, int]:
    """Widths minimising the sum of the units' normalised losses under the budget (docs/method.md §5).

    A Lagrangian descent on marginal loss per unit of cost: every unit starts at its smallest width,
    and the budget goes, step by step, to the unit whose next move buys the largest fall of its loss
    per unit of cost. A move jumps to the width that maximises that ratio (a vertex of the lower convex
    hull of the unit's curve), so a flat stretch followed by a drop is not mistaken for a dead end. A
    move that no longer fits becomes a single step; a unit whose single step does not fit is done.
    The costs are the exact changes of the cost model (units that share a layer change each other's).
    """
    steps = {u.name: _steps(u.width, round_to, min_channels) for u in free}
    pos = {u.name: 0 for u in free}
    widths = {**fixed, **{u.name: steps[u.name][0] for u in free}}
    used = cost.fraction(widths, target_kind)
    _check_floor(used, target_kind, target_value)
    curve = {u.name: curves[u.name].to(torch.float64) for u in free}

    def best_move(name: str) -> tuple[float, int]:
        options = steps[name][pos[name] + 1:]
        if not options:
            return -math.inf, -1
        here = steps[name][pos[name]]
        ks = torch.tensor(options)
        gain = (curve[name][here] - curve[name][ks]).clamp_min(0.0)
        per_channel = gain / (ks - here).to(torch.float64)
        j = int(torch.argmax(per_channel))  # the first of equal slopes: the smaller jump
        dc = cost.delta(widths, name, options[j], target_kind)
        return float(gain[j]) / max(dc, 1e-15), pos[name] + 1 + j

    moves = {u.name: best_move(u.name) for u in free}
    while moves:
        name = max(moves, key=lambda n: (moves[n][0], n))
        target = moves[name][1]
        dc = cost.delta(widths, name, steps[name][target], target_kind)
        if used + dc > target_value + 1e-12:
            target = pos[name] + 1
            dc = cost.delta(widths, name, steps[name][target], target_kind)
            if used + dc > target_value + 1e-12:
                del moves[name]
                continue
        pos[name], widths[name], used = target, steps[name][target], used + dc
        for other in cost.neighbours(name) | {name}:
            if other in moves:
                moves[other] = best_move(other)
                if moves[other][1] < 0:
                    del moves[other]
    return widths


def make_plan(units: Sequence[Unit], kept: Mapping[str, torch.Tensor], dof: Mapping[str, float]) -> dict:
    """The JSON-serialisable plan: for each unit its original and kept width and the kept indices."""
    return {
        "format": PLAN_FORMAT,
        "units": [
            {"name": u.name, "kind": u.kind, "type": u.type, "width": u.width,
             "kept": int(kept[u.name].numel()),
             "indices": [int(i) for i in kept[u.name].tolist()],
             "dof": None if u.name not in dof else round(float(dof[u.name]), 4)}
            for u in units if u.name in kept
        ],
    }
