"""What the reach sweeps (sweep_timm.py, sweep_hf.py) do to each model: prune it to half width and say
how that ended."""
from __future__ import annotations

from typing import Any

import torch

from specprune_cli.config import PruneConfig
from specprune_cli.errors import SpecpruneError
from specprune_cli.prune import prune_model


def half_width(model: torch.nn.Module, x: torch.Tensor, row: dict,
               forward_kwargs: dict[str, Any] | None = None) -> None:
    """Prune ``model`` on ``x`` with every unit at half its width (``allocation: ratio``) and run the
    result; fill ``row``'s outcome (pruned, no units, refused, CRASH), units, kept (parameters) and why
    (the first skip reasons, or the error)."""
    kwargs = dict(forward_kwargs or {})
    try:
        result = prune_model(model, [x], example_input=x[:1], progress=False, forward_kwargs=kwargs,
                             cfg=PruneConfig(allocation="ratio", ratio=0.5, round_to=1, min_channels=1,
                                             max_positions=4))
        report = result.report
        row["units"] = len(report["units"])
        row["kept"] = report["params_after"] / report["params_before"]
        row["why"] = "; ".join(s["reason"] for s in report["skipped"][:2])
        with torch.no_grad():
            result.model(x, **kwargs)
        row["outcome"] = "pruned" if row["units"] else "no units"
    except SpecpruneError as exc:
        row["outcome"], row["why"] = "refused", f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001 - what the sweeps exist to find
        row["outcome"], row["why"] = "CRASH", f"{type(exc).__name__}: {exc}"
