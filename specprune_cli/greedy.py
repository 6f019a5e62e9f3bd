"""The exact greedy forward selection behind ``spectral.select`` (docs/method.md §3, §6).

In the notation of ``spectral``'s module docstring, let R = S~ - S~_{:J} B_J S~_{J:} (k0 x k0) and
K = C - C_J B_J S~_{J:} (m x k0). Adding channel j, with s = S~_{Jj}, the block inverse of
S~_{J+j,J+j} + lambda I has the Schur complement d = S~_jj + lambda - s^T B_J s = R_jj + lambda, and

    C_{J+j} B_{J+j} C_{J+j}^T = C_J B_J C_J^T + K_j K_j^T / d        (K_j = K e_j = c_j - C_J B_J s),

so the loss falls by K_j^T M K_j / d = Q_jj / (R_jj + lambda) with Q = K^T M K (k0 x k0). The same block
inverse gives R' = R - r r^T / d and K' = K - K_j r^T / d with r = R e_j; hence, with q = Q e_j, c = Q_jj,

    R' = R - r r^T / d
    Q' = Q - (q r^T + r q^T) / d + c r r^T / d^2,

started from R = S~ and Q = C^T M C (with intercept, from the deflated R and K of ``objective``). For
x~ = x this is Q = S M S, the recursion of docs/method.md §3 (there Q_jj = sum_i R_ij (M R)_ij).
Several signals (the taps of one unit, each with its own S~, C, M, lambda and a weight) share one J:
the gain of j is the weighted sum of their gains, and a pick updates each one.

Speed. The diagonals of R and Q are updated exactly at every step (O(k0)); the full matrices lazily:
the rank-one terms wait in a panel and are applied every ``block`` steps with one matrix product, and
the true row j is rebuilt from the stale row plus the panel (O(k0 block)). That turns a memory-bound
O(k0^2)-per-step loop into compute-bound BLAS-3 work with the same arithmetic up to round-off. Each
flush also drops the picked rows and columns, which never influence the others again, by moving the
last live rows into their places (O(k0 block), not a copy of the matrix); positions then no longer
follow channel order, so exact ties are broken by the channel index explicitly. R, Q and Q's first
value are symmetric: only their lower block triangle is multiplied out and mirrored.
"""
from __future__ import annotations

import math

import torch

from specprune_cli.objective import _Prepared
from specprune_cli.symmetric import sym_addmm

_BLOCK = 128  # rank-one terms per flush: 64, 128 and 256 within 5% of each other at m = 4096


