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

Greedy, exactly. Let R = S~ - S~_{:J} B_J S~_{J:} (k0 x k0) and K = C - C_J B_J S~_{J:} (m x k0). Adding
channel j, with s = S~_{Jj}, the block inverse of S~_{J+j,J+j} + lambda I has the Schur complement
d = S~_jj + lambda - s^T B_J s = R_jj + lambda, and

    C_{J+j} B_{J+j} C_{J+j}^T = C_J B_J C_J^T + K_j K_j^T / d        (K_j = K e_j = c_j - C_J B_J s),

so the loss falls by K_j^T M K_j / d = Q_jj / (R_jj + lambda) with Q = K^T M K (k0 x k0). The same block
inverse gives R' = R - r r^T / d and K' = K - K_j r^T / d with r = R e_j; hence, with q = Q e_j, c = Q_jj,

    R' = R - r r^T / d
    Q' = Q - (q r^T + r q^T) / d + c r r^T / d^2,

started from R = S~ and Q = C^T M C. For x~ = x this is Q = S M S, the recursion of §3 (there Q_jj =
sum_i R_ij (M R)_ij). Several signals (the taps of one unit, each with its own S~, C, M, lambda and a
weight) share one J: the gain of j is the weighted sum of their gains, and a pick updates each one.

An intercept is a constant channel x~_0 = s, s^2 = Tr(S~) / k0 (so the relative ridge treats it like
the others), forced in first: with f = s^2 / (s^2 + lambda) it leaves R = S~ - f mu~ mu~^T and
K = C - f mu mu~^T (mu, mu~ the means of x, x~) and lowers the loss by f mu^T M mu; A_J and the bias b
then make x ~= A x~_J + b.

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
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from specprune_cli.errors import StatisticsError
from specprune_cli.moments import sym_addmm

_BLOCK = 128  # rank-one terms per flush: 64, 128 and 256 within 5% of each other at m = 4096
_CHECK_TILE = 128  # side of the squares compared with their mirror images (two fit in a 1 MiB L2 cache)
_TRI_TILE = 512  # rows per tile of the triangular product in _quadratic (as in sym_addmm)


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


def _metric_weights(sigma: torch.Tensor, theta: float, gram: torch.Tensor | None) -> tuple[float, float]:
    """(a, b) with M = a I + b Z^T Z, each loss term normalised by its value at J = {} (docs/method.md §3).

    Without consumers (gram None), or when Tr(Z Sigma Z^T) = 0 so that the output-aware term is
    undefined, the loss is the input-aware term alone whatever theta is.
    """
    trz = float(torch.vdot(gram.flatten(), sigma.flatten())) if gram is not None else 0.0
    return _weights(float(torch.trace(sigma)), trz, theta)


def _weights(tr: float, trz: float, theta: float) -> tuple[float, float]:
    """``_metric_weights`` from Tr(Sigma) and Tr(Z Sigma Z^T)."""
    if not 0.0 <= theta <= 1.0:
        raise ValueError(f"theta must be in [0, 1], got {theta}")
    if trz <= 0:
        return (1.0 / tr if tr > 0 else 0.0), 0.0
    return ((1.0 - theta) / tr if tr > 0 else 0.0), theta / trz


