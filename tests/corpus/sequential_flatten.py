"""A whole model as one nn.Sequential, with nn.Flatten before the classifier."""
from torch import nn


def lenet_sequential(num_classes=10):
    return nn.Sequential(
        nn.Conv2d(1, 8, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


CORPUS = {
    "lenet_sequential": ([1, 16, 16], "the factory returns an nn.Sequential; nn.Flatten -> "
                                      "Linear(16 * 4 * 4, 64)"),
}
