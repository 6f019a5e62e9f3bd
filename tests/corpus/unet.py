"""A small U-Net: double-conv blocks, max-pool down, one ConvTranspose2d up and one F.interpolate up,
with the encoder's features concatenated onto the decoder's (skip connections)."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class DoubleConv(nn.Module):
    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        return self.block(x)


class Down(nn.Module):
    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.conv = DoubleConv(in_ch, out_ch)

    def forward(self, x):
        return self.conv(self.pool(x))


class UNet(nn.Module):
    def __init__(self, in_channels=1, n_classes=2, base=8):
        super().__init__()
        self.inc = DoubleConv(in_channels, base)
        self.down1 = Down(base, base * 2)
        self.down2 = Down(base * 2, base * 4)
        self.up1 = nn.ConvTranspose2d(base * 4, base * 2, kernel_size=2, stride=2)
        self.dec1 = DoubleConv(base * 4, base * 2)
        self.dec2 = DoubleConv(base * 2 + base, base)
        self.outc = nn.Conv2d(base, n_classes, kernel_size=1)

    def forward(self, x):
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        y = self.up1(x3)
        y = self.dec1(torch.cat([x2, y], dim=1))
        y = F.interpolate(y, size=x1.shape[2:], mode="bilinear", align_corners=False)
        y = self.dec2(torch.cat([x1, y], dim=1))
        return self.outc(y)


def unet():
    return UNet()


CORPUS = {
    "unet": ([1, 16, 16], "U-Net: skip torch.cat, ConvTranspose2d, F.interpolate(size=x1.shape[2:]), "
                          "a per-pixel output map"),
}
