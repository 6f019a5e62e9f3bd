"""A ResNeXt-style bottleneck: 1x1 reduce, 3x3 grouped conv (groups=4, not depthwise), 1x1 expand."""
import torch.nn as nn
import torch.nn.functional as F


class GroupedBottleneck(nn.Module):
    def __init__(self, in_ch, width, out_ch, groups=4):
        super().__init__()
        self.reduce = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.grouped = nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.expand = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)

    def forward(self, x):
        out = F.relu(self.bn1(self.reduce(x)))
        out = F.relu(self.bn2(self.grouped(out)))
        return F.relu(self.bn3(self.expand(out)))


class GroupedNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block = GroupedBottleneck(16, 32, 32, groups=4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.block(self.stem(x))
        return self.fc(self.pool(x).flatten(1))


def grouped_net():
    return GroupedNet()


CORPUS = {
    "grouped_net": ([3, 12, 12], "grouped 3x3 conv with groups=4 (not depthwise) between 1x1 convs"),
}
