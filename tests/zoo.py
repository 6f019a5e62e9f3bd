"""Small instances of the architectures the surgery must handle, with warmed BatchNorm statistics.

Each entry: name -> (factory, input shape without batch). Sizes are chosen so the suite stays fast on
2 cores while every structural feature is present (flatten -> Linear, residual blocks, depthwise
chains, squeeze-excitation gates, concatenations, LayerNorm).
"""
from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.models import VisionTransformer

from helpers import warm_batchnorm


class MLP(nn.Module):
    def __init__(self, d_in: int = 24, hidden: int = 48, classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Dropout(0.1), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FlattenCNN(nn.Module):
    """conv -> BN -> ReLU -> pool stages and a flatten -> Linear -> ReLU -> Linear head."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.features(x), 1)
        return self.fc2(torch.relu(self.fc1(x)))


def _tv(name: str, **kw):
    return lambda: torchvision.models.get_model(name, num_classes=10, **kw)


ZOO = {
    "resnet18": (_tv("resnet18"), (3, 32, 32)),
    "resnet50": (_tv("resnet50"), (3, 32, 32)),
    "vgg11_bn": (_tv("vgg11_bn"), (3, 32, 32)),
    "mobilenet_v2": (_tv("mobilenet_v2"), (3, 32, 32)),
    "mobilenet_v3_small": (_tv("mobilenet_v3_small"), (3, 32, 32)),
    "efficientnet_b0": (_tv("efficientnet_b0"), (3, 32, 32)),
    "squeezenet1_1": (_tv("squeezenet1_1"), (3, 64, 64)),
    # DenseNet's structure (every layer reads the concatenation of all before it) at a test size.
    "densenet_tiny": (lambda: torchvision.models.DenseNet(growth_rate=8, block_config=(2, 3),
                                                          num_init_features=16, bn_size=2, num_classes=10),
                      (3, 32, 32)),
    "convnext_tiny": (_tv("convnext_tiny"), (3, 32, 32)),
    # mlp_dim 4x hidden as in ViT-B, so the prunable MLPs carry most of the FLOPs.
    "vit_small": (lambda: VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                            hidden_dim=32, mlp_dim=128, num_classes=10), (3, 32, 32)),
    "mlp": (lambda: MLP(), (24,)),
    "flatten_cnn": (lambda: FlattenCNN(), (1, 16, 16)),
}


#: The FLOPs a test asks each model to keep: half, except where that is below what the model can reach.
#: vit_small prunes only its MLPs; its attention (the qkv and output projections and the attention
#: products), counted since flops.py turns off the fused fast path, is about half its FLOPs (the floor
#: at one channel per unit is 0.501), so it is asked for 0.6 (tests/test_flops.py checks the count).
FLOPS_TARGET = {name: 0.6 if name == "vit_small" else 0.5 for name in ZOO}


def build(name: str, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """The model in eval mode with BatchNorm running statistics warmed on random data."""
    factory, shape = ZOO[name]
    torch.manual_seed(seed)
    model = factory()
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        warm_batchnorm(model, shape)
    return model.eval(), shape
