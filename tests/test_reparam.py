"""Weight reparametrisations (weight_norm, spectral_norm, the hook-based weight_norm) are folded into
plain weights on the working copy (docs/method.md §4): the model computes the same function, is
pruned like any other, and its pruned file loads back."""
from __future__ import annotations

import pytest
import torch

from conftest import TESTS
from models_small import NormedConv1dNet
from specprune_cli.graph import find_units
from specprune_cli.prune import prune_model
from specprune_cli.pruned_file import Architecture, load_pruned, save_pruned
from specprune_cli.reparam import working_copy
from helpers import prune_cfg

KINDS = ["weight_norm", "old_weight_norm", "spectral_norm"]


def _model(kind):
    torch.manual_seed(0)
    model = NormedConv1dNet(kind)
    model(torch.randn(8, 4, 20))  # spectral_norm's power iteration settles its vectors in training mode
    return model.eval()


@pytest.mark.parametrize("kind", KINDS)
def test_the_working_copy_computes_the_same_with_plain_weights_and_the_original_is_untouched(kind):
    model = _model(kind)
    x = torch.randn(3, 4, 20)
    with torch.no_grad():
        before = model(x)
    copied, folded = working_copy(model)
    assert folded == ["pre.weight", "mid.weight"]
    assert isinstance(copied.pre.weight, torch.nn.Parameter) and not hasattr(copied.pre, "parametrizations")
    with torch.no_grad():
        torch.testing.assert_close(copied(x), before)
        torch.testing.assert_close(model(x), before)  # the user's model still has its reparametrisation
    assert [u.name for u in find_units(copied, x[:1]).units] == ["pre", "mid"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_weight_normed_model_is_pruned_and_its_file_loads_back(kind, tmp_path):
    model = _model(kind)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, 4, 20, generator=g) for _ in range(2)]
    result = prune_model(model, batches, example_input=batches[0][:1], cfg=prune_cfg(round_to=1),
                         progress=False)
    assert result.report["folded_reparametrizations"] == ["pre.weight", "mid.weight"]
    assert 0.45 <= result.report["flops_after"] / result.report["flops_before"] <= 0.525
    path = tmp_path / "pruned.pt"
    save_pruned(path, result.model, result.plan,
                Architecture(f"{TESTS / 'models_small.py'}:NormedConv1dNet", {"kind": kind}, (4, 20)))
    loaded = load_pruned(path)
    x = torch.randn(3, 4, 20)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result.model(x))


def test_compress_says_which_reparametrisations_it_folded(tmp_path):
    import json

    import yaml
    from click.testing import CliRunner

    from specprune_cli.cli import main

    torch.save(_model("old_weight_norm").state_dict(), tmp_path / "ck.pt")
    config = {"model": {"arch": f"{TESTS / 'models_small.py'}:NormedConv1dNet",
                        "kwargs": {"kind": "old_weight_norm"}, "input_shape": [4, 20]},
              "data": {"calibration": {"format": "synthetic", "num_samples": 64, "batch_size": 32}},
              "prune": {"target": {"flops": 0.5}, "round_to": 1, "min_channels": 1},
              "export": {"formats": ["pt"]}, "evaluate": {"latency": False}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compress", str(tmp_path / "ck.pt"), "-c", str(tmp_path / "cfg.yaml"),
                                       "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert ("folded into plain weights (the same outputs in eval mode): pre.weight, mid.weight"
            in result.output)
    report = json.loads((out / "report.json").read_text())
    assert report["prune"]["folded_reparametrizations"] == ["pre.weight", "mid.weight"]
