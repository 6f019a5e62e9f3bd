"""Kernel-wise least-squares refit of a convolution that reads a pruned unit (docs/method.md §4).

The fold W' = W A reconstructs the dropped channels from the kept ones with one A for every kernel
position. A k x k convolution can do better: each of its kernel taps may weigh the kept channels
differently, so fitting W' directly, over the patches the convolution sees, uses the correlation of
neighbouring positions too. With u the patch of the pruned network's kept channels at an output
position (k * K values, K the kernel size) and y the consumer's output there on the original network's
input (without bias),

    W' = E[y u^T] (E[u u^T] + lambda I)^-1,      lambda = ridge * Tr(E[u u^T]) / (k K),

which is the least-squares fit of the original output from the pruned input (the refit of He et al.
2017 and AIMET's channel pruning). The sampled patches (m K values each, every channel) are gathered
before the selection, and their products are formed afterwards over the kept channels only: at half
the width that is a quarter of the multiply-adds. Past ``KEEP_BYTES`` of patches, or when the sums are
all-reduced under torchrun, the products over every channel are summed as the rows come instead, and
the kept rows and columns are read out of them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from specprune_cli.rows import sample_positions

#: Largest m * K (patch length) refit: 256 channels under a 3x3 kernel. A row of the patch moments costs
#: (m K)^2 multiply-adds, so wider units keep the fold W A (a 512-wide unit would cost 4x more per row
#: than a 256-wide one, for a few tenths of a point).
MAX_PATCH = 2304
#: Output positions sampled per sample for the patch moments. Each row costs (m K)^2 multiply-adds,
#: K^2 times what a row of the tap's moments costs, so far fewer rows are read.
POSITIONS = 8
#: Bytes of float32 patch rows a fit holds for products over the kept channels only (see above).
KEEP_BYTES = 256 * 2 ** 20


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
        self.size, self.outputs = width * self.kernel, conv.out_channels  # as when the rows are read
        #: Held batches of (patches u, outputs y) in float32, until the products are formed.
        self.rows: list[tuple[torch.Tensor, torch.Tensor]] | None = []
        self._held = 0
        self.patches: torch.Tensor | None = None  # sum of u^T u over every channel, float64, once summed
        self.cross: torch.Tensor | None = None  # sum of y^T u
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
            self.count += u.shape[0]
            if self.rows is not None and self._held + u.numel() + y.numel() <= KEEP_BYTES // 4:
                self.rows.append((u, y))
                self._held += u.numel() + y.numel()
            else:
                self._add(u, y)

    def _add(self, u: torch.Tensor, y: torch.Tensor) -> None:
        """Add one batch's products over every channel (summing the held rows first)."""
        patches, cross = self.totals()
        patches += (u.T @ u).double()
        cross += (y.T @ u).double()

    def totals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The float64 sums of u^T u and y^T u over every channel, the held rows added in; from then on
        every batch is summed as it comes."""
        if self.patches is None or self.cross is None:
            self.patches = torch.zeros(self.size, self.size, dtype=torch.float64)
            self.cross = torch.zeros(self.outputs, self.size, dtype=torch.float64)
        held, self.rows, self._held = self.rows or [], None, 0
        for u, y in held:
            self.patches += (u.T @ u).double()
            self.cross += (y.T @ u).double()
        return self.patches, self.cross

    def sums(self) -> dict[str, torch.Tensor]:
        """The raw float64 sums and the row count, for ``distributed.all_reduce_moments``."""
        patches, cross = self.totals()
        return {"patches": patches.clone(), "cross": cross.clone(),
                "count": torch.tensor(float(self.count), dtype=torch.float64)}

    def load_sums(self, sums: dict[str, torch.Tensor]) -> "KernelFit":
        """Replace the sums by ``sums`` (as ``sums()`` gives them, e.g. all-reduced). Returns self."""
        self.rows, self._held = None, 0
        self.patches, self.cross = sums["patches"].clone(), sums["cross"].clone()
        self.count = int(round(float(sums["count"])))
        return self

    def _kept_products(self, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sums of u_J^T u_J and y^T u_J over the kept patch columns ``cols``."""
        if self.rows is None:
            patches, cross = self.totals()
            return patches[cols][:, cols], cross[:, cols]
        p = torch.zeros(len(cols), len(cols), dtype=torch.float64)
        q = torch.zeros(self.outputs, len(cols), dtype=torch.float64)
        for u, y in self.rows:
            kept = u[:, cols]
            p += (kept.T @ kept).double()
            q += (y.T @ kept).double()
        return p, q

    def solve(self, keep: torch.Tensor, ridge: float) -> torch.Tensor | None:
        """W' (out, k, kh, kw) for the kept channels, in the weight's dtype; None if it cannot be solved."""
        if self.count == 0:
            return None
        cols = (keep.to(torch.long)[:, None] * self.kernel + torch.arange(self.kernel)).reshape(-1)
        p, q = self._kept_products(cols)
        p, q = p / self.count, q / self.count
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
