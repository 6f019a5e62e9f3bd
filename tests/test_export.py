"""Exports: each format is written as one file, loaded back and matches the model, at a new batch size too,
every output tensor of it.

ONNX export takes seconds per model on 2 shared cores, so each model is exported once per module.
"""
from __future__ import annotations

import collections
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

from conftest import ARCH, make_cnn
from specprune_cli.config import ExportConfig
from specprune_cli.errors import ConfigError, ExportError
from specprune_cli.export import export_model
from specprune_cli.model_io import ModelCall
from specprune_cli.plan import PLAN_FORMAT
from specprune_cli.pruned_file import Architecture

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


def settings(*formats: str, tolerance: float = TOL, opset: int = 18) -> ExportConfig:
    return ExportConfig(formats=formats, opset=opset, onnx_tolerance=tolerance)


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


KEEP_ALL = {"format": PLAN_FORMAT, "units": []}  # a plan that prunes nothing: the architecture as it is


def test_pt_is_a_format_like_the_others(tmp_path):
    model = make_cnn()
    result = export_model(model, torch.zeros(1, 3, 8, 8), tmp_path, settings("pt"), plan=KEEP_ALL,
                          source=Architecture(ARCH, {}, (3, 8, 8)))
    assert result["pt"]["verified"] is True and result["pt"]["max_abs_diff"] == 0.0
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_pt_without_arch_is_written_but_not_claimed_verified(tmp_path):
    result = export_model(make_cnn(), torch.zeros(1, 3, 8, 8), tmp_path, settings("pt"), plan=KEEP_ALL,
                          source=Architecture(None, {}, (3, 8, 8)))
    assert result["pt"]["verified"] is False and result["pt"]["max_abs_diff"] is None
    assert result["pt"]["note"].startswith("model.arch is not set")


def test_a_mismatched_load_raises_and_leaves_no_file(tmp_path, monkeypatch):
    import specprune_cli.export_formats as export_formats

    model = make_cnn()
    other = make_cnn(seed=1)  # what a broken loader would give back: other weights, same architecture
    monkeypatch.setattr(export_formats, "load_pruned", lambda path: other)
    with pytest.raises(ExportError, match=r"pt export does not match the in-memory model at batch size 2 "
                                          r"\(output "
                                          r"output\): max abs difference [0-9.e+-]+ > 0\.0001 \* max\(1, "):
        export_model(model, torch.zeros(1, 3, 8, 8), tmp_path, settings("pt"), plan=KEEP_ALL,
                     source=Architecture(ARCH, {}, (3, 8, 8)))
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


def test_unwritable_format_and_pt_without_plan_are_config_errors(mlp, tmp_path):
    with pytest.raises(ConfigError) as exc:
        export_model(mlp, torch.zeros(1, 12), tmp_path, SimpleNamespace(formats=["tflite"]))
    assert str(exc.value) == ("export format(s) ['tflite'] cannot be written by this version; supported: "
                              "pt, onnx, onnx-int8, torchscript, module")
    with pytest.raises(ConfigError) as exc:
        export_model(mlp, torch.zeros(1, 12), tmp_path, settings("pt"))
    assert str(exc.value) == ("export format 'pt' needs the plan and the architecture: pass plan= and "
                              "source= to "
                              "export_model")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError) as exc:
        export_model(mlp, torch.zeros(1, 12), tmp_path, settings("onnx", "onnx-int8"))
    assert str(exc.value) == ("export format onnx-int8 needs calibration data: pass calibration= to "
                              "export_model")
    assert list(tmp_path.iterdir()) == []


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


Pair = collections.namedtuple("Pair", ["logits", "embedding"])


