#!/usr/bin/env python
"""Accuracy at equal FLOPs: specprune against Torch-Pruning, L1 filter pruning and its own ablations.

For each reference model (scripts/train_reference.py: vgg_small, resnet_small, mobilenetv2_small trained
on full Fashion-MNIST) and each budget (keep 50%, 30%, 15% of FLOPs):

  specprune        dof allocation, sequential order, theta 0.5, reconstruction (the defaults)
  theta=0, theta=1 the same with the input-aware only / output-aware only objective
  no reconstruction  the same selection, consumers sliced instead of folded with A
  oneshot          statistics from the unpruned network for every unit
  uniform          one keep ratio for every unit (bisected to the target) instead of dof widths
  L1 (Li 2017)     specprune's widths, filters ranked by L1 norm, no reconstruction
  TP L2, TP Taylor, TP LAMP, TP random
                   Torch-Pruning's BasePruner with that importance; the pruning ratio is bisected so
                   that the achieved FLOPs match specprune's (within 2%). L2/Taylor/random prune each
                   layer by the same ratio (TP's default); LAMP is a global criterion and runs with
                   global_pruning=True. Taylor's gradients come from cross-entropy on the labelled
                   calibration images (labels specprune never sees). TP also prunes the channels of
                   residual streams, which specprune leaves whole.

Every method sees the same 1,024 calibration images (training split, seed 0) and is scored on the full
10,000-image test split with no fine-tuning, then after the same short fine-tune: 1 epoch of
distillation (KL at T=4, Adam lr 1e-3, batch 64, seed 0) on 5,000 unlabelled training images.
Results per model are cached in bench_cache/quality-<model>.json; the Markdown section of
docs/benchmarks.md and docs/bench_quality.png are written once all models have results.

Usage:
  python scripts/bench_quality.py                             # everything (trains models if not cached)
  python scripts/bench_quality.py --models vgg_small --threads 1   # one model, e.g. in parallel runs
  python scripts/bench_quality.py --report-only               # rewrite docs from cached results
  python scripts/bench_quality.py --quick                     # smoke run: 1 model, 1 budget, tiny data
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import cpu_name, format_table, write_section  # noqa: E402
from fashion_common import CACHE, ROOT, accuracy, load_split, normalise, reference_model  # noqa: E402
from specprune_cli.baselines import prune_by_criterion  # noqa: E402
from specprune_cli.config import FinetuneConfig, PruneConfig  # noqa: E402
from specprune_cli.finetune import finetune  # noqa: E402
from specprune_cli.flops import count_flops, count_params  # noqa: E402
from specprune_cli.prune import prune_model  # noqa: E402

MODELS = ("vgg_small", "resnet_small", "mobilenetv2_small")
BUDGETS = (0.5, 0.3, 0.15)
SPECPRUNE_VARIANTS = {
    "specprune": {},
    "theta=0": {"theta": 0.0},
    "theta=1": {"theta": 1.0},
    "no reconstruction": {"reconstruct": False},
    "oneshot": {"order": "oneshot"},
    "uniform": {"allocation": "uniform"},
}
TP_METHODS = ("TP L2", "TP Taylor", "TP LAMP", "TP random")
METHODS = (*SPECPRUNE_VARIANTS, "L1 (Li 2017)", *TP_METHODS)
FLOPS_TOLERANCE = 0.02
EXAMPLE = torch.zeros(1, 1, 28, 28)


@dataclasses.dataclass
class Data:
    calib_x: torch.Tensor      # normalised float, (1024, 1, 28, 28)
    calib_y: torch.Tensor
    finetune_x: torch.Tensor   # normalised float, labels withheld
    test_x: torch.Tensor       # uint8, normalised by fashion_common.accuracy
    test_y: torch.Tensor


def load_data(calib: int, finetune_n: int, test_n: int | None) -> Data:
    """Disjoint calibration and fine-tuning subsets of the training split (seed 0), and the test split."""
    xtr, ytr = load_split("train")
    perm = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(0))
    c, f = perm[:calib], perm[calib:calib + finetune_n]
    xte, yte = load_split("t10k")
    if test_n is not None:
        xte, yte = xte[:test_n], yte[:test_n]
    return Data(normalise(xtr[c]), ytr[c], normalise(xtr[f]), xte, yte)


def classifier_layer(model: nn.Module) -> nn.Module:
    """The last Linear: Torch-Pruning must leave the class outputs alone."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output width of every conv and Linear layer (to see where each method put its budget)."""
    return {name: m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def tp_prune(model: nn.Module, method: str, ratio: float, data: Data) -> nn.Module:
    """A copy of ``model`` pruned by Torch-Pruning's ``method`` at ``ratio``."""
    import torch_pruning as tp

    model = copy.deepcopy(model).eval()
    importance = {"TP L2": lambda: tp.importance.MagnitudeImportance(p=2),
                  "TP Taylor": tp.importance.TaylorImportance,
                  "TP LAMP": tp.importance.LAMPImportance,
                  "TP random": tp.importance.RandomImportance}[method]()
    torch.manual_seed(0)  # RandomImportance draws from the global RNG
    pruner = tp.pruner.BasePruner(model, EXAMPLE, importance=importance, pruning_ratio=ratio,
                                  global_pruning=method == "TP LAMP", max_pruning_ratio=0.95,
                                  ignored_layers=[classifier_layer(model)])
    if method == "TP Taylor":
        model.zero_grad()
        for i in range(0, len(data.calib_x), 256):
            x, y = data.calib_x[i:i + 256], data.calib_y[i:i + 256]
            (F.cross_entropy(model(x), y, reduction="sum") / len(data.calib_x)).backward()
    pruner.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def match_ratio(model: nn.Module, method: str, target_flops: int, data: Data) -> tuple[float, nn.Module]:
    """Bisect Torch-Pruning's ratio so that the pruned FLOPs meet ``target_flops`` (within tolerance).

    FLOPs fall as the ratio grows, whatever the importance; the selection is re-run at each step
    (for LAMP, where the importance decides the per-layer widths) only on the importance in question.
    """
    lo, hi = 0.0, 0.95
    best: tuple[float, float, nn.Module] | None = None
    for _ in range(30):
        mid = (lo + hi) / 2
        pruned = tp_prune(model, "TP random" if method in ("TP L2", "TP Taylor") else method, mid, data)
        flops = count_flops(pruned, EXAMPLE)
        gap = abs(flops / target_flops - 1)
        if best is None or gap < best[0]:
            best = (gap, mid, pruned)
        if gap < FLOPS_TOLERANCE / 4:
            break
        lo, hi = (mid, hi) if flops > target_flops else (lo, mid)
    gap, ratio, pruned = best
    if method in ("TP L2", "TP Taylor"):
        pruned = tp_prune(model, method, ratio, data)  # uniform per-layer widths: same FLOPs as random
    return ratio, pruned


def finetuned(student: nn.Module, teacher: nn.Module, data: Data, progress: bool) -> nn.Module:
    """A copy of ``student`` after 1 epoch of distillation on the unlabelled fine-tuning images."""
    student = copy.deepcopy(student)
    dataset = TensorDataset(data.finetune_x, torch.full((len(data.finetune_x),), -1, dtype=torch.long))
    loader = DataLoader(dataset, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    finetune(student, teacher, loader, FinetuneConfig(epochs=1, lr=1e-3, distill=True, temperature=4.0),
             progress=progress)
    return student.eval()


def run_model(name: str, budgets: tuple[float, ...], data: Data, progress: bool) -> dict:
    """Every method at every budget on one reference model."""
    model, log = reference_model(name)
    flops0, params0 = count_flops(model, EXAMPLE), count_params(model)
    base = {"model": name, "test_accuracy": accuracy(model, data.test_x, data.test_y), "flops": flops0,
            "params": params0, "train_log": log, "rows": []}
    print(f"{name}: {params0:,} params, {flops0 / 1e6:.1f} MFLOPs, test accuracy {base['test_accuracy']:.4f}",
          flush=True)
    for budget in budgets:
        target = None
        widths = None
        for method in METHODS:
            t = time.perf_counter()
            extra: dict = {}
            if method in SPECPRUNE_VARIANTS:
                cfg = dataclasses.replace(PruneConfig(target={"flops": budget}), **SPECPRUNE_VARIANTS[method])
                result = prune_model(model, [data.calib_x[i:i + 64] for i in range(0, len(data.calib_x), 64)],
                                     example_input=EXAMPLE, cfg=cfg, progress=progress)
                pruned = result.model
                if method == "specprune":  # the budget every other method is matched to
                    target = result.report["flops_after"]
                    widths = {u["name"]: u["kept"] for u in result.report["units"]}
            elif method == "L1 (Li 2017)":
                pruned = prune_by_criterion(model, EXAMPLE, widths, criterion="l1")
            else:
                ratio, pruned = match_ratio(model, method, target, data)
                extra["tp_ratio"] = round(ratio, 4)
            prune_seconds = time.perf_counter() - t
            flops = count_flops(pruned, EXAMPLE)
            row = {"budget": budget, "method": method, "flops_kept": flops / flops0,
                   "flops_vs_specprune": flops / target - 1, "params": count_params(pruned),
                   "prune_seconds": round(prune_seconds, 2), "widths": layer_widths(pruned),
                   "accuracy": accuracy(pruned, data.test_x, data.test_y), **extra}
            row["accuracy_finetuned"] = accuracy(finetuned(pruned, model, data, progress), data.test_x, data.test_y)
            base["rows"].append(row)
            print(f"  keep {budget:.0%} {method:18s} FLOPs {row['flops_kept']:.3f} "
                  f"({row['flops_vs_specprune']:+.1%} vs specprune)  acc {row['accuracy']:.4f}  "
                  f"after fine-tune {row['accuracy_finetuned']:.4f}  ({prune_seconds:.1f}s to prune)", flush=True)
    return base


def report(results: list[dict], setup: dict) -> str:
    """The Markdown section: one table per model, plus a summary of who wins."""
    parts = [
        "## Accuracy at equal FLOPs (`scripts/bench_quality.py`)",
        "",
        f"Produced by `python scripts/bench_quality.py` on {setup['machine']}; torch {setup['torch']}, "
        f"torch-pruning {setup['torch_pruning']}, {setup['date']}. Calibration: {setup['calib']} training "
        f"images; fine-tune: 1 epoch of distillation on {setup['finetune']} unlabelled training images; "
        f"test: {setup['test']} test images. FLOPs kept is measured on the pruned model "
        "(`torch.utils.flop_counter`); every method is matched to specprune's achieved FLOPs "
        f"(column 'vs sp', tolerance {FLOPS_TOLERANCE:.0%}). Accuracy in %; best per budget in bold.",
        "",
        "![accuracy vs FLOPs](bench_quality.png)",
    ]
    wins = []
    for res in results:
        parts += ["", f"### {res['model']}: {res['params']:,} params, {res['flops'] / 1e6:.1f} MFLOPs, "
                      f"test accuracy {100 * res['test_accuracy']:.2f}%", ""]
        headers = ["method"]
        for b in sorted({r["budget"] for r in res["rows"]}, reverse=True):
            headers += [f"{b:.0%}: FLOPs kept", "vs sp", "no FT", "FT"]
        table_rows = []
        by = {(r["budget"], r["method"]): r for r in res["rows"]}
        budgets = sorted({r["budget"] for r in res["rows"]}, reverse=True)
        best = {(b, key): max(r[key] for r in res["rows"] if r["budget"] == b)
                for b in budgets for key in ("accuracy", "accuracy_finetuned")}
        for method in METHODS:
            cells = [method]
            for b in budgets:
                r = by.get((b, method))
                if r is None:
                    cells += ["-"] * 4
                    continue
                acc = [f"{100 * r[key]:.2f}" for key in ("accuracy", "accuracy_finetuned")]
                acc = [f"**{a}**" if r[key] == best[(b, key)] else a
                       for a, key in zip(acc, ("accuracy", "accuracy_finetuned"))]
                off = "" if abs(r["flops_vs_specprune"]) <= FLOPS_TOLERANCE else " (!)"
                cells += [f"{r['flops_kept']:.3f}", f"{r['flops_vs_specprune']:+.1%}{off}", *acc]
            table_rows.append(cells)
        parts.append(format_table(headers, table_rows))
        for b in budgets:
            sp = by[(b, "specprune")]
            others = [r for r in res["rows"] if r["budget"] == b and r["method"] not in SPECPRUNE_VARIANTS]
            rival = max(others, key=lambda r: r["accuracy"])
            rival_ft = max(others, key=lambda r: r["accuracy_finetuned"])
            wins.append([res["model"], f"{b:.0%}", f"{100 * sp['accuracy']:.2f}",
                         f"{rival['method']} {100 * rival['accuracy']:.2f}",
                         f"{100 * (sp['accuracy'] - rival['accuracy']):+.2f}",
                         f"{100 * sp['accuracy_finetuned']:.2f}",
                         f"{rival_ft['method']} {100 * rival_ft['accuracy_finetuned']:.2f}",
                         f"{100 * (sp['accuracy_finetuned'] - rival_ft['accuracy_finetuned']):+.2f}"])
    parts += ["", "### specprune against the best other method (not its own ablations)", "",
              format_table(["model", "FLOPs kept", "specprune no FT", "best other no FT", "margin",
                            "specprune FT", "best other FT", "margin"], wins)]
    return "\n".join(parts) + "\n"


def plot(results: list[dict], path: Path) -> None:
    """Accuracy against FLOPs kept, one column per model, no fine-tune on top, fine-tuned below."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(5 * len(results), 8), squeeze=False)
    for col, res in enumerate(results):
        for row, key in enumerate(("accuracy", "accuracy_finetuned")):
            ax = axes[row][col]
            for method in METHODS:
                pts = sorted((r["flops_kept"], 100 * r[key]) for r in res["rows"] if r["method"] == method)
                if pts:
                    style = "-o" if method == "specprune" else ("--." if method in SPECPRUNE_VARIANTS else ":x")
                    ax.plot(*zip(*pts), style, label=method, linewidth=2 if method == "specprune" else 1)
            ax.axhline(100 * res["test_accuracy"], color="grey", linewidth=0.8)
            ax.set_title(f"{res['model']} ({'after 1-epoch fine-tune' if row else 'no fine-tune'})")
            ax.set_xlabel("FLOPs kept")
            ax.set_ylabel("test accuracy (%)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rerun", action="store_true", help="ignore cached results for the chosen models")
    ap.add_argument("--report-only", action="store_true", help="only rewrite docs from cached results")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run (first model, 30%% budget, 256/512/1000 images); writes nothing to docs")
    ap.add_argument("--progress", action="store_true", help="show the library's progress bars")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    calib, finetune_n, test_n = (256, 512, 1000) if args.quick else (1024, 5000, None)
    budgets = (0.3,) if args.quick else BUDGETS
    models = args.models[:1] if args.quick else args.models
    if not args.report_only:
        data = load_data(calib, finetune_n, test_n)
        for name in models:
            cached = CACHE / f"quality-{name}.json"
            if cached.exists() and not args.rerun and not args.quick:
                print(f"{name}: cached in {cached}")
                continue
            t = time.perf_counter()
            result = run_model(name, budgets, data, args.progress)
            result["seconds"] = round(time.perf_counter() - t, 1)
            if not args.quick:
                CACHE.mkdir(exist_ok=True)
                cached.write_text(json.dumps(result, indent=1))
    if args.quick:
        return
    missing = [m for m in MODELS if not (CACHE / f"quality-{m}.json").exists()]
    if missing:
        print(f"docs not written: no results yet for {', '.join(missing)}")
        return
    results = [json.loads((CACHE / f"quality-{m}.json").read_text()) for m in MODELS]
    import torch_pruning
    setup = {"machine": f"{cpu_name()}, {args.threads} thread(s) per run", "torch": torch.__version__,
             "torch_pruning": torch_pruning.__version__, "date": time.strftime("%Y-%m-%d"),
             "calib": calib, "finetune": finetune_n, "test": len(load_split("t10k")[0]),
             "python": platform.python_version()}
    text = report(results, setup)
    write_section(ROOT / "docs" / "benchmarks.md", "bench_quality", text)
    plot(results, ROOT / "docs" / "bench_quality.png")
    (ROOT / "docs" / "bench_quality.json").write_text(json.dumps(results, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
