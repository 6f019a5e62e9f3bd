"""An audio tagging model in the style of published pretrained checkpoints: ``forward(x, embed=False)``
returns the clip embedding when asked, the class scores otherwise. The conv features (B, C, T, F) are
permuted to time-major order and reshaped to a width written into the module as a literal."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvBlock(nn.Module):
    def __init__(self, in_channels, out_channels):
        super(ConvBlock, self).__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x, pool_size=(2, 2)):
        x = F.relu_(self.bn(self.conv(x)))
        return F.avg_pool2d(x, kernel_size=pool_size)


class AudioTagger(nn.Module):
    """Input (B, 1, 32 frames, 16 mel bins) -> (B, 16, 8, 4) -> (B, 8, 16, 4) -> (B, 8, 64)."""

    def __init__(self, classes_num=8):
        super(AudioTagger, self).__init__()
        self.block1 = ConvBlock(1, 8)
        self.block2 = ConvBlock(8, 16)
        self.fc_embed = nn.Linear(64, 32)
        self.fc_out = nn.Linear(32, classes_num)

    def forward(self, x, embed=False):
        x = self.block1(x)
        x = self.block2(x)
        x = x.permute(0, 2, 1, 3).contiguous()   # (batch, time, channels, mel)
        x = x.reshape(x.shape[0], x.shape[1], 64)
        x = torch.mean(x, dim=1)
        x = F.relu(self.fc_embed(x))
        if embed:
            return x
        return torch.sigmoid(self.fc_out(x))


def audio_tagger():
    return AudioTagger()


CORPUS = {
    "audio_tagger": ([1, 32, 16], "forward(x, embed=False) branching on the flag; permute to time-major, "
                                  "reshape to a literal width 64; ConvBlock.forward(x, pool_size=(2, 2))"),
}
FORWARD_KWARGS = {"audio_tagger": {"embed": True}}
