"""An encoder-decoder for dense prediction that upsamples with nn.Upsample modules."""
import torch.nn as nn


class EncoderDecoder(nn.Module):
    def __init__(self, in_channels=3, n_classes=4):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
        )
        self.decoder = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(32, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(16, n_classes, 3, padding=1),
        )

    def forward(self, x):
        return self.decoder(self.encoder(x))


def encoder_decoder():
    return EncoderDecoder()


CORPUS = {
    "encoder_decoder": ([3, 16, 16], "nn.Upsample (nearest and bilinear) in a decoder; per-pixel output"),
}
