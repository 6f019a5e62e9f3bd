"""The benchmark's side of the AIMET rows: run scripts/aimet_runner.py in .venv-aimet and rebuild what it
pruned as an ordinary model of the benchmark's own classes.

AIMET's channel pruning returns the original model with smaller Conv2d / BatchNorm2d layers and, where a
pruned conv reads a residual stream, a ``Sequential(DownsampleLayer, conv)`` that selects the kept
channels. The runner describes every module (type and constructor arguments) in JSON and saves the
tensors; ``rebuild`` builds a fresh reference model, swaps in layers of those shapes (an AIMET
``DownsampleLayer`` becomes ``ChannelSelect``, an ``UpsampleLayer`` ``ChannelScatter``, each computing
the same thing), loads the state_dict strictly and checks that it reproduces the outputs AIMET's own
model gave in the runner. So no class crosses the two environments, and the rebuilt model is
evaluated and fine-tuned by the same code as every other row.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import torch
from torch import nn

from fashion_common import ROOT

VENV = ROOT / ".venv-aimet"
SETUP = ROOT / "scripts" / "setup_aimet_venv.sh"
RUNNER = ROOT / "scripts" / "aimet_runner.py"
# The AIMET release the setup script pins (aimet-torch==2.42.*): part of every AIMET row's cache key.
SPEC = re.search(r"^SPEC='([^']+)'", SETUP.read_text(), re.M).group(1)
MODES = {"AIMET CP manual": "manual", "AIMET CP greedy": "greedy"}
CHECK_TOLERANCE = 1e-4  # max |difference| / max |output| between AIMET's model and the rebuilt one


class AimetError(RuntimeError):
    """AIMET could not be set up or run, or its result could not be rebuilt faithfully."""


class ChannelSelect(nn.Module):
    """Keep the channels ``keep`` of the input (AIMET's DownsampleLayer: ``index_select`` on dim 1)."""

    def __init__(self, keep: list[int]):
        super().__init__()
        self.register_buffer("keep", torch.tensor(keep, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.index_select(x, 1, self.keep)


class ChannelScatter(nn.Module):
    """Put the input's channels back at ``indices`` of a zero tensor of ``mask``'s width, times ``scale``
    when there is one (AIMET's UpsampleLayer; the buffers keep its names so its state_dict loads)."""

    def __init__(self, width: int, count: int, scale: bool):
        super().__init__()
        self.register_buffer("mask", torch.zeros(width))
        self.register_buffer("indices", torch.zeros(count, dtype=torch.long))
        if scale:
            self.register_buffer("scale", torch.ones(1, width, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(x.shape[0], self.mask.shape[0], *x.shape[2:])
        out[:, self.indices] = x
        return out * self.scale if hasattr(self, "scale") else out


def aimet_python() -> Path:
    """The AIMET venv's interpreter, creating the venv (scripts/setup_aimet_venv.sh) when needed."""
    try:
        subprocess.run(["bash", str(SETUP)], check=True)
    except subprocess.CalledProcessError as exc:
        raise AimetError(f"{SETUP} failed (exit {exc.returncode}); run it by hand to see why") from exc
    return VENV / "bin" / "python"


def run_runner(request: dict, request_path: Path, threads: int) -> None:
    """Write ``request`` and run the AIMET runner on it in .venv-aimet; raises AimetError on failure."""
    python = aimet_python()
    request_path.write_text(json.dumps(request, indent=1))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": ""}
    proc = subprocess.run([str(python), str(RUNNER), str(request_path)], env=env)
    if proc.returncode != 0:
        raise AimetError(f"{RUNNER.name} exited {proc.returncode} on {request_path}")


def _build(entries: dict[str, dict], name: str) -> nn.Module:
    """A fresh module for the described entry ``name`` (children of a Sequential built recursively)."""
    entry = entries[name]
    kind, args = entry["type"], entry["args"]
    if kind == "Conv2d":
        return nn.Conv2d(args["in_channels"], args["out_channels"], tuple(args["kernel_size"]),
                         stride=tuple(args["stride"]), padding=tuple(args["padding"]),
                         dilation=tuple(args["dilation"]), groups=args["groups"], bias=args["bias"],
                         padding_mode=args["padding_mode"])
    if kind == "BatchNorm2d":
        return nn.BatchNorm2d(args["num_features"], eps=args["eps"], momentum=args["momentum"],
                              affine=args["affine"], track_running_stats=args["track_running_stats"])
    if kind == "Linear":
        return nn.Linear(args["in_features"], args["out_features"], bias=args["bias"])
    if kind == "DownsampleLayer":
        return ChannelSelect(args["keep"])
    if kind == "UpsampleLayer":
        return ChannelScatter(args["width"], args["count"], args["scale"])
    if kind == "Sequential":
        prefix = f"{name}."
        children = [n for n in entries if n.startswith(prefix) and "." not in n[len(prefix):]]
        children.sort(key=lambda n: int(n.rsplit(".", 1)[1]))
        return nn.Sequential(*[_build(entries, c) for c in children])
    raise AimetError(f"AIMET's pruned model has a {kind} at {name!r}, which the rebuild does not know")


def rebuild(model: nn.Module, modules: list[dict], state_dict: dict) -> nn.Module:
    """``model`` (a fresh, unpruned reference model) turned into AIMET's pruned model.

    Layers whose class is unchanged but whose shape changed are replaced by layers of the new shape; a
    module whose class changed (AIMET's Sequential around a conv) is built from its description.
    """
    entries = {e["name"]: e for e in modules}
    shaped = {"Conv2d", "BatchNorm2d", "Linear"}
    replaced: list[str] = []
    for entry in modules:
        name = entry["name"]
        if not name or any(name.startswith(f"{r}.") for r in replaced):
            continue
        try:
            current = model.get_submodule(name)
        except AttributeError as exc:
            raise AimetError(f"AIMET's pruned model has a module {name!r} the reference model lacks") from exc
        if type(current).__name__ == entry["type"] and entry["type"] not in shaped:
            continue  # ReLU, pooling, the model's own containers: nothing AIMET changed
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, _build(entries, name))
        replaced.append(name)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def load_result(model: nn.Module, out: Path) -> tuple[nn.Module, dict]:
    """The rebuilt pruned model and the runner's metadata for the job written to ``out`` (.pt/.json).

    Raises AimetError when the rebuilt model's outputs differ from AIMET's model's outputs.
    """
    meta = json.loads(out.with_suffix(".json").read_text())
    tensors = torch.load(out.with_suffix(".pt"), weights_only=True)
    for entry in meta["modules"]:
        if entry["type"] == "UpsampleLayer":  # its widths are in the state_dict
            entry["args"]["width"] = int(tensors["state_dict"][f"{entry['name']}.mask"].shape[0])
            entry["args"]["count"] = int(tensors["state_dict"][f"{entry['name']}.indices"].shape[0])
    pruned = rebuild(model, meta["modules"], tensors["state_dict"])
    with torch.no_grad():
        got = pruned(tensors["check_x"])
    want = tensors["check_y"]
    error = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
    if not error <= CHECK_TOLERANCE:
        raise AimetError(f"the rebuilt AIMET model ({out}) differs from AIMET's by {error:.2e} (relative)")
    meta["rebuild_error"] = error
    return pruned, meta
