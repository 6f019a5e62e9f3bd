"""The pruning run: units -> statistics -> widths -> selection -> surgery -> checks (docs/method.md §1-6).

``prune_model`` is the library entry point the CLI and ``analyze`` build on. It never modifies the
model it is given: it works on a deep copy.

In sequential order each unit is measured on the network whose earlier units are already pruned. With
``target_signal: original`` (docs/method.md §6) the original network runs beside it, batch by batch over
the same cached inputs, so each tap yields the cross moment between the two: the fold then brings the
original network's signal back from the pruned network's channels, and every layer corrects the error
made upstream instead of inheriting it.
"""
from __future__ import annotations

import contextlib
import functools
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from specprune_cli import distributed
from specprune_cli.config import PruneConfig
from specprune_cli.errors import BudgetError, ConfigError, ModelError, reason, user_code
from specprune_cli.flops import count_flops, count_params
from specprune_cli.graph import Unit, UnitGraph, find_units
from specprune_cli.moments import CrossMoment
from specprune_cli.name_patterns import make_matcher
from specprune_cli.plan import CostModel, allocate_widths, make_plan
from specprune_cli.reparam import working_copy
from specprune_cli.selection import TapKey, unit_curve, unit_dof
from specprune_cli.sequential import Run, finished, sequential, sequential_hooks
from specprune_cli.stats import collect_prefix
from specprune_cli.surgery import verify_forward

#: A result further than this above its FLOPs/params target is an error unless prune.allow_partial.
PARTIAL_TOLERANCE = 0.05


@dataclass
class PruneResult:
    """What a pruning run returns.

    Attributes:
        model: the pruned network (a deep copy of the input model, physically smaller).
        plan: JSON-serialisable plan (see ``plan.make_plan``).
        report: JSON-serialisable facts: units, skipped, flops/params before and after, timings,
            warnings.
    """

    model: nn.Module
    plan: dict
    report: dict = field(default_factory=dict)


def allocation_prefix(cfg: PruneConfig) -> Callable[[Unit, Mapping[TapKey, CrossMoment], int], bool]:
    """When the allocation has read enough of a unit: each of its taps holds ``cfg.dof_rows`` rows per
    channel and ``cfg.dof_min_samples`` samples went by (never, if ``dof_rows`` is None).

    N(lambda) and the loss curves only set how the budget is shared, and reading every batch for them
    would cost a whole extra pass over the calibration data. Rows, not samples, are what an estimate
    needs: a unit read once per sample (a Linear, or a conv behind global pooling) waits for as many
    samples as it has channels, while a conv at 28x28 is settled after one batch.
    """
    rows, min_samples = cfg.dof_rows, cfg.dof_min_samples

    def enough(unit: Unit, moments: Mapping[TapKey, CrossMoment], samples: int) -> bool:
        return rows is not None and samples >= min_samples and all(
            moments[(unit.name, t)].count >= rows * unit.width for t in unit.taps)

    return enough


