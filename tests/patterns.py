"""Small models, one per pattern people write, for the capture / layout / layer tests.

Each has a few hundred parameters and takes a short 1-D signal or an 8x8 image. ``PATTERNS`` maps a
name to (factory, input shape without batch).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn


class AudioHead(nn.Module):
    """The published audio model's shape: a flag argument, a (B, C, T, 1) map permuted to time-major
    order and reshaped to a width held in an int attribute (T * C features, channel c at t * C + c)."""

    def __init__(self, t: int = 8, f: int = 6, channels: int = 6, literal: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, channels, (1, f))
        self.flat_dim = t * channels
        self.literal = literal
        self.fc = nn.Linear(t * channels, 5)

    def forward(self, x: torch.Tensor, embed: bool = False) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.bn1(self.conv1(x)))))  # (B, C, T, 1)
        if embed:
            return x.mean((2, 3))
        x = x.permute(0, 2, 1, 3)  # (B, T, C, 1)
        x = x.reshape(-1, 48) if self.literal else x.reshape(-1, self.flat_dim)
        return self.fc(x)


class AudioHeadLiteral(AudioHead):
    def __init__(self):
        super().__init__(literal=True)


class MnistClassic(nn.Module):
    """The PyTorch MNIST example: ``view(-1, 320)`` with the width written as a literal."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.conv2 = nn.Conv2d(4, 5, 3)
        self.fc1 = nn.Linear(80, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 1))
        x = F.relu(self.conv2(x))
        x = x.view(-1, 80)
        return self.fc2(F.relu(self.fc1(x)))


class KeywordSpotter(nn.Module):
    """Conv1d on raw audio with BatchNorm1d, MaxPool1d, AdaptiveAvgPool1d and a shape branch."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(1, 8, 5, padding=2)
        self.bn1 = nn.BatchNorm1d(8)
        self.pool = nn.MaxPool1d(2)
        self.conv2 = nn.Conv1d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm1d(8)
        self.gap = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.gap(F.relu(self.bn2(self.conv2(x))))
        return self.fc(x.squeeze(-1))


class Volumetric(nn.Module):
    """Conv3d, BatchNorm3d, MaxPool3d, AdaptiveAvgPool3d, flatten."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv3d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm3d(4)
        self.pool = nn.MaxPool3d(2)
        self.conv2 = nn.Conv3d(4, 6, 3, padding=1)
        self.gap = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.gap(F.relu(self.conv2(x))), 1))


class Decoder(nn.Module):
    """ConvTranspose2d as consumer and producer, BatchNorm placed after the activation, interpolate."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))
        x = self.bn(F.relu(self.up(x)))  # BatchNorm after the activation
        x = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
        return self.head(x)


class TabularBnAfterRelu(nn.Module):
    """Linear -> ReLU -> BatchNorm1d -> Linear."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.BatchNorm1d(16), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class InstanceNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.norm = nn.InstanceNorm2d(6, affine=True)
        self.conv2 = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.norm(self.conv1(x))))


class FunctionalConv(nn.Module):
    """A layer written as F.conv2d with an nn.Parameter: not a module specprune can slice."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(4, 6, 1, 1) * 0.3)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.conv2d(F.relu(self.conv(x)), self.weight))


class Padded(nn.Module):
    """F.pad, nn.ZeroPad2d and nn.ConstantPad2d along the spatial dimensions, slicing x[..., 1:-1],
    `x * scalar + scalar`, Upsample, softmax over space."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3)
        self.pad = nn.ZeroPad2d(1)
        self.b = nn.Conv2d(6, 6, 3)
        self.cpad = nn.ConstantPad2d((1, 1, 0, 0), 0.5)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.c = nn.Conv2d(6, 6, 3)
        self.d = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.a(F.pad(x, (1, 1, 1, 1))))
        x = self.b(self.pad(x)) * 0.5 + 1.0
        x = self.up(self.cpad(F.relu(x)))[..., 1:-1, :]
        x = F.relu(self.c(x))
        x = torch.softmax(x.flatten(2), dim=-1).view_as(x)
        return self.d(x)


