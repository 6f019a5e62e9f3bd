"""The pruned-model file: a round trip that needs no pickled code, and clear errors for other files."""
from __future__ import annotations

import pytest
import torch

from conftest import ARCH, make_cnn
from specprune_cli.config import PruneConfig
from specprune_cli.errors import CheckpointError
from specprune_cli.prune import prune_model
from specprune_cli.pruned_file import PRUNED_FORMAT, Architecture, load_pruned, save_pruned


@pytest.fixture(scope="module")
def pruned():
    model = make_cnn()
    batches = [torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    cfg = PruneConfig(allocation="ratio", ratio=0.5, round_to=1, min_channels=2, max_positions=16)
    return prune_model(model, batches, example_input=batches[0][:1], cfg=cfg, progress=False)


def test_save_and_load_pruned_round_trip(tmp_path, pruned):
    path = tmp_path / "model.pt"
    save_pruned(path, pruned.model, pruned.plan, Architecture(ARCH, {}, (3, 8, 8)))
    payload = torch.load(path, weights_only=True)  # only tensors and plain values inside
    assert payload["format"] == PRUNED_FORMAT and payload["input_shape"] == [3, 8, 8]
    assert payload["forward_kwargs"] == {}
    loaded = load_pruned(path)
    assert loaded.features[0].out_channels == 8
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(loaded(x), pruned.model(x))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_load_pruned_rejects_other_files(cnn_checkpoint):
    with pytest.raises(CheckpointError) as exc:
        load_pruned(cnn_checkpoint)
    assert str(exc.value) == (f"{cnn_checkpoint} is not a pruned model written by specprune (expected format "
                              f"'{PRUNED_FORMAT}'); to load an original checkpoint use load_checkpoint")


def test_a_file_without_arch_says_why_it_cannot_be_rebuilt(tmp_path, pruned):
    path = tmp_path / "model.pt"
    save_pruned(path, pruned.model, pruned.plan, Architecture(None, {}, (3, 8, 8)))
    with pytest.raises(CheckpointError) as exc:
        load_pruned(path)
    assert str(exc.value) == (f"{path} records no model.arch (the original was a pickled module), so it "
                              f"cannot "
                              "be rebuilt from the plan; export with formats: [module] instead")


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.pop("plan"), "{path} lacks plan; the file is damaged: compress again"),
    (lambda p: p.update(plan={"format": "other"}),
     "the plan has format 'other', expected 'specprune-plan/1'; the file was not written by this version of "
     "specprune"),
    (lambda p: p["plan"]["units"][0].pop("indices"),
     "the plan does not fit the architecture (KeyError: 'indices'); the file is damaged or was written by a "
     "different specprune version"),
    (lambda p: p["plan"]["units"][0].update(name="nowhere"),
     "the plan names units this architecture does not have: ['nowhere']; check model.arch and model.kwargs "
     "match "
     "the model that was pruned"),
])
def test_damaged_payloads(tmp_path, pruned, damage, message):
    path = tmp_path / "model.pt"
    save_pruned(path, pruned.model, pruned.plan, Architecture(ARCH, {}, (3, 8, 8)))
    payload = torch.load(path, weights_only=True)
    damage(payload)
    torch.save(payload, path)
    with pytest.raises(CheckpointError) as exc:
        load_pruned(path)
    assert str(exc.value) == message.format(path=path)