def _run(prepared: list[_Prepared], k: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The greedy order of k picks and the loss curve (k + 1 values) for prepared signals."""
    k0 = prepared[0].source.shape[0]
    if not 1 <= k <= k0:
        raise ValueError(f"k must be in [1, {k0}], got {k}")
    diag = torch.stack([torch.diagonal(p.source) for p in prepared]).amax(0)
    live = torch.nonzero(diag > 0).flatten()
    dead = torch.nonzero(diag <= 0).flatten()
    picks: list[int] = []
    gains: list[float] = []
    if live.numel():
        sub = None if live.numel() == k0 else live
        tracks = [_Track(*p.initial(sub), p.lam, block) for p in prepared]
        order, gains = _greedy_order(tracks, min(k, live.numel()))
        picks = live[torch.tensor(order, dtype=torch.long)].tolist()
    picks += dead[:k - len(picks)].tolist()
    gains += [0.0] * (k - len(gains))
    start = sum(p.start for p in prepared)
    curve = start - torch.tensor([0.0] + gains, dtype=torch.float64).cumsum(0)
    return torch.tensor(picks, dtype=torch.long), curve


def _best(score: torch.Tensor, index: torch.Tensor, permuted: bool) -> int:
    """Position of the highest score; among exact ties the lowest channel index (positions follow
    channel order only until the first flush)."""
    j = int(torch.argmax(score))  # the first maximum
    if permuted:
        ties = torch.nonzero(score == score[j]).flatten()
        if ties.numel() > 1:
            j = int(ties[torch.argmin(index[ties])])
    return j


class _Track:
    """One signal's R and Q, their exact diagonals, and the rank-one terms not yet applied.

    The active part is the leading n x n block of ``r`` and ``q``; position i holds channel index[i]
    (kept by ``_greedy_order``).
    """

    def __init__(self, r: torch.Tensor, q: torch.Tensor, lam: float, block: int):
        n = r.shape[0]
        self.r, self.q, self.lam = r, q, lam
        self.diag_r = torch.diagonal(r).clone()
        self.diag_q = torch.diagonal(q).clone()
        # Rows u_0, v_0, u_1, v_1, ...: each pick writes two contiguous rows, and the per-step product
        # (2 x 2p) @ (2p x n) reads the panel once, about 2x faster than the column layout.
        self.panel = torch.empty(2 * block, n, dtype=torch.float64)
        self.shift = torch.empty(block, dtype=torch.float64)  # s_p = c_p / d_p
        self.coef = torch.empty(2 * block, dtype=torch.float64)

    def score(self) -> torch.Tensor:
        """Q_jj / (R_jj + lambda): the fall of the loss from adding each channel."""
        return self.diag_q / (self.diag_r + self.lam)

    def take(self, j: int, p: int, n: int) -> float:
        """Add position j as pending term p: exact diagonals now, rows later. Returns its gain."""
        r, q, panel = self.r, self.q, self.panel
        if p:
            # True rows from stale rows + panel: R_j -= sum u u_j;  Q_j -= sum v u_j + u (v_j - s u_j).
            # Two matrix-vector products: the panel is read once per row, and unlike a (2 x 2p) GEMM
            # they do not stall on thread barriers when the cores are shared (measured 10x).
            pj = panel[:2 * p, j]
            uj, vj = pj[0::2], pj[1::2]
            coef = self.coef
            coef[0:2 * p:2] = vj - self.shift[:p] * uj
            coef[1:2 * p:2] = uj
            row_r = torch.addmv(r[j, :n], panel[0:2 * p:2, :n].T, uj, alpha=-1.0)
            row_q = torch.addmv(q[j, :n], panel[:2 * p, :n].T, coef[:2 * p], alpha=-1.0)
        else:
            row_r, row_q = r[j, :n].clone(), q[j, :n].clone()
        d = float(self.diag_r[j]) + self.lam
        c = float(self.diag_q[j])
        rr = row_r * row_r
        self.diag_r.sub_(rr, alpha=1.0 / d)
        self.diag_q.sub_(row_q * row_r, alpha=2.0 / d).add_(rr, alpha=c / (d * d))
        root = math.sqrt(d)
        torch.div(row_r, root, out=panel[2 * p, :n])
        torch.div(row_q, root, out=panel[2 * p + 1, :n])
        self.shift[p] = c / d
        return c / d

    def flush(self, src: torch.Tensor, holes: torch.Tensor, fillers: torch.Tensor, p: int, n: int) -> None:
        """Drop the p picked positions and apply the pending terms to what is left.

        The live positions past the new end (``fillers``) move into the picked ones below it
        (``holes``); ``src`` is the old position of each new one. Then R -= U U^T and Q -= V U^T +
        U V^T - U diag(s) U^T = V' U^T + U V'^T with V' = V - U diag(s) / 2, a symmetric rank-2p product.
        """
        size = src.numel()
        if holes.numel():
            for mat in (self.r, self.q):
                # Rows move whole; by symmetry the moved columns are those rows transposed, except
                # where a moved row meets a moved column (the corner, taken before the rows move).
                corner = mat[fillers[:, None], fillers]
                mat[holes, :size] = mat[fillers, :size]
                mat[:size, holes] = mat[holes, :size].T
                mat[holes[:, None], holes] = corner
        u = self.panel[0:2 * p:2].index_select(1, src)
        v = self.panel[1:2 * p:2].index_select(1, src) - (0.5 * self.shift[:p])[:, None] * u
        sym_addmm(self.r[:size, :size], u.T, u.T, alpha=-1.0)
        sym_addmm(self.q[:size, :size], torch.cat([u, v]).T, torch.cat([v, u]).T, alpha=-1.0)
        self.diag_r, self.diag_q = self.diag_r[src], self.diag_q[src]


def _greedy_order(tracks: list[_Track], k: int) -> tuple[list[int], list[float]]:
    """The k greedy picks (indices into the tracks' channels) and the loss each one removed."""
    n = tracks[0].r.shape[0]
    block = tracks[0].shift.numel()
    index = torch.arange(n)  # channel at each position
    taken = torch.zeros(n, dtype=torch.bool)  # picked since the last flush (still in the matrices)
    p = 0
    order: list[int] = []
    gains: list[float] = []
    for step in range(k):
        score = tracks[0].score()
        for t in tracks[1:]:
            score += t.score()
        score.masked_fill_(taken, -math.inf)
        j = _best(score, index, permuted=step >= block)
        gains.append(sum(t.take(j, p, n) for t in tracks))
        p += 1
        taken[j] = True
        order.append(int(index[j]))
        if p == block and step + 1 < k:
            size = n - p
            holes = torch.nonzero(taken[:size]).flatten()
            fillers = torch.nonzero(~taken[size:n]).flatten() + size
            src = torch.arange(size)
            src[holes] = fillers
            for t in tracks:
                t.flush(src, holes, fillers, p, n)
            index, n, p = index[src], size, 0
            taken = torch.zeros(n, dtype=torch.bool)
    return order, gains