class ChannelsLast(nn.Module):
    """Pointwise Linear layers on a channels-last tensor (ConvNeXt style), back to a conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x).permute(0, 2, 3, 1)
        x = self.fc2(F.gelu(self.fc1(x)))
        return self.head(x.permute(0, 3, 1, 2))


class SequenceToConv(nn.Module):
    """A Linear on (B, T, F) whose output is transposed to (B, C, T) for a Conv1d; unsqueeze/squeeze
    around a Conv2d; mean over time with torch.mean(x, dim=...)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(5, 8)
        self.conv = nn.Conv1d(8, 6, 3, padding=1)
        self.conv2d = nn.Conv2d(6, 6, (1, 3), padding=(0, 1))
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, F)
        x = F.relu(self.proj(x)).transpose(1, 2)
        x = F.relu(self.conv(x)).unsqueeze(2)  # (B, C, 1, T)
        x = torch.squeeze(F.relu(self.conv2d(x)), 2)
        return self.fc(torch.mean(x, dim=-1))


class ChannelSplit(nn.Module):
    """Chunks along time are fine; ``x[:, :4]`` and a GLU split the channels and are not."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(2, 8, 3, padding=1)
        self.b = nn.Conv1d(8, 8, 3, padding=1)
        self.d = nn.Conv1d(4, 8, 1)
        self.c = nn.Conv1d(8, 8, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.a(x))
        first, second = x.chunk(2, dim=2)  # along time: each half carries every channel
        x = F.relu(self.b(first + second))
        x = F.relu(self.d(x[:, :4]))  # a slice of the channels
        x = F.glu(self.c(x), dim=1)  # a split of the channels
        return self.fc(x.mean(-1))


class LayerScale(nn.Module):
    """A per-channel parameter multiplies the channels (``x * self.gamma``); an nn.Unflatten sizes them."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, 6).view(6, 1, 1))
        self.flat = nn.Flatten(1)
        self.unflat = nn.Unflatten(1, (6, 64))
        self.head = nn.Conv1d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x)) * self.gamma
        return self.head(self.unflat(self.flat(x)))


class ReadsChannelCount(nn.Module):
    """Python branches on the channel count: the pruned model could take the other path."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))
        x = x * 2.0 if x.shape[1] > 2 else x * 0.5
        return self.head(x)


class DynamicFlatten(nn.Module):
    """Widths computed from the tensor's shape follow a pruned width."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))
        b, c, h, w = x.shape
        x = x.permute(0, 2, 3, 1).reshape(b, h * w * c)  # interleaved: channel c at p * C + c
        return self.fc(x)


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm subclass whose own forward adds an activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                         0.1, self.eps)
        return F.silu(x)


class BatchNormMixing(nn.BatchNorm2d):
    """A BatchNorm subclass whose own forward mixes the channels: it must not be sliced."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + x.mean(1, keepdim=True)


class LayerNorm2d(nn.LayerNorm):
    """timm's and torchvision's LayerNorm2d: nn.LayerNorm over dim 1 of an NCHW map, by permuting."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class NormSubclasses(nn.Module):
    """Norm layers subclassed with a forward of their own, and a head that is handed a parameter's view
    (CaiT's ``blk(x, self.cls_token.expand(...))``)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.bn_act = BatchNormAct(6)
        self.b = nn.Conv2d(6, 6, 3, padding=1)
        self.ln = LayerNorm2d(6)
        self.c = nn.Conv2d(6, 6, 1)
        self.bn_mix = BatchNormMixing(6)
        self.head = TokenHead(6)
        self.token = nn.Parameter(torch.randn(1, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b(self.bn_act(self.a(x)))
        x = self.bn_mix(self.c(self.ln(x)))
        return self.head(x.mean((2, 3)), self.token.expand(x.shape[0], -1))


class TokenHead(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        return self.fc(x + token)


class CastLinear(nn.Linear):
    """timm's Linear: its own forward only casts the weight, so it computes nn.Linear's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias)


