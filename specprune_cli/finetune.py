"""Short fine-tuning after surgery: distillation from the original model, plus cross-entropy on labels.

The pruned model (the student) learns to match the original (the teacher) through the KL divergence of
their softmax outputs at temperature T, scaled by T^2 so that its gradients keep the magnitude of a
T=1 loss (Hinton et al., 2015). Samples labelled ``y >= 0`` also add cross-entropy; ``y < 0`` marks an
unlabelled sample, so a user with only unlabelled calibration data can still fine-tune by distillation.
For a model with several outputs, both losses read the evaluated one (``evaluate.output``).

Under torchrun the student trains under DistributedDataParallel (``distributed.data_parallel``): each
process reads its shard of the batches, gradients are averaged, and every process takes every step.
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from specprune_cli import distributed
from specprune_cli.config import FinetuneConfig
from specprune_cli.data import Batches
from specprune_cli.errors import ConfigError, ModelError
from specprune_cli.evaluate import check_label_range, logits_of, split_batch
from specprune_cli.model_io import ModelCall, device_of, eval_mode

Log = Callable[[str], None]

NEEDS_LABELS = ("fine-tuning needs labels or distill: true; the fine-tune data has no labels (y < 0), so "
                "set finetune.distill: true or give data.finetune a labelled dataset")


def _logits(call: ModelCall, model: nn.Module, x: torch.Tensor, who: str) -> torch.Tensor:
    return logits_of(call.evaluated(model, x), who, "fine-tuned or compared")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)) * T^2, averaged over the batch."""
    t = float(temperature)
    # log_target keeps the teacher side in log space: no log(0) when the teacher is very confident.
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)


def distillation_loss(student: nn.Module, teacher: nn.Module, loader: Iterable, temperature: float, *,
                      call: ModelCall | None = None) -> float:
    """Mean distillation loss (KL * T^2 per sample) of ``student`` against ``teacher`` over a loader.

    Both models run in eval mode without gradients; their previous modes are restored.

    Args:
        student: the model being judged.
        teacher: the reference model.
        loader: yields ``(x, y)`` batches; ``y`` is ignored.
        temperature: softmax temperature T.
        call: the forward keyword arguments and the output tensor compared.

    Returns:
        The sample-weighted mean of KL(teacher || student) * T^2.
    """
    call = call or ModelCall()
    device = device_of(student)
    total, count = 0.0, 0
    with eval_mode(student, teacher), torch.no_grad():
        for batch in loader:
            x = split_batch(batch)[0].to(device)
            s = _logits(call, student, x, "student")
            t = _logits(call, teacher, x, "teacher")
            total += float(kd_loss(s, t, temperature)) * x.shape[0]
            count += x.shape[0]
    if count == 0:
        raise ModelError("distillation_loss got an empty loader; give it at least one batch")
    return total / count