class _Prepared:
    """A validated Signal in float64 with its metric, lambda, and the R and K the greedy starts from.

    ``cross`` is None in the symmetric case (x~ = x, also when C and S are passed equal to S~), where
    every product uses ``source``: the path of ``greedy_select``. With intercept, ``r`` and ``k`` are
    the moments deflated by the constant channel (module docstring); ``source`` and ``cross`` stay as
    given, for the solve.
    """

    def __init__(self, signal: Signal, *, ridge: float, theta: float, weight: float, intercept: bool,
                 name: str = "source"):
        if (signal.cross is None) != (signal.target is None):
            raise ValueError("pass cross (C = E[x x~^T]) and target (S = E[x x^T]) together, or neither "
                             "(then x~ = x)")
        raw = signal.source.to(torch.float64)
        self.source = _check(raw, what=name)
        k0 = self.source.shape[0]
        self.cross = None
        self.target = self.source
        if signal.cross is not None and not (signal.cross.shape == raw.shape
                                             and torch.equal(signal.cross.to(torch.float64), raw)
                                             and torch.equal(signal.target.to(torch.float64), raw)):
            self.target = _check(signal.target, what="target")
            if signal.cross.dim() != 2 or tuple(signal.cross.shape) != (self.target.shape[0], k0):
                raise ValueError(f"cross must be {self.target.shape[0]} x {k0} (target channels x source "
                                 f"channels), got shape {tuple(signal.cross.shape)}")
            self.cross = signal.cross.to(torch.float64)
            _finite(self.cross, "cross")
        m = self.target.shape[0]
        self.gram, self.z = _metric_factor(m, signal)
        self.lam = relative_lambda(self.source, ridge)
        trz = self._output_norm(self.target)
        a, b = _weights(float(torch.trace(self.target)), 0.0 if trz is None else trz, theta)
        self.a, self.b = a * weight, (b * weight if trz is not None else 0.0)
        self.start = self.a * float(torch.trace(self.target))
        if self.b:
            self.start += self.b * trz
        self.r, self.k = self.source, self.cross
        self.scale: float | None = None
        if intercept:
            self._deflate(signal, k0, m)

    def _deflate(self, signal: Signal, k0: int, m: int) -> None:
        """Force the constant channel in: R = S~ - f mu~ mu~^T, K = C - f mu mu~^T (module docstring)."""
        if signal.source_mean is None or (self.cross is not None and signal.target_mean is None):
            raise ValueError("intercept needs source_mean (E[x~]), and target_mean (E[x]) with cross")
        mean = signal.source_mean.to(torch.float64).flatten()
        target_mean = mean if self.cross is None else signal.target_mean.to(torch.float64).flatten()
        if mean.numel() != k0 or target_mean.numel() != m:
            raise ValueError(f"source_mean must have {k0} values and target_mean {m}, got {mean.numel()} "
                             f"and {target_mean.numel()}")
        _finite(mean, "source_mean")
        _finite(target_mean, "target_mean")
        trace = float(torch.trace(self.source))
        self.scale = math.sqrt(trace / k0) if trace > 0 else 1.0
        self.source_mean, self.target_mean = mean, target_mean
        f = self.scale ** 2 / (self.scale ** 2 + self.lam)
        self.r = torch.addr(self.source, mean, mean, alpha=-f)
        self.k = None if self.cross is None else torch.addr(self.cross, target_mean, mean, alpha=-f)
        gain = self.a * float(target_mean @ target_mean)
        if self.b:
            gain += self.b * self._output_norm(target_mean)
        self.start -= f * gain

    def _output_norm(self, x: torch.Tensor) -> float | None:
        """Tr(Z X Z^T) for a matrix X, ||Z x||^2 for a vector x (None without consumers)."""
        if self.z is not None:
            zx = self.z @ x
            # Tr(Z X Z^T) = sum_ij (Z X)_ij Z_ij: no r x r product
            return float(zx @ zx) if x.dim() == 1 else float(torch.vdot(zx.flatten(), self.z.flatten()))
        if self.gram is None:
            return None
        if x.dim() == 1:
            return float(x @ (self.gram @ x))
        return float(torch.vdot(self.gram.flatten(), x.flatten()))

    def initial(self, live: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """R and Q = K^T M K on the live channels (None: all), as fresh matrices the greedy may overwrite."""
        r = self.r if live is None else self.r[live][:, live]
        gram, z = (self.gram, self.z) if self.b else (None, None)
        if self.k is None:
            # A PSD S~ has zero rows and columns at dead channels: they drop out of R, Q and M exactly.
            k = r
            if live is not None:
                gram = None if gram is None else gram[live][:, live]
                z = None if z is None else z[:, live]
        else:
            k = self.k if live is None else self.k[:, live]
        return (r.clone() if r is self.source else r), _quadratic(k, self.a, self.b, gram, z)


def _metric_factor(m: int, signal: Signal) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(Z^T Z, None), (None, Z) or (None, None): how the consumers enter the metric (``Signal.z``)."""
    if signal.z is None:
        return _gram(m, None, signal.z_gram), None
    if signal.z_gram is not None:
        raise ValueError("pass z or z_gram (= z^T z), not both")
    if signal.z.dim() != 2 or signal.z.shape[1] != m:
        raise ValueError(f"z must have {m} columns (one per channel), got shape {tuple(signal.z.shape)}")
    z = signal.z.to(torch.float64)
    _finite(z, "z")
    if 3 * z.shape[0] > m:  # past m/3 rows, the m x m product is the cheaper way (Signal.z)
        return _gram(m, z, None), None
    return None, z


def _quadratic(k: torch.Tensor, a: float, b: float, gram: torch.Tensor | None,
               z: torch.Tensor | None = None) -> torch.Tensor:
    """Q = K^T M K with M = a I + b G, for K (m x n): symmetric, so only half of it is multiplied out.

    With M = L L^T (Cholesky), Q = Y^T Y with Y = L^T K, and the triangle of L halves that product:
    about 2.5 m^2 n flops in all instead of 3 m^2 n for K^T (a K + b G K), which remains the way when
    M is singular (theta = 1 and a rank-deficient Z). Given Z (r x m) instead of G = Z^T Z,
    Q = a K^T K + b (Z K)^T (Z K): about (m + 3r) m n flops.
    """
    if z is not None:
        n = k.shape[1]
        q = sym_addmm(None, k.T, k.T, alpha=a) if a else torch.zeros(n, n, dtype=torch.float64)
        zk = z @ k
        return sym_addmm(q, zk.T, zk.T, alpha=b)
    if gram is None:
        return sym_addmm(None, k.T, k.T, alpha=a)
    metric = gram * b
    metric.diagonal().add_(a)
    chol, info = torch.linalg.cholesky_ex(metric)
    del metric
    if int(info) == 0:
        y = _lower_t_times(chol, k)
        del chol
        return sym_addmm(None, y.T, y.T)
    w = torch.addmm(k, gram, k, beta=a, alpha=b)
    return sym_addmm(None, k.T, w.T)


def _lower_t_times(chol: torch.Tensor, k: torch.Tensor, tile: int = _TRI_TILE) -> torch.Tensor:
    """L^T K for lower-triangular L (m x m), skipping the zero blocks of L^T: about m^2 n flops."""
    m = chol.shape[0]
    out = torch.empty(m, k.shape[1], dtype=torch.float64)
    tiles = max(1, m // tile)
    edges = [m * i // tiles for i in range(tiles + 1)]
    for lo, hi in zip(edges, edges[1:]):
        torch.mm(chol[lo:, lo:hi].T, k[lo:], out=out[lo:hi])
    return out


def _as_list(signals: Signal | Sequence[Signal]) -> list[Signal]:
    out = [signals] if isinstance(signals, Signal) else list(signals)
    if not out:
        raise ValueError("select needs at least one signal")
    return out


def _prepare_all(signals: Signal | Sequence[Signal], *, ridge: float, theta: float, intercept: bool,
                 weights: Sequence[float] | None) -> list[_Prepared]:
    signals = _as_list(signals)
    if weights is None:
        weights = [1.0] * len(signals)
    if len(weights) != len(signals) or any(not w >= 0 for w in weights) or not sum(weights) > 0:
        raise ValueError(f"weights must be {len(signals)} non-negative numbers, not all 0, got "
                         f"{list(weights)}")
    total = float(sum(weights))
    prepared = [_Prepared(s, ridge=ridge, theta=theta, weight=w / total, intercept=intercept)
                for s, w in zip(signals, weights)]
    widths = {p.source.shape[0] for p in prepared}
    if len(widths) > 1:
        raise ValueError("every signal must have the same candidate channels; got sources of sizes "
                         f"{sorted(widths)}")
    return prepared


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
        intercept: fit a bias too (needs the means); see the module docstring.
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
