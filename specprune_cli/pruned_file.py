"""The pruned-model file (``model.pt``): tensors and plain values only, rebuilt without unpickling code.

The file holds the pruned state_dict, the plan (kept channel indices per unit) and how to build the
original architecture (``model.arch``, ``model.kwargs``, ``model.input_shape``, ``model.forward_kwargs``).
``load_pruned`` builds the original architecture, traces it, resizes every unit to the plan's widths
(``apply_plan_shapes``) and loads the weights, so it always loads with ``weights_only=True``.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from specprune_cli.checkpoint import build_model, check_keys
from specprune_cli.checkpoint_file import torch_load
from specprune_cli.errors import CheckpointError, reason
from specprune_cli.graph import find_units
from specprune_cli.plan import PLAN_FORMAT
from specprune_cli.reparam import fold_reparametrizations
from specprune_cli.surgery import prune_unit, selection_matrix

PRUNED_FORMAT = "specprune-pruned/1"
_KEYS = ("state_dict", "plan", "arch", "kwargs", "input_shape")


@dataclass(frozen=True)
class Architecture:
    """How to build the original architecture again (what ``load_pruned`` needs beside the plan).

    Attributes:
        arch: ``model.arch``; None when the checkpoint was a pickled module (the file then cannot be
            rebuilt, and says so when loaded).
        kwargs: ``model.kwargs``.
        input_shape: one sample's shape, to trace the fresh model.
        forward_kwargs: ``model.forward_kwargs``.
        input_dtype: the input's dtype, to trace with ("int64" for token ids).
    """

    arch: str | None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] = ()
    forward_kwargs: Mapping[str, Any] = field(default_factory=dict)
    input_dtype: str = "float32"


def save_pruned(path: str | os.PathLike, model: nn.Module, plan: dict, source: Architecture) -> None:
    """Write a pruned model as one file of tensors and plain values (loads with weights_only=True).

    It is written under a temporary name and renamed, so a failure never leaves a half-written file.

    Args:
        path: destination (conventionally ``model.pt``).
        model: the pruned network.
        plan: the JSON-serialisable plan from ``prune_model``.
        source: how to build the original architecture.
    """
    path = Path(path)
    payload = {
        "format": PRUNED_FORMAT,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "plan": plan,
        "arch": source.arch,
        "kwargs": dict(source.kwargs),
        "input_shape": [int(d) for d in source.input_shape],
        "forward_kwargs": dict(source.forward_kwargs),
        "input_dtype": source.input_dtype,
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_pruned(path: str | os.PathLike) -> nn.Module:
    """Load a file written by ``save_pruned``: build the original arch, resize it to the plan, load.

    Args:
        path: the pruned-model file.

    Returns:
        The pruned model in eval mode.

    Raises:
        CheckpointError: not a specprune file, no architecture recorded, or a plan or weights that do
            not fit the architecture.
    """
    path = Path(path)
    payload = torch_load(path, trust=False)
    if not isinstance(payload, Mapping) or payload.get("format") != PRUNED_FORMAT:
        raise CheckpointError(f"{path} is not a pruned model written by specprune (expected format "
                              f"{PRUNED_FORMAT!r}); to load an original checkpoint use load_checkpoint")
    missing = [k for k in _KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; the file is damaged: compress again")
    if payload["arch"] is None:
        raise CheckpointError(f"{path} records no model.arch (the original was a pickled module), so it "
                              "cannot be rebuilt from the plan; export with formats: [module] instead")
    model = build_model(payload["arch"], payload["kwargs"])
    example = torch.zeros(1, *payload["input_shape"], dtype=_dtype(payload, path))
    apply_plan_shapes(model, payload["plan"], example)
    check_keys(model, payload["state_dict"], f"{path} does not fit its own plan",
               "the file is damaged or was written by a different specprune version")
    model.load_state_dict(payload["state_dict"], strict=True)
    return model.eval()


def _dtype(payload: Mapping[str, Any], path: Path) -> torch.dtype:
    """The recorded input dtype (files written before it was recorded trace with float32)."""
    name = payload.get("input_dtype", "float32")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"{path} records the input dtype {name!r}, which is not a torch dtype; "
                              "the file is damaged: compress again")
    return dtype


def apply_plan_shapes(model: nn.Module, plan: Mapping, example_input: torch.Tensor) -> nn.Module:
    """Resize a fresh instance of the original architecture to a plan's widths, in place.

    The values are placeholders (plain slicing); load the pruned state_dict afterwards.

    Raises:
        CheckpointError: the plan does not fit this architecture.
    """
    if not isinstance(plan, Mapping) or plan.get("format") != PLAN_FORMAT:
        found = plan.get("format") if isinstance(plan, Mapping) else type(plan).__name__
        raise CheckpointError(f"the plan has format {found!r}, expected {PLAN_FORMAT!r}; the file was not "
                              "written by this version of specprune")
    fold_reparametrizations(model)  # as prune_model did before cutting (reparam.py)
    graph = find_units(model, example_input)
    by_name = {u.name: u for u in graph.units}
    try:
        missing = [e["name"] for e in plan["units"] if e["name"] not in by_name]
        if missing:
            raise CheckpointError(f"the plan names units this architecture does not have: {missing[:5]}; "
                                  "check model.arch and model.kwargs match the model that was pruned")
        for entry in plan["units"]:
            unit = by_name[entry["name"]]
            if unit.width != entry["width"]:
                raise CheckpointError(f"unit {unit.name} has {unit.width} channels here but {entry['width']} "
                                      "in the plan; check model.kwargs")
            keep = torch.tensor(entry["indices"], dtype=torch.long)
            prune_unit(model, unit, keep, {t: selection_matrix(unit.width, keep) for t in unit.taps})
    except (KeyError, TypeError, IndexError, RuntimeError) as exc:
        raise CheckpointError(f"the plan does not fit the architecture ({reason(exc)}); the file is damaged "
                              "or was written by a different specprune version") from None
    return model