class PadsItself(nn.Conv2d):
    """timm's Conv2dSame: pads in its own forward, so it does not compute nn.Conv2d's (padding=0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride)


class LayerSubclasses(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = PadsItself(6, 6, 3)
        self.fc1, self.fc2 = CastLinear(6, 8), CastLinear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b(F.relu(self.a(x)))).mean((2, 3))
        return self.fc2(F.relu(self.fc1(x)))


class Scale(nn.Module):
    """timm's LayerScale2d: a per-channel parameter in a module of its own (read by get_attr)."""

    def __init__(self, width: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, width).view(width, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class ScaledResidual(nn.Module):
    """SwiftFormer's blocks: x + scale(conv(f(x))) twice. The stream is cut first, and the layer-scale
    products are computed again after that cut, so they must read the sliced parameters."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.b, self.ls1 = nn.Conv2d(8, 12, 1), nn.Conv2d(12, 8, 1), Scale(8)
        self.c, self.d, self.ls2 = nn.Conv2d(8, 12, 3, padding=1), nn.Conv2d(12, 8, 1), Scale(8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.ls1(self.b(F.relu(self.a(x))))
        x = x + self.ls2(self.d(F.relu(self.c(x))))
        return self.head(x)


class TorchTransformer(nn.Module):
    """nn.TransformerEncoder as people write it, with a mask argument: specprune traces into torch's
    transformer layers and prunes their feed-forward Linears (attention and LayerNorm keep the model
    width whole)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.enc(self.proj(x), src_key_padding_mask=mask).mean(1))


class TorchEncoderDecoder(nn.Module):
    """nn.Transformer, pre-norm with GELU: the encoder's and the decoder's feed-forward Linears."""

    def __init__(self):
        super().__init__()
        with warnings.catch_warnings():  # "enable_nested_tensor is True, but ... norm_first was True"
            warnings.simplefilter("ignore", UserWarning)
            self.t = nn.Transformer(16, 2, 1, 1, 32, dropout=0.0, activation="gelu", batch_first=True,
                                    norm_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.t(x, x[:, :3]))


class CRNN(nn.Module):
    """Text or speech recognition: conv features, each column a time step (channels x height as its
    features, channel c at c * H + h), read by a bidirectional GRU."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.rnn = nn.GRU(6 * 4, 8, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = F.max_pool2d(F.relu(self.bn(self.conv(x))), (2, 1))  # (B, C, H, W)
        b, c, h, w = f.shape
        out, _ = self.rnn(f.permute(0, 3, 1, 2).reshape(b, w, c * h))
        return self.fc(out[:, -1])


class ConvLSTM(nn.Module):
    """Keyword spotting: a Conv1d front end, then a two-layer LSTM in time-major order."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(8, 12, 3, padding=1)
        self.lstm = nn.LSTM(12, 10, num_layers=2)
        self.fc = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(F.relu(self.conv(x)).permute(2, 0, 1))  # (T, B, C)
        return self.fc(h[-1])


class ConvBnSiLU(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.bn(self.conv(x)))


