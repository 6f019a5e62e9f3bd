"""Several outputs: a dict of named outputs, a tuple of two heads, and a ``return_features`` flag."""
import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_bn(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class MultiTaskNet(nn.Module):
    """Shared trunk, one head per task, results returned by name."""

    def __init__(self, num_classes=10, num_attributes=4):
        super().__init__()
        self.trunk = nn.Sequential(conv_bn(3, 16), conv_bn(16, 32, stride=2), nn.AdaptiveAvgPool2d(1))
        self.embed = nn.Linear(32, 32)
        self.classifier = nn.Linear(32, num_classes)
        self.attributes = nn.Linear(32, num_attributes)

    def forward(self, x):
        h = self.trunk(x).flatten(1)
        h = F.relu(self.embed(h))
        return {"logits": self.classifier(h), "attributes": torch.sigmoid(self.attributes(h))}


class TwoHeadNet(nn.Module):
    """A classifier and a box regressor on the same features, returned as a tuple."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 16), nn.MaxPool2d(2), conv_bn(16, 24), nn.MaxPool2d(2))
        self.cls_head = nn.Sequential(nn.Flatten(), nn.Linear(24 * 4 * 4, 32), nn.ReLU(),
                                      nn.Linear(32, num_classes))
        self.box_head = nn.Sequential(nn.Conv2d(24, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                      nn.Linear(16, 4))

    def forward(self, x):
        f = self.features(x)
        return self.cls_head(f), self.box_head(f)


class FeatureNet(nn.Module):
    """``return_features=True`` also hands back the pooled features (e.g. for retrieval)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x, return_features=False):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.relu(self.bn2(self.conv2(x)))
        feats = F.adaptive_avg_pool2d(x, 1).flatten(1)
        logits = self.fc(feats)
        if return_features:
            return logits, feats
        return logits


def multitask_dict():
    return MultiTaskNet()


def two_heads():
    return TwoHeadNet()


def feature_flag():
    return FeatureNet()


CORPUS = {
    "multitask_dict": ([3, 16, 16], "dict output {'logits', 'attributes'} from a shared trunk"),
    "two_heads": ([3, 16, 16], "tuple output: classifier head (nn.Flatten -> Linear) and box head"),
    "feature_flag": ([3, 16, 16], "forward(x, return_features=False): the flag changes what is returned"),
}
FORWARD_KWARGS = {"feature_flag": {"return_features": True}}
