"""Each signal's share of the objective, ready for the greedy and the solve (docs/method.md §3, §6).

``_Prepared`` holds one validated ``Signal`` in float64 with its weighted metric M = a I + b Z^T Z (each
term normalised by its value at J = {}), its lambda, the loss at J = {}, and what the greedy starts
from: R = S~ and K = C, whence Q = K^T M K (the notation of ``spectral``'s module docstring).

An intercept is a constant channel x~_0 = s, s^2 = Tr(S~) / k0 (so the relative ridge treats it like
the others), forced in first: with f = s^2 / (s^2 + lambda) it leaves R = S~ - f mu~ mu~^T and
K = C - f mu mu~^T (mu, mu~ the means of x, x~) and lowers the loss by f mu^T M mu; A_J and the bias b
then make x ~= A x~_J + b.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from specprune_cli.signals import Signal, _check, _finite, _gram, relative_lambda
from specprune_cli.symmetric import lower_t_times, sym_addmm


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
        y = lower_t_times(chol, k)
        del chol
        return sym_addmm(None, y.T, y.T)
    w = torch.addmm(k, gram, k, beta=a, alpha=b)
    return sym_addmm(None, k.T, w.T)


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
