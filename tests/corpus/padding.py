"""TensorFlow-style "same" padding ported to PyTorch: F.pad with an asymmetric pad before a stride-2 conv,
and nn.ZeroPad2d in a Sequential."""
import torch.nn as nn
import torch.nn.functional as F


class SamePadNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2)
        self.bn1 = nn.BatchNorm2d(16)
        self.block = nn.Sequential(nn.ZeroPad2d(1), nn.Conv2d(16, 32, 3), nn.BatchNorm2d(32), nn.ReLU())
        self.conv3 = nn.Conv2d(32, 32, 3)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = F.pad(x, (0, 1, 0, 1))   # "same" for an even input and stride 2
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.block(x)
        x = F.pad(x, [1, 1, 1, 1], mode="constant", value=0.0)
        x = F.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))


def same_pad_net():
    return SamePadNet()


CORPUS = {
    "same_pad_net": ([3, 16, 16], "F.pad (asymmetric and symmetric) and nn.ZeroPad2d along spatial dims"),
}
