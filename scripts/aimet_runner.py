#!/usr/bin/env python
"""AIMET channel pruning for scripts/bench_quality.py; runs inside .venv-aimet (scripts/setup_aimet_venv.sh).

AIMET (aimet-torch 2.42) brings its own ~70 dependencies, so it runs in its own virtual environment and
talks to the benchmark through files. The benchmark writes a request (JSON) naming a reference model's
weights, a tensor file with the calibration and held-out images, and the jobs; this script prunes and
writes, per job, a plain description of the pruned model and its tensors, from which
``scripts/aimet_bench.py`` rebuilds it with the benchmark's own classes. Nothing pickled crosses the
two environments: the tensors are read and written as plain tensor files (``weights_only=True``), the
module structure as JSON. The rebuilt model is checked against the outputs AIMET's model gave here.

What AIMET does (``aimet_torch.compress.ModelCompressor.compress_model`` with
``CompressionScheme.channel_pruning`` and ``CostMetric.mac``): for each selected Conv2d (groups 1, not
the first conv, whose input is the image, nor one AIMET cannot prune with others: ``upsampling_convs``)
it keeps the input channels with the largest squared weight norm, removes the producers' matching
output channels where it can ("winnowing"; a channel that also feeds a residual add is selected by an
inserted index op instead), and refits the conv by least squares: targets are the *original* network's
outputs of that conv, inputs the already-pruned network's activations, ``num_reconstruction_samples`` =
10 positions per calibration image (all of them).

Modes (one job each):
  manual  ``ChannelPruningParameters.Mode.manual``: one compression ratio for every selected conv, found
          by a search so that the pruned model's FLOPs (``specprune_cli.flops``) meet the job's target.
          The bisection runs AIMET with its reconstruction switched off (the kept widths do not depend on
          it); the final model is pruned with reconstruction.
  greedy  ``Mode.auto`` with ``GreedySelectionParameters`` (10 ratio candidates per layer, AIMET's
          default): per-layer ratios from each layer's accuracy-vs-ratio curve on the held-out images
          (the eval callback), meeting AIMET's MAC target. AIMET's MAC ratio is not the FLOPs
          fraction the benchmark counts, so its target is searched too (see ``Job.search``). The
          per-layer eval scores are computed once per model and reused (AIMET's own
          ``saved_eval_scores_dict``), kept in the request's work directory.

Usage (the benchmark calls it): .venv-aimet/bin/python scripts/aimet_runner.py REQUEST.json
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
SAMPLES_PER_IMAGE = 10  # hard-coded in aimet_torch.data_subsampler
BATCH = 64


def _load_file_module(name: str, path: Path):
    """Import one file of specprune_cli by path: the package's __init__ pulls in the CLI's dependencies,
    which .venv-aimet does not have; models.py and flops.py need only torch."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MODELS = _load_file_module("specprune_models", ROOT / "specprune_cli" / "models.py")
FLOPS = _load_file_module("specprune_flops", ROOT / "specprune_cli" / "flops.py")


def _basic_block_forward(self, x: torch.Tensor) -> torch.Tensor:
    # specprune_cli.models.BasicBlock with its module ReLU after the add instead of torch.relu: the same
    # function, written the way AIMET's winnower can follow (it has no rule for a functional relu, and
    # reuses one ReLU module twice the way torchvision's ResNet does).
    y = self.relu(self.bn1(self.conv1(x)))
    return self.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


def aimet_compatible(model: nn.Module) -> nn.Module:
    """``model`` with each residual block's forward written with modules only (same outputs), in place.

    AIMET fails on the reference resnet_small as written ("Unsupported op_type relu"); the rebuilt model
    in the benchmark runs the original forward, and its outputs are checked against AIMET's.
    """
    for m in model.modules():
        if isinstance(m, MODELS.BasicBlock):
            m.forward = _basic_block_forward.__get__(m)
    return model


