"""Global average pooling written as ``x.mean((2, 3))``, then dropout and a classifier."""
import torch.nn as nn
import torch.nn.functional as F


class MeanPoolNet(nn.Module):
    def __init__(self, num_classes=10, drop_rate=0.3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.drop_rate = drop_rate
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = x.mean((2, 3))
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return self.fc(x)


def mean_pool_net():
    return MeanPoolNet()


CORPUS = {
    "mean_pool_net": ([3, 16, 16], "x.mean((2, 3)) global pool, F.dropout(training=self.training) behind an "
                                   "attribute check"),
}
