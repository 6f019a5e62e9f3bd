"""Before/after evaluation: accuracy where labels exist, agreement and relative error always, and the
quality gates that judge them. Latency is timed in ``latency.py``.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from specprune_cli.errors import ConfigError, DataError, ModelError
from specprune_cli.model_io import ModelCall, device_of, eval_mode


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x, y) from a loader item: a tensor, or an (x, y) pair (y < 0 marks an unlabelled sample)."""
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def logits_of(out: Any, who: str, purpose: str = "evaluated") -> torch.Tensor:
    """``out`` if it is a (batch, classes) tensor, else a ModelError saying what to change."""
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"the {who} model must return logits of shape (batch, classes) to be {purpose}, "
                         f"got {shape}; if it returns several tensors, set evaluate.output to the logits, or "
                         "wrap the model so that forward returns them")
    return out


def prediction_of(out: Any, who: str) -> torch.Tensor:
    """``out`` if it is a tensor of predictions with the classes (or channels) on dimension 1, as
    ``nn.CrossEntropyLoss`` takes them: (batch, classes) logits, or dense (batch, classes, *positions)."""
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"the {who} model must return a tensor of shape (batch, classes, ...) to be "
                         f"evaluated, got {shape}; if it returns several tensors, set evaluate.output to "
                         "the one to compare, or wrap the model so that forward returns it")
    return out


def check_label_range(max_label: int | None, classes: int | None, what: str) -> None:
    """A DataError when labels go beyond the classes the model predicts (None: nothing to check)."""
    if max_label is not None and classes is not None and max_label >= classes:
        raise DataError(f"{what} has label {max_label} but the model predicts {classes} classes (0 to "
                        f"{classes - 1}); check that the labels belong to this model")


def _topk_correct(logits: torch.Tensor, y: torch.Tensor, k: int) -> int:
    top = logits.topk(k, dim=1).indices
    return int((top == y[:, None]).any(dim=1).sum())


