"""The pruning run: units -> statistics -> widths -> selection -> surgery -> checks (SPEC §1-6).

``prune_model`` is the library entry point the CLI and ``analyze`` build on. It never modifies the
model it is given: it works on a deep copy.
"""
from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from specprune_cli import distributed
from specprune_cli.config import PruneConfig
from specprune_cli.errors import ConfigError, ModelError
from specprune_cli.flops import count_flops, count_params
from specprune_cli.graph import Unit, UnitGraph, find_units
from specprune_cli.layers import consumer_matrix
from specprune_cli.plan import CostModel, allocate_widths, make_matcher, make_plan
from specprune_cli.moments import SecondMoment
from specprune_cli.spectral import degrees_of_freedom, greedy_select, reconstruction_matrix, relative_lambda
from specprune_cli.stats import (SegmentRunner, TapKey, collect_prefix, new_moments, no_inplace_modules,
                                 tap_reader)
from specprune_cli.surgery import prune_unit, selection_matrix, verify_forward


@dataclass
class PruneResult:
    """What a pruning run returns.

    Attributes:
        model: the pruned network (a deep copy of the input model, physically smaller).
        plan: JSON-serialisable plan (see ``plan.make_plan``).
        report: JSON-serialisable facts: units, skipped, flops/params before and after, timings.
    """

    model: nn.Module
    plan: dict
    report: dict = field(default_factory=dict)


def consumer_gram(model: nn.Module, unit: Unit, tap: str) -> torch.Tensor:
    """Z^T Z for the consumers at ``tap``, Z being their weights with a column per channel (SPEC §3).

    Only the Gram matrix enters the objective, and it is m x m whatever the consumers' size.
    """
    blocks = [consumer_matrix(model.get_submodule(c.module), c) for c in unit.consumers if c.tap == tap]
    return sum(b.T @ b for b in blocks)


def primary_tap(model: nn.Module, unit: Unit) -> str:
    """The tap whose consumers hold the most weights: the signal the selection optimises for."""
    sizes: dict[str, int] = {}
    for c in unit.consumers:
        sizes[c.tap] = sizes.get(c.tap, 0) + model.get_submodule(c.module).weight.numel()
    return max(unit.taps, key=lambda t: sizes[t])


