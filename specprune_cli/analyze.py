"""How compressible a model is, unit by unit, measured without changing it (docs/method.md §2, §5, §8).

One pass of statistics on the unmodified network (``oneshot``), then per unit: degrees of freedom
over a grid of ridges, eigen-energy widths, and the greedy reconstruction loss at a few keep
fractions. The suggested widths are computed by the same function and the same statistics that
``compress`` uses to allocate widths, so the two agree.
"""
from __future__ import annotations

import copy
import math
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from specprune_cli.flops import count_flops, count_params
from specprune_cli.graph import find_units
from specprune_cli.name_patterns import make_matcher
from specprune_cli.plan import CostModel, allocate_widths
from specprune_cli.prune import as_inputs, allocation_prefix, prune_model
from specprune_cli.reparam import working_copy
from specprune_cli.selection import consumer_gram, primary_tap, unit_curve, unit_dof
from specprune_cli.spectral import degrees_of_freedom, greedy_select, relative_lambda, selection_loss
from specprune_cli.stats import collect_prefix
from specprune_cli.surgery import prune_unit, selection_matrix

KEEP_FRACTIONS = (0.75, 0.5, 0.25)


def energy_width(eigenvalues: torch.Tensor, fraction: float) -> int:
    """Smallest k whose top-k eigenvalues hold ``fraction`` of the trace (input-aware energy)."""
    mu = eigenvalues.clamp_min(0).sort(descending=True).values
    total = float(mu.sum())
    if total <= 0:
        return 0
    cum = torch.cumsum(mu, 0) / total
    return int(torch.searchsorted(cum, torch.tensor(fraction - 1e-12, dtype=cum.dtype)).item()) + 1


def analyze_model(model: nn.Module, batches: Iterable[Any], *, example_input: torch.Tensor, cfg: Any,
                  ridges: Sequence[float] = (1e-4, 1e-3, 1e-2), progress: bool = True) -> dict:
    """Per-unit spectral analysis and the widths ``compress`` would choose.

    Args:
        model: the trained network (not modified).
        batches: calibration batches (tensors or (x, y) pairs).
        example_input: one batch the model accepts.
        cfg: prune settings (``config.PruneConfig``): ridge, theta, target, allocation, ... .
        ridges: grid of relative ridges for N(lambda).
        progress: tqdm bars on stderr.

    Returns:
        A JSON-serialisable dict: ``units`` (per-unit figures and eigen-spectrum), ``skipped``,
        ``suggested`` (widths, FLOPs and parameters at the configured target), ``samples``.
    """
    model, _ = working_copy(model)
    example1 = example_input[:1]
    graph = find_units(model, example1, exclude=make_matcher(list(cfg.exclude)))
    inputs = as_inputs(batches, model)
    with tqdm(total=len(inputs), desc="statistics", unit="batch", file=sys.stderr, disable=not progress,
              leave=False) as bar:
        # compress takes each unit's dof from a prefix of the batches (prune.dof_rows); the same
        # prefixes here, so the suggested widths are the ones compress picks. The figures use all.
        prefix, moments, dof_samples = collect_prefix(
            graph.gm, graph.units, inputs, max_positions=cfg.max_positions, seed=cfg.seed,
            enough=allocation_prefix(cfg), full=True, progress=bar)
    rows = []
    dof_at_cfg = {u.name: unit_dof(u, prefix, model, cfg.ridge) for u in graph.units}
    for u in tqdm(graph.units, desc="analyze", unit="unit", file=sys.stderr, disable=not progress,
                  leave=False):
        tap = primary_tap(model, u)
        sigma = moments[(u.name, tap)].matrix
        mu = torch.linalg.eigvalsh(sigma).clamp_min(0).flip(0)
        dofs = {f"{r:g}": degrees_of_freedom(sigma, relative_lambda(sigma, r)) for r in ridges}
        gram = consumer_gram(model, u, tap) if cfg.theta > 0 else None
        losses = {}
        for frac in KEEP_FRACTIONS:
            k = max(1, math.ceil(frac * u.width))
            keep, _ = greedy_select(sigma, k, ridge=cfg.ridge, theta=cfg.theta, z_gram=gram)
            losses[f"{frac:g}"] = selection_loss(sigma, keep, ridge=cfg.ridge, theta=cfg.theta, z_gram=gram)
        trace = float(mu.sum())
        rows.append({
            "name": u.name, "kind": u.kind, "width": u.width, "rows": moments[(u.name, tap)].count,
            "dof": {k: round(v, 4) for k, v in dofs.items()},
            "dof_ratio": {k: round(v / u.width, 4) for k, v in dofs.items()},
            "energy90": energy_width(mu, 0.90), "energy99": energy_width(mu, 0.99),
            "loss": {k: round(v, 6) for k, v in losses.items()},
            "spectrum": [float(v) / trace if trace > 0 else 0.0 for v in mu.tolist()],
        })
    curves = ({u.name: unit_curve(model, u, prefix, cfg) for u in graph.units} if cfg.allocation == "loss"
              else None)
    suggested = suggest_widths(model, graph, dof_at_cfg, example1, cfg, curves) if graph.units else {}
    if suggested:
        suggested["dof_samples"] = dof_samples if cfg.allocation == "dof" else None
    return {"samples": sum(x.shape[0] for x in inputs), "ridges": [float(r) for r in ridges],
            "ridge": cfg.ridge, "theta": cfg.theta, "units": rows,
            "skipped": [{"name": s.name, "reason": s.reason} for s in graph.skipped],
            "suggested": suggested}


