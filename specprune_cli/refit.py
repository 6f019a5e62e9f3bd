"""Kernel-wise least-squares refit of a convolution that reads a pruned unit (docs/method.md §4).

The fold W' = W A reconstructs the dropped channels from the kept ones with one A for every kernel
position. A k x k convolution can do better: each of its kernel taps may weigh the kept channels
differently, so fitting W' directly, over the patches the convolution sees, uses the correlation of
neighbouring positions too. With u the patch of the pruned network's kept channels at an output
position (k * K values, K the kernel size) and y the consumer's output there on the original network's
input (without bias),

    W' = E[y u^T] (E[u u^T] + lambda I)^-1,      lambda = ridge * Tr(E[u u^T]) / (k K),

which is the least-squares fit of the original output from the pruned input (the refit of He et al.
2017 and AIMET's channel pruning). Its moments are gathered for every channel before the selection
(m K values per patch), and the rows and columns of the kept channels are read out afterwards.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from specprune_cli.moments import sample_positions

#: Largest m * K (patch length) refit: 256 channels under a 3x3 kernel. A row of the patch moments costs
#: (m K)^2 multiply-adds, so wider units keep the fold W A (a 512-wide unit would cost 4x more per row
#: than a 256-wide one, for a few tenths of a point).
MAX_PATCH = 2304
#: Output positions sampled per sample for the patch moments. Each row costs (m K)^2 multiply-adds,
#: K^2 times what a row of the tap's moments costs, so far fewer rows are read.
POSITIONS = 8


def refittable(mod: nn.Module, width: int) -> bool:
    """A Conv2d with zero padding, no groups and a kernel larger than 1x1, small enough to refit."""
    return (type(mod).forward is nn.Conv2d.forward and isinstance(mod, nn.Conv2d) and mod.groups == 1
            and mod.padding_mode == "zeros" and isinstance(mod.padding, tuple)
            and math.prod(mod.kernel_size) > 1 and width * math.prod(mod.kernel_size) <= MAX_PATCH)


class KernelFit:
    """Streaming patch moments of one convolution consumer.

    Attributes:
        module: the consumer's name.
        count: rows (sampled output positions) accumulated.
    """

    def __init__(self, module: str, conv: nn.Conv2d, width: int, *, max_positions: int | None, seed: int,
                 draw_offset: int = 0, draw_stride: int = 1):
        self.module, self.conv, self.width = module, conv, width
        self.kernel = math.prod(conv.kernel_size)
        self.max_positions = POSITIONS if max_positions is None else min(max_positions, POSITIONS)
        self.seed = seed
        self.draw_offset, self.draw_stride = draw_offset, draw_stride
        size = width * self.kernel
        self.patches = torch.zeros(size, size, dtype=torch.float64)
        self.cross = torch.zeros(conv.out_channels, size, dtype=torch.float64)
        self.count = 0
        self._updates = 0

    def update(self, x: torch.Tensor, x_tilde: torch.Tensor) -> None:
        """Add a batch: ``x`` the original network's input to the consumer, ``x_tilde`` the pruned one's.

        Only the sampled output positions' patches are formed (no full unfold or convolution)."""
        conv = self.conv
        key = self.draw_offset + self.draw_stride * self._updates
        self._updates += 1
        (kh, kw), (sh, sw), (dh, dw), (ph, pw) = conv.kernel_size, conv.stride, conv.dilation, conv.padding
        n, _, h, w = x.shape
        out_h, out_w = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        positions = out_h * out_w
        if positions > self.max_positions:
            idx = sample_positions(n, positions, self.max_positions, self.seed, key, salt=7)
        else:
            idx = torch.arange(positions).expand(n, positions)
        rows = (idx // out_w)[..., None, None] * sh + (torch.arange(kh) * dh)[:, None]
        cols = (idx % out_w)[..., None, None] * sw + (torch.arange(kw) * dw)[None, :]
        batch = torch.arange(n)[:, None, None, None]

        def patches(t: torch.Tensor) -> torch.Tensor:  # (n * positions, C * kh * kw), channel-major
            padded = F.pad(t.detach().float(), (pw, pw, ph, ph))
            vals = padded[batch, :, rows, cols]  # (n, P, kh, kw, C)
            return vals.permute(0, 1, 4, 2, 3).reshape(-1, t.shape[1] * kh * kw)

        with torch.no_grad():
            # One batch's products in float32 (a few thousand rows: relative error ~1e-6), summed over
            # batches in float64: the (m K)^2-per-row product is the cost of the refit.
            u = patches(x_tilde)
            y = patches(x) @ conv.weight.detach().float().reshape(conv.out_channels, -1).T
            self.patches += (u.T @ u).double()
            self.cross += (y.T @ u).double()
            self.count += u.shape[0]

    def sums(self) -> dict[str, torch.Tensor]:
        """The raw float64 sums and the row count, for ``distributed.all_reduce_moments``."""
        return {"patches": self.patches.clone(), "cross": self.cross.clone(),
                "count": torch.tensor(float(self.count), dtype=torch.float64)}

    def load_sums(self, sums: dict[str, torch.Tensor]) -> "KernelFit":
        """Replace the sums by ``sums`` (as ``sums()`` gives them, e.g. all-reduced). Returns self."""
        self.patches, self.cross = sums["patches"].clone(), sums["cross"].clone()
        self.count = int(round(float(sums["count"])))
        return self

    def solve(self, keep: torch.Tensor, ridge: float) -> torch.Tensor | None:
        """W' (out, k, kh, kw) for the kept channels, in the weight's dtype; None if it cannot be solved."""
        if self.count == 0:
            return None
        cols = (keep.to(torch.long)[:, None] * self.kernel + torch.arange(self.kernel)).reshape(-1)
        p = self.patches[cols][:, cols] / self.count
        q = self.cross[:, cols] / self.count
        lam = ridge * float(torch.trace(p)) / len(cols)
        eye = torch.eye(len(cols), dtype=torch.float64)
        chol, info = torch.linalg.cholesky_ex(p + max(lam, 1e-12) * eye)
        if int(info) != 0:
            return None
        w = torch.cholesky_solve(q.T.contiguous(), chol).T
        if not torch.isfinite(w).all():
            return None
        conv = self.conv
        if w.shape[0] != conv.out_channels:
            # The conv also writes the unit (x + conv(x) in a residual stream): its output rows were cut
            # to the same kept channels, and least squares fits each output row alone.
            if w.shape[0] != self.width or conv.out_channels != len(keep):
                return None
            w = w[keep.to(torch.long)]
        return w.reshape(conv.out_channels, len(keep), *conv.kernel_size).to(conv.weight.dtype)
