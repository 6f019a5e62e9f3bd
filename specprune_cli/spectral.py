"""The spectral core: second moments, degrees of freedom, greedy selection (SPEC §2-3).

Pure tensor code: nothing here knows about nn.Module. Accumulation and selection run in float64,
and no explicit inverse is ever formed (Cholesky solves only).

Greedy selection, fast and exact. With R the residual covariance and M the metric of the combined
loss, the decrease of the loss from adding channel j is ``Q_jj / (R_jj + lambda)`` where
``Q = R M R``. After picking j with ``r = R e_j``, ``q = Q e_j``, ``d = R_jj + lambda``,
``c = Q_jj``:

    R' = R - r r^T / d
    Q' = Q - (q r^T + r q^T) / d + c r r^T / d^2

The diagonals are updated exactly at every step (O(m)); the full matrices are updated lazily: the
rank-one terms wait in a panel and are applied every ``block`` steps with one matrix product, and the
true row j is rebuilt from the stale row plus the panel. That turns a memory-bound O(m^2)-per-step
loop into compute-bound BLAS-3 work, with the same arithmetic up to round-off; the tests check the
selected indices against a plain transcription of SPEC §3 (``_greedy_select_reference``).
"""
from __future__ import annotations

import math

import torch

from specprune_cli.errors import StatisticsError

_BLOCK = 128


class SecondMoment:
    """Streaming uncentered second moment (1/n) sum_i x_i x_i^T, accumulated in float64.

    ``update`` takes (N, C) rows, or (N, C, *spatial) where each (sample, position) is a row; with
    ``channel_dim=-1`` it takes (..., C) as a Linear on an N-D input sees it. When ``max_positions`` is
    set, that many positions per sample are drawn at random (seeded, reproducible) to bound the cost.

    Attributes:
        count: number of rows n accumulated so far.
        channels: C (fixed by the first update if not given).
    """

    def __init__(self, channels: int | None = None, *, max_positions: int | None = None, seed: int = 0,
                 channel_dim: int = 1):
        self.channels = channels
        self.max_positions = max_positions
        self.channel_dim = channel_dim
        self.count = 0
        self._sum: torch.Tensor | None = None
        self._generator = torch.Generator().manual_seed(seed)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel_dim == -1 or x.dim() == 2:
            return x.reshape(-1, x.shape[-1])
        n, c = x.shape[0], x.shape[1]
        x = x.reshape(n, c, -1)
        positions = x.shape[2]
        if self.max_positions is not None and positions > self.max_positions:
            idx = torch.randint(positions, (n, self.max_positions), generator=self._generator)
            x = torch.gather(x, 2, idx.unsqueeze(1).expand(n, c, self.max_positions))
        return x.permute(0, 2, 1).reshape(-1, c)

    def update(self, x: torch.Tensor) -> "SecondMoment":
        """Add a batch of activations. Returns self."""
        rows = self._rows(x.detach())
        if self.channels is None:
            self.channels = rows.shape[1]
        if rows.shape[1] != self.channels:
            raise StatisticsError(f"expected {self.channels} channels, got a batch with {rows.shape[1]}; "
                                  "the same accumulator must see the same layer")
        bad = int((~torch.isfinite(rows)).sum())
        if bad:
            raise StatisticsError(f"{bad} activation values are NaN or Inf; check the input normalisation "
                                  "(data.*.mean/std), that the checkpoint matches the architecture, and that "
                                  "the model runs in eval mode")
        rows64 = rows.to(torch.float64)
        s = rows64.T @ rows64
        self._sum = s if self._sum is None else self._sum + s
        self.count += rows.shape[0]
        return self

    def merge(self, other: "SecondMoment") -> "SecondMoment":
        """Add another accumulator's rows (count-weighted). Returns self."""
        if other._sum is None:
            return self
        if self._sum is None:
            self._sum, self.count, self.channels = other._sum.clone(), other.count, other.channels
            return self
        if other.channels != self.channels:
            raise StatisticsError(f"cannot merge second moments of {self.channels} and {other.channels} channels")
        self._sum = self._sum + other._sum
        self.count += other.count
        return self

    @property
    def matrix(self) -> torch.Tensor:
        """Sigma, symmetrised, float64 (C, C)."""
        if self._sum is None or self.count == 0:
            raise StatisticsError("the second moment was read before any update: run the 'observe' step "
                                  "(a forward pass over calibration data) first")
        m = self._sum / self.count
        return 0.5 * (m + m.T)


def relative_lambda(sigma: torch.Tensor, ridge: float) -> float:
    """lambda = ridge * Tr(Sigma) / m (a tiny positive floor when Sigma is all zero)."""
    value = float(ridge) * float(torch.trace(sigma)) / sigma.shape[0]
    return value if value > 0 else 1e-12