def suggest_widths(model: nn.Module, graph: Any, dof: dict[str, float], example1: torch.Tensor, cfg: Any,
                   curves: dict[str, torch.Tensor] | None = None) -> dict:
    """The widths compress would allocate, with FLOPs and parameters measured on a model of that shape."""
    widths = allocate_widths(graph.units, CostModel(model, graph.units, example1), allocation=cfg.allocation,
                             target_kind=cfg.target_kind, target_value=cfg.target_value, dof=dof,
                             ratio=cfg.ratio, overrides=dict(cfg.overrides), round_to=cfg.round_to,
                             min_channels=cfg.min_channels, curves=curves)
    shaped = copy.deepcopy(model)
    shaped_graph = find_units(shaped, example1, exclude=make_matcher(list(cfg.exclude)))
    for u in shaped_graph.units:
        keep = torch.arange(widths[u.name])
        prune_unit(shaped, u, keep, {t: selection_matrix(u.width, keep) for t in u.taps})
    return {"target": {cfg.target_kind: cfg.target_value}, "allocation": cfg.allocation, "widths": widths,
            "flops_before": count_flops(model, example1), "flops_after": count_flops(shaped, example1),
            "params_before": count_params(model), "params_after": count_params(shaped)}


def prunability(model: nn.Module, batches: Sequence[Any], *, example_input: torch.Tensor, cfg: Any,
                tolerance: float, steps: int = 7) -> dict:
    """Smallest uniform keep fraction whose calibration loss stays within ``tolerance`` (Kuhn et al. 2021).

    The loss is cross-entropy when the batches carry labels (y >= 0), else the KL divergence from
    the original model's predictions (which is 0 for the original). Pruning uses spectral selection
    with reconstruction and no fine-tuning; the fraction is found by bisection over ``steps`` halvings.

    Returns:
        ``{"fraction": f, "loss_original": ..., "loss_at_fraction": ..., "tolerance": tol, "probes": [...]}``
    """
    pairs = [(b[0], b[1] if len(b) > 1 else None) if isinstance(b, (tuple, list)) else (b, None)
             for b in batches]
    labelled = all(y is not None and bool((y >= 0).all()) for _, y in pairs)

    def loss_of(net: nn.Module) -> float:
        total, n = 0.0, 0
        with torch.no_grad():
            for x, y in pairs:
                out = net(x)
                if labelled:
                    total += float(F.cross_entropy(out, y, reduction="sum"))
                else:
                    ref = model(x)
                    total += float(F.kl_div(F.log_softmax(out, -1), F.log_softmax(ref, -1), log_target=True,
                                            reduction="sum"))
                n += x.shape[0]
        return total / max(n, 1)

    base = loss_of(model)
    probes = []
    lo, hi = 0.0, 1.0  # hi always within tolerance (keep-all), lo never tested
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        probe_cfg = _with(cfg, allocation="ratio", ratio=mid, overrides={})
        pruned = prune_model(model, [x for x, _ in pairs], example_input=example_input, cfg=probe_cfg,
                             progress=False).model
        loss = loss_of(pruned)
        probes.append({"fraction": round(mid, 5), "loss": round(loss, 6),
                       "params": count_params(pruned)})
        if loss <= base + tolerance:
            hi = mid
        else:
            lo = mid
    at = next((p["loss"] for p in probes if p["fraction"] == round(hi, 5)), base)
    return {"fraction": round(hi, 5), "loss_original": round(base, 6), "loss_at_fraction": at,
            "tolerance": tolerance, "loss_kind": "cross_entropy" if labelled else "kl_to_original",
            "probes": probes}


def _with(cfg: Any, **changes: Any) -> Any:
    """A copy of a (frozen) settings object with some fields changed."""
    import dataclasses

    if dataclasses.is_dataclass(cfg):
        return dataclasses.replace(cfg, **changes)
    new = copy.copy(cfg)
    for k, v in changes.items():
        setattr(new, k, v)
    return new
