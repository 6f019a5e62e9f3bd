"""The run's state and the sequential order (docs/method.md §6).

``Run`` holds what a pruning run has decided so far and cuts one unit on its moments (both orders use
it). ``sequential`` measures each unit on the network whose earlier units are already cut, replaying
the captured graph stretch by stretch (``runner.SegmentRunner``); with ``target_signal: original`` an
untouched copy runs beside it so each tap gives the cross moment between the two networks.
``sequential_hooks`` does the same with hooks during whole forward passes, for a graph that cannot be
replayed. Where the kernel refit applies (docs/method.md §4), its patch moments are gathered in the
same pass and solved once the unit's channels are chosen.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from specprune_cli import distributed
from specprune_cli.config import PruneConfig
from specprune_cli.graph import Unit, UnitGraph
from specprune_cli.moments import CrossMoment
from specprune_cli.refit import KernelFit, refittable
from specprune_cli.runner import SegmentRunner, no_inplace_modules
from specprune_cli.selection import Choice, TapKey, choose, unit_dof
from specprune_cli.stats import collect_paired, new_cross_moments, pair_readers, sharded
from specprune_cli.surgery import absorb_bias, bias_sinks, prune_unit


class Run:
    """The state of one pruning run: the working copy, its graph and what was decided so far."""

    def __init__(self, model: nn.Module, graph: UnitGraph, inputs: list[torch.Tensor], cfg: PruneConfig):
        self.model, self.graph, self.inputs, self.cfg = model, graph, inputs, cfg
        self.kept: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.dof: dict[str, float] = {}
        self.losses: dict[str, float] = {}
        self.intercepts = 0
        self.refits = 0
        self.sinks = bias_sinks(graph.gm, model, graph.units) if cfg.intercept else {}

    def apply(self, unit: Unit, k: int, moments: Mapping[TapKey, CrossMoment]) -> Choice:
        """Select and cut one unit on ``moments``; returns the choice."""
        intercept = self.cfg.intercept and unit.name in self.sinks
        choice = choose(self.model, unit, k, moments, self.cfg, intercept=intercept)
        if choice.keep is not None:
            shifts = {c.module: absorb_bias(self.model, c, choice.biases[c.tap]) for c in unit.consumers
                      if c.tap in choice.biases}
            prune_unit(self.model, unit, choice.keep, choice.maps)
            for module, shift in shifts.items():
                self.sinks[unit.name][module](shift)
            self.intercepts += bool(shifts)
        self.kept[unit.name] = choice.keep if choice.keep is not None else torch.arange(unit.width)
        self.rows[unit.name] = moments[(unit.name, unit.taps[0])].count
        self.losses[unit.name] = choice.loss
        return choice


def sequential(run: Run, widths: Mapping[str, int], bar: Any) -> float:
    """Sequential order by replaying the captured graph (docs/method.md §6): one pass in all.

    The pruned network's runner keeps the values alive at the cut and slices them after each surgery;
    with ``target_signal: original`` a runner over an untouched copy of the graph goes batch by batch
    beside it, so each tap is read from both networks for the same input.
    """
    units, gm, cfg = run.graph.units, run.graph.gm, run.cfg
    # The runner reads parameters from the model itself: surgery replaces a sliced parameter there, and
    # the graph module's own reference to it (a get_attr outside any leaf module) would go stale.
    runner = SegmentRunner(gm, run.inputs, root=run.model, int_attrs=run.graph.int_attrs)
    twin = (SegmentRunner(gm, run.inputs, root=copy.deepcopy(run.model), int_attrs=run.graph.int_attrs)
            if cfg.target_signal == "original" else None)
    index = {n.name: i for i, n in enumerate(runner.nodes)}
    replay = 0.0
    upstream_cut = False  # once a unit is cut, the two networks differ downstream of it
    for i, u in enumerate(units):
        local = new_cross_moments(u, max_positions=cfg.max_positions, seed=cfg.seed)
        stop = max(index[tap] for tap in u.taps) + 1
        # Keep what this stretch computed, up to where the next unit starts, if slicing can bring it up
        # to date after the surgery; see SegmentRunner.resume_point. The original never changes.
        limit = min(stop, units[i + 1].position) if i + 1 < len(units) else stop
        snap = runner.resume_point(u, limit)
        t_run = time.perf_counter()
        runner.check(stop, snap)
        # Patch moments cost (m K)^2 a row: gathered only for a unit that will be cut and refit.
        refit = (cfg.kernel_refit and cfg.reconstruct and widths[u.name] < u.width
                 and not (cfg.intercept and u.name in run.sinks))
        fits = _kernel_fits(run, u) if refit else []
        with no_inplace_modules(gm), no_inplace_modules(twin.root if twin else gm):
            # Each batch's new cache entry replaces its old one at once (a batch reads only its own), so
            # the values at the old cut are freed batch by batch instead of living until the last batch.
            for b in range(len(run.inputs)):
                originals: dict[str, torch.Tensor] = {}
                if twin is not None and upstream_cut:
                    twin.cache[b] = twin.run_batch(b, stop, snapshot_at=limit,
                                                   visit={t: (lambda v, t=t: originals.__setitem__(t, v))
                                                          for t in u.taps})
                visit = pair_readers(u, local, originals)
                for tap, fit in fits:
                    visit[tap] = lambda v, tap=tap, fit=fit, read=visit[tap]: (
                        read(v), fit.update(originals.get(tap, v), v))
                runner.cache[b] = runner.run_batch(b, stop, snapshot_at=snap, visit=visit)
        runner.commit(snap, runner.cache)
        if twin is not None:
            if upstream_cut:
                twin.commit(limit, twin.cache)
            else:  # nothing cut yet: the pruned network is the original, and its cache serves both
                twin.cache, twin.position = [dict(env) for env in runner.cache], runner.position
        replay += time.perf_counter() - t_run
        # every rank's shard, before the selection (and the refit)
        distributed.all_reduce_moments(local, {i: fit for i, (_, fit) in enumerate(fits)})
        finished(local, u)
        if u.name not in run.dof:
            run.dof[u.name] = unit_dof(u, local, run.model, cfg.ridge)
        choice = run.apply(u, widths[u.name], local)
        if choice.keep is not None:
            run.refits += _refit(fits, choice.keep, cfg.ridge)
            upstream_cut = True
            t_run = time.perf_counter()
            runner.narrow(u, choice.keep)
            replay += time.perf_counter() - t_run
        bar.update(1)
    return replay


def finished(moments: dict[TapKey, CrossMoment], unit: Unit) -> dict[TapKey, CrossMoment]:
    """``moments`` with ``unit``'s accumulators turned into its moments in place (``CrossMoment.finish``):
    what is read from them now (N(lambda), the selection) reads them without copies. Returns ``moments``."""
    for tap in unit.taps:
        moments[(unit.name, tap)].finish()
    return moments


def _kernel_fits(run: Run, unit: Unit) -> list[tuple[str, KernelFit]]:
    """A kernel-wise refit (docs/method.md §4) for each k x k convolution reading ``unit``."""
    fits = []
    for c in unit.consumers:
        mod = run.model.get_submodule(c.module)
        if c.kind == "conv" and c.block is None and refittable(mod, unit.width):
            fits.append((c.tap, sharded(KernelFit(c.module, mod, unit.width,
                                                  max_positions=run.cfg.max_positions,
                                                  seed=run.cfg.seed))))
    return fits


def _refit(fits: list[tuple[str, KernelFit]], keep: torch.Tensor, ridge: float) -> int:
    """Replace the folded weights by the kernel-wise least-squares fit; returns how many were."""
    done = 0
    for _, fit in fits:
        weight = fit.solve(keep, ridge)
        if weight is not None and weight.shape == fit.conv.weight.shape:
            with torch.no_grad():
                fit.conv.weight.copy_(weight)
            done += 1
    return done


def sequential_hooks(run: Run, widths: Mapping[str, int], bar: Any) -> float:
    """Sequential order for a graph that cannot be replayed on other batch sizes: every unit's taps
    are read with hooks during whole forward passes of the real models (one pass per unit)."""
    cfg = run.cfg
    original = copy.deepcopy(run.model) if cfg.target_signal == "original" else None
    replay = 0.0
    for u in run.graph.units:
        t_run = time.perf_counter()
        local = collect_paired(original, run.model, u, run.inputs, max_positions=cfg.max_positions,
                               seed=cfg.seed)
        replay += time.perf_counter() - t_run
        distributed.all_reduce_moments(local)
        finished(local, u)
        if u.name not in run.dof:
            run.dof[u.name] = unit_dof(u, local, run.model, cfg.ridge)
        run.apply(u, widths[u.name], local)
        bar.update(1)
    return replay
