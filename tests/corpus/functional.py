"""Layers written with torch.nn.functional and bare nn.Parameter weights instead of nn.Conv2d."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class FunctionalConvNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1_weight = nn.Parameter(torch.empty(16, 3, 3, 3))
        self.conv1_bias = nn.Parameter(torch.zeros(16))
        self.conv2_weight = nn.Parameter(torch.empty(32, 16, 3, 3))
        self.fc = nn.Linear(32, num_classes)
        nn.init.kaiming_uniform_(self.conv1_weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.conv2_weight, a=math.sqrt(5))

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.conv1_weight, self.conv1_bias, padding=1))
        x = F.max_pool2d(x, 2)
        x = F.relu(F.conv2d(x, self.conv2_weight, padding=1))
        x = x.mean(dim=(2, 3))
        return self.fc(x)


def functional_convs():
    return FunctionalConvNet()


CORPUS = {
    "functional_convs": ([3, 16, 16], "functional-only layers: F.conv2d(x, self.conv1_weight) with "
                                      "nn.Parameter weights, then an nn.Linear head"),
}
