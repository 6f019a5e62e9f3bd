"""Every architecture of the surgery tests, pruned to half its FLOPs, exports to ONNX with parity.

About two minutes on 2 cores in all; vgg11_bn (a minute: 4096-wide Linear units) runs with `make test-slow`.
"""
from __future__ import annotations

import pytest
import torch

from specprune_cli.config import ExportConfig
from specprune_cli.export import export_model
from specprune_cli.prune import prune_model
from helpers import prune_cfg
from zoo import FLOPS_TARGET, ZOO, build


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "vgg11_bn" else n
                                  for n in ZOO])
def test_pruned_model_exports_to_onnx_with_parity(name, tmp_path):
    model, shape = build(name)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, *shape, generator=g) for _ in range(2)]
    pruned = prune_model(model, batches, example_input=batches[0][:1],
                         cfg=prune_cfg(target={"flops": FLOPS_TARGET[name]}, max_positions=16),
                         progress=False).model
    settings = ExportConfig(formats=("onnx",))
    info = export_model(pruned, batches[0][:2], tmp_path, settings)["onnx"]
    assert info["verified"] and info["batch_sizes"] == [2, 3]
    with torch.no_grad():
        scale = float(pruned(batches[0][:2]).abs().max())
    assert info["max_abs_diff"] <= 1e-4 * max(1.0, scale)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