def degrees_of_freedom(sigma: torch.Tensor, lam: float) -> float:
    """N(lambda) = Tr[Sigma (Sigma + lambda I)^-1] = sum_j mu_j / (mu_j + lambda).

    Computed as m - lambda * ||L^-1||_F^2 with L the Cholesky factor of Sigma + lambda I (about twice
    as fast as an eigendecomposition for wide layers); eigenvalues are the fallback.
    """
    sigma = sigma.to(torch.float64)
    m = sigma.shape[0]
    eye = torch.eye(m, dtype=torch.float64)
    chol, info = torch.linalg.cholesky_ex(sigma + lam * eye)
    if int(info) == 0:
        inv = torch.linalg.solve_triangular(chol, eye, upper=False)
        value = m - lam * float((inv * inv).sum())
        if 0.0 <= value <= m:
            return value
    mu = torch.linalg.eigvalsh(sigma).clamp_min(0)
    return float((mu / (mu + lam)).sum())


def _metric_weights(sigma: torch.Tensor, theta: float, z: torch.Tensor | None,
                    z_gram: torch.Tensor | None = None) -> tuple[float, float]:
    """(a, b) with M = a I + b Z^T Z, each loss term normalised by its value at J = {}."""
    tr = float(torch.trace(sigma))
    if z is None and z_gram is None:
        return (1.0 / tr if tr > 0 else 0.0), 0.0
    trz = float(((z @ sigma) * z).sum()) if z_gram is None else float((sigma * z_gram).sum())
    a = (1.0 - theta) / tr if tr > 0 else 0.0
    b = theta / trz if trz > 0 else 0.0
    return a, b


def _check(sigma: torch.Tensor, k: int) -> torch.Tensor:
    if sigma.dim() != 2 or sigma.shape[0] != sigma.shape[1]:
        raise ValueError(f"sigma must be square, got shape {tuple(sigma.shape)}")
    m = sigma.shape[0]
    if not 1 <= k <= m:
        raise ValueError(f"k must be in [1, {m}], got {k}")
    sigma = sigma.to(torch.float64)
    return 0.5 * (sigma + sigma.T)


def reconstruction_matrix(sigma: torch.Tensor, keep: torch.Tensor, *, ridge: float = 1e-3) -> torch.Tensor:
    """A_J = Sigma[:, J] (Sigma[J, J] + lambda I)^-1 (m x k), by a Cholesky solve (jitter if needed)."""
    sigma = sigma.to(torch.float64)
    keep = keep.to(torch.long)
    lam = relative_lambda(sigma, ridge)
    gram = sigma[keep][:, keep] + lam * torch.eye(len(keep), dtype=torch.float64)
    jitter = 0.0
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(gram + jitter * torch.eye(len(keep), dtype=torch.float64))
        if int(info) == 0:
            # A^T = (Sigma_JJ + lam I)^-1 Sigma[J, :]
            return torch.cholesky_solve(sigma[keep, :], chol).T.contiguous()
        jitter = max(jitter * 10, lam * 1e-6, 1e-12)
    raise StatisticsError("the kept channels' second moment is not positive definite even with jitter; "
                          "raise prune.ridge")


def selection_loss(sigma: torch.Tensor, keep: torch.Tensor, *, ridge: float = 1e-3, theta: float = 0.5,
                   z: torch.Tensor | None = None, z_gram: torch.Tensor | None = None) -> float:
    """L(J) of SPEC §3: (1-theta) Tr(R_J)/Tr(Sigma) + theta Tr(Z R_J Z^T)/Tr(Z Sigma Z^T).

    With ``z`` None the loss is the input-aware term alone, Tr(R_J)/Tr(Sigma). ``z_gram`` = Z^T Z may be
    given instead of ``z`` (only the Gram matrix enters the loss).
    """
    sigma = sigma.to(torch.float64)
    keep = torch.as_tensor(keep, dtype=torch.long)
    residual = sigma.clone()
    if keep.numel():
        a = reconstruction_matrix(sigma, keep, ridge=ridge)
        residual = sigma - a @ sigma[keep, :]
    zz = None if z is None else z.to(torch.float64)
    gram = None if z_gram is None else z_gram.to(torch.float64)
    a_w, b_w = _metric_weights(sigma, theta, zz, gram)
    loss = a_w * float(torch.trace(residual))
    if zz is not None:
        loss += b_w * float(((zz @ residual) * zz).sum())
    elif gram is not None:
        loss += b_w * float((residual * gram).sum())
    return loss


