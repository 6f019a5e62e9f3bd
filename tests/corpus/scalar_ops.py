"""Scalar arithmetic on feature maps: rescaling with ``x * 0.5 + 1``, ``2 * x - 1`` and ``x / 6``."""
import torch
from torch import nn


class ScaledNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = 2 * x - 1  # inputs in [0, 1] to [-1, 1]
        x = self.conv1(x)
        x = torch.relu(x * 0.5 + 1)
        x = self.pool(x)
        x = self.conv2(x)
        x = x * torch.clamp(x + 3, 0, 6) / 6  # hard-swish written out
        return self.fc(torch.mean(x, dim=(2, 3)))


def scaled_net():
    return ScaledNet()


CORPUS = {
    "scaled_net": ([3, 12, 12], "scalar ops on channels: x * 0.5 + 1, 2 * x - 1, hand-written hard-swish "
                                "x * clamp(x + 3, 0, 6) / 6"),
}
