"""Keyword spotting: Conv1d nets on raw 16 kHz audio (0.1 s here) and on MFCC frames."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class RawAudioNet(nn.Module):
    """M5-style: a wide strided first conv over the waveform, then small Conv1d blocks."""

    def __init__(self, n_input=1, n_output=12, stride=8, n_channel=16):
        super().__init__()
        self.conv1 = nn.Conv1d(n_input, n_channel, kernel_size=40, stride=stride)
        self.bn1 = nn.BatchNorm1d(n_channel)
        self.pool1 = nn.MaxPool1d(4)
        self.conv2 = nn.Conv1d(n_channel, n_channel, kernel_size=3)
        self.bn2 = nn.BatchNorm1d(n_channel)
        self.pool2 = nn.MaxPool1d(4)
        self.conv3 = nn.Conv1d(n_channel, 2 * n_channel, kernel_size=3)
        self.bn3 = nn.BatchNorm1d(2 * n_channel)
        self.fc1 = nn.Linear(2 * n_channel, n_output)

    def forward(self, x):
        x = self.pool1(F.relu(self.bn1(self.conv1(x))))
        x = self.pool2(F.relu(self.bn2(self.conv2(x))))
        x = F.relu(self.bn3(self.conv3(x)))
        x = F.avg_pool1d(x, x.shape[-1])
        x = x.permute(0, 2, 1)  # (B, 1, C)
        x = self.fc1(x)
        return F.log_softmax(x, dim=2).squeeze(1)


class WaveformNet(nn.Module):
    """Takes the bare waveform (B, samples) and adds the channel dimension itself."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, 16, 9, stride=4, padding=4),
            nn.BatchNorm1d(16),
            nn.ReLU(inplace=True),
            nn.MaxPool1d(2),
            nn.Conv1d(16, 24, 9, stride=2, padding=4),
            nn.BatchNorm1d(24),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool1d(1),
        )
        self.classifier = nn.Linear(24, num_classes)

    def forward(self, wav):
        x = self.features(wav.unsqueeze(1))
        return self.classifier(x.squeeze(-1))


class MfccConv1d(nn.Module):
    """MFCC coefficients as channels, convolution over time (TC-ResNet-like, no residual)."""

    def __init__(self, n_mfcc=40, num_classes=12):
        super().__init__()
        self.conv1 = nn.Conv1d(n_mfcc, 24, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(24)
        self.conv2 = nn.Conv1d(24, 32, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(32)
        self.conv3 = nn.Conv1d(32, 32, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm1d(32)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):  # x: (B, n_mfcc, frames)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        x = self.pool(x).view(x.size(0), -1)
        return self.fc(self.drop(x))


class MfccConv2d(nn.Module):
    """MFCCs as a one-channel image: (B, 40, 100) -> (B, 1, 40, 100) -> Conv2d stack."""

    def __init__(self, num_classes=12):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 12, (5, 3), stride=(2, 2), padding=(2, 1))
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 24, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(24)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x):
        x = x.unsqueeze(1)
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = F.relu(self.bn2(self.conv2(x)))
        x = torch.amax(x, dim=(2, 3))
        return self.fc(x)


def raw_audio_m5():
    return RawAudioNet()


def waveform_net():
    return WaveformNet()


def mfcc_conv1d():
    return MfccConv1d()


def mfcc_conv2d():
    return MfccConv2d()


CORPUS = {
    "raw_audio_m5": ([1, 1600], "raw-audio KWS: Conv1d/BatchNorm1d/MaxPool1d, F.avg_pool1d over time, "
                                "permute to (B, 1, C) before the Linear"),
    "waveform_net": ([1600], "raw-audio KWS on 1-D input: unsqueeze(1), Conv1d, AdaptiveAvgPool1d, "
                             "squeeze(-1)"),
    "mfcc_conv1d": ([40, 100], "MFCC KWS, 2-D input as (channels=40, time): Conv1d stack, "
                               "view(x.size(0), -1)"),
    "mfcc_conv2d": ([40, 100], "MFCC KWS, 2-D input unsqueezed to (1, 40, 100): Conv2d stack, "
                               "torch.amax pool"),
}
