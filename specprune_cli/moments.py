"""Streaming moments of the signals at a tap, accumulated in float64 (docs/method.md §2, §6).

``CrossMoment`` reads two signals at once: x, the original network's signal (m channels), and x~, the
pruned-so-far network's signal at the same tap (k0 <= m channels), on the same sampled positions. It
keeps the raw sums of the joint rows [x, x~]: their products give S = E[x x^T], S~ = E[x~ x~^T] and
C = E[x x~^T] as blocks of one symmetric matrix, and their row sums the two means. As long as x~ is
the very same tensor as x (nothing pruned upstream), only the m x m block is accumulated, so it costs
what one second moment costs. ``SecondMoment`` is that case with a single signal.

Cost (docs/method.md §6): the joint rows are built with one float64 copy per signal, and the
products go through the half-triangle ``sym_addmm``, (m + k0)^2 multiply-adds per row in all, the
same as separate half products for S and S~ and one GEMM for C.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import torch

from specprune_cli.errors import StatisticsError

_SYM_TILE = 512  # rows per tile in the half-triangle products; below two tiles a plain GEMM is faster
_CHUNK_ELEMENTS = 1 << 23  # float64 values per piece of rows converted at a time (64 MiB)
_GRAM_TILE = 64  # fewest channels per tile when accumulating (at most 8 tiles)


def sym_addmm(out: torch.Tensor | None, left: torch.Tensor, right: torch.Tensor,
              alpha: float = 1.0, tile: int = _SYM_TILE) -> torch.Tensor:
    """out + alpha * left @ right^T for a product known to be symmetric, at about half the flops.

    Only the lower block triangle is multiplied (tiles of ``tile`` rows); the upper one is mirrored.
    ``out`` None means zeros; it may be a strided view. Updates ``out`` in place and returns it.
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


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when a and b are views of the same memory with the same layout (x~ is x)."""
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
                      and a.dtype == b.dtype)


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
        # Sums of the joint rows: products (w x w) and values (w), w = m while x~ has been x (shared),
        # else m + k0 with x first.
        self._products: torch.Tensor | None = None
        self._sums: torch.Tensor | None = None
        self._generator = torch.Generator().manual_seed(seed)

    @property
    def shared(self) -> bool:
        """True while every update so far had x~ the very same tensor as x (then S = S~ = C)."""
        return self._products is None or self._products.shape[0] == self.channels

    def _channels_of(self, x: torch.Tensor) -> int:
        return x.shape[-1] if self.channel_dim == -1 else x.shape[1]

    def _validate(self, x: torch.Tensor, expected: int | None, name: str) -> int:
        """x's channel count, after checking its shape and that it holds no NaN/Inf."""
        if x.dim() < 2:
            raise StatisticsError(f"{name}activations must have a batch and a channel dimension, got shape "
                                  f"{tuple(x.shape)}")
        channels = self._channels_of(x)
        if expected is not None and channels != expected:
            raise StatisticsError(f"{name}expected {expected} channels, got a batch with {channels}; "
                                  "the same accumulator must see the same layer")
        # Checked on the whole batch, before subsampling: a broken model must not pass by luck. A sum
        # reads x once without a mask the size of x; only a non-finite sum (NaN/Inf, or an overflow)
        # pays for the exact count.
        if x.is_floating_point() and not math.isfinite(float(x.sum())):
            bad = int(x.numel() - torch.isfinite(x).sum())
            if bad:
                raise StatisticsError(f"{name}{bad} of {x.numel()} activation values are NaN or Inf; check "
                                      "the input normalisation (data.*.mean/std), that the checkpoint matches "
                                      "the architecture, and that the model runs in eval mode")
        return channels

    def _row_chunks(self, signals: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The joint rows of ``signals`` as float64 (rows, sum of channels) pieces of bounded size.

        Each signal goes into its columns of a piece by one copy that changes layout and dtype
        together: float64 before the product, not after (docs/method.md §2).
        """
        widths = [self._channels_of(s) for s in signals]
        width = sum(widths)
        if self.channel_dim == -1 or signals[0].dim() == 2:
            flats = [s.reshape(-1, s.shape[-1]) for s in signals]
            per = max(1, _CHUNK_ELEMENTS // width)
            for lo in range(0, flats[0].shape[0], per):
                parts = [f[lo:lo + per] for f in flats]
                rows = torch.empty(parts[0].shape[0], width, dtype=torch.float64)
                col = 0
                for part, w in zip(parts, widths):
                    rows[:, col:col + w].copy_(part)
                    col += w
                yield rows
            return
        n = signals[0].shape[0]
        flats = [s.reshape(n, w, -1) for s, w in zip(signals, widths)]
        positions = flats[0].shape[2]
        if self.max_positions is not None and positions > self.max_positions:
            # Distinct positions (no duplicated rows): the first max_positions of a random permutation,
            # the same positions for every signal.
            idx = torch.rand(n, positions, generator=self._generator).argsort(1)[:, :self.max_positions]
            positions = self.max_positions
            flats = [torch.gather(f, 2, idx.unsqueeze(1).expand(n, w, positions)) for f, w in zip(flats, widths)]
        per = max(1, _CHUNK_ELEMENTS // (positions * width))  # samples per piece
        for lo in range(0, n, per):
            count = min(per, n - lo)
            rows = torch.empty(count, positions, width, dtype=torch.float64)
            col = 0
            for f, w in zip(flats, widths):
                rows[:, :, col:col + w].copy_(f[lo:lo + count].permute(0, 2, 1))
                col += w
            yield rows.view(-1, width)

    def update(self, x: torch.Tensor, x_tilde: torch.Tensor) -> "CrossMoment":
        """Add a batch: the two networks' signals at the tap for the same inputs.

        Args:
            x: the original network's signal, (N, m) or (N, m, *spatial) (``channel_dim=1``), or (..., m).
            x_tilde: the pruned network's signal, the same layout with k0 channels; pass x itself when
                nothing upstream is pruned (then only one product is accumulated).

        Returns:
            self.

        Raises:
            StatisticsError: a signal holds NaN/Inf (the message says which), a channel count differs
                from earlier updates, or the two signals do not have the same rows.
        """
        shared = _same_tensor(x, x_tilde)
        x, x_tilde = x.detach(), x_tilde.detach()
        m = self._validate(x, self.channels, self._names[0])
        k0 = m if shared else self._validate(x_tilde, self.source_channels, self._names[1])
        if shared and self.source_channels is not None and m != self.source_channels:
            raise StatisticsError(f"{self._names[1]}expected {self.source_channels} channels, got a batch "
                                  f"with {m}; the same accumulator must see the same layer")
        if not shared:
            rows_x = x.shape[:-1] if self.channel_dim == -1 else (x.shape[0], *x.shape[2:])
            rows_t = x_tilde.shape[:-1] if self.channel_dim == -1 else (x_tilde.shape[0], *x_tilde.shape[2:])
            if rows_x != rows_t:
                raise StatisticsError(f"the two signals must come from the same inputs: x has shape "
                                      f"{tuple(x.shape)} and x~ {tuple(x_tilde.shape)} (only channels may differ)")
        self.channels, self.source_channels = m, k0
        width = m if shared and self.shared else m + k0
        self._grow(width)
        tile = max(_GRAM_TILE, width // 8)
        # x~ is x now but was not before: the joint rows are [x, x].
        for rows in self._row_chunks([x] if width == m else [x, x_tilde]):
            sym_addmm(self._products, rows.T, rows.T, tile=tile)
            self._sums += rows.sum(0)
            self.count += rows.shape[0]
        return self

    def _grow(self, width: int) -> None:
        """Make the sums (width x width), turning shared sums [x] into joint sums [x, x] if needed."""
        if self._products is None:
            self._products = torch.zeros(width, width, dtype=torch.float64)
            self._sums = torch.zeros(width, dtype=torch.float64)
        elif self._products.shape[0] < width:
            self._products = self._products.repeat(2, 2)
            self._sums = self._sums.repeat(2)

    def _require(self) -> None:
        if self._products is None or self.count == 0:
            raise StatisticsError("the second moment was read before any update: run the 'observe' step "
                                  "(a forward pass over calibration data) first")

    def _block(self, rows: slice, cols: slice) -> torch.Tensor:
        self._require()
        return self._products[rows, cols] / self.count

    def _source_slice(self) -> slice:
        return slice(0, self.channels) if self.shared else slice(self.channels, None)

    @property
    def target(self) -> torch.Tensor:
        """S = E[x x^T], symmetrised, float64 (m, m)."""
        s = self._block(slice(0, self.channels), slice(0, self.channels))
        return 0.5 * (s + s.T)

    @property
    def source(self) -> torch.Tensor:
        """S~ = E[x~ x~^T], symmetrised, float64 (k0, k0)."""
        part = self._source_slice()
        s = self._block(part, part)
        return 0.5 * (s + s.T)

    @property
    def cross(self) -> torch.Tensor:
        """C = E[x x~^T], float64 (m, k0); equal to ``target`` while ``shared``."""
        if self.shared:
            return self.target
        return self._block(slice(0, self.channels), self._source_slice()).contiguous()

    @property
    def target_mean(self) -> torch.Tensor:
        """E[x], float64 (m,)."""
        self._require()
        return self._sums[:self.channels] / self.count

    @property
    def source_mean(self) -> torch.Tensor:
        """E[x~], float64 (k0,)."""
        self._require()
        return self._sums[self._source_slice()] / self.count

    def sums(self) -> dict[str, torch.Tensor]:
        """The raw sums, for ``torch.distributed.all_reduce`` then ``load_sums``.

        Returns:
            {"count": 0-d float64, "products": (w, w) float64 sum of joint rows' outer products,
            "sums": (w,) float64 sum of joint rows}, w = m while ``shared``, else m + k0 (x first).
            The tensors are copies: reducing them leaves this accumulator as it is until ``load_sums``.
            Every rank must be in the same mode (``shared`` or not) for the shapes to agree.
        """
        self._require()
        return {"count": torch.tensor(float(self.count), dtype=torch.float64),
                "products": self._products.clone(), "sums": self._sums.clone()}

    def load_sums(self, sums: dict[str, torch.Tensor]) -> "CrossMoment":
        """Replace the accumulated sums by ``sums`` (as ``sums()`` gives them, e.g. all-reduced). Returns self."""
        products = sums["products"].to(torch.float64)
        width = products.shape[0]
        m, k0 = self.channels, self.source_channels
        if m is None or tuple(products.shape) != (width, width) or width not in (m, m + k0) or \
                tuple(sums["sums"].shape) != (width,):
            raise StatisticsError(f"sums of shape {tuple(products.shape)} do not fit this accumulator "
                                  f"({m} and {k0} channels): load them into the one that produced them")
        self._products = products.clone()
        self._sums = sums["sums"].to(torch.float64).clone()
        self.count = int(round(float(sums["count"])))
        return self

    def copy(self) -> "CrossMoment":
        """An independent accumulator holding the same rows so far; later updates to either do not
        reach the other, and its generator goes on from the same state (same updates, same matrices)."""
        out = copy.copy(self)
        out._generator = torch.Generator()
        out._generator.set_state(self._generator.get_state())
        out._products = None if self._products is None else self._products.clone()
        out._sums = None if self._sums is None else self._sums.clone()
        return out

    def merge(self, other: "CrossMoment") -> "CrossMoment":
        """Add another accumulator's rows (the result is count-weighted). Returns self."""
        for mine, theirs in ((self.channels, other.channels), (self.source_channels, other.source_channels)):
            if mine is not None and theirs is not None and mine != theirs:
                raise StatisticsError(f"cannot merge second moments of {mine} and {theirs} channels: they "
                                      "come from different layers")
        if other._products is None:
            return self
        if self._products is None:
            self.channels, self.source_channels = other.channels, other.source_channels
            self._products, self._sums = other._products.clone(), other._sums.clone()
        else:
            width = max(self._products.shape[0], other._products.shape[0])
            self._grow(width)
            theirs_p, theirs_s = other._products, other._sums
            if theirs_p.shape[0] < width:
                theirs_p, theirs_s = theirs_p.repeat(2, 2), theirs_s.repeat(2)
            self._products += theirs_p
            self._sums += theirs_s
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
