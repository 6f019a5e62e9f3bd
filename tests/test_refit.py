"""Kernel-wise least-squares refit of k x k convolutions (docs/method.md §4)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from specprune_cli.prune import prune_model
from specprune_cli.refit import KernelFit, refittable
from helpers import prune_cfg, warm_batchnorm


def _conv() -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(6, 5, 3, stride=2, padding=1).double()


def test_patch_moments_are_those_of_unfold():
    conv = _conv()
    x, xt = torch.randn(4, 6, 9, 9, dtype=torch.float64), torch.randn(4, 6, 9, 9, dtype=torch.float64)
    fit = KernelFit("c", conv, 6, max_positions=None, seed=0)
    fit.max_positions = 10 ** 9  # every position
    fit.update(x, xt)
    u = F.unfold(xt, 3, 1, 1, 2).transpose(1, 2).reshape(-1, 54)
    y = F.conv2d(x, conv.weight, None, 2, 1).flatten(2).transpose(1, 2).reshape(-1, 5)
    assert fit.count == 4 * 25
    # One batch's products are formed in float32 (the refit's cost), then summed in float64.
    sums = fit.sums()
    torch.testing.assert_close(sums["patches"], u.T @ u, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sums["cross"], y.T @ u, rtol=1e-5, atol=1e-4)


def test_products_over_the_kept_channels_equal_those_read_out_of_every_channel(monkeypatch):
    """The held rows' products over the kept channels, the products summed over every channel as the
    rows come (past KEEP_BYTES), and a mix of both, give the same fit."""
    import specprune_cli.refit as refit

    conv = _conv()
    xs = [torch.randn(4, 6, 9, 9, dtype=torch.float64) for _ in range(3)]
    keep = torch.tensor([0, 2, 5])
    solved, held = {}, {}
    # one batch's rows (u: 4 x 8 positions x 54, y: x 5) are 1888 floats
    for name, limit in (("held", 10 ** 9), ("summed", 0), ("mixed", 4 * 1888 + 4)):
        monkeypatch.setattr(refit, "KEEP_BYTES", limit)
        fit = KernelFit("c", conv, 6, max_positions=None, seed=0)
        for x in xs:
            fit.update(x, 0.5 * x + 0.1)
        held[name] = None if fit.rows is None else len(fit.rows)
        solved[name] = fit.solve(keep, 1e-3)
    assert held == {"held": 3, "summed": None, "mixed": None}
    torch.testing.assert_close(solved["held"], solved["summed"], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(solved["mixed"], solved["summed"], rtol=1e-6, atol=1e-8)


def test_keeping_every_channel_gives_the_weight_back():
    conv = _conv()
    x = torch.randn(8, 6, 9, 9, dtype=torch.float64)
    fit = KernelFit("c", conv, 6, max_positions=None, seed=0)
    fit.update(x, x)
    torch.testing.assert_close(fit.solve(torch.arange(6), 1e-12), conv.weight.detach(), rtol=1e-4, atol=1e-4)


def test_only_plain_kxk_convolutions_are_refit():
    assert refittable(nn.Conv2d(8, 8, 3, padding=1), 8)
    assert not refittable(nn.Conv2d(8, 8, 1), 8)  # 1x1: the fold W A is already the least-squares fit
    assert not refittable(nn.Conv2d(8, 8, 3, groups=2), 8)
    assert not refittable(nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), 8)
    assert refittable(nn.Conv2d(256, 8, 3), 256)
    assert not refittable(nn.Conv2d(512, 8, 3), 512)  # patch moments too large


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 24, 3, padding=1)
        self.b = nn.Conv2d(24, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.b(torch.relu(self.a(x))))
        return self.fc(self.bn(x).mean((2, 3)))


def test_the_refit_lowers_the_consumers_error_and_is_reported():
    torch.manual_seed(0)
    model = warm_batchnorm(Net(), (3, 10, 10))
    data = torch.randn(64, 3, 10, 10)
    errors, refits = {}, {}
    with torch.no_grad():
        want = model.b(torch.relu(model.a(data)))
        for flag in (False, True):
            cfg = prune_cfg(allocation="ratio", ratio=0.34, overrides={"b": 1.0}, kernel_refit=flag,
                            round_to=1, min_channels=1)
            result = prune_model(model, [data[:32], data[32:]], example_input=data[:1], cfg=cfg,
                                 progress=False)
            got = result.model.b(torch.relu(result.model.a(data)))
            errors[flag] = float((got - want).norm() / want.norm())
            refits[flag] = result.report["kernel_refits"]
    assert refits == {False: 0, True: 1}
    assert errors[True] < 0.9 * errors[False], errors


def test_a_conv_that_reads_and_writes_the_same_stream_is_refit_on_its_kept_rows():
    """x + bn(conv(x)): the conv is a consumer and a producer of one residual stream, so its output rows
    are cut with the stream before the refit solves for them (this crashed on efficientnet_v2)."""
    from specprune_cli.prune import prune_model
    from helpers import prune_cfg

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.conv, self.bn = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
            self.head = nn.Conv2d(16, 4, 1)

        def forward(self, x):
            x = self.stem(x)
            x = x + self.bn(self.conv(torch.relu(x)))
            return self.head(torch.relu(x)).mean((2, 3))

    torch.manual_seed(0)
    model = Block().eval()
    batches = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    result = prune_model(model, batches, example_input=batches[0][:1],
                         cfg=prune_cfg(allocation="ratio", ratio=0.5, round_to=1, min_channels=1),
                         progress=False)
    (unit,) = result.report["units"]
    assert unit["type"] == "stream" and set(unit["producers"]) == {"stem", "conv"}
    assert result.report["kernel_refits"] == 1
    assert result.model.conv.weight.shape == (8, 8, 3, 3)
    with torch.no_grad():
        assert torch.isfinite(result.model(batches[0])).all()
