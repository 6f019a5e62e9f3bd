"""Human-readable tables for ``compress`` and ``analyze``, and the plots ``analyze --output`` writes."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

from specprune_cli.latency import verdict  # noqa: E402

OUTPUT_FILES = ("model.pt", "report.json", "config.resolved.yaml")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain fixed-width table; numbers right-aligned, text left-aligned."""
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = [bool(rows) and all(isinstance(row[i], (int, float)) for row in rows)
               for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        cells = (v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric))
        return "  ".join(cells).rstrip()

    out = [line(list(headers)), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.3g}"


def summary_table(report: dict) -> str:
    """What ``compress`` prints: params, FLOPs, accuracy, files and latency before/after, then each unit."""
    p = report["prune"]
    rows = []
    for name, key in (("params", "params"), ("FLOPs", "flops")):
        before, after = p[f"{key}_before"], p[f"{key}_after"]
        rows.append([name, human(before), human(after), f"{after / before:.3f}" if before else "-"])
    ev = report.get("evaluation") or {}
    if ev.get("accuracy_before") is not None:
        rows.append(["top-1 accuracy", f"{100 * ev['accuracy_before']:.2f}%",
                     f"{100 * ev['accuracy_after']:.2f}%",
                     f"{100 * (ev['accuracy_after'] - ev['accuracy_before']):+.2f} pts"])
        if ev.get("finetuned"):
            rows.append(["  (before fine-tune)", "", f"{100 * ev['accuracy_after_pruning']:.2f}%", ""])
    if ev:
        rows.append(["top-1 agreement", "", f"{100 * ev['agreement']:.2f}%", ""])
        rows.append(["output rel. error", "", f"{ev['relative_error']:.4f}", ""])
    rows += _int8_rows(ev)
    before_size = report.get("checkpoint_bytes")
    exports = report.get("exports") or {}
    for fmt, info in exports.items():
        before = human(before_size) + "B" if before_size and fmt == "pt" else ""
        kept = "" if info.get("verified") else "not verified"
        if fmt == "onnx-int8" and "onnx" in exports:
            kept = f"{info['bytes'] / exports['onnx']['bytes']:.2f}x model.onnx"
        rows.append([f"file {info.get('path', fmt)}", before, human(info["bytes"]) + "B", kept])
    rows += _latency_rows(report.get("latency") or {})
    text = [format_table(["", "before", "after", "kept"], rows), ""]
    units = p.get("units", [])
    if units:
        text.append(format_table(["unit", "kind", "width", "kept", "dof"],
                                 [[u["name"], u.get("kind", ""), u["width"], u["kept"], u.get("dof", "")]
                                  for u in units]))
    skipped = p.get("skipped", [])
    if skipped:
        text += ["", "not pruned:"] + [f"  {s['name']}: {s['reason']}" for s in skipped]
    folded = p.get("folded_reparametrizations", [])
    if folded:
        text += ["", "weight reparametrisations folded into plain weights (the same outputs in eval mode): "
                 + ", ".join(folded)]
    files = [f for f in OUTPUT_FILES if f != "model.pt" or "pt" in exports]
    files += [i["path"] for f, i in exports.items() if i["path"] not in files]
    text += ["", f"wrote {', '.join(files)} to {report['output_dir']}"]
    return "\n".join(text)


def _int8_rows(ev: dict) -> list[list[str]]:
    """The int8 model against the original (before) and, in the last column, against the float model."""
    int8 = ev.get("int8")
    if not int8:
        return []
    rows = []
    if int8.get("accuracy") is not None:
        before, after = ev["accuracy_before"], int8["accuracy"]
        rows.append(["int8 top-1 accuracy", f"{100 * before:.2f}%", f"{100 * after:.2f}%",
                     f"{100 * (after - before):+.2f} pts"])
    rows.append(["int8 top-1 agreement", "", f"{100 * int8['agreement']:.2f}%",
                 f"{100 * int8['agreement_with_float']:.2f}% with float"])
    rows.append(["int8 output rel. error", "", f"{int8['relative_error']:.4f}",
                 f"{int8['relative_error_to_float']:.4f} to float"])
    return rows


