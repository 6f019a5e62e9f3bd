"""FLOP counting (flops.py) against counts worked out by hand, attention included.

In eval mode without gradients, nn.MultiheadAttention and nn.TransformerEncoderLayer take a fused fast
path that torch's counter has no formula for, and on the CPU ``scaled_dot_product_attention`` and
nn.LSTM run kernels it has none for either: before flops.py closed these gaps, they counted as free.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from specprune_cli.flops import count_flops, module_flops


def _linear(tokens: int, fan_in: int, fan_out: int) -> int:
    return 2 * tokens * fan_in * fan_out


def _attention(batch_heads: int, queries: int, keys: int, head_dim: int) -> int:
    return 2 * 2 * batch_heads * queries * keys * head_dim  # q k^T, then the weights times v


def test_convolution_and_linear_are_two_flops_per_multiply_add():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).eval()
    assert count_flops(model, torch.randn(2, 3, 8, 8)) == 2 * 2 * 8 * 6 * 6 * 3 * 9 + _linear(2, 288, 5)


@pytest.mark.parametrize("norm_first", [False, True])
def test_a_transformer_layer_in_eval_mode_counts_its_attention(norm_first):
    d, ff, seq, heads = 32, 64, 10, 4
    layer = nn.TransformerEncoderLayer(d, heads, ff, batch_first=True, norm_first=norm_first).eval()
    x = torch.randn(3, seq, d)
    want = (_linear(3 * seq, d, 3 * d) + _linear(3 * seq, d, d) + _attention(3 * heads, seq, seq, d // heads)
            + _linear(3 * seq, d, ff) + _linear(3 * seq, ff, d))
    assert count_flops(layer, x) == want
    assert count_flops(layer.train(), x) == want  # the plain path, as training runs it
    assert torch.backends.mha.get_fastpath_enabled()  # the user's setting is back


def test_multihead_attention_and_its_projections_are_attributed_to_it():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.out = nn.Linear(16, 4)

        def forward(self, x):
            return self.out(self.attn(x, x, x, need_weights=False)[0])

    x = torch.randn(2, 5, 16)
    flops = module_flops(Block().eval(), x)
    assert flops["attn"] == _linear(10, 16, 48) + _linear(10, 16, 16) + _attention(4, 5, 5, 8)
    assert flops["out"] == _linear(10, 16, 4)


def test_scaled_dot_product_attention_on_the_cpu():
    class Attend(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("memory", torch.randn(2, 3, 11, 8))  # 11 keys and values

        def forward(self, q):
            return F.scaled_dot_product_attention(q, self.memory, self.memory)

    assert count_flops(Attend(), torch.randn(2, 3, 7, 8)) == _attention(6, 7, 11, 8)


@pytest.mark.parametrize("cell,gates", [(nn.LSTM, 4), (nn.GRU, 3), (nn.RNN, 1)])
def test_recurrent_layers_count_their_matrix_products(cell, gates):
    hidden, steps = 16, 10
    rnn = cell(24, hidden, num_layers=2, batch_first=True, bidirectional=True).eval()
    per_direction = [gates * hidden * (24 + hidden), gates * hidden * (2 * hidden + hidden)]  # layer 0, 1
    want = sum(2 * steps * 2 * n for n in per_direction)
    assert count_flops(rnn, torch.randn(1, steps, 24)) == want
    assert torch.backends.mkldnn.enabled  # the user's setting is back
