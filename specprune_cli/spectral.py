"""The spectral core: degrees of freedom, greedy selection, reconstruction (docs/method.md §2, §3, §6).

Pure tensor code: nothing here knows about nn.Module. Everything runs in float64, and no explicit
inverse is ever formed (Cholesky solves only).

The objective (docs/method.md §3, §6). At a tap, x is the original network's signal (m channels) and
x~ the pruned network's (k0 channels), with S = E[x x^T], S~ = E[x~ x~^T], C = E[x x~^T]. With the
metric M = a I + b Z^T Z, a = (1 - theta) / Tr S, b = theta / Tr(Z S Z^T), and lambda = ridge Tr(S~) / k0,
keeping the channels J of x~ costs

    L(J) = min_A  E||x - A x~_J||_M^2 + lambda ||A||_M^2 = Tr(M S) - Tr(M C_J B_J C_J^T),
    A_J = C_J B_J,   B_J = (S~_JJ + lambda I)^-1,   C_J = C[:, J],

normalised so that L({}) = Tr(M S) = 1 (each term by its value at J = {}). With x~ = x (C = S~ = S)
this is the loss of docs/method.md §3.

With ``intercept``, a constant channel is forced in first and x ~= A x~_J + b (``objective``).
Several signals (the taps of one unit, each with its own S~, C, M, lambda and a weight) share one J,
and the loss is their weighted mean.

The parts: ``signals`` (the inputs, lambda and N(lambda)), ``objective`` (each signal's metric and
starting matrices), ``greedy`` (the exact greedy, its rank-one updates and its speed), and here the
public calls, which select and then solve for A_J.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from specprune_cli.errors import StatisticsError
from specprune_cli.greedy import _BLOCK, _run
from specprune_cli.objective import _metric_weights, _prepare_all, _Prepared
from specprune_cli.signals import Signal, _check, _gram, degrees_of_freedom, relative_lambda

__all__ = ["Selection", "Signal", "degrees_of_freedom", "greedy_select", "loss_curve", "reconstruction",
           "reconstruction_matrix", "relative_lambda", "select", "selection_loss"]


@dataclass(frozen=True)
class Selection:
    """The result of ``select``.

    Attributes:
        keep: the kept channels J, LongTensor (k,) sorted ascending.
        order: the same channels in the order the greedy picked them, LongTensor (k,); its first k'
            entries are the greedy choice for k' channels.
        maps: one A_J per signal, float64 (m_t x k), columns in ``keep`` order.
        biases: one b per signal, float64 (m_t,), or None each without intercept.
        curve: float64 (k + 1,): the normalised loss after 0, 1, ..., k picks (``order``); curve[0] is
            1 without intercept (less with it: the loss of the constant channel alone).
    """

    keep: torch.Tensor
    order: torch.Tensor
    maps: list[torch.Tensor]
    biases: list[torch.Tensor | None]
    curve: torch.Tensor


def select(signals: Signal | Sequence[Signal], k: int, *, ridge: float = 1e-3, theta: float = 0.5,
           intercept: bool = False, weights: Sequence[float] | None = None, block: int = _BLOCK) -> Selection:
    """Greedy forward selection of k candidate channels for one or several taps, exactly (docs/method.md §6).

    The loss is the weighted mean over signals of each one's normalised loss (module docstring): at a
    tap, (1 - theta) E||x - A x~_J - b||^2 / Tr(S) + theta E||Z(x - A x~_J - b)||^2 / Tr(Z S Z^T) with
    the ridge term; theta is ignored where there is no z_gram (or Tr(Z S Z^T) = 0). Ties go to the
    lowest index. Dead channels (S~_jj = 0 at every tap) are picked only once every live channel is
    kept, lowest index first. With one signal whose cross and target are None (or equal to the source),
    this is ``greedy_select``, bit for bit.

    Args:
        signals: one Signal or several sharing the same candidate channels (same k0).
        k: channels to keep, 1 <= k <= k0 (the intercept is not counted).
        ridge: lambda = ridge * Tr(S~) / k0, per signal.
        theta: weight of the output-aware term, in [0, 1].
        intercept: fit a bias too (needs the means); see ``objective``'s module docstring.
        weights: one non-negative weight per signal (default equal); normalised to sum 1.
        block: rank-one updates applied together (speed only; the selection does not depend on it).

    Returns:
        The Selection: keep, order, one (A, b) per signal, and the loss curve.

    Raises:
        ValueError: shapes that do not fit, k outside [1, k0], theta outside [0, 1], a missing mean.
        StatisticsError: NaN/Inf in the statistics, or kept channels that cannot be solved for.
    """
    prepared = _prepare_all(signals, ridge=ridge, theta=theta, intercept=intercept, weights=weights)
    return _select(prepared, k, block)


def _select(prepared: list[_Prepared], k: int, block: int) -> Selection:
    order, curve = _run(prepared, k, block)
    keep = order.sort().values
    fits = [_solve(p, keep) for p in prepared]
    return Selection(keep=keep, order=order, maps=[a for a, _ in fits], biases=[b for _, b in fits],
                     curve=curve)


def loss_curve(signals: Signal | Sequence[Signal], *, ridge: float = 1e-3, theta: float = 0.5,
               kmax: int | None = None, intercept: bool = False, weights: Sequence[float] | None = None,
               block: int = _BLOCK) -> torch.Tensor:
    """The normalised loss after 0, 1, ..., kmax greedy picks, float64 (kmax + 1,) (see ``select``).

    Costs the greedy alone (no reconstruction); kmax defaults to every candidate channel.
    """
    prepared = _prepare_all(signals, ridge=ridge, theta=theta, intercept=intercept, weights=weights)
    return _run(prepared, prepared[0].source.shape[0] if kmax is None else kmax, block)[1]


def greedy_select(sigma: torch.Tensor, k: int, *, ridge: float = 1e-3, theta: float = 0.5,
                  z: torch.Tensor | None = None, z_gram: torch.Tensor | None = None,
                  block: int = _BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy forward selection of k of m channels minimising L(J) (docs/method.md §3), exactly.

    ``select`` with one signal whose source is sigma (x~ = x). Ties go to the lowest index. Dead
    channels (Sigma_jj = 0) are picked only once every live channel is kept, lowest index first; an
    all-zero Sigma keeps channels 0..k-1 with A = 0.

    Args:
        sigma: second moment (m x m).
        k: channels to keep, 1 <= k <= m.
        ridge: lambda = ridge * Tr(sigma) / m.
        theta: weight of the output-aware term (ignored without consumers: input-aware only).
        z: consumers' weights with one column per channel (rows: outputs x kernel positions).
        z_gram: Z^T Z instead of z (m x m; cheaper when Z is tall). At most one of z, z_gram.
        block: rank-one updates applied together (speed only; the selection does not depend on it).

    Returns:
        (keep, A): the kept indices as a LongTensor sorted ascending, and A_J (m x k, float64).

    Raises:
        ValueError: k outside [1, m], sigma not square/symmetric, theta outside [0, 1], z of wrong shape.
    """
    if sigma.dim() != 2 or sigma.shape[0] != sigma.shape[1]:
        raise ValueError(f"sigma must be square, got shape {tuple(sigma.shape)}")
    if z is not None and z_gram is not None:
        raise ValueError("pass z or z_gram (= z^T z), not both")
    signal = Signal(sigma, z_gram=z_gram, z=z)
    out = _select([_Prepared(signal, ridge=ridge, theta=theta, weight=1.0, intercept=False, name="sigma")],
                  k, block)
    return out.keep, out.maps[0]


