"""Small architectures for the CLI and checkpoint tests, built as "tests/models_small.py:SmallCNN".

Kept tiny (a few thousand parameters, 8x8 inputs) so end-to-end runs stay fast on 2 shared cores.
"""
from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """conv-BN-ReLU-pool, conv-BN-ReLU, global average pool, linear head."""

    def __init__(self, in_channels: int = 3, width: int = 16, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


class SmallMLP(nn.Module):
    """Two hidden layers on flat inputs (npz arrays of shape (N, C))."""

    def __init__(self, d_in: int = 12, hidden: int = 32, classes: int = 4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallResNet(nn.Module):
    """A stem conv and two residual blocks (conv-BN-ReLU-conv-BN, added to their input), pooled, linear
    head."""

    def __init__(self, in_channels: int = 3, width: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.blocks = nn.ModuleList(nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, width, 3, padding=1), nn.BatchNorm2d(width)) for _ in range(2))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = torch.relu(h + block(h))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


def small_cnn(**kwargs) -> SmallCNN:
    """Factory form, to test "file.py:function" arches."""
    return SmallCNN(**kwargs)


class NormedConv1dNet(nn.Module):
    """An audio-style Conv1d stack whose convolutions carry weight reparametrisations: ``kind`` is
    "weight_norm" (torch.nn.utils.parametrizations), "old_weight_norm" (the hook-based
    torch.nn.utils.weight_norm) or "spectral_norm"."""

    def __init__(self, kind: str = "weight_norm"):
        super().__init__()
        from torch.nn.utils import parametrizations, weight_norm

        wrap = {"weight_norm": parametrizations.weight_norm, "old_weight_norm": weight_norm,
                "spectral_norm": parametrizations.spectral_norm}[kind]
        self.pre = wrap(nn.Conv1d(4, 32, 3, padding=1))
        self.mid = wrap(nn.Conv1d(32, 32, 3, padding=1))
        self.post = nn.Conv1d(32, 2, 1)

    def forward(self, x):
        x = nn.functional.leaky_relu(self.pre(x), 0.1)
        return self.post(nn.functional.leaky_relu(self.mid(x), 0.1))
