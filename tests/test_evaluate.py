"""Evaluation: accuracy, agreement and relative error on hand-countable cases, any output structure."""
from __future__ import annotations

import collections
import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from specprune_cli.errors import ConfigError, DataError, ModelError
from specprune_cli.evaluate import evaluate_model
from specprune_cli.model_io import ModelCall


class Ranked(nn.Module):
    """Input (N, 1) holds an integer f; class scores are -((j - f) mod C), so the ranking is
    f, f+1, f+2, ... (mod C): top-1 is f and top-5 is {f, ..., f+4}, with no ties."""

    def __init__(self, classes: int):
        super().__init__()
        self.classes = classes
        self.dummy = nn.Parameter(torch.zeros(()))  # gives the model a device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = x[:, 0].long()
        j = torch.arange(self.classes)
        return -((j[None, :] - f[:, None]) % self.classes).float() + 0 * self.dummy


def ranked_loader(offsets: list[int], classes: int, batch_size: int = 4) -> DataLoader:
    """Sample i has f = i mod C and label f + offset (mod C), or -1 for offset None."""
    f = torch.arange(len(offsets)) % classes
    y = torch.tensor([(int(fi) + o) % classes if o is not None else -1 for fi, o in zip(f, offsets)])
    return DataLoader(TensorDataset(f[:, None].float(), y), batch_size=batch_size)


def test_accuracy_on_a_hand_counted_case():
    # offset 0: top-1 and top-5 hit; 1..4: only top-5; 5+: neither; None: unlabelled, not counted.
    offsets = [0, 0, 0, 1, 4, 5, 9, None, None, 2]
    result = evaluate_model(Ranked(10), Ranked(10), ranked_loader(offsets, 10))
    assert result["samples"] == 10
    assert result["labelled_samples"] == 8
    assert result["top1"] == pytest.approx(3 / 8)
    assert result["top5"] == pytest.approx(6 / 8)  # offsets 0, 0, 0, 1, 4, 2
    assert result["reference_top1"] == pytest.approx(3 / 8)
    assert result["agreement"] == 1.0
    assert result["relative_error"] == 0.0


def test_top5_is_none_with_fewer_than_five_classes():
    result = evaluate_model(Ranked(4), Ranked(4), ranked_loader([0, 1, 3, 0], 4))
    assert result["top1"] == pytest.approx(2 / 4)
    assert result["top5"] is None and result["reference_top5"] is None


def test_no_labels_gives_no_accuracy_but_still_agreement():
    result = evaluate_model(Ranked(10), Ranked(10), ranked_loader([None] * 6, 10))
    assert result["top1"] is None and result["top5"] is None and result["labelled_samples"] == 0
    assert result["agreement"] == 1.0


def test_agreement_and_relative_error_against_a_shifted_reference():
    class Shifted(Ranked):
        def forward(self, x):
            return super().forward(x + 1)  # predicts f + 1: never agrees

    result = evaluate_model(Shifted(10), Ranked(10), ranked_loader([0] * 10, 10), max_samples=7)
    assert result["samples"] == 7
    assert result["agreement"] == 0.0
    assert result["top1"] == 0.0 and result["reference_top1"] == 1.0
    # By hand: each row of the reference is a permutation of -(0..9), squared norm 285; the shifted row
    # differs by +1 at 9 classes and -9 at one, squared norm 9 + 81 = 90; ratio sqrt(90 / 285).
    assert result["relative_error"] == pytest.approx((90 / 285) ** 0.5)


@pytest.fixture(scope="module")
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 5)).eval()


def test_a_model_against_itself_and_against_other_weights(mlp):
    loader = DataLoader(TensorDataset(torch.randn(40, 6), torch.randint(0, 5, (40,))), batch_size=16)
    same = evaluate_model(mlp, mlp, loader)
    assert same["agreement"] == 1.0 and same["relative_error"] == 0.0
    other = copy.deepcopy(mlp)
    torch.manual_seed(1)
    other[2].reset_parameters()
    differ = evaluate_model(other, mlp, loader)
    assert differ["agreement"] < 1.0
    assert differ["relative_error"] > 0.1
    assert not mlp.training


def test_empty_data_is_an_error(mlp):
    empty = DataLoader(TensorDataset(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long)), batch_size=4)
    with pytest.raises(DataError, match="the evaluation data is empty"):
        evaluate_model(mlp, mlp, empty)


Heads = collections.namedtuple("Heads", ["features", "logits"])


class MultiOut(nn.Module):
    """Ranked's logits inside a tuple, dict or namedtuple, beside a features tensor."""

    def __init__(self, kind: str, classes: int = 10):
        super().__init__()
        self.kind, self.ranked = kind, Ranked(classes)

    def forward(self, x, scale: float = 1.0):
        logits, feats = self.ranked(x) * scale, x.repeat(1, 3)
        if self.kind == "tuple":
            return feats, logits
        if self.kind == "dict":
            return {"features": feats, "logits": logits}
        return Heads(feats, logits)


@pytest.mark.parametrize("kind, output", [("tuple", 1), ("dict", "logits"), ("namedtuple", "logits"),
                                          ("namedtuple", 1)])
def test_the_evaluated_output_of_a_structured_model(kind, output):
    offsets = [0, 0, 0, 1, 4, 5, 9, None, None, 2]
    result = evaluate_model(MultiOut(kind), MultiOut(kind), ranked_loader(offsets, 10),
                            call=ModelCall(output=output))
    assert result["top1"] == pytest.approx(3 / 8) and result["top5"] == pytest.approx(6 / 8)


def test_forward_kwargs_reach_every_call():
    # scale=-1 reverses the ranking: top-1 becomes the class the original ranks last, f+9 = f-1.
    loader = ranked_loader([9] * 4, 10)
    result = evaluate_model(MultiOut("dict"), MultiOut("dict"), loader,
                            call=ModelCall(forward_kwargs={"scale": -1.0}, output="logits"))
    assert result["top1"] == 1.0


def test_an_output_key_that_names_no_tensor():
    loader = ranked_loader([0] * 4, 10)
    with pytest.raises(ConfigError) as exc:
        evaluate_model(MultiOut("dict"), MultiOut("dict"), loader, call=ModelCall(output="logit"))
    assert str(exc.value) == ("evaluate.output is 'logit' but the model returns dict "
                              "{features: tensor (4, 3), "
                              "logits: tensor (4, "
                              "10)}; set evaluate.output to the tensor to evaluate: features, "
                              "logits")


def test_a_reference_that_already_gives_nan_is_blamed_not_the_pruning(mlp):
    broken = copy.deepcopy(mlp)
    with torch.no_grad():
        broken[0].bias[0] = float("nan")
    loader = DataLoader(TensorDataset(torch.randn(8, 6), torch.zeros(8, dtype=torch.long)), batch_size=4)
    with pytest.raises(ModelError) as exc:
        evaluate_model(mlp, broken, loader)
    assert str(exc.value) == ("the reference (original) model already produces NaN or Inf on the evaluation "
                              "data "
                              "(batch starting at sample 0), before any pruning; fix the model or the data "
                              "(check data.*.mean and std) first")


def test_labels_beyond_the_classes(mlp):
    loader = DataLoader(TensorDataset(torch.randn(8, 6), torch.full((8,), 5)), batch_size=4)
    with pytest.raises(DataError) as exc:
        evaluate_model(mlp, mlp, loader)
    assert str(exc.value) == ("the evaluation data has label 5 but the model predicts 5 classes (0 to 4); "
                              "check "
                              "that the labels belong to this model")