def selection_loss(sigma: torch.Tensor, keep: torch.Tensor, *, ridge: float = 1e-3, theta: float = 0.5,
                   z: torch.Tensor | None = None, z_gram: torch.Tensor | None = None) -> float:
    """L(J) of docs/method.md §3, by solves.

    L(J) = (1-theta) Tr(R_J)/Tr(Sigma) + theta Tr(Z R_J Z^T)/Tr(Z Sigma Z^T).
    With neither ``z`` nor ``z_gram`` the loss is the input-aware term alone, Tr(R_J)/Tr(Sigma).
    ``z_gram`` = Z^T Z gives the same value as ``z`` (Tr(Z R Z^T) = sum(Z^T Z * R)).
    """
    sigma = _check(sigma)
    keep = torch.as_tensor(keep, dtype=torch.long)
    gram = _gram(sigma.shape[0], z, z_gram)
    residual = sigma
    if keep.numel():
        residual = sigma - reconstruction_matrix(sigma, keep, ridge=ridge) @ sigma[keep, :]
    a_w, b_w = _metric_weights(sigma, theta, gram)
    loss = a_w * float(torch.trace(residual))
    if b_w:
        loss += b_w * float((gram * residual).sum())
    return loss


def reconstruction(signal: Signal, keep: torch.Tensor, *, ridge: float = 1e-3, intercept: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A_J = C[:, J] (S~_JJ + lambda I)^-1 and, with intercept, the bias b (docs/method.md §6).

    Args:
        signal: the tap's statistics (its z_gram is not used).
        keep: kept channel indices J (k distinct values in [0, k0)).
        ridge: lambda = ridge * Tr(S~) / k0.
        intercept: fit x ~= A x~_J + b with a constant channel (needs the means).

    Returns:
        (A, b): A float64 (m x k), columns in the order of ``keep``; b float64 (m,), or None without
        intercept. An all-zero S~ gives A = 0.
    """
    plain = Signal(signal.source, signal.cross, signal.target, signal.source_mean, signal.target_mean)
    return _solve(_Prepared(plain, ridge=ridge, theta=0.0, weight=1.0, intercept=intercept), keep)


def reconstruction_matrix(sigma: torch.Tensor, keep: torch.Tensor, *, ridge: float = 1e-3) -> torch.Tensor:
    """A_J = Sigma[:, J] (Sigma[J, J] + lambda I)^-1 (m x k, float64): ``reconstruction`` with x~ = x.

    Args:
        sigma: second moment (m x m) of the signal the consumers read.
        keep: kept channel indices J (k distinct values in [0, m)).
        ridge: lambda = ridge * Tr(sigma) / m.

    Returns:
        A_J, float64 (m x k); the consumer's new weight is W A_J.
    """
    return reconstruction(Signal(sigma), keep, ridge=ridge)[0]


def _solve(p: _Prepared, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(A, b) for one prepared signal by a Cholesky solve, with growing jitter if it fails."""
    keep = torch.as_tensor(keep, dtype=torch.long)
    k0, k = p.source.shape[0], keep.numel()
    if k and (int(keep.min()) < 0 or int(keep.max()) >= k0 or torch.unique(keep).numel() != k):
        raise ValueError(f"keep must hold distinct indices in [0, {k0}), got {keep.tolist()}")
    rhs = p.source[keep, :] if p.cross is None else p.cross[:, keep].T.contiguous()  # C_J^T (k x m)
    gram = p.source[keep][:, keep]
    if p.scale is not None:  # the constant channel joins the system first: [s, x~_J]
        s, mean = p.scale, p.source_mean[keep]
        gram = torch.cat([torch.cat([mean.new_full((1, 1), s * s), s * mean[None]], 1),
                          torch.cat([s * mean[:, None], gram], 1)])
        rhs = torch.cat([s * p.target_mean[None], rhs])
    eye = torch.eye(gram.shape[0], dtype=torch.float64)
    jitter = 0.0
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(gram + (p.lam + jitter) * eye)
        if int(info) == 0:
            sol = torch.cholesky_solve(rhs, chol)  # A^T = (S~_JJ + lam I)^-1 C_J^T
            if p.scale is None:
                return sol.T.contiguous(), None
            return sol[1:].T.contiguous(), p.scale * sol[0]
        jitter = max(jitter * 10, p.lam * 1e-6, 1e-12)
    raise StatisticsError("the kept channels' second moment is not positive definite even with jitter; "
                          "raise prune.ridge")
