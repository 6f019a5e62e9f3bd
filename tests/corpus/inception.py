"""Inception-style block: four parallel branches concatenated along the channels."""
import torch
from torch import nn


class BasicConv2d(nn.Module):
    def __init__(self, in_channels, out_channels, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class InceptionBlock(nn.Module):
    def __init__(self, in_channels, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj):
        super().__init__()
        self.branch1 = BasicConv2d(in_channels, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(BasicConv2d(in_channels, ch3x3red, kernel_size=1),
                                     BasicConv2d(ch3x3red, ch3x3, kernel_size=3, padding=1))
        self.branch3 = nn.Sequential(BasicConv2d(in_channels, ch5x5red, kernel_size=1),
                                     BasicConv2d(ch5x5red, ch5x5, kernel_size=5, padding=2))
        self.branch4 = nn.Sequential(nn.MaxPool2d(kernel_size=3, stride=1, padding=1),
                                     BasicConv2d(in_channels, pool_proj, kernel_size=1))

    def forward(self, x):
        outputs = [self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)]
        return torch.cat(outputs, 1)


class TinyInception(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = BasicConv2d(3, 16, kernel_size=3, stride=2, padding=1)
        self.mixed = InceptionBlock(16, 8, 8, 16, 4, 8, 8)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 + 16 + 8 + 8, num_classes)

    def forward(self, x):
        x = self.mixed(self.stem(x))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def tiny_inception():
    return TinyInception()


CORPUS = {
    "tiny_inception": ([3, 16, 16], "inception block: four branches (1x1, 3x3, 5x5, pool) joined by "
                                    "torch.cat"),
}
