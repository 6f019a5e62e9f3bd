"""Evaluation: accuracy, agreement and relative error on hand-countable cases; latency shape."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from specprune_cli.errors import DataError
from specprune_cli.evaluate import (evaluate_model, keep_memory_mapped, measure_latency,
                                    measure_onnx_latency)


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
    assert same["top1"] == same["reference_top1"]
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


def test_latency_medians_are_positive_per_batch_size(mlp):
    result = measure_latency(mlp, torch.zeros(1, 6), [1, 4], repeats=5)
    assert sorted(result) == [1, 4]
    for stats in result.values():
        assert stats["median_ms"] > 0 and stats["min_ms"] <= stats["median_ms"]
        assert stats["samples"] == 5


def test_onnx_latency(mlp, tmp_path):
    from specprune_cli.export import export_model

    settings = SimpleNamespace(formats=["onnx"], opset=18, onnx_tolerance=1e-4)
    path = export_model(mlp, torch.zeros(1, 6), tmp_path, settings)["onnx"]["path"]
    result = measure_onnx_latency(path, torch.zeros(1, 6), [1, 3], repeats=4)
    assert sorted(result) == [1, 3]
    assert all(s["median_ms"] > 0 and s["samples"] == 4 for s in result.values())


def test_onnx_latency_runs_with_the_threads_asked_for(mlp, tmp_path, monkeypatch):
    import onnxruntime as ort

    from specprune_cli.export import export_model

    settings = SimpleNamespace(formats=["onnx"], opset=18, onnx_tolerance=1e-4)
    path = export_model(mlp, torch.zeros(1, 6), tmp_path, settings)["onnx"]["path"]
    seen = []
    real = ort.InferenceSession

    def session(file, sess_options=None, **kwargs):
        seen.append(sess_options.intra_op_num_threads)
        return real(file, sess_options=sess_options, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", session)
    measure_onnx_latency(path, torch.zeros(1, 6), [2], repeats=2, threads=1)
    measure_onnx_latency(path, torch.zeros(1, 6), [2], repeats=2)
    assert seen == [1, 0]  # 0 is ONNX Runtime's "choose for me"


def test_keep_memory_mapped_is_idempotent():
    assert keep_memory_mapped() is keep_memory_mapped()