def as_inputs(batches: Iterable[Any], model: nn.Module) -> list[torch.Tensor]:
    """The inputs of ``batches`` (labels dropped); floating ones in the model's floating dtype, others
    (token ids) as they are."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    out = []
    for b in batches:
        x = (b[0] if isinstance(b, (tuple, list)) else b).detach()
        out.append(x.to(dtype) if x.is_floating_point() else x)
    return out


def prune_model(model: nn.Module, batches: Iterable[Any], *, example_input: torch.Tensor, cfg: PruneConfig,
                progress: bool = True, graph: UnitGraph | None = None,
                forward_kwargs: Mapping[str, Any] | None = None) -> PruneResult:
    """Prune ``model`` with spectral selection on ``batches`` of calibration data.

    Args:
        model: the trained network (not modified).
        batches: calibration batches, tensors or (x, y) pairs; read into memory once.
        example_input: one batch of the shape the model takes (used for tracing and counting).
        cfg: the prune settings.
        progress: show tqdm bars on stderr.
        graph: units found beforehand on a deep copy (internal: lets ``analyze`` share the work).
        forward_kwargs: fixed keyword arguments of the model's forward (``model.forward_kwargs``).

    Returns:
        A PruneResult.

    Raises:
        BudgetError: the target cannot be met, or the result is more than 5% above it (naming the
            largest layers left whole and why) without ``cfg.allow_partial``.
    """
    model, folded = working_copy(model)
    kwargs = dict(forward_kwargs or {})
    with bound_forward(model, kwargs):
        result = _prune(model, batches, example_input=example_input, cfg=cfg, progress=progress, graph=graph,
                        kwargs=kwargs)
    result.report["folded_reparametrizations"] = folded
    return result


@contextlib.contextmanager
def bound_forward(model: nn.Module, kwargs: Mapping[str, Any]) -> Iterator[None]:
    """Call ``model(x)`` as ``model(x, **kwargs)`` while the block runs (``model.forward_kwargs``), so
    that counting, hooks and copies see the forward the user configured; restored on exit."""
    if not kwargs:
        yield
        return
    model.forward = functools.partial(type(model).forward, model, **kwargs)
    try:
        yield
    finally:
        del model.forward


def _prune(model: nn.Module, batches: Iterable[Any], *, example_input: torch.Tensor, cfg: PruneConfig,
           progress: bool, graph: UnitGraph | None, kwargs: dict[str, Any]) -> PruneResult:
    timings: dict[str, float] = {}
    t = time.perf_counter()
    example1 = example_input[:1]
    with torch.no_grad(), user_code(lambda exc: ModelError(
            f"the model fails on example_input of shape {tuple(example1.shape)} ({reason(exc)}); give an "
            "input of the shape and dtype the model was trained on")):
        expected = model(example1)
    flops_before, params_before = count_flops(model, example1), count_params(model)
    graph = graph or find_units(model, example1, exclude=make_matcher(list(cfg.exclude)),
                                forward_kwargs=kwargs)
    units = graph.units
    inputs = as_inputs(batches, model)
    if not inputs:
        raise ConfigError("no calibration batches: data.calibration yielded nothing")
    timings["trace"] = time.perf_counter() - t
    run = Run(model, graph, inputs, cfg)

    widths: dict[str, int] = {}
    moments: dict[TapKey, CrossMoment] = {}
    dof_samples = None
    warnings: list[str] = []
    if units:
        t = time.perf_counter()
        cost = CostModel(model, units, example1)
        curves = None
        if cfg.allocation in ("dof", "loss") or cfg.order == "oneshot":
            # One pass: the prefix the allocation needs; in oneshot order it goes on over every batch.
            enough = (allocation_prefix(cfg) if cfg.allocation in ("dof", "loss")
                      else (lambda _u, _m, _n: False))
            with tqdm(total=len(inputs), desc="statistics", unit="batch", file=sys.stderr,
                      disable=not progress, leave=False) as bar:
                prefix, full, dof_samples = collect_prefix(
                    graph.gm, units, inputs, max_positions=cfg.max_positions, seed=cfg.seed, enough=enough,
                    full=cfg.order == "oneshot", progress=bar)
            distributed.all_reduce_moments(prefix, full)  # every rank's shard, before any selection
            moments = full if full is not None else prefix
            run.dof = {u.name: unit_dof(u, prefix, model, cfg.ridge) for u in units}
            if cfg.allocation == "loss":
                curves = {u.name: unit_curve(model, u, prefix, cfg) for u in units}
            # Each unit's m x m moments are freed once used: the prefix's now, oneshot's after its selection.
            prefix = full = None
            if cfg.order == "sequential":
                moments = {}
        timings["statistics"] = time.perf_counter() - t
        t = time.perf_counter()
        try:
            widths = allocate_widths(units, cost, allocation=cfg.allocation, target_kind=cfg.target_kind,
                                     target_value=cfg.target_value, dof=run.dof, ratio=cfg.ratio,
                                     overrides=dict(cfg.overrides), round_to=cfg.round_to,
                                     min_channels=cfg.min_channels, curves=curves)
        except BudgetError as exc:
            if not cfg.allow_partial:
                raise BudgetError(f"{exc}{left_whole(graph, sentence=True)}") from None
            warnings.append(f"{exc} (prune.allow_partial: every unit at its minimum width instead)")
            widths = allocate_widths(units, cost, allocation="ratio", target_kind=cfg.target_kind,
                                     target_value=1.0, ratio=0.0, round_to=cfg.round_to,
                                     min_channels=cfg.min_channels)
        timings["allocation"] = time.perf_counter() - t

    t = time.perf_counter()
    replay = 0.0  # of which: running stretches of the network in sequential order
    with tqdm(total=len(units), desc=f"select ({cfg.order})", unit="unit", file=sys.stderr,
              disable=not progress or not units, leave=False) as bar:
        if cfg.order == "oneshot":
            for u in units:  # every unit measured on the original: cutting one leaves the others' moments
                run.apply(u, widths[u.name], finished(moments, u))
                for tap in u.taps:
                    del moments[(u.name, tap)]
                bar.update(1)
        elif graph.replayable:
            replay = sequential(run, widths, bar)
        else:
            replay = sequential_hooks(run, widths, bar)
    timings["replay"] = replay
    timings["selection"] = time.perf_counter() - t - replay

    t = time.perf_counter()
    verify_forward(model, example1, expected if not isinstance(expected, torch.Tensor) else expected.shape,
                   units=units)
    flops_after, params_after = count_flops(model, example1), count_params(model)
    timings["verify"] = time.perf_counter() - t
    achieved = (flops_after / flops_before if cfg.target_kind == "flops" else params_after / params_before)
    warnings += check_target(achieved, cfg, graph, units, widths, flops_before, params_before)
    plan = make_plan(units, run.kept, run.dof)
    report = {
        "samples": sum(x.shape[0] for x in inputs),
        "dof_samples": dof_samples if cfg.allocation in ("dof", "loss") else None,
        "target_signal": cfg.target_signal if cfg.order == "sequential" else "original",
        "units_with_intercept": run.intercepts,
        "kernel_refits": run.refits,
        "flops_before": flops_before, "flops_after": flops_after,
        "params_before": params_before, "params_after": params_after,
        "units": [{"name": u.name, "kind": u.kind, "type": u.type,
                   "producers": [p.module for p in u.producers],
                   "width": u.width, "kept": int(run.kept[u.name].numel()),
                   "dof": round(run.dof.get(u.name, float("nan")), 3), "rows": int(run.rows.get(u.name, 0)),
                   "loss": round(run.losses.get(u.name, 0.0), 6)}
                  for u in units],
        "skipped": [{"name": s.name, "reason": s.reason} for s in graph.skipped],
        "warnings": warnings,
        "timings": {k: round(v, 4) for k, v in timings.items()},
    }
    return PruneResult(model=model, plan=plan, report=report)


def check_target(achieved: float, cfg: PruneConfig, graph: UnitGraph, units: list[Unit],
                 widths: Mapping[str, int], flops: int, params: int) -> list[str]:
    """Warnings (with ``allow_partial``) or a BudgetError when the result misses its target by more
    than ``PARTIAL_TOLERANCE``, naming the largest layers that were left whole and why."""
    if cfg.allocation == "ratio" or achieved <= cfg.target_value * (1 + PARTIAL_TOLERANCE):
        return []
    message = (f"the pruned model keeps {achieved:.3f} of its {cfg.target_kind} against the target "
               f"{cfg.target_value:g}{left_whole(graph)}. Raise prune.target, remove layers from "
               "prune.exclude, or set prune.allow_partial: true to accept a partial result")
    if not cfg.allow_partial:
        raise BudgetError(message)
    return [message]


def left_whole(graph: UnitGraph, *, sentence: bool = False, n: int = 5) -> str:
    """The first ``n`` layers left whole with their reasons, for a budget message ('' if none): a clause
    ("; the layers left whole: ...") or, with ``sentence``, a sentence after one that ends."""
    blockers = "; ".join(f"{s.name} ({s.reason})" for s in graph.skipped[:n])
    if not blockers:
        return ""
    return f" The layers left whole: {blockers}." if sentence else f"; the layers left whole: {blockers}"
