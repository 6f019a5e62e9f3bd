"""MobileNetV1-style depthwise-separable convolutions."""
import torch.nn as nn


def conv_bn(inp, oup, stride):
    return nn.Sequential(
        nn.Conv2d(inp, oup, 3, stride, 1, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


def conv_dw(inp, oup, stride):
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
        nn.BatchNorm2d(inp),
        nn.ReLU(inplace=True),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class MobileNetV1(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.model = nn.Sequential(
            conv_bn(3, 16, 2),
            conv_dw(16, 32, 1),
            conv_dw(32, 32, 2),
            conv_dw(32, 48, 1),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(48, num_classes)

    def forward(self, x):
        x = self.model(x)
        x = x.view(-1, 48)
        return self.fc(x)


def mobilenet_v1():
    return MobileNetV1()


CORPUS = {
    "mobilenet_v1": ([3, 16, 16], "depthwise-separable blocks (groups=in_channels then 1x1), x.view(-1, 48)"),
}
