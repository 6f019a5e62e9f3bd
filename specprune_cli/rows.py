"""The rows a moment accumulator reads from a batch of activations, in float64 (docs/method.md §2).

A batch is (N, C) rows, or (N, C, *spatial) where each (sample, position) is a row, or, with
``channel_dim=-1``, (..., C) as a Linear sees an N-D input (leading dims are rows). Past
``max_positions`` positions per sample, that many distinct positions are drawn, the same for every
signal of the batch, from a generator seeded by the batch's key alone (``sample_positions``).
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from specprune_cli.errors import StatisticsError

_CHUNK_ELEMENTS = 1 << 23  # float64 values per piece of rows converted at a time (64 MiB)


def sample_positions(n: int, positions: int, count: int, seed: int, key: int, salt: int = 0) -> torch.Tensor:
    """``count`` distinct positions of ``positions`` for each of ``n`` samples, (n, count), drawn from a
    generator seeded by (seed, key, salt) alone: key is the batch's index in the whole calibration set, so
    every process of a torchrun job draws what one process would (docs/method.md §2)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + key + salt)
    return torch.rand(n, positions, generator=generator).argsort(1)[:, :count]


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when a and b are views of the same memory with the same layout (x~ is x)."""
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
                      and a.dtype == b.dtype)


def channels_of(x: torch.Tensor, channel_dim: int) -> int:
    """The channel count of a batch in the layout ``channel_dim`` (1 or -1) names."""
    return x.shape[-1] if channel_dim == -1 else x.shape[1]


def checked_channels(x: torch.Tensor, expected: int | None, name: str, channel_dim: int) -> int:
    """x's channel count, after checking its shape and that it holds no NaN/Inf."""
    if x.dim() < 2:
        raise StatisticsError(f"{name}activations must have a batch and a channel dimension, got shape "
                              f"{tuple(x.shape)}")
    channels = channels_of(x, channel_dim)
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
                                  "the input normalisation (data.*.mean/std), that the checkpoint "
                                  "matches the architecture, and that the model runs in eval mode")
    return channels


def check_same_rows(x: torch.Tensor, x_tilde: torch.Tensor, channel_dim: int) -> None:
    """Raise unless the two signals have the same rows (only their channels may differ)."""
    rows_x = x.shape[:-1] if channel_dim == -1 else (x.shape[0], *x.shape[2:])
    rows_t = x_tilde.shape[:-1] if channel_dim == -1 else (x_tilde.shape[0], *x_tilde.shape[2:])
    if rows_x != rows_t:
        raise StatisticsError(f"the two signals must come from the same inputs: x has shape "
                              f"{tuple(x.shape)} and x~ {tuple(x_tilde.shape)} (only channels may "
                              "differ)")


def row_chunks(signals: list[torch.Tensor], channel_dim: int, max_positions: int | None, seed: int,
               key: int) -> Iterator[list[torch.Tensor]]:
    """The rows of ``signals`` as float64 (rows, C) pieces, one per signal, of bounded size.

    Each piece is made by one copy that changes layout and dtype together: float64 before the
    product, not after (docs/method.md §2). ``seed`` and ``key`` (the batch's index in the whole
    calibration set) seed the draw of positions (``sample_positions``).
    """
    widths = [channels_of(s, channel_dim) for s in signals]
    if channel_dim == -1 or signals[0].dim() == 2:
        flats = [s.reshape(-1, w) for s, w in zip(signals, widths)]
        per = max(1, _CHUNK_ELEMENTS // sum(widths))
        for lo in range(0, flats[0].shape[0], per):
            yield [f[lo:lo + per].to(torch.float64) for f in flats]
        return
    n = signals[0].shape[0]
    flats = [s.reshape(n, w, -1) for s, w in zip(signals, widths)]
    positions = flats[0].shape[2]
    if max_positions is not None and positions > max_positions:
        # Distinct positions (no duplicated rows): the first max_positions of a random permutation,
        # the same positions for every signal.
        idx = sample_positions(n, positions, max_positions, seed, key)
        positions = max_positions
        flats = [torch.gather(f, 2, idx.unsqueeze(1).expand(n, w, positions))
                 for f, w in zip(flats, widths)]
    per = max(1, _CHUNK_ELEMENTS // (positions * sum(widths)))  # samples per piece
    for lo in range(0, n, per):
        pieces = []
        for f, w in zip(flats, widths):
            part = f[lo:lo + per]
            rows = torch.empty(part.shape[0], positions, w, dtype=torch.float64)
            rows.copy_(part.permute(0, 2, 1))
            pieces.append(rows.view(-1, w))
        yield pieces
