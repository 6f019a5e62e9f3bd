"""A C3D-like Conv3d net on a tiny video clip (channels, frames, height, width)."""
import torch
import torch.nn as nn


class TinyC3D(nn.Module):
    def __init__(self, num_classes=6):
        super().__init__()
        self.conv1 = nn.Conv3d(3, 8, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm3d(8)
        self.pool1 = nn.MaxPool3d(kernel_size=(1, 2, 2))
        self.conv2 = nn.Conv3d(8, 16, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm3d(16)
        self.pool2 = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.pool1(torch.relu(self.bn1(self.conv1(x))))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = self.pool2(x)
        return self.fc(x.flatten(1))


def tiny_c3d():
    return TinyC3D()


CORPUS = {
    "tiny_c3d": ([3, 4, 8, 8], "Conv3d / BatchNorm3d / MaxPool3d / AdaptiveAvgPool3d on a 4-frame clip"),
}
