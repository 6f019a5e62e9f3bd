"""Keep-all is exact, with ONNX parity, on the concatenating and grouped architectures beyond the zoo
(densenet121: concatenations everywhere; regnet_y_400mf: residual streams, grouped convs, SE gates).
resnet18/50, mobilenet_v2 and efficientnet_b0 are covered by tests/test_prune_models.py and
tests/test_export_zoo.py."""
from __future__ import annotations

import pytest
import torch
import torchvision

from specprune_cli.config import ExportConfig
from specprune_cli.export import export_model
from specprune_cli.graph import find_units
from helpers import fold_keep_all, warm_batchnorm


@pytest.mark.parametrize("name", [pytest.param("densenet121", marks=pytest.mark.slow), "regnet_y_400mf"])
def test_keep_all_fold_is_exact_and_exports_with_parity(name, tmp_path):
    torch.manual_seed(0)
    model = warm_batchnorm(torchvision.models.get_model(name, num_classes=10), (3, 32, 32))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x)
    graph = find_units(model, x[:1])
    assert graph.units, f"{name}: no prunable unit found"
    if name == "regnet_y_400mf":
        assert any(u.type == "stream" for u in graph.units)
        assert any("grouped convolution" in s.reason for s in graph.skipped)
    fold_keep_all(model, graph, [x])
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * float(before.abs().max()))
    info = export_model(model, x[:2], tmp_path, ExportConfig(formats=("onnx",)))["onnx"]
    assert info["verified"] and info["max_abs_diff"] <= 1e-4 * max(1.0, float(after.abs().max()))