def evaluate_model(model: nn.Module, reference: nn.Module, loader: Iterable, *,
                   max_samples: int | None = None, call: ModelCall | None = None) -> dict:
    """Compare ``model`` with ``reference`` (usually pruned vs original) on a loader.

    Args:
        model: the model evaluated.
        reference: the model it is compared with; its own accuracy is reported too.
        loader: yields ``(x, y)``; ``y < 0`` marks an unlabelled sample.
        max_samples: stop after this many samples (None: the whole loader).
        call: the forward keyword arguments and the evaluated output tensor (default: none, the first).

    Returns:
        ``samples``, ``labelled_samples``; ``top1``/``top5`` of ``model`` and ``reference_top1``/
        ``reference_top5`` as fractions over labelled samples (None without labels, or for dense
        outputs; top-5 also None with fewer than 5 classes); ``agreement``: fraction of samples where
        both argmaxes over dimension 1 match (for dense (batch, classes, *positions) outputs, the mean
        over positions);
        ``relative_error``: ||out - ref|| / ||ref|| over all outputs (0 when both are zero, inf when only
        the reference is).

    Raises:
        ModelError: an output that is not a (batch, classes, ...) tensor, outputs of different shapes, or a
            reference that already produces NaN/Inf (the original model, not the pruning, is at fault).
        DataError: no samples, or labels beyond the model's classes.
    """
    call = call or ModelCall()
    device = device_of(model)
    n = labelled = agree = 0
    correct = {"top1": 0, "top5": 0, "reference_top1": 0, "reference_top5": 0}
    diff_sq = ref_sq = 0.0
    classes = None
    with eval_mode(model, reference), torch.inference_mode():
        for batch in loader:
            if max_samples is not None and n >= max_samples:
                break
            x, y = split_batch(batch)
            if max_samples is not None:
                x = x[:max_samples - n]
                y = y[:max_samples - n] if y is not None else None
            x = x.to(device)
            out = prediction_of(call.evaluated(model, x), "evaluated").double()
            ref = prediction_of(call.evaluated(reference, x), "reference").double()
            if not bool(torch.isfinite(ref).all()):
                raise ModelError(f"the reference (original) model already produces NaN or Inf on the "
                                 f"evaluation data (batch starting at sample {n}), before any pruning; "
                                 "fix the model or the data (check data.*.mean and std) first")
            if out.shape != ref.shape:
                raise ModelError(f"the evaluated model returns {tuple(out.shape)} but the reference "
                                 f"returns {tuple(ref.shape)}; both must predict the same classes")
            classes = out.shape[1]
            n += x.shape[0]
            same = (out.argmax(1) == ref.argmax(1)).double()
            agree += float(same.reshape(same.shape[0], -1).mean(1).sum())
            diff_sq += float(((out - ref) ** 2).sum())
            ref_sq += float((ref ** 2).sum())
            if y is None or out.dim() > 2:  # accuracy needs one label per sample and (batch, classes)
                continue
            mask = (y >= 0).to(device)
            if not bool(mask.any()):
                continue
            yl = y.to(device)[mask]
            check_label_range(int(yl.max()), out.shape[1], "the evaluation data")
            labelled += int(mask.sum())
            for name, logits in (("top1", out), ("reference_top1", ref)):
                correct[name] += _topk_correct(logits[mask], yl, 1)
            if classes >= 5:
                for name, logits in (("top5", out), ("reference_top5", ref)):
                    correct[name] += _topk_correct(logits[mask], yl, 5)
    if n == 0:
        raise DataError("the evaluation data is empty; give data.eval at least one sample "
                        "(or raise evaluate.max_eval_samples above 0)")

    def frac(name: str) -> float | None:
        if labelled == 0 or (name.endswith("top5") and classes < 5):
            return None
        return correct[name] / labelled

    if ref_sq > 0:
        rel = (diff_sq / ref_sq) ** 0.5
    else:
        rel = 0.0 if diff_sq == 0 else float("inf")
    return {"samples": n, "labelled_samples": labelled, "top1": frac("top1"), "top5": frac("top5"),
            "reference_top1": frac("reference_top1"), "reference_top5": frac("reference_top5"),
            "agreement": agree / n, "relative_error": rel}


def check_gates(evaluation: dict | None, *, max_accuracy_drop: float | None,
                min_agreement: float | None) -> list[dict]:
    """Compare an evaluation with the CI gates.

    Args:
        evaluation: needs ``accuracy_before`` and ``accuracy_after`` (fractions) for the accuracy gate
            and ``agreement`` (fraction of top-1 equal to the original's) for the agreement gate.
        max_accuracy_drop: largest allowed drop in percentage points, or None.
        min_agreement: smallest allowed agreement in [0, 1], or None.

    Returns:
        One entry per requested gate: name, limit, value, passed.

    Raises:
        ConfigError: a gate that the evaluation cannot answer (no labels for the accuracy gate).
    """
    gates = []
    evaluation = evaluation or {}
    if max_accuracy_drop is not None:
        before, after = evaluation.get("accuracy_before"), evaluation.get("accuracy_after")
        if before is None or after is None:
            raise ConfigError("--max-accuracy-drop needs accuracy before and after pruning: set data.eval to "
                              "a labelled dataset")
        drop = 100.0 * (before - after)
        gates.append({"name": "max_accuracy_drop", "limit": max_accuracy_drop, "value": round(drop, 4),
                      "passed": drop <= max_accuracy_drop})
    if min_agreement is not None:
        agreement = evaluation.get("agreement")
        if agreement is None:
            raise ConfigError("--min-agreement needs an evaluation of the pruned model against the original")
        gates.append({"name": "min_agreement", "limit": min_agreement, "value": round(agreement, 6),
                      "passed": agreement >= min_agreement})
    return gates
