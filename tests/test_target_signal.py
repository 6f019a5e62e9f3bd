"""What the sequential order reconstructs (docs/method.md §6), checked against the definition by hand.

A three-layer MLP: unit fc1 (read by fc2), unit fc2 (read by fc3). The second unit's statistics are
computed here directly from the two networks, the original and the one with fc1 already cut, and the
kept channels and the fold the run chose must be the ones the definition gives.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from specprune_cli.models import fashion_cnn
from specprune_cli.prune import prune_model
from specprune_cli.spectral import Signal, greedy_select, reconstruction, select
from helpers import prune_cfg

ROOT = Path(__file__).resolve().parents[1]
RIDGE = 1e-3


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def _moments(x: torch.Tensor, xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, xt = x.double(), xt.double()
    n = x.shape[0]
    return x.T @ x / n, xt.T @ xt / n, x.T @ xt / n


@pytest.mark.parametrize("target", ["original", "pruned"])
def test_second_unit_is_fitted_as_defined(target):
    model = _mlp()
    torch.manual_seed(1)
    data = torch.randn(512, 8)
    cfg = prune_cfg(allocation="ratio", ratio=0.5, theta=0.0, ridge=RIDGE, target_signal=target,
                    max_positions=None, round_to=1, min_channels=1)
    result = prune_model(model, [data[:256], data[256:]], example_input=data[:1], cfg=cfg, progress=False)
    kept = {u["name"]: torch.tensor(u["indices"]) for u in result.plan["units"]}
    assert set(kept) == {"0", "2"}

    with torch.no_grad():
        h1 = torch.relu(model[0](data))
        s1 = (h1.double().T @ h1.double()) / len(data)
        # The first unit: nothing is cut upstream, so both targets give the plain selection of §3.
        j1, a1 = greedy_select(s1, 16, ridge=RIDGE, theta=0.0)
        assert torch.equal(kept["0"], j1)
        x = torch.relu(model[2](h1))  # the original network's signal at fc3
        w2 = (model[2].weight.double() @ a1).float()  # fc2 after the fold of unit fc1
        xt = torch.relu(h1[:, j1] @ w2.T + model[2].bias)  # the pruned network's signal there
    s, st, c = _moments(x, xt)
    if target == "original":
        signal = Signal(st, cross=c, target=s)
    else:
        signal = Signal(st)
    j2 = select(signal, 16, ridge=RIDGE, theta=0.0).keep
    assert torch.equal(kept["2"], j2)
    a2, _ = reconstruction(signal, j2, ridge=RIDGE)
    expected = model[4].weight.double() @ a2
    assert torch.allclose(result.model[4].weight.double(), expected, rtol=1e-4, atol=1e-5)
    if target == "original":  # the cross moment is really used: x~ differs from x
        assert not torch.allclose(c, st, atol=1e-6)


def test_nothing_cut_upstream_gives_the_same_run_for_both_targets():
    model = _mlp()
    torch.manual_seed(2)
    data = torch.randn(256, 8)
    runs = [prune_model(model, [data], example_input=data[:1], progress=False,
                        cfg=prune_cfg(allocation="ratio", ratio=0.5, overrides={"2": 1.0}, target_signal=t,
                                      round_to=1, min_channels=1)) for t in ("original", "pruned")]
    assert runs[0].plan == runs[1].plan
    for p, q in zip(runs[0].model.parameters(), runs[1].model.parameters()):
        assert torch.equal(p, q)


def test_original_target_beats_pruned_target_on_the_trained_example():
    """Measured when written: at 15% FLOPs without fine-tuning (and without the kernel refit, which
    narrows the gap: 91.5% against 89.7% with it), original 93.5%, target pruned 85.0%, target original
    90.9% (the first 1,000 bundled images calibrate, the other 1,000 evaluate)."""
    data = np.load(ROOT / "examples" / "fashion_subset.npz")
    x = (torch.from_numpy(data["x"]).float() / 255.0 - 0.2860) / 0.3530
    y = torch.from_numpy(data["y"])
    model = fashion_cnn()
    model.load_state_dict(torch.load(ROOT / "examples" / "fashion_cnn.pt", weights_only=True))
    model.eval()
    calib = [x[i:i + 100] for i in range(0, 1000, 100)]
    accuracy = {}
    for target in ("original", "pruned"):
        result = prune_model(model, calib, example_input=x[:1], progress=False,
                             cfg=prune_cfg(target={"flops": 0.15}, target_signal=target, kernel_refit=False))
        with torch.no_grad():
            accuracy[target] = float((result.model(x[1000:]).argmax(1) == y[1000:]).float().mean())
    assert accuracy["original"] >= accuracy["pruned"] + 0.03, accuracy
