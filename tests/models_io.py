"""Models with the inputs and outputs people write: several outputs, flags, 1-D and 2-D samples.

Built as "tests/models_io.py:<Name>" by the end-to-end tests.
"""
from __future__ import annotations

import collections
import dataclasses
import functools

import torch
from torch import nn

Heads = collections.namedtuple("Heads", ["logits", "embedding"])


@dataclasses.dataclass
class HeadsOutput:
    """A model output class, as Hugging Face's (not registered with pytree here)."""
    logits: torch.Tensor
    embedding: torch.Tensor


class MultiHead(nn.Module):
    """conv-BN-ReLU trunk on (3, 8, 8) images, a classifier and an embedding head; ``kind`` picks the
    output structure: tuple, dict (nested), namedtuple or dataclass. ``embed`` is a non-tensor flag with a
    default."""

    def __init__(self, kind: str = "dict", classes: int = 10):
        super().__init__()
        self.kind = kind
        self.trunk = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.cls, self.emb = nn.Linear(16, classes), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor, embed: bool = True):
        h = self.trunk(x)
        logits, emb = self.cls(h), (self.emb(h) if embed else h[:, :8])
        if self.kind == "tuple":
            return logits, emb
        if self.kind == "namedtuple":
            return Heads(logits, emb)
        if self.kind == "dataclass":
            return HeadsOutput(logits, emb)
        return {"aux": {"embedding": emb}, "logits": logits}


class Sequence1d(nn.Module):
    """(40, 100) samples (40 MFCCs x 100 frames): Conv1d-BN-ReLU, global pooling, a Linear head."""

    def __init__(self, classes: int = 12):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv1d(40, 32, 3, padding=1), nn.BatchNorm1d(32), nn.ReLU())
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(-1))


class Flat(nn.Module):
    """(64,) samples: a two-hidden-layer MLP."""

    def __init__(self, d_in: int = 64, classes: int = 5):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                                 nn.Linear(32, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TwoInputs(nn.Module):
    """A forward that needs two tensors: out of scope, refused with a message."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * lengths[:, None]


class Chatty(Flat):
    """Prints on every forward call, as debugging code left in a model does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        print("forward called with", tuple(x.shape))
        return super().forward(x)


class ExitsInForward(Flat):
    """Calls sys.exit on a batch larger than one: the shape check passes, the calibration batch does not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1:
            raise SystemExit(5)
        return super().forward(x)


class NaNModel(Flat):
    """Produces NaN on every input: broken before any pruning."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * float("nan")


class ExitsWhenTraining(Flat):
    """Calls sys.exit in training mode only: checks and evaluation pass, fine-tuning does not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise SystemExit("no training here")
        return super().forward(x)


class TextCNN(nn.Module):
    """Token ids in (an Embedding), two convolutions over time concatenated, a class out."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 32)
        self.c3, self.c5 = nn.Conv1d(32, 48, 3, padding=1), nn.Conv1d(32, 48, 5, padding=2)
        self.fc = nn.Linear(96, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.emb(tokens).transpose(1, 2)
        return self.fc(torch.cat([torch.relu(self.c3(e)).amax(-1), torch.relu(self.c5(e)).amax(-1)], 1))


class TutorialLM(nn.Module):
    """The PyTorch tutorial's language model, small: token ids (batch, length) in, sequence-first inside,
    a causal mask sized with ``len(src)`` and passed without ``is_causal``, torch's encoder layers."""

    def __init__(self, tokens: int = 50, width: int = 16):
        super().__init__()
        self.width = width
        self.embedding = nn.Embedding(tokens, width)
        self.register_buffer("position", torch.randn(64, 1, width) * 0.1)
        layer = nn.TransformerEncoderLayer(width, 2, 32, dropout=0.1)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.decoder = nn.Linear(width, tokens)

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        src = self.embedding(src.t()) * self.width ** 0.5
        src = src + self.position[:src.size(0)]
        if src_mask is None:
            src_mask = nn.Transformer.generate_square_subsequent_mask(len(src))
        return self.decoder(self.encoder(src, src_mask))[-1]  # the next token's logits


@dataclasses.dataclass
class EncoderOutput:
    """Hugging Face's way: a model output class registered with pytree."""
    logits: torch.Tensor
    pooled: torch.Tensor


torch.utils._pytree.register_pytree_node(
    EncoderOutput, lambda o: ([o.logits, o.pooled], None), lambda values, _: EncoderOutput(*values))


def returns_output(forward):
    """Hugging Face's ``@can_return_tuple``: ``wrapper(self, *args, **kwargs)`` around the real forward."""
    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        return_dict = kwargs.pop("return_dict", True)
        out = forward(self, *args, **kwargs)
        return out if return_dict else (out.logits, out.pooled)
    return wrapper


class HubEncoder(nn.Module):
    """A text classifier written as Hugging Face writes its encoders: position ids from a buffer sliced
    and expanded to the input's sizes, a decorated forward with optional arguments and ``**kwargs``, a
    pytree-registered output class, a tanh GELU written out (``torch.pow(x, 3.0)``)."""

    def __init__(self, tokens: int = 50, width: int = 16, classes: int = 4):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(tokens, width), nn.Embedding(32, width)
        self.register_buffer("position_ids", torch.arange(32).expand(1, -1), persistent=False)
        self.norm = nn.LayerNorm(width)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.head = nn.Linear(width, classes)

    @staticmethod
    def gelu(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608 * (x + 0.044715 * torch.pow(x, 3.0))))

    @returns_output
    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        batch, length = input_ids.shape
        positions = self.position_ids[:, :length].expand(batch, length)
        h = self.norm(self.tokens(input_ids) + self.positions(positions))
        h = h + self.fc2(self.gelu(self.fc1(h)))
        pooled = h.mean(1)
        return EncoderOutput(self.head(pooled), pooled)