class YoloC2f(nn.Module):
    """Ultralytics' YOLOv8 blocks as they are written: C2f iterates over `chunk`'s pieces (`list(...)`,
    then `extend` with a generator) and concatenates them, its bottleneck adds a chunk back; SPPF
    concatenates a tensor with max-pooled copies of itself."""

    def __init__(self):
        super().__init__()
        self.stem = ConvBnSiLU(3, 8, 3)
        self.cv1 = ConvBnSiLU(8, 8)
        self.m = nn.ModuleList([nn.Sequential(ConvBnSiLU(4, 4, 3), ConvBnSiLU(4, 4, 3))])
        self.cv2 = ConvBnSiLU(12, 8)
        self.spp1 = ConvBnSiLU(8, 4)
        self.spp2 = ConvBnSiLU(16, 8)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(self.stem(x)).chunk(2, 1))
        y.extend(y[-1] + m(y[-1]) for m in self.m)
        z = [self.spp1(self.cv2(torch.cat(y, 1)))]
        z.extend(F.max_pool2d(z[-1], 3, 1, 1) for _ in range(3))
        return self.head(self.spp2(torch.cat(z, 1))).flatten(2)


class SwiGLU(nn.Module):
    """Llama's MLP in a pre-norm residual block: down(silu(gate(x)) * up(x)); the gate and the up
    projection lose the same rows, as one unit."""

    def __init__(self):
        super().__init__()
        self.proj, self.norm = nn.Linear(8, 16), nn.LayerNorm(16)
        self.gate, self.up = nn.Linear(16, 24, bias=False), nn.Linear(16, 24)
        self.down, self.head = nn.Linear(24, 16, bias=False), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        n = self.norm(h)
        h = h + self.down(F.silu(self.gate(n)) * self.up(n))
        return self.head(h.mean(1))


class HandWrittenActivations(nn.Module):
    """Activations written out: a leaky ReLU as `torch.where(x > 0, x, 0.1 * x)`, and GPT-2's tanh GELU
    with `torch.pow(x, 3.0)` (whose Scalar overload once made tracing crash the process)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h = self.b(torch.where(h > 0, h, 0.1 * h))
        h = 0.5 * h * (1.0 + torch.tanh(0.7978845608 * (h + 0.044715 * torch.pow(h, 3.0))))
        return self.fc(h.mean((2, 3)))


PATTERNS = {
    "audio_head": (AudioHead, (1, 8, 6)),
    "audio_head_literal": (AudioHeadLiteral, (1, 8, 6)),
    "mnist_classic": (MnistClassic, (1, 8, 8)),
    "keyword_spotter": (KeywordSpotter, (32,)),
    "volumetric": (Volumetric, (1, 4, 8, 8)),
    "decoder": (Decoder, (3, 8, 8)),
    "tabular_bn_after_relu": (TabularBnAfterRelu, (12,)),
    "instance_norm": (InstanceNormNet, (3, 8, 8)),
    "functional_conv": (FunctionalConv, (3, 8, 8)),
    "padded": (Padded, (3, 8, 8)),
    "channels_last": (ChannelsLast, (3, 8, 8)),
    "sequence_to_conv": (SequenceToConv, (6, 5)),
    "channel_split": (ChannelSplit, (2, 8)),
    "layer_scale": (LayerScale, (3, 8, 8)),
    "reads_channel_count": (ReadsChannelCount, (3, 8, 8)),
    "dynamic_flatten": (DynamicFlatten, (3, 8, 8)),
    "norm_subclasses": (NormSubclasses, (3, 8, 8)),
    "layer_subclasses": (LayerSubclasses, (3, 8, 8)),
    "scaled_residual": (ScaledResidual, (3, 8, 8)),
    "torch_transformer": (TorchTransformer, (5, 8)),
    "torch_encoder_decoder": (TorchEncoderDecoder, (5, 16)),
    "crnn": (CRNN, (1, 8, 6)),
    "conv_lstm": (ConvLSTM, (8, 7)),
    "yolo_c2f": (YoloC2f, (3, 8, 8)),
    "swiglu": (SwiGLU, (5, 8)),
    "hand_written_activations": (HandWrittenActivations, (3, 8, 8)),
}


def build(name: str, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """The model in eval mode with BatchNorm statistics warmed on random data."""
    factory, shape = PATTERNS[name]
    torch.manual_seed(seed)
    model = factory()
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, *shape))
    return model.eval(), shape