def _optimizer(params: list[nn.Parameter], cfg: FinetuneConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def finetune(student: nn.Module, teacher: nn.Module | None, loader: Batches | Iterable,
             cfg: FinetuneConfig, *, call: ModelCall | None = None, progress: bool = True,
             log: Log | None = None) -> dict:
    """Fine-tune ``student`` in place by distillation from ``teacher`` and/or cross-entropy on labels.

    The teacher runs in eval mode without gradients. The student trains (BatchNorm statistics update) and
    is left in eval mode. The global RNG is seeded with ``cfg.seed`` inside ``torch.random.fork_rng``,
    so shuffling and dropout are reproducible and the caller's RNG state is untouched.

    Args:
        student: the pruned model; its parameters are updated.
        teacher: the original model; may be None only when ``cfg.distill`` is false.
        loader: yields ``(x, y)`` with ``y`` a LongTensor of labels, ``y < 0`` for unlabelled samples;
            ``Batches`` also say up front whether there are labels.
        cfg: the fine-tuning settings (``max_steps``, when set, caps the optimiser steps).
        call: the forward keyword arguments and the output tensor trained on.
        progress: show a tqdm bar with the running loss on stderr.
        log: called with one line per epoch.

    Returns:
        ``{"epochs": [{"epoch", "loss", "steps", "seconds"}, ...], "steps", "seconds", "final_loss"}``
        where ``loss`` is the epoch's mean training loss.

    Raises:
        ConfigError: no labels and ``distill`` false, or a NaN loss.
        DataError: labels beyond the model's classes (``evaluate.check_label_range``).
    """
    call = call or ModelCall()
    distill = cfg.distill
    if not distill and isinstance(loader, Batches) and not loader.has_labels:
        raise ConfigError(NEEDS_LABELS)
    if distill and teacher is None:
        raise ConfigError("finetune.distill is true but no teacher model was given; pass the original model")
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ModelError("the student model has no trainable parameters; nothing to fine-tune")
    device = device_of(student)
    max_steps = cfg.max_steps
    try:
        per_epoch = len(loader)  # type: ignore[arg-type]
    except TypeError:
        per_epoch = None
    total = cfg.epochs * per_epoch if per_epoch is not None else None
    if max_steps is not None:
        total = min(total, max_steps) if total is not None else max_steps

    history: list[dict] = []
    steps = 0
    started = time.perf_counter()
    teacher_mode = teacher.training if teacher is not None else False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        optimizer = _optimizer(params, cfg)
        student.train()
        trained = distributed.data_parallel(student)
        if teacher is not None:
            teacher.eval()
        bar = tqdm(total=total, desc="finetune", unit="step", file=sys.stderr, disable=not progress,
                   dynamic_ncols=True)
        try:
            for epoch in range(1, cfg.epochs + 1):
                if max_steps is not None and steps >= max_steps:
                    break
                epoch_start, epoch_loss, epoch_steps = time.perf_counter(), 0.0, 0
                for batch in loader:
                    if max_steps is not None and steps >= max_steps:
                        break
                    x, y = split_batch(batch)
                    x = x.to(device)
                    labelled = (y >= 0).to(device) if y is not None else None
                    has_labels = labelled is not None and bool(labelled.any())
                    # Nothing to learn from in this batch; under torchrun every process still takes
                    # the step (DistributedDataParallel steps together), with a loss of zero.
                    if not distill and not has_labels and not distributed.active():
                        continue
                    out = _logits(call, trained, x, "student")
                    loss = out.sum() * 0.0 if distributed.active() else out.new_zeros(())
                    if distill:
                        with torch.no_grad():
                            target = _logits(call, teacher, x, "teacher")
                        loss = loss + kd_loss(out, target, cfg.temperature)
                    if has_labels:
                        targets = y.to(device)[labelled]
                        check_label_range(int(targets.max()), out.shape[1], "the fine-tune data")
                        loss = loss + F.cross_entropy(out[labelled], targets)
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        raise ConfigError(f"the fine-tuning loss became {value} at step {steps + 1}; "
                                          f"lower finetune.lr (now {cfg.lr:g})")
                    optimizer.zero_grad(set_to_none=True)
                    distributed.check_peers()  # a failed process stops the others here, not in backward
                    loss.backward()
                    optimizer.step()
                    steps += 1
                    epoch_steps += 1
                    epoch_loss += value
                    bar.update(1)
                    bar.set_postfix(loss=f"{epoch_loss / epoch_steps:.4f}", epoch=epoch)
                if epoch_steps == 0 and not distill:
                    raise ConfigError(NEEDS_LABELS)
                seconds = time.perf_counter() - epoch_start
                epoch_loss, loss_steps = distributed.all_sum(epoch_loss, epoch_steps)  # over processes
                mean = epoch_loss / loss_steps if loss_steps else float("nan")
                history.append({"epoch": epoch, "loss": mean, "steps": epoch_steps,
                                "seconds": round(seconds, 3)})
                if log is not None:
                    log(f"finetune epoch {epoch}: loss {mean:.4f} over {epoch_steps} steps ({seconds:.1f} s)")
        finally:
            bar.close()
            student.eval()
            if teacher is not None:
                teacher.train(teacher_mode)
    return {"epochs": history, "steps": steps, "seconds": round(time.perf_counter() - started, 3),
            "final_loss": history[-1]["loss"] if history else None}
