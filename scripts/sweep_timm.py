#!/usr/bin/env python
"""Reach over timm: prune one small model per timm model family and say what happened to each.

Models people write come in more shapes than the test zoo holds. This builds, for every module of
``timm.models`` (one architecture family each), its first ``--per-family`` models whose names read small
(tiny, small, nano, _s, 18, b0, ...), with random weights and 10 classes, skips those above
``--max-params``, and runs ``prune_model`` at half of every unit's width (``allocation: ratio``) on two
random inputs of 64x64 where the model takes that size, else of its own input size.
Each model ends in one of:

- pruned: units were cut and the pruned model runs (the report's first skip reasons are shown);
- no units: nothing could be pruned; the first reasons say why;
- refused: a specprune error with its message (a BudgetError, a ModelError, ...);
- CRASH: any other exception, which is a bug: an internal error must never reach a user;
- timeout: over ``--timeout`` seconds.

timm is not a dependency of specprune: install it where this runs, e.g. ``pip install timm`` in the
project's venv, or ``pip install --target /tmp/timm --no-deps timm`` and ``PYTHONPATH=/tmp/timm``.
Nothing is downloaded (``pretrained=False``). Writes its section of docs/benchmarks.md.

Usage:
  python scripts/sweep_timm.py [--per-family 1] [--max-params 60e6] [--timeout 240] [--only NAME ...]
"""
from __future__ import annotations

import argparse
import collections
import datetime
import re
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import format_table, write_section  # noqa: E402
from fashion_common import ROOT  # noqa: E402
from quality_cache import library_commit  # noqa: E402
from sweep_common import half_width  # noqa: E402

SMALL = re.compile(r"(tiny|small|nano|pico|femto|atto|xxs|_xs|_s$|_t$|18|b0|_050|_100|lite0|mini|_s_|_t_)")


class _Timeout(BaseException):  # not caught as an error of the model
    pass


def picks(per_family: int) -> list[str]:
    """The first ``per_family`` small-sounding models of each timm model module, in timm's order."""
    import timm
    from timm.models import _registry

    families: dict[str, list[str]] = collections.defaultdict(list)
    for name in timm.list_models():
        families[_registry._model_to_module[name]].append(name)
    out = []
    for names in families.values():
        out += ([n for n in names if SMALL.search(n)] or names)[:per_family]
    return out


def _input(model: torch.nn.Module) -> torch.Tensor:
    """Two random samples at 64x64 where the model takes that size, else at its own input size."""
    cfg = model.pretrained_cfg or {}
    c, h, w = cfg.get("input_size", (3, 224, 224))
    if not cfg.get("fixed_input_size", False) and min(h, w) > 64:
        small = torch.randn(2, c, 64, 64)
        try:
            with torch.no_grad():
                model(small)
            return small
        except Exception:  # noqa: BLE001 - too small for its stem (Inception): use its own size
            pass
    return torch.randn(2, c, h, w)


def run_one(name: str, max_params: float, timeout: int) -> dict:
    import timm

    row: dict = {"model": name, "outcome": "", "params": None, "units": None, "kept": None, "why": ""}
    started = time.perf_counter()
    signal.alarm(timeout)
    try:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=10).eval()
        row["params"] = sum(p.numel() for p in model.parameters())
        if row["params"] > max_params:
            row["outcome"] = "too big"
            return row
        x = _input(model)
        half_width(model, x, row)
    except _Timeout:
        row["outcome"] = "timeout"
    except Exception as exc:  # noqa: BLE001 - timm itself failing to build the model
        row["outcome"], row["why"] = "CRASH", f"{type(exc).__name__}: {exc}"
    finally:
        signal.alarm(0)
        row["seconds"] = time.perf_counter() - started
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-family", type=int, default=1)
    ap.add_argument("--max-params", type=float, default=60e6)
    ap.add_argument("--timeout", type=int, default=240, help="seconds per model")
    ap.add_argument("--only", nargs="*", help="these timm model names instead of the picks")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = ap.parse_args()
    try:
        import timm
    except ImportError:
        sys.exit("timm is not installed here: pip install timm (see this script's docstring)")
    torch.set_num_threads(1)
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(_Timeout()))
    commit = library_commit()[:12]  # the code the rows come from, even if the tree changes meanwhile
    names = args.only or picks(args.per_family)
    rows = []
    for i, name in enumerate(names, 1):
        row = run_one(name, args.max_params, args.timeout)
        rows.append(row)
        print(f"[{i}/{len(names)}] {name}: {row['outcome']} {row['why'][:100]}", flush=True)
    tally = collections.Counter(r["outcome"] for r in rows)
    table = [[r["model"], f"{r['params'] / 1e6:.1f}M" if r["params"] else "-", r["outcome"],
              r["units"] if r["units"] is not None else "-", f"{r['kept']:.3f}" if r["kept"] else "-",
              f"{r['seconds']:.1f}", r["why"][:160].replace("|", "/")] for r in rows]
    text = (f"## Reach over timm (`scripts/sweep_timm.py`)\n\n"
            f"timm {timm.__version__}, torch {torch.__version__}, specprune at commit "
            f"{commit} (the last change to specprune_cli/), {datetime.date.today()}, "
            f"one thread. {args.per_family} model(s) per timm model family, random weights, 10 classes, "
            f"`allocation: ratio` 0.5 (every unit to half its width) on two random inputs (64x64 where the "
            f"model takes it, else its own size); models over "
            f"{args.max_params / 1e6:.0f}M parameters are not run. *kept*: parameters kept. *why*: the first "
            "reasons something was left whole, or the error.\n\n"
            + ", ".join(f"{k}: {v}" for k, v in sorted(tally.items())) + f" (of {len(rows)})\n\n"
            + format_table(["model", "params", "outcome", "units", "kept", "s", "why"], table))
    if not args.only:
        write_section(args.out, "sweep-timm", text)
    print(text)


if __name__ == "__main__":
    main()