def _latency_rows(latency: dict) -> list[list[str]]:
    """One row per runtime and batch size: the medians and the speed-up, or why it cannot be told; the
    int8 model's rows compare it with the original float model."""
    rows = []
    for runtime, model, key in (("torch", "pruned", "speedup"), ("onnxruntime", "pruned", "speedup"),
                                ("onnxruntime", "int8", "speedup_int8")):
        timing = latency.get(runtime) or {}
        label = runtime if model == "pruned" else f"{runtime} {model}"
        for b, original in (timing.get("original") or {}).items() if model in timing else ():
            after, speedup = timing[model][b], timing[key][b]
            rows.append([f"{label} ms @ batch {b}", f"{original['median_ms']:.3f}",
                         f"{after['median_ms']:.3f}", f"{verdict(speedup)} ({speedup['runs']} runs)"])
    return rows


def analysis_table(analysis: dict) -> str:
    """The per-unit table `specprune analyze` prints, then skipped units and the suggestion."""
    ridges = [f"{r:g}" for r in analysis["ridges"]]
    suggested = analysis.get("suggested", {}).get("widths", {})
    headers = (["unit", "kind", "m"] + [f"N({r})" for r in ridges]
               + [f"N/m({analysis['ridge']:g})", "e90", "e99", "L@.75", "L@.5", "L@.25", "suggest"])
    ref = f"{analysis['ridge']:g}"
    rows = []
    for u in analysis["units"]:
        ratio = u["dof_ratio"].get(ref)
        if ratio is None:
            ratio = next(iter(u["dof_ratio"].values()))
        rows.append([u["name"], u["kind"], u["width"], *[u["dof"][r] for r in ridges], ratio,
                     u["energy90"], u["energy99"], u["loss"]["0.75"], u["loss"]["0.5"], u["loss"]["0.25"],
                     suggested.get(u["name"], "-")])
    parts = [format_table(headers, rows)]
    if analysis["skipped"]:
        parts.append("\nleft unpruned:")
        parts += [f"  {s['name']}: {s['reason']}" for s in analysis["skipped"]]
    s = analysis.get("suggested")
    if s:
        parts.append(f"\nsuggested widths for target {s['target']} ({s['allocation']} allocation): "
                     f"FLOPs {human(s['flops_before'])} -> {human(s['flops_after'])} "
                     f"({s['flops_after'] / s['flops_before']:.3f}), params {human(s['params_before'])} -> "
                     f"{human(s['params_after'])} ({s['params_after'] / s['params_before']:.3f})")
    p = analysis.get("prunability")
    if p:
        parts.append(f"prunability (tolerance {p['tolerance']:g} on {p['loss_kind']}): keep fraction "
                     f"{p['fraction']:g}")
    return "\n".join(parts)


def _save(fig: Any, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def plot_spectrum(analysis: dict, path: str | Path) -> None:
    """Eigenvalue decay per unit (normalised by the trace, log scale), as a PNG."""
    fig, ax = plt.subplots(figsize=(8, 5))
    units = analysis["units"]
    cmap = plt.get_cmap("viridis")
    for i, u in enumerate(units):
        spec = [max(v, 1e-12) for v in u["spectrum"]]
        x = [(j + 1) / len(spec) for j in range(len(spec))]
        ax.plot(x, spec, color=cmap(i / max(1, len(units) - 1)), lw=1,
                label=u["name"] if len(units) <= 12 else None)
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue index / width")
    ax.set_ylabel("eigenvalue / trace")
    ax.set_title("activation spectrum per unit (colour: depth)")
    if len(units) <= 12:
        ax.legend(fontsize=7)
    _save(fig, Path(path))
    plt.close(fig)


def plot_dof(analysis: dict, path: str | Path) -> None:
    """N(lambda)/m per unit along depth, one line per ridge, as a PNG."""
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(analysis["units"])), 4.5))
    names = [u["name"] for u in analysis["units"]]
    for r in analysis["ridges"]:
        key = f"{r:g}"
        ax.plot(range(len(names)), [u["dof_ratio"][key] for u in analysis["units"]], marker="o",
                label=f"ridge {key}")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=75, fontsize=7)
    ax.set_ylabel("N(lambda) / m")
    ax.set_ylim(0, 1.05)
    ax.set_title("degrees of freedom per unit")
    ax.legend()
    _save(fig, Path(path))
    plt.close(fig)
