"""Slow reference implementations of the selection, used only by the tests (docs/method.md §3, §6).

Each one is written the plain way, so that the fast code in specprune_cli.spectral is checked against
arithmetic it does not share: the loss is evaluated from an explicit A (and b) solved with a general
LU solve, the greedy tries every candidate, the exhaustive search tries every subset.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from specprune_cli.objective import _metric_weights
from specprune_cli.signals import Signal, _check, _gram, relative_lambda


def greedy_select_reference(sigma: torch.Tensor, k: int, *, ridge: float = 1e-3, theta: float = 0.5,
                            z: torch.Tensor | None = None, z_gram: torch.Tensor | None = None) -> list[int]:
    """docs/method.md §3 transcribed literally (full R and G = M R updated every step); the order of picks.

    The only addition to the pseudo-code is the dead-channel rule of ``greedy_select``.
    """
    sigma = _check(sigma, k)
    m = sigma.shape[0]
    lam = relative_lambda(sigma, ridge)
    gram = _gram(m, z, z_gram)
    a_w, b_w = _metric_weights(sigma, theta, gram)
    metric = a_w * torch.eye(m, dtype=torch.float64)
    if b_w:
        metric = metric + b_w * gram
    dead = torch.diagonal(sigma) <= 0
    r = sigma.clone()
    g = metric @ r
    picked: list[int] = []
    for _ in range(k):
        score = (r * g).sum(0) / (torch.diagonal(r) + lam)
        score[dead] = -1e300  # below every live score, above the -inf of picked channels
        score[picked] = -math.inf
        j = int(torch.argmax(score))
        rj, gj, d = r[:, j].clone(), g[:, j].clone(), r[j, j] + lam
        r -= torch.outer(rj, rj) / d
        g -= torch.outer(gj, rj) / d
        picked.append(j)
    return picked


def _parts(signal: Signal) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None,
                                    torch.Tensor | None]:
    """(S~, C, S, mu~, mu) in float64, filling in x~ = x where cross/target are None."""
    source = signal.source.double()
    cross = source if signal.cross is None else signal.cross.double()
    target = source if signal.target is None else signal.target.double()
    mean = None if signal.source_mean is None else signal.source_mean.double()
    target_mean = mean if signal.target_mean is None else signal.target_mean.double()
    return source, cross, target, mean, target_mean


def _metric(signal: Signal, theta: float) -> torch.Tensor:
    """M = (1 - theta) / Tr S I + theta / Tr(Z S Z^T) Z^T Z, or I / Tr S without consumers."""
    target = _parts(signal)[2]
    eye = torch.eye(target.shape[0], dtype=torch.float64)
    gram = None if signal.z_gram is None else signal.z_gram.double()
    trz = 0.0 if gram is None else float((gram * target).sum())
    if trz > 0:
        return (1 - theta) / float(torch.trace(target)) * eye + theta / trz * gram
    return eye / float(torch.trace(target))  # the input-aware term alone


def _constant_channel(signal: Signal) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(s, S~', C'): the moments with the constant channel s appended as the first candidate."""
    source, cross, _, mean, target_mean = _parts(signal)
    s = math.sqrt(float(torch.trace(source)) / source.shape[0])
    top = torch.cat([torch.tensor([[s * s]], dtype=torch.float64), s * mean[None]], 1)
    source = torch.cat([top, torch.cat([s * mean[:, None], source], 1)])
    return s, source, torch.cat([s * target_mean[:, None], cross], 1)


