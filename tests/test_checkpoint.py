"""Checkpoint loading (weights_only by default), mismatch messages, and every way a file or a model's
code can fail to load: each a clear error, never a traceback."""
from __future__ import annotations

import os
import random

import pytest
import torch
from torch import nn

from conftest import ARCH, TESTS, make_cnn
from models_small import SmallMLP
from specprune_cli.checkpoint import build_model, load_checkpoint
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
    # a LightningModule holding the network as self.net, saved by its Trainer
    lambda sd: {"state_dict": {"net." + k: v for k, v in sd.items()}, "epoch": 3, "global_step": 90},
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


class Tied(nn.Module):
    """An embedding and an output layer sharing one weight (safetensors' save_model stores it once)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.out = nn.Linear(4, 7, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, x):
        return self.out(self.embed(x))


def test_safetensors_checkpoints_load(tmp_path):
    from safetensors.torch import save_file, save_model

    ref = make_cnn()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    model = load_checkpoint(path, arch=ARCH, kwargs={})
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(x), ref(x))
    # tied weights stored once; the name does not matter, the content does
    torch.manual_seed(0)
    tied = Tied()
    save_model(tied, str(tmp_path / "tied.bin"))
    loaded = load_checkpoint(tmp_path / "tied.bin", arch=f"{__file__}:Tied")
    tokens = torch.tensor([[0, 3, 6]])
    torch.testing.assert_close(loaded(tokens), tied(tokens))
    assert loaded.out.weight is loaded.embed.weight


def test_a_damaged_safetensors_file_is_a_clean_error(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in make_cnn().state_dict().items()}, path)
    path.write_bytes(path.read_bytes()[:-100])  # truncated download
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, arch=ARCH)
    assert str(exc.value).startswith(f"cannot read checkpoint {path} as a safetensors file (")
    assert str(exc.value).endswith("it is damaged or truncated: save or download it again")
    assert exc.value.exit_code == 1


def test_the_weights_are_found_under_any_single_key_or_the_one_named(tmp_path):
    ref = make_cnn()
    other = make_cnn(seed=3)
    x = torch.randn(2, 3, 8, 8)
    single = tmp_path / "single.pt"  # an unusual key, the only state_dict in the dict
    torch.save({"epoch": 9, "optimizer": {"lr": 0.1}, "student_weights": ref.state_dict()}, single)
    torch.testing.assert_close(load_checkpoint(single, arch=ARCH)(x), ref(x))
    two = tmp_path / "two.pt"  # a known key wins over another set; the other is reached by name, nested too
    torch.save({"model": ref.state_dict(), "extra": {"ema": other.state_dict()}}, two)
    torch.testing.assert_close(load_checkpoint(two, arch=ARCH)(x), ref(x))
    torch.testing.assert_close(load_checkpoint(two, arch=ARCH, key="extra.ema")(x), other(x))
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(two, arch=ARCH, key="extra.emma")
    assert str(exc.value) == (f"checkpoint {two} has no key 'extra.emma' (model.checkpoint_key); its keys "
                              "there: ema")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(two, arch=ARCH, key="extra")
    assert "holds a dict under 'extra', not a state_dict" in str(exc.value)
    ambiguous = tmp_path / "ambiguous.pt"
    torch.save({"student": ref.state_dict(), "teacher": other.state_dict()}, ambiguous)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(ambiguous, arch=ARCH)
    assert str(exc.value) == (f"checkpoint {ambiguous} holds 2 sets of weights (student, teacher); set "
                              "model.checkpoint_key to the one to prune")
    torch.testing.assert_close(load_checkpoint(ambiguous, arch=ARCH, key="teacher")(x), other(x))


def test_a_torchscript_archive_is_read_for_its_weights_only_when_trusted(tmp_path):
    ref = make_cnn()
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(ref), str(path))
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, arch=ARCH)
    assert str(exc.value).startswith(f"checkpoint {path} is a TorchScript archive (torch.jit.save)")
    assert str(exc.value).endswith("pass --trust-checkpoint to read its weights out for model.arch")
    model = load_checkpoint(path, arch=ARCH, trust=True)
    assert type(model).__name__ == "SmallCNN"  # the Python model, with the archive's weights
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(x), ref(x))


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


@pytest.mark.parametrize("content", [
    os.urandom(4096),                                   # the case: fresh random bytes each run
    random.Random(2).randbytes(4096),                   # and fixed ones (IndexError in torch.load before)
    random.Random(1).randbytes(37),
    b"PK\x03\x04" + random.Random(2).randbytes(200),  # looks like a zip, is not one
    b"\x80\x02",                                       # a pickle that stops after its first opcode
], ids=["urandom", "random-4k", "random-37", "zip-magic", "truncated-pickle"])
def test_any_unreadable_checkpoint_is_a_clean_error(tmp_path, content):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(bad, arch=ARCH)
    assert str(exc.value).startswith(f"cannot read checkpoint {bad} (")
    assert exc.value.exit_code == 1


def test_empty_checkpoint_file(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(empty, arch=ARCH)
    assert str(exc.value) == (f"checkpoint {empty} is empty (0 bytes); the file was not written completely: "
                              "save it again with torch.save(model.state_dict(), path)")


@pytest.mark.parametrize("obj, found", [
    (torch.zeros(3, 4), "a single tensor of shape (3, 4)"),
    ([torch.zeros(2)], "a list"),
    (None, "a NoneType"),
    ({}, "an empty dict"),
    ({"weight": torch.zeros(2), "epoch": 3}, "a dict with keys weight, epoch"),
])
def test_checkpoints_that_hold_something_else(tmp_path, obj, found):
    path = tmp_path / "c.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, arch=ARCH)
    assert str(exc.value) == (f"checkpoint {path} holds {found}, not a state_dict; save model.state_dict(), "
                              f"or "
                              "a dict with it under 'state_dict' or 'model'")


def _model_file(tmp_path, body: str):
    path = tmp_path / "net.py"
    path.write_text("import sys\nimport torch\n" + body)
    return f"{path}:Net"


@pytest.mark.parametrize("body, where, what", [
    ("sys.exit(3)\n", "could not be imported", "SystemExit: 3"),
    ("raise SystemExit\n", "could not be imported", "SystemExit"),
    ("class Boom(BaseException):\n    pass\nraise Boom('at import')\n", "could not be imported",
     "Boom: at import"),
    ("def Net():\n    sys.exit('no GPU')\n", "failed to build with model.kwargs {}", "SystemExit: no GPU"),
    ("def Net():\n    return 3\n", None, None),
])
def test_model_code_that_exits_or_raises_at_import_or_build(tmp_path, body, where, what):
    arch = _model_file(tmp_path, body)
    with pytest.raises(ConfigError) as exc:
        build_model(arch, {})
    if where is None:
        assert str(exc.value) == f"model.arch {arch!r} returned int, not a torch.nn.Module"
    else:
        assert str(exc.value).startswith(f"model.arch {arch!r} {where} ({what})")


def test_keyboard_interrupt_in_model_code_still_interrupts(tmp_path):
    arch = _model_file(tmp_path, "raise KeyboardInterrupt\n")
    with pytest.raises(KeyboardInterrupt):
        build_model(arch, {})


def test_a_trusted_pickle_that_exits_while_loading(tmp_path):
    class Exits:
        def __reduce__(self):
            return (exit, (4,))

    path = tmp_path / "exits.pt"
    torch.save({"model": Exits()}, path)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, arch=None, trust=True)
    assert str(exc.value).startswith(f"cannot read checkpoint {path} (SystemExit: 4)")


def test_a_wrapper_prefix_is_kept_when_dropping_it_would_not_match_exactly(tmp_path):
    """Keys under one wrapper attribute with an extra module (a loss with weights) are not guessed at:
    the mismatch is reported key by key."""
    state = {"net." + k: v for k, v in make_cnn().state_dict().items()}
    state["net.extra.weight"] = torch.zeros(2)
    torch.save({"state_dict": state}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="unexpected key"):
        load_checkpoint(tmp_path / "c.pt", arch=ARCH, kwargs={})