class TwoHeads(nn.Module):
    """A trunk with two heads; the output's structure is chosen at construction; ``scale`` is a
    non-tensor forward argument."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.trunk = nn.Sequential(nn.Linear(12, 16), nn.ReLU())
        self.cls, self.emb = nn.Linear(16, 4), nn.Linear(16, 6)

    def forward(self, x: torch.Tensor, scale: float = 1.0):
        h = self.trunk(x)
        logits, emb = self.cls(h) * scale, self.emb(h)
        if self.kind == "tuple":
            return logits, emb
        if self.kind == "dict":
            return {"logits": logits, "aux": {"embedding": emb}}
        return Pair(logits, emb)


@pytest.mark.parametrize("kind, names", [("tuple", ["output_0", "output_1"]),
                                         ("dict", ["logits", "aux.embedding"]),
                                         ("namedtuple", ["logits", "embedding"])])
def test_structured_outputs_export_with_named_outputs_each_compared(kind, names, tmp_path):
    model = trained_looking(TwoHeads(kind), (12,))
    call = ModelCall(forward_kwargs={"scale": 3.0})
    result = export_model(model, torch.zeros(1, 12), tmp_path, settings("onnx", "torchscript"), call=call)
    assert result["onnx"]["outputs"] == result["torchscript"]["outputs"] == names
    traced = torch.jit.load(result["torchscript"]["path"])
    assert isinstance(traced(torch.zeros(2, 12)), tuple)  # TorchScript gets the tensors as a flat tuple
    session = ort.InferenceSession(result["onnx"]["path"], providers=["CPUExecutionProvider"])
    x = torch.randn(5, 12)
    got = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        want = [model(x, scale=3.0)[0] if kind != "dict" else model(x, scale=3.0)["logits"]]
    np.testing.assert_allclose(got[0], want[0].numpy(), atol=1e-4)  # scale=3 reached the exported graph
    assert got[1].shape == (5, 6)


def test_one_wrong_output_tensor_among_several_is_caught(tmp_path, monkeypatch):
    import specprune_cli.export_formats as export_formats

    model = trained_looking(TwoHeads("dict"), (12,))

    def broken(path):  # the loaded model gets the embedding wrong, the logits right
        loaded = copy.deepcopy(model)
        with torch.no_grad():
            loaded.emb.bias.add_(1.0)
        return loaded

    monkeypatch.setattr(export_formats, "load_pruned", broken)
    with pytest.raises(ExportError, match=r"\(output aux\.embedding\): max abs difference 1 > "):
        export_model(model, torch.zeros(1, 12), tmp_path, settings("pt"), plan=KEEP_ALL,
                     source=Architecture("unused:unused", {}, (12,)))


def test_an_opset_the_exporter_replaces_is_stated(tmp_path):
    # torch's dynamo exporter writes opset 18 for this model when asked for 13 (it cannot convert down).
    result = export_model(trained_looking(TwoHeads("dict"), (12,)), torch.zeros(1, 12), tmp_path,
                          settings("onnx", opset=13))
    info = result["onnx"]
    assert info["opset"] != 13
    assert info["note"] == (f"export.opset 13 was not honoured: the exporter wrote opset {info['opset']} "
                            f"(it could "
                            "not convert this model); the file was verified as written")
    assert "note" not in export_model(trained_looking(TwoHeads("dict"), (12,)), torch.zeros(1, 12),
                                      tmp_path / "b", settings("onnx", opset=18))["onnx"]


def test_a_model_reading_token_ids_is_pruned_and_exported_with_integer_check_inputs(tmp_path):
    """Exports are checked on random inputs at two batch sizes: for integer inputs (token ids) they are
    drawn from the example's own range, not as normal floats (which raised inside torch)."""
    from specprune_cli.prune import prune_model
    from helpers import prune_cfg
    from models_io import TextCNN

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 100, (4, 12), generator=g) for _ in range(2)]
    result = prune_model(TextCNN().eval(), batches, example_input=batches[0][:1], cfg=prune_cfg(),
                         progress=False)
    assert [u["type"] for u in result.plan["units"]] == ["concat", "concat"]
    info = export_model(result.model, batches[0][:2], tmp_path, ExportConfig(formats=("onnx", "torchscript")))
    assert info["onnx"]["verified"] and info["torchscript"]["verified"]


def _conv_net(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4)).eval().to(dtype)


def test_a_half_precision_model_is_fed_in_its_own_type_through_int8(tmp_path):
    """ONNX Runtime gets each input in the type the file declares (quantize.ort_feed): a float16 model's
    calibration and checks were cast to float32, which its int8 quantization refused."""
    x = torch.randn(8, 3, 8, 8, dtype=torch.float16)
    info = export_model(_conv_net(torch.float16), x[:2], tmp_path,
                        ExportConfig(formats=("onnx", "onnx-int8")), calibration=[x])
    assert info["onnx"]["verified"] and info["onnx-int8"]["verified"]


def test_a_double_precision_model_onnx_runtime_cannot_run_is_an_export_error(tmp_path):
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(ExportError) as err:
        export_model(_conv_net(torch.float64), x, tmp_path, ExportConfig(formats=("onnx",)))
    assert str(err.value).startswith("ONNX Runtime cannot load the exported file (NotImplemented: ")
    assert str(err.value).endswith("ONNX Runtime has no float64 kernel for some operators (the one named): "
                                   "cast the model with model.float() and give float32 inputs")
    assert list(tmp_path.iterdir()) == []
