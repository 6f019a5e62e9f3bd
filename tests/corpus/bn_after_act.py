"""BatchNorm placed after the activation (conv -> ReLU -> BN), as some Keras ports and tutorials do."""
import torch.nn as nn


class PostActBNNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(16), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(32), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 3 * 3, 32), nn.ReLU(), nn.BatchNorm1d(32),
            nn.Linear(32, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def post_act_bn():
    return PostActBNNet()


CORPUS = {
    "post_act_bn": ([3, 12, 12], "BatchNorm after the activation (Conv -> ReLU -> BatchNorm2d; "
                                 "Linear -> ReLU -> BatchNorm1d)"),
}
