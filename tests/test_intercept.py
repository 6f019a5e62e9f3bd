"""The intercept (docs/method.md §4, §6): a constant channel in the fit, absorbed by the consumer's bias
or by the running mean of the BatchNorm that reads the consumer."""
from __future__ import annotations

import torch
from torch import nn

from specprune_cli.prune import prune_model
from helpers import prune_cfg, warm_batchnorm


class Net(nn.Module):
    """conv1 -> relu -> conv2 (a 1x1 consumer, with or without bias) -> bn -> relu -> pool -> fc."""

    def __init__(self, bias: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 16, 1, bias=bias)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv2(torch.relu(self.conv1(x)))))
        return self.fc(x.mean((2, 3)))


def _pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    plain = warm_batchnorm(Net(bias=False), (3, 8, 8))
    biased = Net(bias=True)
    state = dict(plain.state_dict(), **{"conv2.bias": torch.zeros(16)})
    biased.load_state_dict(state)
    return plain, biased.eval()


def _prune(model: nn.Module, data: torch.Tensor, intercept: bool):
    cfg = prune_cfg(allocation="ratio", ratio=0.25, overrides={"conv2": 1.0}, intercept=intercept,
                    round_to=1, min_channels=1, max_positions=None)
    return prune_model(model, [data], example_input=data[:1], cfg=cfg, progress=False)


def test_batchnorm_after_the_consumer_absorbs_the_intercept_exactly():
    plain, biased = _pair()
    data = torch.randn(64, 3, 8, 8)
    a, b = _prune(plain, data, True), _prune(biased, data, True)
    assert a.report["units_with_intercept"] == 1 and b.report["units_with_intercept"] == 1
    assert a.plan["units"] == b.plan["units"]
    # The BatchNorm's running mean moved by the shift the biased twin put in its conv2 bias.
    shift = b.model.conv2.bias.detach()
    assert shift.abs().max() > 1e-3
    assert torch.allclose(a.model.bn.running_mean, plain.bn.running_mean - shift, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(a.model(data), b.model(data), atol=1e-5)


def test_the_intercept_lowers_the_consumers_error_on_a_signal_with_a_mean():
    _, biased = _pair()
    data = torch.randn(64, 3, 8, 8) + 1.0

    def consumer_output(model: nn.Module) -> torch.Tensor:  # what the output-aware fit aims at
        return model.conv2(torch.relu(model.conv1(data)))

    with torch.no_grad():
        reference = consumer_output(biased)
        errors = {}
        for flag in (False, True):
            cfg = prune_cfg(allocation="ratio", ratio=0.25, overrides={"conv2": 1.0}, intercept=flag,
                            theta=1.0, round_to=1, min_channels=1, max_positions=None)
            pruned = prune_model(biased, [data], example_input=data[:1], cfg=cfg, progress=False).model
            errors[flag] = float((consumer_output(pruned) - reference).norm() / reference.norm())
    assert errors[True] < errors[False], errors  # measured when written: 0.419 against 0.442


def test_a_consumer_without_a_place_for_the_bias_fits_none():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4, bias=False)).eval()
    data = torch.randn(128, 8)
    result = prune_model(model, [data], example_input=data[:1], progress=False,
                         cfg=prune_cfg(allocation="ratio", ratio=0.5, intercept=True, round_to=1,
                                       min_channels=1))
    assert result.report["units_with_intercept"] == 0
    assert result.model[2].bias is None
