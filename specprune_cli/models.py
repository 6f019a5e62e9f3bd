"""Small reference architectures for 28x28 single-channel images (the bundled example, benchmarks).

Each is a plain ``nn.Module`` with a factory ``name(num_classes=10, in_channels=1)`` that a config can
name as ``"specprune_cli.models:name"``. All trace with torch.fx (no data-dependent control flow),
and every prunable width is a multiple of 8. Between them they cover the structures the pruner must
handle: flatten -> Linear (fashion_cnn, vgg_small), residual adds (resnet_small, mobilenetv2_small)
and depthwise convolutions (mobilenetv2_small).

Parameters and FLOPs at 1x1x28x28 with 10 classes, measured with ``specprune_cli.flops``
(a multiply-add counts as 2 FLOPs):

    fashion_cnn         836,074 params   30.5 MFLOPs
    vgg_small           584,618 params   58.8 MFLOPs
    resnet_small        697,130 params   44.9 MFLOPs
    mobilenetv2_small   133,194 params   22.0 MFLOPs
"""
from __future__ import annotations

import torch
from torch import nn


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    # No conv bias: the BatchNorm shift that follows makes it redundant.
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


class FashionCNN(nn.Module):
    """Four conv-BN-ReLU layers (32-64-128-128) with max-pooling, then flatten -> MLP head.

    28x28 -> pool 14 -> pool 7 -> two convs -> pool 3; the head sees a 128*3*3 = 1152 flatten (not global
    pooling), so pruning the last conv's channels removes blocks of nine Linear input columns.
    836,074 params, 30.5 MFLOPs at 1x1x28x28.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, 32), nn.MaxPool2d(2),     # 32 x 14 x 14
            *_conv_bn_relu(32, 64), nn.MaxPool2d(2),              # 64 x 7 x 7
            *_conv_bn_relu(64, 128),
            *_conv_bn_relu(128, 128), nn.MaxPool2d(2),            # 128 x 3 x 3
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(128 * 3 * 3, 512), nn.ReLU(inplace=True), nn.Dropout(0.2),
            nn.Linear(512, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class VGGSmall(nn.Module):
    """VGG-style: three stages of two 3x3 conv-BN-ReLU (32, 64, 128) with max-pooling, flatten -> MLP.

    584,618 params, 58.8 MFLOPs at 1x1x28x28.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, 32), *_conv_bn_relu(32, 32), nn.MaxPool2d(2),   # 14x14
            *_conv_bn_relu(32, 64), *_conv_bn_relu(64, 64), nn.MaxPool2d(2),            # 7x7
            *_conv_bn_relu(64, 128), *_conv_bn_relu(128, 128), nn.MaxPool2d(2),         # 3x3
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(128 * 3 * 3, 256), nn.ReLU(inplace=True),
                                        nn.Linear(256, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN, identity or 1x1 conv-BN shortcut, ReLU after the add."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNetSmall(nn.Module):
    """ResNet-style: a 32-channel stem at 28x28, three stages of two basic blocks (32, 64, 128; each
    stage starts with stride 2: 14x14, 7x7, 4x4), global average pooling and a Linear head.

    697,130 params, 44.9 MFLOPs at 1x1x28x28.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn_relu(in_channels, 32))
        self.layers = nn.Sequential(
            BasicBlock(32, 32, 2), BasicBlock(32, 32),          # 14x14
            BasicBlock(32, 64, 2), BasicBlock(64, 64),          # 7x7
            BasicBlock(64, 128, 2), BasicBlock(128, 128))       # 4x4
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.layers(self.stem(x)))
        return self.head(torch.flatten(x, 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand -> BN -> ReLU6 -> 3x3 depthwise -> BN -> ReLU6 -> 1x1 project -> BN,
    plus the input when stride is 1 and the widths match (decided at construction, so fx sees no branch).
    """

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.block = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_residual else y


class MobileNetV2Small(nn.Module):
    """MobileNetV2-style: 32-channel stem, six inverted residuals (expansion 6 after the first),
    1x1 conv to 256, global average pooling and a Linear head.

    133,194 params, 22.0 MFLOPs at 1x1x28x28.
    """

    # (in, out, stride, expansion); strides take 28x28 to 7x7.
    BLOCKS = [(32, 16, 1, 1), (16, 24, 2, 6), (24, 24, 1, 6), (24, 48, 2, 6), (48, 48, 1, 6), (48, 96, 1, 6)]

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32),
                                  nn.ReLU6(inplace=True))
        self.blocks = nn.Sequential(*[InvertedResidual(*cfg) for cfg in self.BLOCKS])
        self.last = nn.Sequential(nn.Conv2d(96, 256, 1, bias=False), nn.BatchNorm2d(256),
                                  nn.ReLU6(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.last(self.blocks(self.stem(x))))
        return self.head(torch.flatten(x, 1))


def fashion_cnn(num_classes: int = 10, in_channels: int = 1) -> FashionCNN:
    """The bundled example's model (``examples/fashion_cnn.pt``)."""
    return FashionCNN(num_classes, in_channels)


def vgg_small(num_classes: int = 10, in_channels: int = 1) -> VGGSmall:
    """VGG-style network with a flatten -> Linear head."""
    return VGGSmall(num_classes, in_channels)


def resnet_small(num_classes: int = 10, in_channels: int = 1) -> ResNetSmall:
    """ResNet-style network of basic residual blocks."""
    return ResNetSmall(num_classes, in_channels)


def mobilenetv2_small(num_classes: int = 10, in_channels: int = 1) -> MobileNetV2Small:
    """MobileNetV2-style network of inverted residuals."""
    return MobileNetV2Small(num_classes, in_channels)