def greedy_reference(signals: Sequence[Signal], k: int, *, ridge: float, theta: float,
                     intercept: bool = False, weights: Sequence[float] | None = None) -> list[int]:
    """docs/method.md §6 literally: per signal the full R (k0 x k0) and K (m x k0), both updated by the
    rank-one step at every pick; the gain of j is sum_t w_t (K^T M K)_jj / (R_jj + lambda). With
    intercept the constant is an explicit extra channel, picked first. Returns the order of picks."""
    weights = [1.0] * len(signals) if weights is None else list(weights)
    state = []
    for signal, w in zip(signals, weights):
        source, cross = _parts(signal)[:2]
        lam = relative_lambda(source, ridge)
        if intercept:
            source, cross = _constant_channel(signal)[1:]
        state.append((source.clone(), cross.clone(), _metric(signal, theta) * w / sum(weights), lam))
    dead = torch.stack([torch.diagonal(r) <= 0 for r, *_ in state]).all(0)
    picked: list[int] = []
    for step in range(k + intercept):
        score = sum((kk * (metric @ kk)).sum(0) / (torch.diagonal(r) + lam) for r, kk, metric, lam in state)
        score[dead] = -1e300  # below every live score, above the -inf of picked channels
        score[picked] = -math.inf
        j = 0 if intercept and step == 0 else int(torch.argmax(score))
        for r, kk, _, lam in state:
            rj, kj, d = r[:, j].clone(), kk[:, j].clone(), r[j, j] + lam
            r -= torch.outer(rj, rj) / d
            kk -= torch.outer(kj, rj) / d
        picked.append(j)
    return [j - 1 for j in picked[1:]] if intercept else picked


def fit(signal: Signal, keep: Sequence[int], *, ridge: float, intercept: bool = False
        ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(A, b, beta): the ridge fit of x from [s 1, x~_J] by a general (LU) solve of the normal equations.

    beta holds every coefficient (the constant's first with intercept), for the penalty term.
    """
    source, cross = _parts(signal)[:2]
    lam = relative_lambda(source, ridge)
    cols = list(keep)
    if intercept:
        s, source, cross = _constant_channel(signal)
        cols = [0] + [j + 1 for j in cols]
    gram, rhs = source[cols][:, cols], cross[:, cols]
    beta = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=torch.float64), rhs.T).T
    if intercept:
        return beta[:, 1:], s * beta[:, 0], beta
    return beta, None, beta


def tap_loss(signal: Signal, keep: Sequence[int], *, ridge: float, theta: float, intercept: bool = False
             ) -> float:
    """The normalised loss of one tap at J = keep, from the explicit fit:
    E||x - A x~_J - b||_M^2 + lambda ||beta||_M^2, with M = a I + b Z^T Z as in docs/method.md §3."""
    source, cross, target, mean, target_mean = _parts(signal)
    keep = list(keep)
    lam = relative_lambda(source, ridge)
    metric = _metric(signal, theta)
    if not keep and not intercept:
        return float((metric * target).sum())
    a, b, beta = fit(signal, keep, ridge=ridge, intercept=intercept)
    # E[(x - A x~_J - b)(x - A x~_J - b)^T], expanded from the moments
    err = target - cross[:, keep] @ a.T - a @ cross[:, keep].T + a @ source[keep][:, keep] @ a.T
    if intercept:
        err = err - torch.outer(b, target_mean) - torch.outer(target_mean, b) + torch.outer(b, b)
        err = err + torch.outer(a @ mean[keep], b) + torch.outer(b, a @ mean[keep])
    return float((metric * err).sum() + lam * (metric * (beta @ beta.T)).sum())


def loss(signals: Sequence[Signal], keep: Sequence[int], *, ridge: float, theta: float,
         intercept: bool = False, weights: Sequence[float] | None = None) -> float:
    """The weighted mean of the taps' normalised losses (``select``'s objective)."""
    weights = [1.0] * len(signals) if weights is None else list(weights)
    total = sum(w * tap_loss(s, keep, ridge=ridge, theta=theta, intercept=intercept)
                for s, w in zip(signals, weights))
    return total / sum(weights)


def brute_force_greedy(signals: Sequence[Signal], k: int, **kw) -> list[int]:
    """Each step: try every candidate, evaluate the loss by solves, keep the best (lowest index on ties)."""
    chosen: list[int] = []
    for _ in range(k):
        rest = [j for j in range(signals[0].source.shape[0]) if j not in chosen]
        chosen.append(min(rest, key=lambda j: loss(signals, chosen + [j], **kw)))
    return chosen


def exhaustive_best(signals: Sequence[Signal], k: int, **kw) -> float:
    """The smallest loss over every subset of k channels."""
    m = signals[0].source.shape[0]
    return min(loss(signals, list(c), **kw) for c in itertools.combinations(range(m), k))
