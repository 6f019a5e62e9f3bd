"""Fine-tuning: distillation and cross-entropy lower the gap to the teacher; errors name the fix."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import make_cnn
from torch.utils.data import DataLoader, TensorDataset

from specprune_cli.config import DataConfig, FinetuneConfig
from specprune_cli.data import build_batches
from specprune_cli.errors import ConfigError, DataError
from specprune_cli.finetune import distillation_loss, finetune, kd_loss


def settings(**overrides) -> FinetuneConfig:
    return FinetuneConfig(**{"epochs": 3, "lr": 3e-3, "temperature": 2.0, **overrides})


def noisy_copy(model: torch.nn.Module, scale: float = 0.5, seed: int = 1) -> torch.nn.Module:
    """The teacher with every weight perturbed: a student that starts measurably wrong."""
    student = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.std().clamp_min(0.05))
    return student


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    model = make_cnn(seed=0, width=8)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:  # exact running statistics of the input distribution, as after real training
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    with torch.no_grad():
        model(inputs(512, seed=11))
        model.head.weight.mul_(10)  # logits of a trained model's spread (std ~2), not ~0.2 at init
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


def inputs(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def eval_loader() -> DataLoader:
    x = inputs(64, seed=100)
    return DataLoader(TensorDataset(x, torch.full((64,), -1)), batch_size=32)


def train_loader(teacher: torch.nn.Module, labels: bool, n: int = 64) -> DataLoader:
    x = inputs(n, seed=7)
    if labels:
        with torch.no_grad():
            y = teacher(x).argmax(1)  # labels the teacher agrees with: both losses pull the same way
        return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    return DataLoader(TensorDataset(x, torch.full((n,), -1)), batch_size=16, shuffle=True)


def test_kd_loss_is_zero_for_identical_logits_and_scales_with_t_squared():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    assert float(kd_loss(logits, logits, 4.0)) == pytest.approx(0.0, abs=1e-7)
    # By hand at T=1: p = softmax([0, 0]) = [.5, .5], q = softmax([0, ln 3]) = [.25, .75];
    # KL(p||q) = .5 ln(.5/.25) + .5 ln(.5/.75) = .5 ln(4/3).
    teacher, student = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, float(torch.log(torch.tensor(3.0)))]])
    assert float(kd_loss(student, teacher, 1.0)) == pytest.approx(0.5 * float(torch.log(torch.tensor(4 / 3))))


def test_distillation_loss_of_a_model_with_itself_is_zero(teacher, eval_loader):
    assert distillation_loss(teacher, teacher, eval_loader, 2.0) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("labels", [True, False], ids=["labelled", "unlabelled"])
def test_finetune_lowers_distillation_loss_on_held_out_data(teacher, eval_loader, labels):
    student = noisy_copy(teacher)
    teacher_before = copy.deepcopy(teacher.state_dict())
    before = distillation_loss(student, teacher, eval_loader, 2.0)
    # 8 short epochs: BatchNorm running statistics (momentum 0.1) need a few dozen steps to catch up.
    history = finetune(student, teacher, train_loader(teacher, labels), settings(epochs=8), progress=False)
    after = distillation_loss(student, teacher, eval_loader, 2.0)
    assert before > 0.05
    assert after < 0.5 * before, (before, after)
    assert history["steps"] == 8 * 4  # 8 epochs of 64 / 16 batches
    assert [e["steps"] for e in history["epochs"]] == [4] * 8
    assert history["epochs"][-1]["loss"] < history["epochs"][0]["loss"]
    assert not student.training and not teacher.training
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), f"the teacher changed: {key}"


def test_cross_entropy_alone_trains_on_labels(teacher):
    student = noisy_copy(teacher)
    loader = train_loader(teacher, labels=True)
    history = finetune(student, None, loader, settings(distill=False, optimizer="sgd", lr=0.05),
                       progress=False)
    assert history["epochs"][-1]["loss"] < history["epochs"][0]["loss"]


def test_max_steps_caps_the_run_logs_each_epoch_and_shows_progress(teacher, capsys):
    lines: list[str] = []
    history = finetune(noisy_copy(teacher), teacher, train_loader(teacher, labels=False),
                       settings(epochs=5, max_steps=6), progress=True, log=lines.append)
    assert history["steps"] == 6
    assert [e["steps"] for e in history["epochs"]] == [4, 2]
    assert len(lines) == 2 and lines[0].startswith("finetune epoch 1: loss ")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "finetune" in captured.err and "6/6" in captured.err and "loss=" in captured.err


def test_same_seed_gives_the_same_weights(teacher):
    a, b = noisy_copy(teacher), noisy_copy(teacher)
    for student in (a, b):
        finetune(student, teacher, train_loader(teacher, labels=False), settings(epochs=1), progress=False)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_no_labels_without_distillation_is_a_config_error(teacher, tmp_path):
    message = "fine-tuning needs labels or distill: true"
    path = tmp_path / "unlabelled.npz"
    np.savez(path, x=inputs(8, seed=3).numpy())  # no y: the real data class knows there are no labels
    cfg = DataConfig(format="npz", path=str(path), num_samples=None, batch_size=4)
    batches = build_batches(cfg, [3, 8, 8])
    assert not batches.has_labels
    with pytest.raises(ConfigError, match=message):
        finetune(noisy_copy(teacher), teacher, batches, settings(distill=False), progress=False)
    x = inputs(8, seed=3)  # a plain loader whose labels are all -1: found while iterating
    loader = DataLoader(TensorDataset(x, torch.full((8,), -1)), batch_size=4)
    with pytest.raises(ConfigError, match=message):
        finetune(noisy_copy(teacher), teacher, loader, settings(distill=False), progress=False)


def test_labels_beyond_the_model_classes_are_a_data_error(teacher):
    x = inputs(8, seed=3)
    loader = DataLoader(TensorDataset(x, torch.full((8,), 12)), batch_size=4)
    with pytest.raises(DataError) as exc:
        finetune(noisy_copy(teacher), teacher, loader, settings(), progress=False)
    assert str(exc.value) == ("the fine-tune data has label 12 but the model predicts 10 classes (0 to 9); "
                              "check "
                              "that the labels belong to this model")
