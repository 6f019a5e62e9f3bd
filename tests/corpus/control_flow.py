"""A forward with a shape-dependent branch: large inputs are pooled once more before the head."""
import torch
from torch import nn


class AdaptiveDepthNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(32 * 4 * 4, num_classes)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        if x.shape[-1] > 8:  # 32x32 inputs: one more halving so the head always sees 4x4
            x = self.pool(x)
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        return self.fc(x.view(x.size(0), -1))


def shape_branch():
    return AdaptiveDepthNet()


CORPUS = {
    "shape_branch": ([3, 32, 32], "shape-dependent `if x.shape[-1] > 8: x = self.pool(x)` (taken at 32x32), "
                                  "view(x.size(0), -1) -> Linear"),
}
