"""Streaming moments of the signals at a tap, accumulated in float64 (docs/method.md §2, §6).

``CrossMoment`` reads two signals at once: x, the original network's signal (m channels), and x~, the
pruned-so-far network's signal at the same tap (k0 <= m channels), on the same sampled positions, and
keeps the raw sums for S = E[x x^T], S~ = E[x~ x~^T], C = E[x x~^T] and both means. As long as x~ is
the very same tensor as x (nothing pruned upstream), one product serves all three, so it costs what
one second moment costs. ``SecondMoment`` is that case with a single signal.

Cost (docs/method.md §6): the rows are built with one float64 copy per signal; S and S~ go through
the half-triangle ``sym_addmm`` and C through one GEMM, (m + k0)^2 multiply-adds per row in all
against m^2 for one second moment.
"""
from __future__ import annotations

import copy

import torch

from specprune_cli.errors import StatisticsError
from specprune_cli.rows import check_same_rows, checked_channels, row_chunks, same_tensor
from specprune_cli.symmetric import sym_addmm, symmetrise_

__all__ = ["CrossMoment", "SecondMoment"]

_GRAM_TILE = 64  # fewest channels per tile when accumulating (at most 8 tiles)


class CrossMoment:
    """Streaming moments of x (original network, m channels) and x~ (pruned network, k0 channels).

    ``update(x, x_tilde)`` takes (N, C) rows, or (N, C, *spatial) where each (sample, position) is a
    row; with ``channel_dim=-1`` it takes (..., C) as a Linear sees an N-D input (leading dims are
    rows). Both signals must have the same rows. When ``max_positions`` is set and a sample has more
    positions, that many distinct positions per sample are drawn at random, one draw per update for
    both signals, from a generator seeded with ``seed``: the same seed and the same sequence of updates
    give the same matrices.

    Attributes:
        count: number of rows n accumulated so far.
        channels: m, the channels of x (fixed by the first update if not given).
        source_channels: k0, the channels of x~ (fixed by the first update if not given).
    """

    # How an error names each signal; SecondMoment has one signal and names neither.
    _names = ("the original network's signal x: ", "the pruned network's signal x~: ")

    def __init__(self, channels: int | None = None, source_channels: int | None = None, *,
                 max_positions: int | None = None, seed: int = 0, channel_dim: int = 1):
        if channel_dim not in (1, -1):
            raise ValueError(f"channel_dim must be 1 (N, C, *spatial) or -1 (..., C), got {channel_dim}")
        if max_positions is not None and max_positions < 1:
            raise ValueError(f"max_positions must be a positive integer or None, got {max_positions}")
        self.channels = channels
        self.source_channels = source_channels
        self.max_positions = max_positions
        self.channel_dim = channel_dim
        self.count = 0
        # Raw sums: "target" (sum x x^T), "target_sum" (sum x) and, once x~ has differed from x,
        # "source" (sum x~ x~^T), "cross" (sum x x~^T), "source_sum" (sum x~).
        self._sums: dict[str, torch.Tensor] = {}
        self.seed = seed
        # The positions of update i are drawn from a generator seeded by (seed, draw_offset +
        # draw_stride * i): a batch's draw depends on its index in the whole calibration set, so the
        # processes that each read every world-th batch draw what one process would (docs/method.md §2).
        self.draw_offset, self.draw_stride = 0, 1
        self._updates = 0
        self._finished = False  # the sums hold the moments themselves (``finish``)

    @property
    def shared(self) -> bool:
        """True while every update so far had x~ the very same tensor as x (then S = S~ = C)."""
        return "source" not in self._sums

    def update(self, x: torch.Tensor, x_tilde: torch.Tensor) -> "CrossMoment":
        """Add a batch: the two networks' signals at the tap for the same inputs.

        Args:
            x: the original network's signal, (N, m) or (N, m, *spatial) (``channel_dim=1``), or (..., m).
            x_tilde: the pruned network's signal, the same layout with k0 channels; pass x itself when
                nothing upstream is pruned (then one product serves S, S~ and C).

        Returns:
            self.

        Raises:
            StatisticsError: a signal holds NaN/Inf (the message says which), a channel count differs
                from earlier updates, or the two signals do not have the same rows.
        """
        self._open("update")
        same = same_tensor(x, x_tilde)
        x, x_tilde = x.detach(), x_tilde.detach()
        m = checked_channels(x, self.channels, self._names[0], self.channel_dim)
        k0 = m if same else checked_channels(x_tilde, self.source_channels, self._names[1], self.channel_dim)
        if same and self.source_channels is not None and m != self.source_channels:
            raise StatisticsError(f"{self._names[1]}expected {self.source_channels} channels, got a batch "
                                  f"with {m}; the same accumulator must see the same layer")
        if not same:
            check_same_rows(x, x_tilde, self.channel_dim)
        self.channels, self.source_channels = m, k0
        if not self._sums:
            self._sums = {"target": torch.zeros(m, m, dtype=torch.float64),
                          "target_sum": torch.zeros(m, dtype=torch.float64)}
            if not same:
                self._sums.update(source=torch.zeros(k0, k0, dtype=torch.float64),
                                  cross=torch.zeros(m, k0, dtype=torch.float64),
                                  source_sum=torch.zeros(k0, dtype=torch.float64))
        elif not same and self.shared:
            self._split()
        sums = self._sums
        # Half-triangle products for the symmetric sums, one GEMM for C (measured 20% faster than one
        # half product of the joint rows [x, x~] at m = k0 = 288, whose narrow tiles cost more).
        tile_x, tile_t = max(_GRAM_TILE, m // 8), max(_GRAM_TILE, k0 // 8)
        key = self.draw_offset + self.draw_stride * self._updates
        signals = [x] if same else [x, x_tilde]
        for pieces in row_chunks(signals, self.channel_dim, self.max_positions, self.seed, key):
            rows = pieces[0]
            if same and not self.shared:  # x~ is x now, after updates where it was not: add x x^T thrice
                product = sym_addmm(None, rows.T, rows.T, tile=tile_x)
                total = rows.sum(0)
                for key in ("target", "source", "cross"):
                    sums[key] += product
                for key in ("target_sum", "source_sum"):
                    sums[key] += total
            else:
                sym_addmm(sums["target"], rows.T, rows.T, tile=tile_x)
                sums["target_sum"] += rows.sum(0)
                if not same:
                    tilde = pieces[1]
                    sym_addmm(sums["source"], tilde.T, tilde.T, tile=tile_t)
                    sums["cross"].addmm_(rows.T, tilde)
                    sums["source_sum"] += tilde.sum(0)
            self.count += rows.shape[0]
        self._updates += 1
        return self

    def _split(self) -> None:
        """Shared sums [x] -> separate sums for x and x~ (both equal to x's so far)."""
        self._sums.update(source=self._sums["target"].clone(), cross=self._sums["target"].clone(),
                          source_sum=self._sums["target_sum"].clone())

    def _open(self, what: str) -> None:
        if self._finished:
            raise StatisticsError(f"{what} after finish(): the accumulator holds the moments, not the sums, "
                                  "now; accumulate in a fresh one")

    def _read(self, key: str) -> torch.Tensor:
        if not self._sums or self.count == 0:
            raise StatisticsError("the second moment was read before any update: run the 'observe' step "
                                  "(a forward pass over calibration data) first")
        shared = {"source": "target", "cross": "target", "source_sum": "target_sum"}
        value = self._sums[shared.get(key, key) if self.shared else key]
        return value if self._finished else value / self.count

    def finish(self) -> "CrossMoment":
        """Turn the sums into the moments in place: from now on every property returns the accumulator's
        own tensor (to be read, not written) instead of a new one, with the same values, and updates are
        refused. For the last reader of a wide tap, which would otherwise hold the moments twice: an
        8,192-wide tap's S, S~ and C take 1.5 GiB. Returns self.
        """
        self._read("target")
        if not self._finished:
            for value in self._sums.values():
                value.div_(self.count)
            for key in ("target", "source"):
                if key in self._sums:
                    symmetrise_(self._sums[key])
            self._finished = True
        return self

    @property
    def target(self) -> torch.Tensor:
        """S = E[x x^T], symmetrised, float64 (m, m)."""
        s = self._read("target")
        return s if self._finished else symmetrise_(s)

    @property
    def source(self) -> torch.Tensor:
        """S~ = E[x~ x~^T], symmetrised, float64 (k0, k0); equal to ``target`` while ``shared``."""
        s = self._read("source")
        return s if self._finished else symmetrise_(s)

    @property
    def cross(self) -> torch.Tensor:
        """C = E[x x~^T], float64 (m, k0); equal to ``target`` while ``shared``."""
        return self.target if self.shared else self._read("cross")

    @property
    def target_mean(self) -> torch.Tensor:
        """E[x], float64 (m,)."""
        return self._read("target_sum")

    @property
    def source_mean(self) -> torch.Tensor:
        """E[x~], float64 (k0,)."""
        return self._read("source_sum")

    def sums(self) -> dict[str, torch.Tensor]:
        """The raw sums, for ``torch.distributed.all_reduce`` then ``load_sums``.

        Returns:
            Copies, float64: "count" (0-d), "target" (m, m) = sum x x^T, "target_sum" (m,) = sum x, and
            unless ``shared`` also "source" (k0, k0), "cross" (m, k0), "source_sum" (k0,). Reducing them
            leaves this accumulator as it is until ``load_sums``. Every rank must be in the same mode
            (``shared`` or not) for the keys to agree.
        """
        self._open("sums()")
        self._read("target")
        out = {key: value.clone() for key, value in self._sums.items()}
        out["count"] = torch.tensor(float(self.count), dtype=torch.float64)
        return out

    def load_sums(self, sums: dict[str, torch.Tensor]) -> "CrossMoment":
        """Replace the accumulated sums by ``sums`` (as ``sums()`` gives them, e.g. all-reduced).

        Returns:
            self.
        """
        self._open("load_sums()")
        m, k0 = self.channels, self.source_channels
        shapes = {"target": (m, m), "target_sum": (m,)}
        if "source" in sums:
            shapes.update(source=(k0, k0), cross=(m, k0), source_sum=(k0,))
        got = {key: tuple(value.shape) for key, value in sums.items() if key != "count"}
        if m is None or got != shapes:
            raise StatisticsError(f"sums of shapes {got} do not fit this accumulator ({m} and {k0} "
                                  "channels): load them into the one that produced them")
        self._sums = {key: sums[key].to(torch.float64).clone() for key in shapes}
        self.count = int(round(float(sums["count"])))
        return self

    def copy(self) -> "CrossMoment":
        """An independent accumulator holding the same rows so far; later updates to either do not
        reach the other, and its draws go on from the same update count (same updates, same matrices)."""
        out = copy.copy(self)
        out._sums = {key: value.clone() for key, value in self._sums.items()}
        return out

    def merge(self, other: "CrossMoment") -> "CrossMoment":
        """Add another accumulator's rows (the result is count-weighted). Returns self."""
        self._open("merge()")
        other._open("merge()")
        for mine, theirs in ((self.channels, other.channels), (self.source_channels, other.source_channels)):
            if mine is not None and theirs is not None and mine != theirs:
                raise StatisticsError(f"cannot merge second moments of {mine} and {theirs} channels: they "
                                      "come from different layers")
        if not other._sums:
            return self
        if not self._sums:
            self.channels, self.source_channels = other.channels, other.source_channels
            self._sums = {key: value.clone() for key, value in other._sums.items()}
        else:
            if self.shared and not other.shared:
                self._split()
            for key in self._sums:
                theirs = key if not other.shared else {"source": "target", "cross": "target",
                                                         "source_sum": "target_sum"}.get(key, key)
                self._sums[key] += other._sums[theirs]
        self.count += other.count
        return self


class SecondMoment(CrossMoment):
    """Streaming uncentered second moment (1/n) sum_i x_i x_i^T of one signal, in float64.

    A ``CrossMoment`` whose two signals are the same tensor: ``update(x)`` takes the layouts described
    there, ``matrix`` is Sigma (= S = S~ = C) and ``mean`` is E[x].
    """

    _names = ("", "")

    def __init__(self, channels: int | None = None, *, max_positions: int | None = None, seed: int = 0,
                 channel_dim: int = 1):
        super().__init__(channels, channels, max_positions=max_positions, seed=seed, channel_dim=channel_dim)

    def update(self, x: torch.Tensor) -> "SecondMoment":  # type: ignore[override]
        """Add a batch of activations: (N, C) or (N, C, *spatial) (``channel_dim=1``), or (..., C).

        Returns:
            self, so that ``SecondMoment().update(x).matrix`` reads naturally.

        Raises:
            StatisticsError: x holds NaN/Inf, or its channel count differs from earlier updates.
        """
        super().update(x, x)
        return self

    @property
    def matrix(self) -> torch.Tensor:
        """Sigma = (1/n) sum_i x_i x_i^T, symmetrised, float64 (C, C)."""
        return self.target

    @property
    def mean(self) -> torch.Tensor:
        """E[x], float64 (C,)."""
        return self.target_mean
