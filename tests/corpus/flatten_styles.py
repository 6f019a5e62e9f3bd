"""The same small CNN three times, each flattening its 4x4 feature map for the Linear in a different way."""
import torch
import torch.nn as nn


class FlattenNet(nn.Module):
    def __init__(self, style, num_classes=10):
        super().__init__()
        self.style = style
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        if self.style == "method":
            x = x.flatten(1)
        elif self.style == "function":
            x = torch.flatten(x, 1)
        else:
            x = x.reshape(x.size(0), -1)
        return self.fc2(torch.relu(self.fc1(x)))


def flatten_method():
    return FlattenNet("method")


def flatten_function():
    return FlattenNet("function")


def flatten_reshape():
    return FlattenNet("reshape")


CORPUS = {
    "flatten_method": ([1, 16, 16], "x.flatten(1) -> Linear (channel-major, 16 positions per channel)"),
    "flatten_function": ([1, 16, 16], "torch.flatten(x, 1) -> Linear"),
    "flatten_reshape": ([1, 16, 16], "x.reshape(x.size(0), -1) -> Linear"),
}
