"""Models as people write them (tests/corpus/, issue 13 item 7), through the public API.

For every corpus model, as a user would run it: a state_dict checkpoint, a config naming the arch as
"tests/corpus/<file>.py:<factory>", and ``specprune compress`` at 50% FLOPs through Click's CliRunner
(one run per model, shared by the checks that read its output):

1. compress never shows a traceback: exit 0, or a documented non-zero code with an ``Error: ...``
   message and no output directory left behind;
2. it succeeds, and every layer with output channels is either a pruned unit or skipped with a reason
   in report.json; a missed target is said out loud; the pruned model answers with outputs of the
   same structure and shapes;
3. keep-all (``prune_model`` with ``allocation: ratio``, ``ratio: 1.0`` and a tiny ridge) gives the
   original's outputs to float tolerance;
4. the exported model.onnx, run in ONNX Runtime, matches the pruned PyTorch model (model.pt loaded
   back with ``load_pruned``), at a batch size the exporter never saw.

Two more: pruning away channels that are exact copies of kept ones must not change the outputs (what a
wrong channel-to-column mapping breaks), and flag arguments set in ``model.forward_kwargs`` are the
ones the pruned and exported model run with.

Everything is parametrized by model, so a failure names it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner, Result
from torch import nn

import corpus
from helpers import prune_cfg
from specprune_cli import load_pruned, prune_model
from specprune_cli.cli import main
from specprune_cli.config import PruneConfig

REPO = Path(__file__).resolve().parent.parent
CORPUS = corpus.load_corpus()
IDS = [e.name for e in CORPUS]
WITH_FLAGS = [e for e in CORPUS if e.forward_kwargs]
TARGET = 0.5
MISS_FACTOR = 1.05  # issue 13: a result more than 5% above its target must be reported
ONNX_TOLERANCE = 1e-4  # the config default, relative to max(1, max|output|) as in specprune_cli.export
DOCUMENTED_EXIT_CODES = (1, 2, 3)  # README: 1 the run failed, 2 bad usage or config, 3 a gate failed

# Layers whose output channels a pruner could remove. A depthwise conv (groups == channels) keeps
# channel identity and travels with the unit that feeds it, so it is not a layer of its own here.
CHANNEL_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                  nn.ConvTranspose3d)
PER_CHANNEL = (nn.modules.batchnorm._NormBase, nn.LayerNorm)


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and 1 < module.groups == module.in_channels \
        == module.out_channels


def _config(entry: corpus.CorpusModel, forward_kwargs: dict | None = None) -> dict:
    prune: dict[str, Any] = {"target": {"flops": TARGET}, "round_to": 1, "min_channels": 2,
                             "max_positions": 16}
    if "allow_partial" in {f.name for f in dataclasses.fields(PruneConfig)}:
        prune["allow_partial"] = True  # issue 13 item 3: a missed target is then a warning, not exit 1
    model: dict[str, Any] = {"arch": entry.arch, "input_shape": list(entry.input_shape)}
    if forward_kwargs:
        model["forward_kwargs"] = forward_kwargs
    return {
        "model": model,
        "data": {"calibration": {"format": "synthetic", "num_samples": 32, "batch_size": 16}},
        "prune": prune,
        "evaluate": {"latency": False},
        "export": {"formats": ["pt", "onnx"], "onnx_tolerance": ONNX_TOLERANCE},
    }


@dataclasses.dataclass
class Run:
    """One ``specprune compress`` run on a corpus model."""

    entry: corpus.CorpusModel
    model: nn.Module
    result: Result
    out: Path

    def describe(self) -> str:
        """Exit code, the last lines of output and, if one escaped, the exception's traceback."""
        text = f"exit {self.result.exit_code}; output tail:\n{self.result.output[-1500:]}"
        if self.result.exc_info is not None and not isinstance(self.result.exception, SystemExit):
            trace = "".join(traceback.format_exception(*self.result.exc_info))
            text += f"\nescaped exception:\n{trace[-2500:]}"
        return text

    def report(self) -> dict:
        assert self.result.exit_code == 0, f"{self.entry.name}: compress failed, {self.describe()}"
        return json.loads((self.out / "report.json").read_text(encoding="utf-8"))


