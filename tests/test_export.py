"""Exports: each format is written as one file, loaded back and matches the model, at a new batch size too.

ONNX export takes seconds per model on 2 shared cores, so each model is exported once per module.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from models_small import SmallMLP
from torch import nn

from specprune_cli.errors import ConfigError, ExportError
from specprune_cli.export import export_model

TOL = 1e-4


class FlatCNN(nn.Module):
    """conv-BN-ReLU twice, then flatten straight into a Linear (the batch size must stay symbolic)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).view(x.size(0), -1))


def settings(*formats: str, tolerance: float = TOL) -> SimpleNamespace:
    return SimpleNamespace(formats=list(formats), opset=18, onnx_tolerance=tolerance)


def trained_looking(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """Seeded weights, BatchNorm statistics from a few batches, and every Linear re-drawn: torchvision
    zero-initialises the ViT head, and a model whose outputs are all 0 would pass any comparison."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=m.in_features ** -0.5)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, *shape))
    return model.eval()


MODELS = {
    "mlp": (lambda: SmallMLP(d_in=12, hidden=16, classes=4), (12,)),
    "flat_cnn": (FlatCNN, (3, 8, 8)),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 32, 32)),
    # MobileNetV2 with 5 of its 17 inverted-residual blocks: every block kind (expand 1 and 6, stride 1
    # and 2, residual add, depthwise conv, ReLU6) at a third of the full model's ~30 s export time.
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(
        num_classes=10, inverted_residual_setting=[[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 2, 2]]),
        (3, 32, 32)),
    "vit": (lambda: torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10),
        (3, 32, 32)),
}


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request, tmp_path_factory):
    """Each model exported to ONNX once for the whole module."""
    build, shape = MODELS[request.param]
    model = trained_looking(build(), shape)
    out = tmp_path_factory.mktemp(request.param)
    result = export_model(model, torch.zeros(1, *shape), out, settings("onnx"))
    return SimpleNamespace(model=model, shape=shape, out=out, result=result)


def test_onnx_is_one_verified_file_from_the_dynamo_exporter(exported):
    info = exported.result["onnx"]
    assert info["verified"] is True
    assert info["exporter"] == "dynamo"  # torch 2.14's default path works with our arguments
    assert info["batch_sizes"] == [2, 3]
    assert Path(info["path"]) == exported.out / "model.onnx"
    assert info["bytes"] == os.path.getsize(info["path"]) > 0
    assert not list(exported.out.glob("*.data")) and not list(exported.out.glob("*tmp-*"))
    proto = onnx.load(info["path"], load_external_data=False)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch dimension


def test_onnx_runs_at_an_unseen_batch_size_and_matches_torch(exported):
    x = torch.randn(5, *exported.shape, generator=torch.Generator().manual_seed(5))
    session = ort.InferenceSession(exported.result["onnx"]["path"], providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = exported.model(x).numpy()
    assert got.shape == want.shape == (5, want.shape[1])
    assert np.abs(want).max() > 0.1  # a real signal, not all zeros
    assert np.abs(got - want).max() <= TOL * max(1.0, np.abs(want).max())
    assert exported.result["onnx"]["max_abs_diff"] <= TOL * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("name", ["mlp", "flat_cnn"])  # architecture-blind formats: small models suffice
def test_torchscript_and_module_round_trips(name, tmp_path):
    build, shape = MODELS[name]
    model = trained_looking(build(), shape)
    result = export_model(model, torch.zeros(1, *shape), tmp_path, settings("torchscript", "module"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.module.pt", "model.torchscript.pt"]
    assert result["torchscript"]["verified"] is True and result["module"]["pickled"] is True
    x = torch.randn(4, *shape)
    with torch.no_grad():
        want = model(x)
    ts = torch.jit.load(result["torchscript"]["path"])
    module = torch.load(result["module"]["path"], weights_only=False)
    assert type(module) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(ts(x), want, rtol=0, atol=1e-5)
        assert torch.equal(module(x), want)


@pytest.fixture
def mlp() -> nn.Module:
    return trained_looking(SmallMLP(d_in=12, hidden=16, classes=4), (12,))


def state_dict_io(model: nn.Module, load_into: nn.Module):
    def writer(path):
        torch.save(model.state_dict(), path)

    def loader(path):
        load_into.load_state_dict(torch.load(path, weights_only=True))
        return load_into

    return writer, loader


def test_pt_round_trip_uses_the_given_writer_and_loader(mlp, tmp_path):
    writer, loader = state_dict_io(mlp, SmallMLP(d_in=12, hidden=16, classes=4))
    result = export_model(mlp, torch.zeros(1, 12), tmp_path, settings("pt"), pt_writer=writer,
                          pt_loader=loader)
    assert result["pt"]["verified"] is True and result["pt"]["max_abs_diff"] == 0.0
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_a_mismatched_load_raises_and_leaves_no_file(mlp, tmp_path):
    other = copy.deepcopy(mlp)
    with torch.no_grad():
        other.net[-1].bias.add_(0.5)  # the loader "restores" a model that differs by 0.5 in every output
    with pytest.raises(ExportError, match=r"pt export does not match the in-memory model at batch size 2: "
                                          r"max abs difference 0\.5 > 0\.0001 \* max\(1, max\|output\|="):
        export_model(mlp, torch.zeros(1, 12), tmp_path, settings("pt"),
                     pt_writer=lambda p: torch.save({}, p), pt_loader=lambda p: other)
    assert list(tmp_path.iterdir()) == []


def test_legacy_exporter_is_the_fallback_when_dynamo_fails(mlp, tmp_path, monkeypatch):
    real = torch.onnx.export

    def dynamo_broken(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("simulated dynamo failure")
        return real(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_broken)
    result = export_model(mlp, torch.zeros(1, 12), tmp_path, settings("onnx"))
    assert result["onnx"]["exporter"] == "legacy" and result["onnx"]["verified"] is True
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_both_exporters_failing_is_an_export_error(mlp, tmp_path, monkeypatch):
    def broken(*args, dynamo=True, **kwargs):
        raise RuntimeError(f"simulated failure (dynamo={dynamo})")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(ExportError, match=r"ONNX export failed with both exporters\.\ndynamo: RuntimeError: "
                                          r"simulated failure \(dynamo=True\)\nlegacy \(TorchScript\): "
                                          r"RuntimeError: simulated failure \(dynamo=False\)"):
        export_model(mlp, torch.zeros(1, 12), tmp_path, settings("onnx"))
    assert list(tmp_path.iterdir()) == []


def test_unknown_format_and_pt_without_callables_are_config_errors(mlp, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown export format\(s\) \['tflite'\]; supported: pt, onnx, "
                                          r"torchscript, module"):
        export_model(mlp, torch.zeros(1, 12), tmp_path, settings("tflite"))
    with pytest.raises(ConfigError, match="export format 'pt' needs pt_writer and pt_loader"):
        export_model(mlp, torch.zeros(1, 12), tmp_path, settings("pt"))


def test_export_leaves_the_model_in_its_mode(mlp, tmp_path):
    mlp.train()
    export_model(mlp, torch.zeros(1, 12), tmp_path, settings("module"))
    assert mlp.training


def test_a_model_with_a_fixed_batch_size_is_refused_before_writing(tmp_path):
    class FixedBatch(SmallMLP):
        def forward(self, x):
            return super().forward(x.view(2, -1))

    with pytest.raises(ExportError, match=r"the model itself fails on a batch of 3 inputs of shape "
                                          r"\(12,\) \(RuntimeError: .*\); exports are checked at batch "
                                          r"sizes 2 and 3"):
        export_model(FixedBatch(d_in=12, hidden=16, classes=4), torch.zeros(1, 12), tmp_path,
                     settings("module"))
    assert list(tmp_path.iterdir()) == []
