"""A tabular MLP: Linear -> LayerNorm -> activation -> dropout blocks."""
import torch.nn as nn


class TabularMLP(nn.Module):
    def __init__(self, n_features=20, hidden=(64, 32), n_classes=3, dropout=0.1):
        super().__init__()
        layers = []
        prev = n_features
        for width in hidden:
            layers += [nn.Linear(prev, width), nn.LayerNorm(width), nn.SiLU(), nn.Dropout(dropout)]
            prev = width
        self.backbone = nn.Sequential(*layers)
        self.out = nn.Linear(prev, n_classes)

    def forward(self, x):
        return self.out(self.backbone(x))


def tabular_mlp():
    return TabularMLP()


CORPUS = {
    "tabular_mlp": ([20], "tabular MLP on 1-D rows: Linear -> LayerNorm -> SiLU -> Dropout"),
}