def _compress(entry: corpus.CorpusModel, work: Path, forward_kwargs: dict | None = None) -> Run:
    model = corpus.build(entry)
    checkpoint = work / "model.pt"
    torch.save(model.state_dict(), checkpoint)
    config = work / "cfg.yaml"
    config.write_text(yaml.safe_dump(_config(entry, forward_kwargs), sort_keys=False), encoding="utf-8")
    out = work / "out"
    with contextlib.chdir(REPO):  # the arch path is relative to the working directory, as for a user
        result = CliRunner().invoke(main, ["compress", str(checkpoint), "--config", str(config),
                                           "--output", str(out), "--quiet"])
    return Run(entry, model, result, out)


@pytest.fixture(scope="module", params=CORPUS, ids=IDS)
def compressed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """``specprune compress`` at 50% FLOPs on the model's checkpoint, run once per model."""
    return _compress(request.param, tmp_path_factory.mktemp(request.param.name))


def _structure(out: Any) -> Any:
    """The output's nesting with each tensor replaced by its shape."""
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, dict):
        return {k: _structure(v) for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return type(out)(_structure(v) for v in out)
    return type(out).__name__


def _tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor of an output, in order (dict values in insertion order, as the exporter flattens)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    return [t for v in out for t in _tensors(v)]


def _input(entry: corpus.CorpusModel, batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, *entry.input_shape, generator=torch.Generator().manual_seed(seed))


def _assert_close(got: Any, want: Any, tolerance: float, what: str) -> None:
    """Every tensor within ``tolerance * max(1, max|want|)``, the bound specprune's export uses."""
    got_t, want_t = _tensors(got), _tensors(want)
    assert len(got_t) == len(want_t), f"{what}: {len(got_t)} output tensors, expected {len(want_t)}"
    for i, (g, w) in enumerate(zip(got_t, want_t)):
        g, w = torch.as_tensor(g).double(), w.double()
        assert g.shape == w.shape, f"{what}: output {i} has shape {tuple(g.shape)}, expected {tuple(w.shape)}"
        diff = float((g - w).abs().max())
        bound = tolerance * max(1.0, float(w.abs().max()))
        assert diff <= bound, f"{what}: output {i} differs by {diff:.3g} > {bound:.3g}"


def _assert_onnx_matches(run: Run, forward_kwargs: dict | None = None) -> None:
    """The report says model.onnx was verified, and ONNX Runtime agrees with model.pt loaded back."""
    import onnxruntime as ort

    entry, report = run.entry, run.report()
    info = report["exports"]["onnx"]
    assert info["verified"] is True and info["batch_sizes"] == [2, 3]
    assert math.isfinite(info["max_abs_diff"])
    session = ort.InferenceSession(str(run.out / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    assert len(inputs) == 1, f"{entry.name}: the ONNX model has inputs {[i.name for i in inputs]}"
    x = _input(entry, 4, seed=5)
    with torch.no_grad():
        want = load_pruned(run.out / "model.pt")(x, **(forward_kwargs or {}))
    got = [torch.from_numpy(a) for a in session.run(None, {inputs[0].name: x.numpy()})]
    _assert_close(got, want, ONNX_TOLERANCE, f"{entry.name} in ONNX Runtime")


# -- the corpus itself ---------------------------------------------------------------------------

@pytest.mark.parametrize("entry", CORPUS, ids=IDS)
def test_corpus_model_runs_and_is_tiny(entry):
    model = corpus.build(entry)
    params = sum(p.numel() for p in model.parameters())
    assert params <= 40_000, f"{entry.name} has {params} parameters; the corpus must stay tiny"
    with torch.no_grad():
        out = model(_input(entry, 3, seed=0))
    assert all(t.shape[0] == 3 and torch.isfinite(t).all() for t in _tensors(out))


def test_corpus_covers_every_pattern_of_issue_13():
    assert len(CORPUS) >= 20
    covers = " ".join(e.covers for e in CORPUS)
    for pattern in ("view(-1, 320)", "Conv1d", "(channels=40, time)", "unsqueezed to (1, 40, 100)",
                    "ConvTranspose2d", "F.interpolate", "skip torch.cat", "four branches", "channel shuffle",
                    "dict output", "tuple output", "return_features=False", "squeeze(3) -> permute(0, 2, 1)",
                    "int attribute", "embed=False", "x.shape[-1] > 8", "F.conv2d", "ModuleList", "LayerNorm",
                    "groups=4", "SE block", "depthwise", "nn.Flatten", "F.pad", "nn.Upsample", "x * 0.5 + 1",
                    "BatchNorm after the activation", "Conv3d", "x.mean((2, 3))", "x.flatten(1)",
                    "torch.flatten(x, 1)", "x.reshape(x.size(0), -1)"):
        assert pattern in covers, f"no corpus model covers {pattern!r}"


# -- compress at 50% FLOPs -----------------------------------------------------------------------

def test_compress_never_shows_a_traceback(compressed: Run):
    """Exit 0, or a documented code with `Error: ...`; never an internal exception or half-written output."""
    result, out = compressed.result, compressed.out
    escaped = result.exception is not None and not isinstance(result.exception, SystemExit)
    assert not escaped, \
        f"{compressed.entry.name}: an internal exception reached the user; {compressed.describe()}"
    assert "Traceback (most recent call last)" not in result.output, compressed.describe()
    if result.exit_code != 0:
        assert result.exit_code in DOCUMENTED_EXIT_CODES, compressed.describe()
        assert re.search(r"^Error: \S", result.output, re.M), compressed.describe()
        left = [p.name for p in out.parent.iterdir() if p.name.startswith(out.name)]
        assert left == [], f"{compressed.entry.name}: a failed run left {left}"


def test_compress_prunes_or_skips_every_layer_with_a_reason(compressed: Run):
    entry, model, report = compressed.entry, compressed.model, compressed.report()
    pruning = report["prune"]
    units = {u["name"] for u in pruning["units"]}
    skipped = {s["name"]: s["reason"] for s in pruning["skipped"]}
    assert all(reason.strip() for reason in skipped.values()), \
        f"{entry.name}: a skip without a reason: {skipped}"
    # A layer absorbed into another unit (e.g. a gate) counts if that unit's entry names it.
    mentioned = json.dumps(pruning["units"])
    for name, module in model.named_modules():
        if isinstance(module, CHANNEL_LAYERS) and not _is_depthwise(module):
            assert name in units or name in skipped or f'"{name}"' in mentioned, \
                f"{entry.name}: layer {name} ({type(module).__name__}) is neither pruned nor skipped with " \
                f"a reason; units {sorted(units)}, skipped {skipped}"
    # Weights used through torch.nn.functional (no nn.Conv2d / nn.Linear around them) must be named.
    for owner_name, owner in model.named_modules():
        if isinstance(owner, CHANNEL_LAYERS + PER_CHANNEL):
            continue
        for pname, p in owner.named_parameters(recurse=False):
            qualified = f"{owner_name}.{pname}" if owner_name else pname
            if p.ndim >= 2:
                assert any(qualified in name or qualified in reason for name, reason in skipped.items()), \
                    f"{entry.name}: functional weight {qualified} is not reported as skipped; " \
                    f"skipped {skipped}"
    # Missing the target is never silent.
    kept = pruning["flops_after"] / pruning["flops_before"]
    if kept > MISS_FACTOR * TARGET:
        assert re.search(r"^warning:.*\b(target|flops)\b", compressed.result.output, re.M | re.I), \
            f"{entry.name}: kept {kept:.3f} of FLOPs against a {TARGET} target, and nothing said so"
    # The pruned model answers like the original: the same output structure and shapes.
    x = _input(entry, 5, seed=3)
    with torch.no_grad():
        want, got = model(x), load_pruned(compressed.out / "model.pt")(x)
    assert _structure(got) == _structure(want)
    assert all(torch.isfinite(t).all() for t in _tensors(got))


def test_onnx_export_matches_the_pruned_model(compressed: Run):
    _assert_onnx_matches(compressed)


# -- exactness -----------------------------------------------------------------------------------

@pytest.mark.parametrize("entry", CORPUS, ids=IDS)
def test_keep_all_gives_the_original_outputs(entry):
    model = corpus.build(entry)
    batches = [_input(entry, 8, seed=s) for s in (1, 2)]
    cfg = prune_cfg(allocation="ratio", ratio=1.0, ridge=1e-9, round_to=1, min_channels=1, max_positions=16)
    result = prune_model(model, batches, example_input=batches[0][:1], cfg=cfg, progress=False)
    assert result.report["params_after"] == result.report["params_before"]
    x = _input(entry, 5, seed=4)  # a batch size the run never saw
    with torch.no_grad():
        want, got = model(x), result.model(x)
    assert _structure(got) == _structure(want)
    _assert_close(got, want, 1e-4, f"{entry.name} at keep-all")


# The copies are made by halves in each layer's own channel order; a model that reorders channels
# before a per-channel layer (BatchNorm, depthwise conv) breaks them, and the check does not apply.
COPIES_DO_NOT_SURVIVE = {
    "tiny_shufflenet": "the channel shuffle interleaves the halves before the depthwise conv",
}
WITH_COPIES = [e for e in CORPUS if e.name not in COPIES_DO_NOT_SURVIVE]


def _copy_halves(model: nn.Module) -> None:
    """Make output channel j + m // 2 of every layer an exact copy of channel j: every weight, bias and
    running statistic takes the first half of its output-channel axis into the second half."""
    with torch.no_grad():
        for module in model.modules():
            out_dim = 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0
            tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
            for name, t in tensors:
                dim = out_dim if name == "weight" else 0
                if t.ndim == 0 or t.shape[dim] < 2:
                    continue
                h = t.shape[dim] // 2
                t.narrow(dim, h, h).copy_(t.narrow(dim, 0, h))


def _halves_equal(t: torch.Tensor, dim: int) -> bool:
    h = t.shape[dim] // 2
    return torch.equal(t.narrow(dim, h, h), t.narrow(dim, 0, h))


def _broken_copies(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Per-channel layers whose input does not hold the copies (in halves, in their own channel order)."""
    broken: list[str] = []

    def check(module: nn.Module, args: tuple) -> None:
        dim = args[0].ndim - 1 if isinstance(module, nn.LayerNorm) else 1
        if not _halves_equal(args[0], dim):
            broken.append(type(module).__name__)

    handles = [m.register_forward_pre_hook(check) for m in model.modules()
               if isinstance(m, PER_CHANNEL) or _is_depthwise(m)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return broken


@pytest.mark.parametrize("entry", WITH_COPIES, ids=[e.name for e in WITH_COPIES])
def test_pruning_away_exact_copies_changes_nothing(entry):
    """Half of every layer's output channels are copies of the other half, so keeping half of each
    unit (allocation ratio 0.5) with reconstruction loses nothing: each dropped channel is exactly one
    kept channel. The outputs on the calibration samples must not change. This is what a wrong
    channel-to-column mapping (through permute, reshape, a hard-coded view) breaks: the fold then
    moves the wrong columns."""
    model = corpus.build(entry)
    _copy_halves(model)
    broken = _broken_copies(model, _input(entry, 2, seed=6))  # a precondition of this test, not of specprune
    assert not broken, \
        f"{entry.name}: channel copies do not survive to {broken}; add it to COPIES_DO_NOT_SURVIVE"
    batches = [_input(entry, 16, seed=s) for s in range(10, 14)]
    # Every position is read (max_positions None) and the outputs are compared on calibration samples:
    # a channel that the statistics never see active (a ReLU that stays at zero) is rightly taken for
    # zero, and may differ on other inputs.
    cfg = prune_cfg(allocation="ratio", ratio=0.5, ridge=1e-9, round_to=1, min_channels=1, max_positions=None)
    result = prune_model(model, batches, example_input=batches[0][:1], cfg=cfg, progress=False)
    x = batches[1]
    with torch.no_grad():
        want, got = model(x), result.model(x)
    assert _structure(got) == _structure(want)
    units = [(u["name"], u["width"], u["kept"]) for u in result.report["units"]]
    _assert_close(got, want, 1e-4, f"{entry.name} with copies pruned away (units {units})")


# -- flag arguments from the config --------------------------------------------------------------

@pytest.mark.parametrize("entry", WITH_FLAGS, ids=[e.name for e in WITH_FLAGS])
def test_forward_kwargs_from_the_config_are_the_ones_pruned_and_exported(entry, tmp_path):
    """``model.forward_kwargs`` (issue 13 item 1) picks the branch: with ``embed: true`` the audio model
    is an embedding model, and that is what is pruned, saved and exported."""
    kwargs = dict(entry.forward_kwargs)
    run = _compress(entry, tmp_path, kwargs)
    assert run.result.exit_code == 0, f"{entry.name} with {kwargs}: {run.describe()}"
    x = _input(entry, 5, seed=8)
    with torch.no_grad():
        want, got = run.model(x, **kwargs), load_pruned(run.out / "model.pt")(x, **kwargs)
    assert _structure(got) == _structure(want)
    _assert_onnx_matches(run, kwargs)