def greedy_select(sigma: torch.Tensor, k: int, *, ridge: float = 1e-3, theta: float = 0.5,
                  z: torch.Tensor | None = None, z_gram: torch.Tensor | None = None,
                  block: int = _BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy forward selection of k of m channels minimising L(J) (SPEC §3), exactly.

    Args:
        sigma: second moment (m x m).
        k: channels to keep.
        ridge: lambda = ridge * Tr(sigma) / m.
        theta: weight of the output-aware term (ignored when ``z`` is None).
        z: consumers' weights with one column per channel (rows: outputs x kernel positions).
        z_gram: Z^T Z instead of ``z`` (m x m): cheaper when Z has many more rows than columns.
        block: rank-one updates applied together (speed only; the selection does not depend on it).

    Returns:
        (keep, A): the kept indices sorted ascending, and A_J (m x k, float64) by Cholesky solve.
    """
    sigma = _check(sigma, k)
    m = sigma.shape[0]
    lam = relative_lambda(sigma, ridge)
    zz = None if z is None else z.to(torch.float64)
    if zz is not None and zz.shape[1] != m:
        raise ValueError(f"z must have {m} columns (one per channel), got shape {tuple(zz.shape)}")
    gram = None if z_gram is None else z_gram.to(torch.float64)
    a_w, b_w = _metric_weights(sigma, theta, zz, gram)
    q = a_w * (sigma @ sigma)
    if zz is not None and b_w > 0:
        zs = zz @ sigma
        q += b_w * (zs.T @ zs)
    elif gram is not None and b_w > 0:
        q += b_w * (sigma @ (gram @ sigma))
    q = 0.5 * (q + q.T)
    r = sigma.clone()
    diag_r = torch.diagonal(r).clone()
    diag_q = torch.diagonal(q).clone()
    chosen = torch.zeros(m, dtype=torch.bool)
    u_panel = torch.empty(m, block, dtype=torch.float64)
    v_panel = torch.empty(m, block, dtype=torch.float64)
    s_panel = torch.empty(block, dtype=torch.float64)
    p = 0
    order: list[int] = []
    for step in range(k):
        score = diag_q / (diag_r + lam)
        score[chosen] = -math.inf
        j = int(torch.argmax(score))
        row_r, row_q = r[j].clone(), q[j].clone()  # rows: both matrices are symmetric, rows are contiguous
        if p:
            up, vp = u_panel[:, :p], v_panel[:, :p]
            uj, vj = up[j], vp[j]
            row_r -= up @ uj
            row_q -= vp @ uj + up @ (vj - s_panel[:p] * uj)
        d = float(diag_r[j]) + lam
        c = float(diag_q[j])
        diag_r -= row_r * row_r / d
        diag_q -= (2.0 / d) * row_q * row_r - (c / (d * d)) * row_r * row_r
        root = math.sqrt(d)
        u_panel[:, p] = row_r / root
        v_panel[:, p] = row_q / root
        s_panel[p] = c / d
        p += 1
        chosen[j] = True
        order.append(j)
        if p == block:
            _apply_panel(r, q, u_panel[:, :p], v_panel[:, :p], s_panel[:p])
            p = 0
    keep = torch.tensor(sorted(order), dtype=torch.long)
    return keep, reconstruction_matrix(sigma, keep, ridge=ridge)


def _apply_panel(r: torch.Tensor, q: torch.Tensor, u: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> None:
    """R -= U U^T;  Q -= V U^T + U V^T - U diag(s) U^T, as one product each."""
    r.addmm_(u, u.T, alpha=-1.0)
    q.addmm_(torch.cat([v, u, u * s], 1), torch.cat([u, v, -u], 1).T, alpha=-1.0)


def _greedy_select_reference(sigma: torch.Tensor, k: int, *, ridge: float = 1e-3, theta: float = 0.5,
                             z: torch.Tensor | None = None) -> list[int]:
    """SPEC §3 transcribed literally (full R and G updated every step); the order of picks."""
    sigma = _check(sigma, k)
    m = sigma.shape[0]
    lam = relative_lambda(sigma, ridge)
    zz = None if z is None else z.to(torch.float64)
    a_w, b_w = _metric_weights(sigma, theta, zz)
    metric = a_w * torch.eye(m, dtype=torch.float64)
    if zz is not None:
        metric = metric + b_w * (zz.T @ zz)
    r = sigma.clone()
    g = metric @ r
    picked: list[int] = []
    for _ in range(k):
        score = (r * g).sum(0) / (torch.diagonal(r) + lam)
        score[picked] = -math.inf
        j = int(torch.argmax(score))
        rj, gj, d = r[:, j].clone(), g[:, j].clone(), r[j, j] + lam
        r -= torch.outer(rj, rj) / d
        g -= torch.outer(gj, rj) / d
        picked.append(j)
    return picked
