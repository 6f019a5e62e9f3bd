"""Checkpoint loading (weights_only by default), mismatch messages, and the pruned-model file round trip."""
from __future__ import annotations


import pytest
import torch
from torch import nn

from conftest import ARCH, TESTS, make_cnn
from models_small import SmallMLP
from specprune_cli.checkpoint import PRUNED_FORMAT, build_model, load_checkpoint, load_pruned, save_pruned
from specprune_cli.errors import CheckpointError, ConfigError



def test_build_model_from_module_and_file():
    lin = build_model("torch.nn:Linear", {"in_features": 3, "out_features": 2})
    assert isinstance(lin, nn.Linear) and lin.weight.shape == (2, 3)
    cnn = build_model(f"{TESTS / 'models_small.py'}:small_cnn", {"width": 4})
    assert cnn.head.in_features == 8
    # The same file imported twice yields the same class (one module per file, cached).
    assert type(build_model(ARCH, {})) is type(build_model(ARCH, {}))


def test_build_model_import_failure_message():
    with pytest.raises(ConfigError) as exc:
        build_model("nonexistent_pkg_xyz.models:Net", {})
    assert str(exc.value) == (
        "model.arch 'nonexistent_pkg_xyz.models:Net' could not be imported (ModuleNotFoundError: No module "
        "named 'nonexistent_pkg_xyz'); check that the module is installed (or the file exists, relative to "
        "the working directory) and that it defines the callable after the ':'")
    assert exc.value.exit_code == 2


def test_build_model_bad_kwargs_message():
    with pytest.raises(ConfigError) as exc:
        build_model(ARCH, {"depth": 3})
    assert str(exc.value).startswith(f"model.arch {ARCH!r} failed to build with model.kwargs {{'depth': 3}} "
                                     "(TypeError: ")
    assert str(exc.value).endswith("; check model.kwargs")


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3},
    lambda sd: {"model": {"_orig_mod." + k: v for k, v in sd.items()}},
    lambda sd: {"model_state_dict": {"module._orig_mod." + k: v for k, v in sd.items()}},
])
def test_load_checkpoint_layouts(tmp_path, wrap):
    ref = make_cnn()
    path = tmp_path / "c.pt"
    torch.save(wrap(ref.state_dict()), path)
    model = load_checkpoint(path, arch=ARCH, kwargs={})
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(x), ref(x))
    assert not model.training


def test_key_mismatch_lists_missing_and_unexpected(tmp_path):
    path = tmp_path / "mlp.pt"
    torch.save(SmallMLP().state_dict(), path)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, arch=ARCH, kwargs={})
    assert str(exc.value) == (
        f"checkpoint {path} does not match model.arch {ARCH!r}: 16 missing keys (features.0.weight, "
        "features.0.bias, features.1.weight, features.1.bias, features.1.running_mean, ... (11 more)); "
        "6 unexpected keys (net.0.weight, net.0.bias, net.2.weight, net.2.bias, net.4.weight, ... (1 more)); "
        "check that model.arch and model.kwargs are the ones the checkpoint was trained with")


def test_shape_mismatch_is_listed(tmp_path):
    path = tmp_path / "narrow.pt"
    torch.save(make_cnn(width=8).state_dict(), path)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, arch=ARCH, kwargs={})
    assert str(exc.value) == (
        f"checkpoint {path} does not match model.arch {ARCH!r}: 13 shape mismatches (features.0.weight: file "
        "(8, 3, 3, 3) vs model (16, 3, 3, 3), features.0.bias: file (8,) vs model (16,), features.1.weight: "
        "file (8,) vs model (16,), features.1.bias: file (8,) vs model (16,), features.1.running_mean: file "
        "(8,) vs model (16,), ... (8 more)); check that model.arch and model.kwargs are the ones the "
        "checkpoint was trained with")


def test_pickled_module_needs_trust(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(make_cnn(), path)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, arch=ARCH, kwargs={})
    assert str(exc.value) == (
        f"checkpoint {path} holds pickled Python objects (a whole model, not only tensors), which specprune "
        "will not unpickle by default because unpickling can run arbitrary code. If you trust this file, "
        "pass --trust-checkpoint; better, re-save it with torch.save(model.state_dict(), path).")
    model = load_checkpoint(path, arch=None, trust=True)
    assert isinstance(model, nn.Module) and not model.training


def test_state_dict_without_arch_and_not_a_state_dict(tmp_path, cnn_checkpoint):
    with pytest.raises(ConfigError) as exc:
        load_checkpoint(cnn_checkpoint, arch=None)
    assert str(exc.value).startswith("model.arch is not set; checkpoint")
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "acc": 0.9}, path)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, arch=ARCH)
    assert str(exc.value) == (f"checkpoint {path} holds a dict with keys epoch, acc, not a state_dict; save "
                              "model.state_dict(), or a dict with it under 'state_dict' or 'model'")


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path / "none.pt", arch=ARCH)
    assert str(exc.value) == (f"checkpoint {tmp_path / 'none.pt'} does not exist or is not a file; check the "
                              "path")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(bad, arch=ARCH)
    assert str(exc.value) == (f"cannot read checkpoint {bad} (it does not unpickle as a torch.save file: it "
                              "is damaged or in another format); check the path, or re-save the weights "
                              "with torch.save(model.state_dict(), path)")


def test_save_and_load_pruned_round_trip(tmp_path):
    from specprune_cli.config import PruneConfig
    from specprune_cli.prune import prune_model

    model = make_cnn()
    batches = [torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    cfg = PruneConfig(allocation="ratio", ratio=0.5, round_to=1, min_channels=2, max_positions=16)
    result = prune_model(model, batches, example_input=batches[0][:1], cfg=cfg, progress=False)
    path = tmp_path / "model.pt"
    save_pruned(path, result.model, result.plan, arch=ARCH, kwargs={}, input_shape=[3, 8, 8])
    payload = torch.load(path, weights_only=True)  # only tensors and plain values inside
    assert payload["format"] == PRUNED_FORMAT and payload["input_shape"] == [3, 8, 8]
    loaded = load_pruned(path)
    assert loaded.features[0].out_channels == 8
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(loaded(x), result.model(x))
    assert not list(tmp_path.glob(".*tmp*"))


def test_load_pruned_rejects_other_files(cnn_checkpoint):
    with pytest.raises(CheckpointError) as exc:
        load_pruned(cnn_checkpoint)
    assert str(exc.value) == (f"{cnn_checkpoint} is not a pruned model written by specprune (expected format "
                              f"'{PRUNED_FORMAT}'); to load an original checkpoint use load_checkpoint")
