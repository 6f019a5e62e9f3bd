"""Dense float64 kernels that do half the work of a plain product, by symmetry or triangularity.

``sym_addmm`` multiplies out only the lower block triangle of a product known to be symmetric and
mirrors the rest; ``symmetrise_`` averages a matrix with its transpose in place; ``lower_t_times``
skips the zero blocks of a triangular factor. Mirroring goes in squares that fit in cache: a
transposed pass over a whole matrix reads a new cache line per element. Shared by the moment
accumulators (``moments``) and the spectral core (``signals``, ``objective``, ``greedy``).
"""
from __future__ import annotations

import torch

_SYM_TILE = 512  # rows per tile in the half-triangle products; below two tiles a plain GEMM is faster
_COPY_TILE = 128  # side of the squares transposed at once (two fit in a 1 MiB L2 cache)
_TRI_TILE = 512  # rows per tile of ``lower_t_times`` (as _SYM_TILE)


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
        # Mirrored in squares that fit in cache: one transposed copy of the whole strip reads a new
        # cache line per element (measured 2x slower at n = 4096).
        for c0 in range(lo, hi, _COPY_TILE):
            c1 = min(c0 + _COPY_TILE, hi)
            for r0 in range(0, lo, _COPY_TILE):
                r1 = min(r0 + _COPY_TILE, lo)
                out[r0:r1, c0:c1].copy_(out[c0:c1, r0:r1].T)
    return out


def symmetrise_(s: torch.Tensor) -> torch.Tensor:
    """s <- (s + s^T) / 2 in place, in squares that fit in cache (a transposed pass over the whole matrix
    reads a new cache line per element), with no m x m temporary; the values of ``0.5 * (s + s.T)``."""
    n = s.shape[0]
    for r0 in range(0, n, _COPY_TILE):
        rows = slice(r0, r0 + _COPY_TILE)
        for c0 in range(0, r0 + 1, _COPY_TILE):
            cols = slice(c0, c0 + _COPY_TILE)
            mean = (s[rows, cols] + s[cols, rows].T).mul_(0.5)
            s[rows, cols] = mean
            s[cols, rows] = mean.T
    return s


def lower_t_times(chol: torch.Tensor, k: torch.Tensor, tile: int = _TRI_TILE) -> torch.Tensor:
    """L^T K for lower-triangular L (m x m), skipping the zero blocks of L^T: about m^2 n flops."""
    m = chol.shape[0]
    out = torch.empty(m, k.shape[1], dtype=torch.float64)
    tiles = max(1, m // tile)
    edges = [m * i // tiles for i in range(tiles + 1)]
    for lo, hi in zip(edges, edges[1:]):
        torch.mm(chol[lo:, lo:hi].T, k[lo:], out=out[lo:hi])
    return out
