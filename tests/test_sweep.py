"""Every torchvision classification model is either pruned or reported with reasons; none raises.

Slow (builds ~80 models, some with hundreds of millions of parameters): `make test-slow`, or
`pytest -m slow tests/test_sweep.py -s` to see the tally. One test per model, so that a failure names
the model and does not hide the rest.
"""
from __future__ import annotations

import pytest
import torch
import torchvision

from specprune_cli.prune import prune_model
from helpers import prune_cfg

# Models whose input size is fixed by their architecture (position embeddings, window sizes).
FIXED_224 = ("vit_", "swin_", "maxvit_")
NAMES = torchvision.models.list_models(module=torchvision.models)
TALLY: dict[str, list] = {"pruned": [], "skipped": []}


@pytest.fixture(scope="module", autouse=True)
def print_tally():
    yield
    done = len(TALLY["pruned"]) + len(TALLY["skipped"])
    print(f"\n{done} of {len(NAMES)} torchvision classifiers checked: {len(TALLY['pruned'])} pruned, "
          f"{len(TALLY['skipped'])} reported without units: {TALLY['skipped']}")


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_torchvision_classifier_is_pruned_or_reported(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    size = 224 if name.startswith(FIXED_224) else 64
    if name.startswith("inception"):
        size = 96
    x = torch.randn(2, 3, size, size)
    result = prune_model(model, [x], example_input=x[:1],
                         cfg=prune_cfg(allocation="ratio", ratio=0.5, round_to=1, min_channels=1,
                                       max_positions=4), progress=False)
    if result.report["units"]:
        assert result.report["params_after"] < result.report["params_before"], name
        TALLY["pruned"].append(name)
    else:
        assert result.report["skipped"], f"{name}: no unit and no reason"
        TALLY["skipped"].append((name, result.report["skipped"][0]["reason"]))
