"""Two branches of different receptive field concatenated along the channels and fused by a 1x1 conv."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class FusionNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.local = nn.Conv2d(16, 16, 3, padding=1)
        self.context = nn.Conv2d(16, 16, 3, padding=2, dilation=2)
        self.fuse = nn.Conv2d(32, 24, kernel_size=1)
        self.bn = nn.BatchNorm2d(24)
        self.classifier = nn.Linear(24, num_classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        a = F.relu(self.local(x))
        b = F.relu(self.context(x))
        x = torch.cat((a, b), dim=1)
        x = F.relu(self.bn(self.fuse(x)))
        x = F.adaptive_max_pool2d(x, 1)
        return self.classifier(torch.flatten(x, 1))


def fusion_net():
    return FusionNet()


CORPUS = {
    "fusion_net": ([3, 12, 12], "torch.cat((a, b), dim=1) of two conv branches, then a 1x1 conv"),
}