def describe(model: nn.Module) -> list[dict]:
    """Every module of ``model`` (preorder) as {name, type, args}: what aimet_bench.rebuild needs."""
    entries = []
    for name, m in model.named_modules():
        args: dict = {}
        kind = type(m).__name__
        if isinstance(m, nn.Conv2d):
            args = {"in_channels": m.in_channels, "out_channels": m.out_channels,
                    "kernel_size": list(m.kernel_size), "stride": list(m.stride), "padding": list(m.padding),
                    "dilation": list(m.dilation), "groups": m.groups, "bias": m.bias is not None,
                    "padding_mode": m.padding_mode}
            if tuple(m.weight.shape) != (m.out_channels, m.in_channels // m.groups, *m.kernel_size):
                raise RuntimeError(f"{name}: weight {tuple(m.weight.shape)} disagrees with its attributes")
        elif isinstance(m, nn.BatchNorm2d):
            args = {"num_features": m.num_features, "eps": m.eps, "momentum": m.momentum, "affine": m.affine,
                    "track_running_stats": m.track_running_stats}
        elif isinstance(m, nn.Linear):
            args = {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}
        elif kind == "DownsampleLayer":
            args = {"keep": [int(i) for i in m.keep_tensor.tolist()]}
        elif kind == "UpsampleLayer":
            args = {"scale": hasattr(m, "scale")}
        entries.append({"name": name, "type": kind, "args": args})
    return entries


class Job:
    """One pruning job: a mode and a FLOPs target for one model."""

    def __init__(self, model: nn.Module, data: dict, spec: dict, workdir: Path, tolerance: float,
                 excluded: list[str] = ()):
        self.model, self.data, self.spec, self.workdir, self.tolerance = model, data, spec, workdir, tolerance
        self.excluded = list(excluded)
        self.example = torch.zeros(1, *data["calib_x"].shape[1:])
        self.flops0 = FLOPS.count_flops(model, self.example)
        self.loader = DataLoader(TensorDataset(data["calib_x"], data["calib_y"]), batch_size=BATCH)
        convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        self.first_conv = convs[0]
        self.selected = [n for n in convs[1:] if model.get_submodule(n).groups == 1 and n not in excluded]
        self.scores_path = workdir / "data" / "greedy_selection_eval_scores_dict.pkl"  # AIMET's name

    def evaluate(self, model: nn.Module, iterations=None, use_cuda: bool = False) -> float:
        """AIMET's eval callback: top-1 accuracy on the held-out labelled images."""
        x, y = self.data["heldout_x"], self.data["heldout_y"]
        model.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(x), 256):
                correct += int((model(x[i:i + 256]).argmax(1) == y[i:i + 256]).sum())
        return correct / len(x)

    def compress(self, mode: str, ratio: float, layers: list[str] | None = None) -> nn.Module:
        """ModelCompressor.compress_model (channel pruning, MAC cost) on a copy of the model, in ``mode`` at
        ``ratio``: the ratio of every selected conv (or of ``layers``) in manual mode, the greedy search's
        target in auto mode."""
        from aimet_torch.common.defs import CompressionScheme, CostMetric, GreedySelectionParameters
        from aimet_torch.compress import ModelCompressor
        from aimet_torch.defs import ChannelPruningParameters, ModuleCompRatioPair

        model = copy.deepcopy(self.model)  # AIMET names layers by module identity: pairs use the copy's
        cp = ChannelPruningParameters
        if mode == "manual":
            pairs = [ModuleCompRatioPair(model.get_submodule(n), ratio) for n in layers or self.selected]
            mode_enum, mode_params = cp.Mode.manual, cp.ManualModeParams(pairs)
        else:
            saved = str(self.scores_path) if self.scores_path.exists() else None
            greedy = GreedySelectionParameters(target_comp_ratio=ratio, num_comp_ratio_candidates=10,
                                               saved_eval_scores_dict=saved)
            mode_enum = cp.Mode.auto
            ignore = [model.get_submodule(n) for n in (self.first_conv, *self.excluded)]
            mode_params = cp.AutoModeParams(greedy, modules_to_ignore=ignore)
        samples = SAMPLES_PER_IMAGE * len(self.data["calib_x"])  # every calibration image
        params = cp(data_loader=self.loader, num_reconstruction_samples=samples,
                    allow_custom_downsample_ops=True, mode=mode_enum, params=mode_params, multiplicity=1)
        pruned, _stats = ModelCompressor.compress_model(
            model, eval_callback=self.evaluate, eval_iterations=None, input_shape=tuple(self.example.shape),
            compress_scheme=CompressionScheme.channel_pruning, cost_metric=CostMetric.mac, parameters=params)
        return pruned.eval()

    def fraction(self, mode: str, ratio: float, reconstruct: bool) -> tuple[float, nn.Module]:
        """FLOPs kept by AIMET at ``ratio``, and the pruned model."""
        with _without_reconstruction(not reconstruct):
            pruned = self.compress(mode, ratio)
        return FLOPS.count_flops(pruned, self.example) / self.flops0, pruned

    def search(self, mode: str, target: float) -> tuple[float, list[tuple[float, float]], nn.Module | None]:
        """The ratio whose pruned FLOPs fraction is closest to ``target``, the (ratio, fraction) pairs
        tried, and the model pruned with reconstruction at that ratio when the search made it.

        Interpolation search inside a shrinking bracket, starting at the target itself (the pruned
        FLOPs grow with the ratio, in steps: widths are whole channels, and greedy ratios come from 10
        candidates per layer): over the uniform ratio in manual mode (12 tries at most), over AIMET's
        MAC target in greedy mode (5 tries at most: each runs AIMET's whole greedy search). Searches run
        without the reconstruction, except greedy's first call: AIMET computes and saves its per-layer
        eval scores there, on networks pruned with reconstruction, and that call is often the result.
        """
        tried: list[tuple[float, float]] = []
        first = None
        lo, hi = (0.0, 0.0), (1.0, 1.0)  # (ratio, fraction); both ends virtual
        while len(tried) < (12 if mode == "manual" else 5) and hi[0] - lo[0] > 1e-3:
            width = hi[0] - lo[0]
            r = lo[0] + (target - lo[1]) * width / (hi[1] - lo[1]) if hi[1] > lo[1] else lo[0] + width / 2
            if tried:
                r = min(max(r, lo[0] + 0.1 * width), hi[0] - 0.1 * width)  # a step cannot stall the bracket
            reconstruct = mode == "greedy" and first is None
            f, pruned = self.fraction(mode, r, reconstruct=reconstruct)
            if reconstruct:
                first = (r, pruned)
            tried.append((r, f))
            if abs(f / target - 1) < self.tolerance / 4:
                break
            lo, hi = (lo, (r, f)) if f > target else ((r, f), hi)
        best = min(tried, key=lambda p: abs(p[1] / target - 1))
        return best[0], tried, first[1] if first is not None and best[0] == first[0] else None

    def run(self) -> dict:
        """Search the ratio, prune with reconstruction, save the result, and return the metadata."""
        mode, target = self.spec["mode"], self.spec["target_flops"] / self.flops0
        t = time.perf_counter()
        ratio, tried, pruned = self.search(mode, target)
        seconds = time.perf_counter() - t
        if pruned is None:
            _, pruned = self.fraction(mode, ratio, reconstruct=True)
        fraction = FLOPS.count_flops(pruned, self.example) / self.flops0
        if abs(fraction - dict(tried)[ratio]) > 1e-9:
            raise RuntimeError(f"AIMET {mode}: FLOPs with reconstruction ({fraction:.4f}) differ from the "
                               f"search without it ({dict(tried)[ratio]:.4f}) at ratio {ratio}")
        out = Path(self.spec["out"])
        check_x = self.data["calib_x"][:BATCH]
        with torch.no_grad():
            check_y = pruned(check_x)
        torch.save({"state_dict": pruned.state_dict(), "check_x": check_x, "check_y": check_y},
                   out.with_suffix(".pt"))
        meta = {"mode": mode, "ratio": ratio, "flops_fraction": fraction, "target_fraction": target,
                "tried": tried, "seconds": round(time.perf_counter() - t, 2),
                "search_seconds": round(seconds, 2), "heldout_accuracy": self.evaluate(pruned),
                "aimet": aimet_version(), "excluded": self.excluded, "modules": describe(pruned)}
        out.with_suffix(".json").write_text(json.dumps(meta, indent=1))
        return meta