def _select(model: nn.Module, unit: Unit, k: int, moments: Mapping[TapKey, SecondMoment], cfg: Any
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Kept indices and a reconstruction matrix per tap for one unit."""
    tap = primary_tap(model, unit)
    sigma = moments[(unit.name, tap)].matrix
    gram = consumer_gram(model, unit, tap) if cfg.theta > 0 else None
    keep, a = greedy_select(sigma, k, ridge=cfg.ridge, theta=cfg.theta, z_gram=gram)
    a_by_tap = {tap: a}
    for other in unit.taps:
        if other != tap:
            a_by_tap[other] = reconstruction_matrix(moments[(unit.name, other)].matrix, keep, ridge=cfg.ridge)
    return keep, a_by_tap


def unit_dof(unit: Unit, moments: Mapping[TapKey, SecondMoment], model: nn.Module, ridge: float) -> float:
    """N(lambda) of ``unit`` at its primary tap, lambda = ``ridge`` * Tr(Sigma) / m (SPEC §2)."""
    sigma = moments[(unit.name, primary_tap(model, unit))].matrix
    return degrees_of_freedom(sigma, relative_lambda(sigma, ridge))


def allocation_prefix(cfg: Any) -> Callable[[Unit, Mapping[TapKey, SecondMoment], int], bool]:
    """When the ``dof`` allocation has read enough of a unit: each of its taps holds ``cfg.dof_rows``
    rows per channel and ``cfg.dof_min_samples`` samples went by (never, if ``dof_rows`` is None).

    N(lambda) only sets how the budget is shared, and reading every batch for it would cost a whole
    extra pass over the calibration data. Rows, not samples, are what an estimate of N needs: it can
    be no larger than the rows it saw, so a unit read once per sample (a Linear, or a conv behind
    global pooling) waits for as many samples as it has channels, while a conv at 28x28 is settled
    after one batch.
    """
    rows, min_samples = cfg.dof_rows, cfg.dof_min_samples

    def enough(unit: Unit, moments: Mapping[TapKey, SecondMoment], samples: int) -> bool:
        return rows is not None and samples >= min_samples and all(
            moments[(unit.name, t)].count >= rows * unit.width for t in unit.taps)

    return enough


def _as_inputs(batches: Iterable[Any]) -> list[torch.Tensor]:
    out = []
    for b in batches:
        x = b[0] if isinstance(b, (tuple, list)) else b
        out.append(x.detach().to(torch.float32))
    return out


def prune_model(model: nn.Module, batches: Iterable[Any], *, example_input: torch.Tensor, cfg: PruneConfig,
                progress: bool = True, graph: UnitGraph | None = None) -> PruneResult:
    """Prune ``model`` with spectral selection on ``batches`` of calibration data.

    Args:
        model: the trained network (not modified).
        batches: calibration batches, tensors or (x, y) pairs; read into memory once.
        example_input: one batch of the shape the model takes (used for tracing and counting).
        cfg: the prune settings.
        progress: show tqdm bars on stderr.
        graph: units found beforehand on a deep copy (internal: lets ``analyze`` share the work).

    Returns:
        A PruneResult.
    """
    timings: dict[str, float] = {}
    t = time.perf_counter()
    model = copy.deepcopy(model).eval()
    example1 = example_input[:1]
    with torch.no_grad():
        expected_shape = model(example1).shape
    flops_before, params_before = count_flops(model, example1), count_params(model)
    graph = graph or find_units(model, example1, exclude=make_matcher(list(cfg.exclude)))
    units, gm = graph.units, graph.gm
    inputs = _as_inputs(batches)
    if not inputs:
        raise ConfigError("no calibration batches: data.calibration yielded nothing")
    timings["trace"] = time.perf_counter() - t

    widths: dict[str, int] = {}
    dof: dict[str, float] = {}
    moments: dict[TapKey, SecondMoment] = {}
    samples = sum(x.shape[0] for x in inputs)
    dof_samples = None
    if units:
        t = time.perf_counter()
        cost = CostModel(model, units, example1)
        if cfg.allocation == "dof" or cfg.order == "oneshot":
            # One pass: the prefix the dof widths need; in oneshot order it goes on over every batch.
            enough = allocation_prefix(cfg) if cfg.allocation == "dof" else (lambda _u, _m, _n: False)
            with tqdm(total=len(inputs), desc="statistics", unit="batch", file=sys.stderr,
                      disable=not progress, leave=False) as bar:
                prefix, full, dof_samples = collect_prefix(
                    gm, units, inputs, max_positions=cfg.max_positions, seed=cfg.seed, enough=enough,
                    full=cfg.order == "oneshot", progress=bar)
            distributed.all_reduce_moments(prefix, full)  # every rank's shard, before any selection
            moments = full if full is not None else prefix
            # Without dof allocation nothing ever has enough: the prefix is every batch.
            dof = {u.name: unit_dof(u, prefix, model, cfg.ridge) for u in units}
        timings["statistics"] = time.perf_counter() - t
        t = time.perf_counter()
        widths = allocate_widths(units, cost, allocation=cfg.allocation, target_kind=cfg.target_kind,
                                 target_value=cfg.target_value, dof=dof, ratio=cfg.ratio,
                                 overrides=dict(cfg.overrides), round_to=cfg.round_to,
                                 min_channels=cfg.min_channels)
        timings["allocation"] = time.perf_counter() - t

    t = time.perf_counter()
    replay = 0.0  # of which: running stretches of the network in sequential order (and slicing them)
    kept: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    with tqdm(total=len(units), desc=f"select ({cfg.order})", unit="unit", file=sys.stderr,
              disable=not progress or not units, leave=False) as bar:
        if cfg.order == "oneshot":
            chosen = {}
            for u in units:
                chosen[u.name] = _choose(model, u, widths[u.name], moments, cfg)
                bar.update(1)
            for u in units:
                keep, a_by_tap = chosen[u.name]
                if keep is not None:
                    prune_unit(model, u, keep, a_by_tap)
                kept[u.name] = keep if keep is not None else torch.arange(u.width)
            rows = {u.name: moments[(u.name, u.taps[0])].count for u in units}
        elif cfg.order == "sequential":
            runner = SegmentRunner(gm, inputs)
            node_index = {n.name: i for i, n in enumerate(runner.nodes)}
            for i, u in enumerate(units):
                local = new_moments([u], max_positions=cfg.max_positions, seed=cfg.seed)
                readers = {tap: tap_reader(u, tap, local[(u.name, tap)]) for tap in u.taps}
                stop = max(node_index[t] for t in u.taps) + 1
                # Keep what this stretch computed, up to where the next unit starts, if slicing can
                # bring it up to date after the surgery; see SegmentRunner.resume_point.
                limit = min(stop, units[i + 1].position) if i + 1 < len(units) else stop
                t_run = time.perf_counter()
                with no_inplace_modules(gm):
                    runner.run(stop, snapshot_at=runner.resume_point(u, limit), visit=readers)
                replay += time.perf_counter() - t_run
                distributed.all_reduce_moments(local)  # every rank's shard, before the selection
                if u.name not in dof:
                    dof[u.name] = unit_dof(u, local, model, cfg.ridge)
                keep, a_by_tap = _choose(model, u, widths[u.name], local, cfg)
                if keep is not None:
                    prune_unit(model, u, keep, a_by_tap)
                    t_run = time.perf_counter()
                    runner.narrow(u, keep)
                    replay += time.perf_counter() - t_run
                kept[u.name] = keep if keep is not None else torch.arange(u.width)
                rows[u.name] = local[(u.name, u.taps[0])].count
                bar.update(1)
        else:
            raise ConfigError(f"prune.order must be 'sequential' or 'oneshot', got {cfg.order!r}")
    timings["replay"] = replay
    timings["selection"] = time.perf_counter() - t - replay

    t = time.perf_counter()
    verify_forward(model, example1, expected_shape)
    flops_after, params_after = count_flops(model, example1), count_params(model)
    timings["verify"] = time.perf_counter() - t
    plan = make_plan(units, kept, dof)
    report = {
        "samples": samples,
        "dof_samples": dof_samples if cfg.allocation == "dof" else None,
        "flops_before": flops_before, "flops_after": flops_after,
        "params_before": params_before, "params_after": params_after,
        "units": [{"name": u.name, "kind": u.kind, "width": u.width, "kept": int(kept[u.name].numel()),
                   "dof": round(dof.get(u.name, float("nan")), 3), "rows": int(rows.get(u.name, 0))}
                  for u in units],
        "skipped": [{"name": s.name, "reason": s.reason} for s in graph.skipped],
        "timings": {k: round(v, 4) for k, v in timings.items()},
    }
    return PruneResult(model=model, plan=plan, report=report)


def _choose(model: nn.Module, unit: Unit, k: int, moments: Mapping[TapKey, SecondMoment], cfg: Any
            ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """Select ``k`` channels; a unit kept whole is left untouched (a fold would only shrink it by the
    ridge), and ``cfg.reconstruct`` False (an ablation) slices without folding."""
    if k >= unit.width:
        return None, {}
    keep, a_by_tap = _select(model, unit, k, moments, cfg)
    if not getattr(cfg, "reconstruct", True):
        a_by_tap = {tap: selection_matrix(unit.width, keep) for tap in unit.taps}
    for tap, a in a_by_tap.items():
        if not torch.isfinite(a).all():
            raise ModelError(f"the reconstruction for unit {unit.name} is not finite; try a larger prune.ridge")
    return keep, a_by_tap
