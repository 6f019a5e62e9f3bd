"""Sequence heads on conv features: time-major outputs of shape (B, T, classes)."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class FrameClassifier(nn.Module):
    """Input (B, 1, T, F). The conv stack pools the frequency axis away, giving (B, C, T, 1); the head
    squeezes it, permutes to (B, T, C) and applies a Linear to each frame (CTC-style)."""

    def __init__(self, n_tokens=12):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.pool1 = nn.MaxPool2d((1, 2))
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.freq_pool = nn.AdaptiveAvgPool2d((None, 1))
        self.head = nn.Linear(32, n_tokens)

    def forward(self, x):
        x = self.pool1(F.relu(self.bn1(self.conv1(x))))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.freq_pool(x)          # (B, C, T, 1)
        x = x.squeeze(3)               # (B, C, T)
        x = x.permute(0, 2, 1)         # (B, T, C)
        return F.log_softmax(self.head(x), dim=-1)


class CRNNHead(nn.Module):
    """OCR-style: input (B, 1, H, W) with W as time. Features (B, C, H', W) are permuted to (B, W, C, H')
    and reshaped to (B, W, C * H'); the width C * H' is kept in an int attribute."""

    def __init__(self, n_tokens=10, img_h=16):
        super().__init__()
        self.cnn = nn.Sequential(
            nn.Conv2d(1, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU(True), nn.MaxPool2d((2, 1)),
            nn.Conv2d(16, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU(True), nn.MaxPool2d((2, 1)),
        )
        self.feat_dim = 16 * (img_h // 4)
        self.proj = nn.Linear(self.feat_dim, 32)
        self.out = nn.Linear(32, n_tokens)

    def forward(self, x):
        conv = self.cnn(x)
        b, c, h, w = conv.size()
        seq = conv.permute(0, 3, 1, 2).reshape(b, w, self.feat_dim)
        return self.out(torch.relu(self.proj(seq)))


def frame_classifier():
    return FrameClassifier()


def crnn_head():
    return CRNNHead()


CORPUS = {
    "frame_classifier": ([1, 24, 8], "time-major head: (B, C, T, 1) -> squeeze(3) -> permute(0, 2, 1) -> "
                                     "Linear over C, output (B, T, classes)"),
    "crnn_head": ([1, 16, 20], "CRNN head: permute(0, 3, 1, 2) -> reshape(b, w, self.feat_dim) with the "
                               "width in an int attribute"),
}