def upsampling_convs(model: nn.Module, data: dict, workdir: Path) -> list[str]:
    """The convs whose pruning alone (ratio 0.5) makes AIMET put an UpsampleLayer into the model.

    AIMET re-expands a BatchNorm's output with an UpsampleLayer when it removed more channels there than
    the next op reads (on mobilenetv2_small, at the residual streams); its own winnower cannot trace
    that layer afterwards ("Unsupported op_type zeros"), so pruning any further conv fails. Those convs
    are left out of both modes, as a user would have to, and the result records them.
    """
    probe = Job(model, data, {"mode": "manual", "target_flops": 1, "out": ""}, workdir, 0.0)
    found = []
    for name in probe.selected:
        with _without_reconstruction(True):
            try:
                pruned = probe.compress("manual", 0.5, layers=[name])
            except NotImplementedError:
                found.append(name)
                continue
        if any(type(m).__name__ == "UpsampleLayer" for m in pruned.modules()):
            found.append(name)
    return found


def aimet_version() -> str:
    import aimet_torch
    return aimet_torch.__version__


@contextlib.contextmanager
def _without_reconstruction(active: bool):
    """Switch AIMET's least-squares refit off (for the width searches, whose FLOPs it cannot change)."""
    from aimet_torch.channel_pruning.channel_pruner import InputChannelPruner

    original = InputChannelPruner._data_subsample_and_reconstruction
    if active:
        InputChannelPruner._data_subsample_and_reconstruction = lambda *args, **kwargs: None
    try:
        yield
    finally:
        InputChannelPruner._data_subsample_and_reconstruction = original


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    request = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(request.get("threads", 1))
    from aimet_torch.channel_pruning import channel_pruner  # noqa: F401  (creates AIMET's loggers)
    from aimet_torch.compress import ModelCompressor  # noqa: F401
    # AIMET logs each layer it touches, warns on every graph it traces that it cannot isolate the
    # outputs (harmless here) and torch deprecates the jit.trace it uses: keep the run's log readable.
    for name in list(logging.root.manager.loggerDict):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.manual_seed(0)
    model = getattr(MODELS, request["model"])()
    model.load_state_dict(torch.load(request["weights"], weights_only=True))
    model = aimet_compatible(model.eval())
    data = torch.load(request["data"], weights_only=True)
    workdir = Path(request["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)  # AIMET writes its eval-score and ratio pickles to ./data
    probe = workdir / "excluded.json"  # per model, data and code, like the work directory
    if not probe.exists():
        probe.write_text(json.dumps(upsampling_convs(model, data, workdir)))
    excluded = json.loads(probe.read_text())
    print(json.dumps({"excluded": excluded}), flush=True)
    for spec in request["jobs"]:
        meta = Job(model, data, spec, workdir, request["tolerance"], excluded).run()
        print(json.dumps({"mode": meta["mode"], "ratio": round(meta["ratio"], 4),
                          "flops_fraction": round(meta["flops_fraction"], 4),
                          "target_fraction": round(meta["target_fraction"], 4),
                          "seconds": meta["seconds"],
                          "aimet": aimet_version()}), flush=True)


if __name__ == "__main__":
    main()
