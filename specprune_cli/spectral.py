"""The spectral core: second moments, degrees of freedom, greedy selection (SPEC §2-3).

Pure tensor code: nothing here knows about nn.Module. Accumulation and selection run in float64,
and no explicit inverse is ever formed (Cholesky solves only).

Greedy selection, fast and exact. With R the residual covariance and M = a I + b Z^T Z the metric of
the combined loss, the decrease of the loss from adding channel j is ``Q_jj / (R_jj + lambda)`` where
``Q = R M R`` (because sum_i R_ij (M R)_ij = (R M R)_jj). After picking j with ``r = R e_j``,
``q = Q e_j``, ``d = R_jj + lambda``, ``c = Q_jj``:

    R' = R - r r^T / d
    Q' = Q - (q r^T + r q^T) / d + c r r^T / d^2

The diagonals are updated exactly at every step (O(m)); the full matrices lazily: the rank-one terms
wait in a panel and are applied every ``block`` steps with one matrix product, and the true row j is
rebuilt from the stale row plus the panel (O(m block)). That turns a memory-bound O(m^2)-per-step loop
into compute-bound BLAS-3 work with the same arithmetic up to round-off. Two more savings: the rows and
columns of picked channels never influence the others again, so each flush also drops them (the
matrices shrink as k grows), and R, Q and Q's first value are symmetric, so only their lower block
triangle is multiplied out and mirrored. The tests check the picks against a literal transcription of
SPEC §3 (``_greedy_select_reference``) and against brute force.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from specprune_cli.errors import StatisticsError

_BLOCK = 128  # rank-one terms per flush: fastest of 32/64/128 at m = 2048 on 2 shared cores
_SYM_TILE = 512  # rows per tile in the half-triangle products; below two tiles a plain GEMM is faster
_ROW_CHUNK = 1 << 16  # rows converted to float64 at a time in SecondMoment.update (bounds the copy)
_GRAM_TILE = 64  # fewest channels per tile when SecondMoment accumulates (at most 8 tiles)


class SecondMoment:
    """Streaming uncentered second moment (1/n) sum_i x_i x_i^T, accumulated in float64.

    ``update`` takes (N, C) rows, or (N, C, *spatial) where each (sample, position) is a row; with
    ``channel_dim=-1`` it takes (..., C) as a Linear on an N-D input sees it (all leading dims are rows).
    When ``max_positions`` is set and a sample has more positions, that many distinct positions per
    sample are drawn at random from a generator seeded with ``seed``: the same seed and the same
    sequence of updates give the same matrix.

    Attributes:
        count: number of rows n accumulated so far.
        channels: C (fixed by the first update if not given).
    """

    def __init__(self, channels: int | None = None, *, max_positions: int | None = None, seed: int = 0,
                 channel_dim: int = 1):
        if channel_dim not in (1, -1):
            raise ValueError(f"channel_dim must be 1 (N, C, *spatial) or -1 (..., C), got {channel_dim}")
        if max_positions is not None and max_positions < 1:
            raise ValueError(f"max_positions must be a positive integer or None, got {max_positions}")
        self.channels = channels
        self.max_positions = max_positions
        self.channel_dim = channel_dim
        self.count = 0
        self._sum: torch.Tensor | None = None
        self._generator = torch.Generator().manual_seed(seed)

    def _row_chunks(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        """The rows of ``x`` as float64 (rows, C) pieces of at most about _ROW_CHUNK rows.

        Each piece is made by one copy that changes layout and dtype together: float64 before the
        product, not after (SPEC §2).
        """
        if self.channel_dim == -1 or x.dim() == 2:
            flat = x.reshape(-1, x.shape[-1])
            for lo in range(0, flat.shape[0], _ROW_CHUNK):
                yield flat[lo:lo + _ROW_CHUNK].to(torch.float64)
            return
        n, c = x.shape[0], x.shape[1]
        x = x.reshape(n, c, -1)
        positions = x.shape[2]
        if self.max_positions is not None and positions > self.max_positions:
            # Distinct positions (no duplicated rows): the first max_positions of a random permutation.
            idx = torch.rand(n, positions, generator=self._generator).argsort(1)[:, :self.max_positions]
            positions = self.max_positions
            x = torch.gather(x, 2, idx.unsqueeze(1).expand(n, c, positions))
        per = max(1, _ROW_CHUNK // positions)  # samples per piece
        for lo in range(0, n, per):
            part = x[lo:lo + per]
            rows = torch.empty(part.shape[0], positions, c, dtype=torch.float64)
            rows.copy_(part.permute(0, 2, 1))
            yield rows.view(-1, c)

    def update(self, x: torch.Tensor) -> "SecondMoment":
        """Add a batch of activations.

        Args:
            x: (N, C) or (N, C, *spatial) activations (``channel_dim=1``), or (..., C) (``channel_dim=-1``).

        Returns:
            self, so that ``SecondMoment().update(x).matrix`` reads naturally.

        Raises:
            StatisticsError: x holds NaN/Inf, or its channel count differs from earlier updates.
        """
        x = x.detach()
        if x.dim() < 2:
            raise StatisticsError(f"activations must have a batch and a channel dimension, got shape "
                                  f"{tuple(x.shape)}")
        channels = x.shape[-1] if self.channel_dim == -1 else x.shape[1]
        if self.channels is None:
            self.channels = channels
        if channels != self.channels:
            raise StatisticsError(f"expected {self.channels} channels, got a batch with {channels}; "
                                  "the same accumulator must see the same layer")
        # Checked on the whole batch, before subsampling: a broken model must not pass by luck. A sum
        # reads x once without a mask the size of x; only a non-finite sum (NaN/Inf, or an overflow)
        # pays for the exact count.
        bad = 0
        if x.is_floating_point() and not math.isfinite(float(x.sum())):
            bad = int(x.numel() - torch.isfinite(x).sum())
        if bad:
            raise StatisticsError(f"{bad} of {x.numel()} activation values are NaN or Inf; check the input "
                                  "normalisation (data.*.mean/std), that the checkpoint matches the "
                                  "architecture, and that the model runs in eval mode")
        if self._sum is None:
            self._sum = torch.zeros(self.channels, self.channels, dtype=torch.float64)
        # Half the flops through the symmetric product: at m = 288 and 12,544 rows, 16 ms, not 23.
        tile = max(_GRAM_TILE, self.channels // 8)
        for rows in self._row_chunks(x):
            _sym_addmm(self._sum, rows.T, rows.T, tile=tile)
            self.count += rows.shape[0]
        return self

    def copy(self) -> "SecondMoment":
        """An independent accumulator holding the same rows so far; later updates to either do not
        reach the other, and its generator goes on from the same state (same updates, same matrix)."""
        out = SecondMoment(self.channels, max_positions=self.max_positions, channel_dim=self.channel_dim)
        out._generator.set_state(self._generator.get_state())
        out.count = self.count
        out._sum = None if self._sum is None else self._sum.clone()
        return out

    def merge(self, other: "SecondMoment") -> "SecondMoment":
        """Add another accumulator's rows (the result is count-weighted). Returns self."""
        if self.channels is not None and other.channels is not None and other.channels != self.channels:
            raise StatisticsError(f"cannot merge second moments of {self.channels} and {other.channels} "
                                  "channels: they come from different layers")
        if other._sum is None:
            return self
        self._sum = other._sum.clone() if self._sum is None else self._sum + other._sum
        self.count += other.count
        self.channels = other.channels
        return self

    @property
    def matrix(self) -> torch.Tensor:
        """Sigma = (1/n) sum_i x_i x_i^T, symmetrised, float64 (C, C)."""
        if self._sum is None or self.count == 0:
            raise StatisticsError("the second moment was read before any update: run the 'observe' step "
                                  "(a forward pass over calibration data) first")
        m = self._sum / self.count
        return 0.5 * (m + m.T)


