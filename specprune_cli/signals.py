"""A tap's statistics as the spectral core reads them: ``Signal``, its checks, lambda and N(lambda).

The relative ridge and the degrees of freedom are those of docs/method.md §2; a Signal is what one tap
of a unit gives the selection (docs/method.md §6). Pure tensor code in float64; the objective these
inputs feed is written out in ``spectral``'s module docstring.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from specprune_cli.errors import StatisticsError
from specprune_cli.symmetric import sym_addmm

_CHECK_TILE = 128  # side of the squares compared with their mirror images (two fit in a 1 MiB L2 cache)


@dataclass(frozen=True)
class Signal:
    """What one tap gives the selection (docs/method.md §6); float64 or any float dtype.

    Attributes:
        source: S~ = E[x~ x~^T] (k0 x k0), the second moment of the candidate channels.
        cross: C = E[x x~^T] (m x k0); None when the target is the source itself (x~ = x).
        target: S = E[x x^T] (m x m); None when it is the source. Pass cross and target together.
        source_mean: E[x~] (k0,), needed for ``intercept``.
        target_mean: E[x] (m,), needed for ``intercept`` when cross is given.
        z_gram: Z^T Z (m x m) of the consumers reading x at this tap; None: input-aware loss only.
        z: Z itself (rows x m), instead of z_gram. With at most m/3 rows it is used as it is (Q then
            costs about m^3 multiply-adds instead of 2.3 m^3 through Z^T Z); with more, Z^T Z is formed.
    """

    source: torch.Tensor
    cross: torch.Tensor | None = None
    target: torch.Tensor | None = None
    source_mean: torch.Tensor | None = None
    target_mean: torch.Tensor | None = None
    z_gram: torch.Tensor | None = None
    z: torch.Tensor | None = None


def relative_lambda(sigma: torch.Tensor, ridge: float) -> float:
    """lambda = ridge * Tr(Sigma) / m, floored at 1e-12 so that an all-zero Sigma stays solvable."""
    value = float(ridge) * float(torch.trace(sigma)) / sigma.shape[0]
    return value if value > 0 else 1e-12


def degrees_of_freedom(sigma: torch.Tensor, lam: float) -> float:
    """N(lambda) = Tr[Sigma (Sigma + lambda I)^-1] = sum_j mu_j / (mu_j + lambda) (docs/method.md §2).

    The trace of one Cholesky solve, (Sigma + lambda I)^-1 Sigma: no inverse, and no cancellation when
    N is small next to m (m - lambda Tr[(Sigma + lambda I)^-1] loses those digits). When the
    factorisation fails or the value lands outside [0, m] (round-off negative eigenvalues), the
    eigenvalues are used, with negative ones clamped to 0.
    """
    if not lam > 0:
        raise ValueError(f"lambda must be positive, got {lam}")
    sigma = sigma.to(torch.float64)
    m = sigma.shape[0]
    chol, info = torch.linalg.cholesky_ex(sigma + lam * torch.eye(m, dtype=torch.float64))
    if int(info) == 0:
        value = float(torch.trace(torch.cholesky_solve(sigma, chol)))
        if 0.0 <= value <= m:
            return value
    mu = torch.linalg.eigvalsh(sigma).clamp_min(0)
    return float((mu / (mu + lam)).sum())


def _finite(t: torch.Tensor, what: str) -> None:
    # A sum reads t once; only a non-finite sum pays for the elementwise test.
    if not math.isfinite(float(t.sum())) and not bool(torch.isfinite(t).all()):
        raise StatisticsError(f"{what} holds NaN or Inf: the statistics are broken; check the calibration "
                              "data")


def _check(sigma: torch.Tensor, k: int | None = None, what: str = "sigma") -> torch.Tensor:
    """Validated, symmetrised float64 version of a second moment (the input itself if exactly symmetric)."""
    if sigma.dim() != 2 or sigma.shape[0] != sigma.shape[1]:
        raise ValueError(f"{what} must be square, got shape {tuple(sigma.shape)}")
    m = sigma.shape[0]
    if k is not None and not 1 <= k <= m:
        raise ValueError(f"k must be in [1, {m}], got {k}")
    sigma = sigma.to(torch.float64)
    _finite(sigma, what)
    if m == 0:
        return sigma
    low, high = torch.aminmax(sigma)
    scale = max(-float(low), float(high))
    # Square tiles against their mirror images: a transposed pass over the whole matrix reads a new
    # cache line per element (measured 7x slower at m = 4096).
    pairs = [(slice(r, r + _CHECK_TILE), slice(c, c + _CHECK_TILE))
             for r in range(0, m, _CHECK_TILE) for c in range(0, r + 1, _CHECK_TILE)]
    asym = max(float((sigma[a, b] - sigma[b, a].T).abs().max()) for a, b in pairs)
    if asym > 1e-6 * scale:
        raise ValueError(f"{what} must be symmetric (a second moment); got an asymmetry above 1e-6 relative")
    if asym == 0:
        return sigma
    out = torch.empty_like(sigma)
    for a, b in pairs:
        mean = (sigma[a, b] + sigma[b, a].T).mul_(0.5)
        out[a, b] = mean
        out[b, a] = mean.T
    return out


def _gram(m: int, z: torch.Tensor | None, z_gram: torch.Tensor | None) -> torch.Tensor | None:
    """Z^T Z (m x m, float64) from either form the caller has, validated."""
    if z is not None and z_gram is not None:
        raise ValueError("pass z or z_gram (= z^T z), not both")
    if z is not None:
        if z.dim() != 2 or z.shape[1] != m:
            raise ValueError(f"z must have {m} columns (one per channel), got shape {tuple(z.shape)}")
        zt = z.to(torch.float64).T
        return sym_addmm(None, zt, zt)
    if z_gram is not None:
        if tuple(z_gram.shape) != (m, m):
            raise ValueError(f"z_gram must be {m} x {m} (z^T z), got shape {tuple(z_gram.shape)}")
        return _check(z_gram, what="z_gram")
    return None
