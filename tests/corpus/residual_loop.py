"""A stack of residual blocks held in an nn.ModuleList and applied in a Python loop."""
import torch
import torch.nn as nn


class ResidualBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x):
        return self.body(x)


class LoopResNet(nn.Module):
    def __init__(self, num_blocks=3, channels=16, num_classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.ModuleList([ResidualBlock(channels) for _ in range(num_blocks)])
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
            x = torch.relu(x)
        return self.head(x.mean(dim=[2, 3]))


def loop_resnet():
    return LoopResNet()


CORPUS = {
    "loop_resnet": ([3, 12, 12], "nn.ModuleList of blocks in a for loop with `x = x + block(x)`"),
}