def relative_lambda(sigma: torch.Tensor, ridge: float) -> float:
    """lambda = ridge * Tr(Sigma) / m, floored at 1e-12 so that an all-zero Sigma stays solvable."""
    value = float(ridge) * float(torch.trace(sigma)) / sigma.shape[0]
    return value if value > 0 else 1e-12


def degrees_of_freedom(sigma: torch.Tensor, lam: float) -> float:
    """N(lambda) = Tr[Sigma (Sigma + lambda I)^-1] = sum_j mu_j / (mu_j + lambda).

    Computed as m - lambda * ||L^-1||_F^2 with L the Cholesky factor of Sigma + lambda I (about twice
    as fast as an eigendecomposition for wide layers). When that fails or lands outside [0, m] (round-
    off negative eigenvalues), the eigenvalues are used, with negative ones clamped to 0.
    """
    if not lam > 0:
        raise ValueError(f"lambda must be positive, got {lam}")
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


def _check(sigma: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Validated, symmetrised float64 copy of sigma."""
    if sigma.dim() != 2 or sigma.shape[0] != sigma.shape[1]:
        raise ValueError(f"sigma must be square, got shape {tuple(sigma.shape)}")
    m = sigma.shape[0]
    if k is not None and not 1 <= k <= m:
        raise ValueError(f"k must be in [1, {m}], got {k}")
    sigma = sigma.to(torch.float64)
    if not bool(torch.isfinite(sigma).all()):
        raise StatisticsError("sigma holds NaN or Inf: the statistics are broken; check the calibration data")
    scale = float(sigma.abs().max()) if m else 0.0
    if float((sigma - sigma.T).abs().max()) > 1e-6 * scale:
        raise ValueError("sigma must be symmetric (a second moment); got an asymmetry above 1e-6 relative")
    return 0.5 * (sigma + sigma.T)


def _gram(sigma: torch.Tensor, z: torch.Tensor | None, z_gram: torch.Tensor | None) -> torch.Tensor | None:
    """Z^T Z (m x m, float64) from either form the caller has, validated."""
    m = sigma.shape[0]
    if z is not None and z_gram is not None:
        raise ValueError("pass z or z_gram (= z^T z), not both")
    if z is not None:
        if z.dim() != 2 or z.shape[1] != m:
            raise ValueError(f"z must have {m} columns (one per channel), got shape {tuple(z.shape)}")
        zt = z.to(torch.float64).T
        return _sym_addmm(None, zt, zt)
    if z_gram is not None:
        if tuple(z_gram.shape) != (m, m):
            raise ValueError(f"z_gram must be {m} x {m} (z^T z), got shape {tuple(z_gram.shape)}")
        g = z_gram.to(torch.float64)
        return 0.5 * (g + g.T)
    return None


def _metric_weights(sigma: torch.Tensor, theta: float, gram: torch.Tensor | None) -> tuple[float, float]:
    """(a, b) with M = a I + b Z^T Z, each loss term normalised by its value at J = {}.

    Without consumers (gram None), or when Tr(Z Sigma Z^T) = 0 so that the output-aware term is
    undefined, the loss is the input-aware term alone whatever theta is.
    """
    if not 0.0 <= theta <= 1.0:
        raise ValueError(f"theta must be in [0, 1], got {theta}")
    tr = float(torch.trace(sigma))
    trz = float((gram * sigma).sum()) if gram is not None else 0.0
    if trz <= 0:
        return (1.0 / tr if tr > 0 else 0.0), 0.0
    return ((1.0 - theta) / tr if tr > 0 else 0.0), theta / trz


def _sym_addmm(out: torch.Tensor | None, left: torch.Tensor, right: torch.Tensor,
               alpha: float = 1.0, tile: int = _SYM_TILE) -> torch.Tensor:
    """out + alpha * left @ right^T for a product known to be symmetric, at about half the flops.

    Only the lower block triangle is multiplied (tiles of ``tile`` rows); the upper one is mirrored.
    ``out`` None means zeros. Updates ``out`` in place and returns it.
    """
    n = left.shape[0]
    if out is None:
        out = torch.zeros(n, n, dtype=left.dtype)
    tiles = n // tile
    if tiles < 2:
        return out.addmm_(left, right.T, alpha=alpha)
    edges = [n * i // tiles for i in range(tiles + 1)]
    for lo, hi in zip(edges, edges[1:]):
        out[lo:hi, :hi].addmm_(left[lo:hi], right[:hi].T, alpha=alpha)
    for lo, hi in zip(edges, edges[1:]):
        out[:lo, lo:hi].copy_(out[lo:hi, :lo].T)
    return out


def reconstruction_matrix(sigma: torch.Tensor, keep: torch.Tensor, *, ridge: float = 1e-3) -> torch.Tensor:
    """A_J = Sigma[:, J] (Sigma[J, J] + lambda I)^-1 (m x k, float64), by a Cholesky solve.

    If the Cholesky factorisation fails (round-off in a nearly singular Sigma[J, J]), growing jitter
    is added to the diagonal and it is retried. An all-zero Sigma gives A = 0: nothing to reconstruct.

    Args:
        sigma: second moment (m x m) of the signal the consumers read.
        keep: kept channel indices J (k distinct values in [0, m)).
        ridge: lambda = ridge * Tr(sigma) / m.

    Returns:
        A_J, float64 (m x k); the consumer's new weight is W A_J.
    """
    sigma = sigma.to(torch.float64)
    keep = torch.as_tensor(keep, dtype=torch.long)
    m, k = sigma.shape[0], keep.numel()
    if k and (int(keep.min()) < 0 or int(keep.max()) >= m or torch.unique(keep).numel() != k):
        raise ValueError(f"keep must hold distinct indices in [0, {m}), got {keep.tolist()}")
    lam = relative_lambda(sigma, ridge)
    gram = sigma[keep][:, keep]
    eye = torch.eye(k, dtype=torch.float64)
    jitter = 0.0
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(gram + (lam + jitter) * eye)
        if int(info) == 0:
            # A^T = (Sigma_JJ + lam I)^-1 Sigma[J, :]
            return torch.cholesky_solve(sigma[keep, :], chol).T.contiguous()
        jitter = max(jitter * 10, lam * 1e-6, 1e-12)
    raise StatisticsError("the kept channels' second moment is not positive definite even with jitter; "
                          "raise prune.ridge")


def selection_loss(sigma: torch.Tensor, keep: torch.Tensor, *, ridge: float = 1e-3, theta: float = 0.5,
                   z: torch.Tensor | None = None, z_gram: torch.Tensor | None = None) -> float:
    """L(J) of SPEC §3: (1-theta) Tr(R_J)/Tr(Sigma) + theta Tr(Z R_J Z^T)/Tr(Z Sigma Z^T), by solves.

    With neither ``z`` nor ``z_gram`` the loss is the input-aware term alone, Tr(R_J)/Tr(Sigma).
    ``z_gram`` = Z^T Z gives the same value as ``z`` (Tr(Z R Z^T) = sum(Z^T Z * R)).
    """
    sigma = _check(sigma)
    keep = torch.as_tensor(keep, dtype=torch.long)
    gram = _gram(sigma, z, z_gram)
    residual = sigma
    if keep.numel():
        residual = sigma - reconstruction_matrix(sigma, keep, ridge=ridge) @ sigma[keep, :]
    a_w, b_w = _metric_weights(sigma, theta, gram)
    loss = a_w * float(torch.trace(residual))
    if b_w:
        loss += b_w * float((gram * residual).sum())
    return loss


def greedy_select(sigma: torch.Tensor, k: int, *, ridge: float = 1e-3, theta: float = 0.5,
                  z: torch.Tensor | None = None, z_gram: torch.Tensor | None = None,
                  block: int = _BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy forward selection of k of m channels minimising L(J) (SPEC §3), exactly.

    Ties go to the lowest index. Dead channels (Sigma_jj = 0) are picked only once every live channel
    is kept, lowest index first; an all-zero Sigma keeps channels 0..k-1 with A = 0.

    Args:
        sigma: second moment (m x m).
        k: channels to keep, 1 <= k <= m.
        ridge: lambda = ridge * Tr(sigma) / m.
        theta: weight of the output-aware term (ignored without consumers: input-aware only).
        z: consumers' weights with one column per channel (rows: outputs x kernel positions).
        z_gram: Z^T Z instead of z (m x m; cheaper when Z is tall). At most one of z, z_gram.
        block: rank-one updates applied together (speed only; the selection does not depend on it).

    Returns:
        (keep, A): the kept indices as a LongTensor sorted ascending, and A_J (m x k, float64) from
        ``reconstruction_matrix``.

    Raises:
        ValueError: k outside [1, m], sigma not square/symmetric, theta outside [0, 1], z of wrong shape.
    """
    sigma = _check(sigma, k)
    lam = relative_lambda(sigma, ridge)
    gram = _gram(sigma, z, z_gram)
    a_w, b_w = _metric_weights(sigma, theta, gram)
    live = torch.nonzero(torch.diagonal(sigma) > 0).flatten()
    dead = torch.nonzero(torch.diagonal(sigma) <= 0).flatten()
    picks: list[int] = []
    if live.numel():
        # A PSD Sigma has zero rows and columns at dead channels: they drop out of R, Q and M exactly.
        whole = live.numel() == sigma.shape[0]
        sub = sigma if whole else sigma[live][:, live]
        sub_gram = None if gram is None or not b_w else (gram if whole else gram[live][:, live])
        order = _greedy_order(sub, min(k, live.numel()), lam, a_w, b_w, sub_gram, block)
        picks = live[torch.tensor(order, dtype=torch.long)].tolist()
    picks += dead[:k - len(picks)].tolist()
    keep = torch.tensor(sorted(picks), dtype=torch.long)
    return keep, reconstruction_matrix(sigma, keep, ridge=ridge)


def _greedy_order(sigma: torch.Tensor, k: int, lam: float, a_w: float, b_w: float,
                  gram: torch.Tensor | None, block: int) -> list[int]:
    """The order of the k greedy picks on live channels (see the module docstring for the algebra)."""
    n = sigma.shape[0]
    # Q = Sigma M Sigma = Sigma (a Sigma + b G Sigma): symmetric, so half of the last product suffices.
    w = sigma * a_w if gram is None else torch.addmm(sigma, gram, sigma, beta=a_w, alpha=b_w)
    q = _sym_addmm(None, sigma, w.T)
    del w
    r = sigma.clone()
    diag_r = torch.diagonal(r).clone()
    diag_q = torch.diagonal(q).clone()
    index = torch.arange(n)  # original index of each row still in r and q
    taken = torch.zeros(n, dtype=torch.bool)  # picked since the last flush (still in r and q)
    # Rows u_0, v_0, u_1, v_1, ...: each pick writes two contiguous rows, and the per-step product
    # (2 x 2p) @ (2p x n) reads the panel once, about 2x faster than the column layout.
    panel = torch.empty(2 * block, n, dtype=torch.float64)
    shift = torch.empty(block, dtype=torch.float64)  # s_p = c_p / d_p
    coef = torch.zeros(2, 2 * block, dtype=torch.float64)
    p = 0
    order: list[int] = []
    threads = torch.get_num_threads()
    # The per-step work is O(m block) and memory-bound: one thread does it as fast as two, and does not
    # stall at thread barriers when the cores are shared (measured 2-5x slower steps with 2 threads on
    # a loaded machine). The flushes are BLAS-3 and get every thread back.
    torch.set_num_threads(1)
    try:
        for step in range(k):
            score = diag_q / (diag_r + lam)
            score.masked_fill_(taken, -math.inf)
            j = int(torch.argmax(score))  # first maximum: the lowest index wins exact ties
            if p:
                # True rows from stale rows + panel: R_j -= sum u u_j;  Q_j -= sum v u_j + u (v_j - s u_j).
                pj = panel[:2 * p, j]
                uj, vj = pj[0::2], pj[1::2]
                coef[0, 0:2 * p:2] = uj
                coef[1, 0:2 * p:2] = vj - shift[:p] * uj
                coef[1, 1:2 * p:2] = uj
                corr = coef[:, :2 * p] @ panel[:2 * p]
                row_r = r[j] - corr[0]
                row_q = q[j] - corr[1]
            else:
                row_r, row_q = r[j].clone(), q[j].clone()
            d = float(diag_r[j]) + lam
            c = float(diag_q[j])
            rr = row_r * row_r
            diag_r.sub_(rr, alpha=1.0 / d)
            diag_q.sub_(row_q * row_r, alpha=2.0 / d).add_(rr, alpha=c / (d * d))
            root = math.sqrt(d)
            torch.div(row_r, root, out=panel[2 * p])
            torch.div(row_q, root, out=panel[2 * p + 1])
            shift[p] = c / d
            p += 1
            taken[j] = True
            order.append(int(index[j]))
            if p == block and step + 1 < k:
                torch.set_num_threads(threads)
                r, q, index, diag_r, diag_q = _flush(r, q, index, diag_r, diag_q, taken, panel[:2 * p],
                                                     shift[:p])
                torch.set_num_threads(1)
                n = r.shape[0]
                taken = torch.zeros(n, dtype=torch.bool)
                panel = torch.empty(2 * block, n, dtype=torch.float64)
                p = 0
    finally:
        torch.set_num_threads(threads)
    return order


def _flush(r, q, index, diag_r, diag_q, taken, panel, shift):
    """Apply the pending panel to the rows still selectable, dropping the picked ones.

    R -= U U^T and Q -= V U^T + U V^T - U diag(s) U^T = V' U^T + U V'^T with V' = V - U diag(s) / 2,
    a symmetric rank-2b product.
    """
    alive = torch.nonzero(~taken).flatten()
    r = r.index_select(0, alive).index_select(1, alive)
    q = q.index_select(0, alive).index_select(1, alive)
    # Panel rows are contiguous: gather columns there and hand transposed views to the GEMM (no copy).
    u = panel[0::2].index_select(1, alive)
    v = panel[1::2].index_select(1, alive) - (0.5 * shift)[:, None] * u
    _sym_addmm(r, u.T, u.T, alpha=-1.0)
    _sym_addmm(q, torch.cat([u, v]).T, torch.cat([v, u]).T, alpha=-1.0)
    return r, q, index[alive], diag_r[alive], diag_q[alive]


def _greedy_select_reference(sigma: torch.Tensor, k: int, *, ridge: float = 1e-3, theta: float = 0.5,
                             z: torch.Tensor | None = None, z_gram: torch.Tensor | None = None) -> list[int]:
    """SPEC §3 transcribed literally (full R and G = M R updated every step); the order of picks.

    The only addition to the SPEC pseudo-code is the dead-channel rule of ``greedy_select``.
    """
    sigma = _check(sigma, k)
    m = sigma.shape[0]
    lam = relative_lambda(sigma, ridge)
    gram = _gram(sigma, z, z_gram)
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
