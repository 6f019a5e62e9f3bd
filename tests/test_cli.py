"""`specprune compress` end to end: happy paths, every bad input's exact message and exit code, and
OUTDIR absent or untouched after a failure."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import click
import pytest
import torch
import yaml
from click.testing import CliRunner

from conftest import ARCH, make_cnn, write_npz
from specprune_cli import __version__, pipeline
from specprune_cli.cli import main
from specprune_cli.config_file import load_config
from specprune_cli.errors import BudgetError, ConfigError
from specprune_cli.evaluate import check_gates
from specprune_cli.plan import PLAN_FORMAT


class _FakeResult:
    def __init__(self, model):
        self.model = copy.deepcopy(model)
        self.plan = {"format": PLAN_FORMAT, "units": []}
        n = sum(p.numel() for p in model.parameters())
        self.report = {"flops_before": 100, "flops_after": 100, "params_before": n, "params_after": n,
                       "units": [], "skipped": [], "timings": {}}


@pytest.fixture
def fake_prune(monkeypatch):
    """Replace the core run with a keep-all fake: error-path tests stay fast and independent of it."""
    calls = []

    def fake(model, batches, *, example_input, config, progress):
        calls.append(sum(x.shape[0] for x, _ in batches))
        return _FakeResult(model)

    monkeypatch.setattr(pipeline, "_prune", fake)
    return calls


def invoke(*args: str) -> click.testing.Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _leftovers(out: Path) -> list[str]:
    """Temporary or backup siblings of OUTDIR that a finished run (failed or not) left behind."""
    return sorted(p.name for pattern in (".tmp-*", ".old-*") for p in out.parent.glob(f"{out.name}{pattern}"))


def _failure(result, out: Path) -> tuple[int, str, list[str]]:
    """What a failed run shows: (exit code, last line on stderr, what it left beside OUTDIR).

    A failed run must leave nothing: not OUTDIR itself, nor a temporary or backup sibling of it, so the
    last item of a correct failure is [].
    """
    lines = result.stderr.strip().splitlines()
    left = ([out.name] if out.exists() else []) + _leftovers(out)
    return result.exit_code, lines[-1] if lines else "", left


# --------------------------------------------------------------------------------------- happy paths

def test_compress_synthetic_json(tmp_path, cnn_checkpoint, write_config):
    from specprune_cli.pruned_file import load_pruned

    out = tmp_path / "out"
    result = invoke("compress", cnn_checkpoint, "--config", write_config(), "--output", out, "--json",
                    "--quiet", "--set", "prune.theta=0.25")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)                      # stdout is the JSON alone
    assert sorted(p.name for p in out.iterdir()) == ["config.resolved.yaml", "model.pt", "report.json"]
    assert json.loads((out / "report.json").read_text()) == report
    p = report["prune"]
    assert p["flops_after"] <= 0.6 * p["flops_before"] and p["params_after"] < p["params_before"]
    assert "FLOPs" in result.stderr and "features.0" in result.stderr   # summary table on stderr
    assert load_config(out / "config.resolved.yaml").prune.theta == 0.25
    pruned = load_pruned(out / "model.pt")
    assert pruned.features[0].out_channels == report["plan"]["units"][0]["kept"] < 16
    assert _leftovers(out) == []


def test_compress_npz_table_on_stdout(tmp_path, cnn_checkpoint, npz_data, write_config):
    out = tmp_path / "out"
    cfg = write_config({"format": "npz", "path": str(npz_data), "num_samples": 24, "batch_size": 8},
                       prune={"allocation": "ratio", "ratio": 0.5})
    result = invoke("compress", cnn_checkpoint, "-c", cfg, "-o", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].split() == ["before", "after", "kept"]
    report = json.loads((out / "report.json").read_text())
    assert report["calibration_samples"] == 24
    assert [u["kept"] for u in report["prune"]["units"]] == [8, 16]


def test_fake_run_writes_outputs_and_logs_progress(tmp_path, cnn_checkpoint, write_config, fake_prune):
    out = tmp_path / "out"
    result = invoke("compress", cnn_checkpoint, "-c", write_config(), "-o", out)
    assert result.exit_code == 0, result.output
    assert fake_prune == [16]
    assert result.stderr.splitlines()[0] == f"loading checkpoint {cnn_checkpoint}"
    assert (out / "model.pt").is_file()
    quiet = invoke("compress", cnn_checkpoint, "-c", write_config(), "-o", tmp_path / "q", "--quiet")
    assert quiet.exit_code == 0 and quiet.stderr == ""


# ------------------------------------------------------------------------------------------ bad input

def test_missing_checkpoint(tmp_path, write_config):
    out = tmp_path / "out"
    result = invoke("compress", tmp_path / "nope.pt", "-c", write_config(), "-o", out)
    assert _failure(result, out) == (
        2, f"Error: Invalid value for 'CHECKPOINT': File '{tmp_path / 'nope.pt'}' does not exist.", [])


def test_unreadable_config(tmp_path, cnn_checkpoint):
    out, cfg = tmp_path / "out", tmp_path / "missing.yaml"
    result = invoke("compress", cnn_checkpoint, "-c", cfg, "-o", out)
    assert _failure(result, out) == (
        2, f"Error: cannot read config file {cfg}: No such file or directory; check the --config path", [])


def test_non_yaml_config(tmp_path, cnn_checkpoint):
    out, cfg = tmp_path / "out", tmp_path / "bad.yaml"
    cfg.write_text("model: {arch: x\nprune: [\n")
    result = invoke("compress", cnn_checkpoint, "-c", cfg, "-o", out)
    assert result.exit_code == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: config file {cfg} is not valid YAML (line ")
    assert last.endswith("); fix the syntax there: check the indentation and that every key is followed "
                         "by ': '")
    assert not out.exists()


def test_unknown_key_suggests(tmp_path, cnn_checkpoint, write_config):
    out = tmp_path / "out"
    result = invoke("compress", cnn_checkpoint, "-c", write_config(prune={"ridg": 0.1}), "-o", out)
    assert _failure(result, out) == (2, "Error: unknown config key prune.ridg; did you mean prune.ridge?", [])


def test_wrong_type(tmp_path, cnn_checkpoint, write_config):
    out = tmp_path / "out"
    result = invoke("compress", cnn_checkpoint, "-c", write_config(), "-o", out,
                    "--set", "prune.round_to=eight")
    assert _failure(result, out) == (
        2, "Error: config key prune.round_to must be an integer, got 'eight' (str)", [])


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2"])
def test_flops_target_outside_unit_interval(tmp_path, cnn_checkpoint, write_config, value):
    out = tmp_path / "out"
    result = invoke("compress", cnn_checkpoint, "-c", write_config(), "-o", out, "--set",
                    f"prune.target.flops={value}")
    assert _failure(result, out) == (
        2, f"Error: config key prune.target.flops must be in (0, 1], got {float(value)!r}", [])


def test_arch_does_not_import(tmp_path, cnn_checkpoint, write_config):
    out = tmp_path / "out"
    cfg = write_config(model={"arch": "no_such_pkg_abc:Net"})
    result = invoke("compress", cnn_checkpoint, "-c", cfg, "-o", out)
    assert _failure(result, out) == (
        2, "Error: model.arch 'no_such_pkg_abc:Net' could not be imported (ModuleNotFoundError: No module "
           "named 'no_such_pkg_abc'); check that the module is installed (or the file exists, relative to "
           "the working directory) and that it defines the callable after the ':'", [])


def test_checkpoint_arch_mismatch(tmp_path, write_config):
    out, ckpt = tmp_path / "out", tmp_path / "narrow.pt"
    torch.save(make_cnn(width=8).state_dict(), ckpt)
    cfg = write_config(model={"kwargs": {"width": 4}})
    result = invoke("compress", ckpt, "-c", cfg, "-o", out)
    assert result.exit_code == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: checkpoint {ckpt} does not match model.arch {ARCH!r}: 13 shape "
                           "mismatches (features.0.weight: file (8, 3, 3, 3) vs model (4, 3, 3, 3), ")
    assert last.endswith("; check that model.arch and model.kwargs are the ones the checkpoint was trained "
                         "with")
    assert not out.exists()


def test_input_shape_rejected(tmp_path, cnn_checkpoint, write_config):
    out = tmp_path / "out"
    cfg = write_config(model={"input_shape": [1, 8, 8]})
    result = invoke("compress", cnn_checkpoint, "-c", cfg, "-o", out)
    assert result.exit_code == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: model.input_shape [1, 8, 8] does not fit the model: a forward pass on "
                           "zeros of shape (1, 1, 8, 8) failed (RuntimeError: ")
    assert last.endswith("); set model.input_shape to the shape of one sample the model was trained on "
                         "(channels first, without the batch dimension)")
    assert not out.exists()


def test_npz_without_x(tmp_path, cnn_checkpoint, write_config):
    out, npz = tmp_path / "out", tmp_path / "d.npz"
    import numpy as np

    np.savez(npz, images=np.zeros((4, 3, 8, 8), dtype=np.float32))
    cfg = write_config({"format": "npz", "path": str(npz)})
    result = invoke("compress", cnn_checkpoint, "-c", cfg, "-o", out)
    assert _failure(result, out) == (
        1, f"Error: data.calibration: {npz} has no array 'x' (found: images); save the inputs as x and the "
           "labels (optional) as y, e.g. numpy.savez(path, x=images, y=labels)", [])


def test_fewer_samples_warns_and_goes_on(tmp_path, cnn_checkpoint, write_config, fake_prune):
    out, npz = tmp_path / "out", write_npz(tmp_path / "few.npz", n=5)
    cfg = write_config({"format": "npz", "path": str(npz), "num_samples": 100})
    result = invoke("compress", cnn_checkpoint, "-c", cfg, "-o", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        f"warning: data.calibration: asked for 100 samples (num_samples) but {npz} has only 5; using all 5"]
    assert fake_prune == [5] and (out / "model.pt").is_file()


def test_zero_samples_is_an_error(tmp_path, cnn_checkpoint, write_config, fake_prune):
    out, npz = tmp_path / "out", write_npz(tmp_path / "empty.npz", n=0)
    cfg = write_config({"format": "npz", "path": str(npz)})
    result = invoke("compress", cnn_checkpoint, "-c", cfg, "-o", out)
    assert _failure(result, out) == (
        1, f"Error: data.calibration: {npz} holds no samples; point data.calibration.path at a non-empty "
           "dataset", [])
    assert fake_prune == []


def test_pickled_module_needs_trust(tmp_path, write_config, fake_prune):
    out, ckpt = tmp_path / "out", tmp_path / "whole.pt"
    torch.save(make_cnn(), ckpt)
    result = invoke("compress", ckpt, "-c", write_config(), "-o", out)
    assert _failure(result, out) == (
        1, f"Error: checkpoint {ckpt} holds pickled Python objects (a whole model, not only tensors), which "
           "specprune will not unpickle by default because unpickling can run arbitrary code. If you trust "
           "this file, pass --trust-checkpoint; better, re-save it with "
           "torch.save(model.state_dict(), path).", [])
    trusted = invoke("compress", ckpt, "-c", write_config(model={"arch": None}), "-o", out,
                     "--trust-checkpoint", "--quiet")
    assert trusted.exit_code == 0, trusted.output
    assert (out / "model.pt").is_file()


def test_outdir_not_empty_needs_overwrite(tmp_path, cnn_checkpoint, write_config, fake_prune):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = invoke("compress", cnn_checkpoint, "-c", write_config(), "-o", out)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: --output {out} already exists and is not empty; pass --overwrite to replace it, or choose "
        "another directory")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and fake_prune == []
    ok = invoke("compress", cnn_checkpoint, "-c", write_config(), "-o", out, "--overwrite", "--quiet")
    assert ok.exit_code == 0, ok.output
    assert sorted(p.name for p in out.iterdir()) == ["config.resolved.yaml", "model.pt", "report.json"]
    assert _leftovers(out) == []


def test_empty_outdir_is_used(tmp_path, cnn_checkpoint, write_config, fake_prune):
    out = tmp_path / "out"
    out.mkdir()
    assert invoke("compress", cnn_checkpoint, "-c", write_config(), "-o", out, "--quiet").exit_code == 0
    assert (out / "report.json").is_file()


def test_failure_leaves_existing_outdir_untouched(tmp_path, cnn_checkpoint, write_config, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    def over_budget(*args, **kwargs):
        raise BudgetError("prune.target.flops=0.01 cannot be met")

    monkeypatch.setattr(pipeline, "_prune", over_budget)
    result = invoke("compress", cnn_checkpoint, "-c", write_config(), "-o", out, "--overwrite")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == "Error: prune.target.flops=0.01 cannot be met"
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert _leftovers(out) == []


def test_missing_calibration_section(tmp_path, cnn_checkpoint):
    out, cfg = tmp_path / "out", tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"arch": ARCH, "input_shape": [3, 8, 8]}}))
    result = invoke("compress", cnn_checkpoint, "-c", cfg, "-o", out)
    assert _failure(result, out) == (
        2, "Error: data.calibration is not set; specprune needs calibration data to measure the layers: set "
           "data.calibration.format (npz, imagefolder, torchvision, idx or synthetic) and "
           "data.calibration.path", [])


@pytest.mark.parametrize("setting, message", [
    ("runtime.device=cuda", "runtime.device: cuda is not available in specprune {v} yet; use auto or cpu"),
])
def test_settings_not_built_yet_are_refused_not_ignored(tmp_path, cnn_checkpoint, write_config, fake_prune,
                                                       setting, message, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # cuda refused as unbuilt, not as absent
    out = tmp_path / "out"
    result = invoke("compress", cnn_checkpoint, "-c", write_config(), "-o", out, "--set", setting)
    assert _failure(result, out) == (2, "Error: " + message.format(v=__version__), [])
    assert fake_prune == []


@pytest.mark.parametrize("how", [("--device", "cuda"), ("--set", "runtime.device=cuda")])
def test_cuda_without_a_cuda_device_is_a_config_error(tmp_path, cnn_checkpoint, write_config, fake_prune,
                                                      monkeypatch, how):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    result = invoke("compress", cnn_checkpoint, "-c", write_config(), "-o", out, *how)
    assert _failure(result, out) == (
        2, "Error: runtime.device is cuda but torch sees no CUDA device on this machine "
           "(torch.cuda.is_available() is false); use --device cpu, or auto", [])
    assert fake_prune == []


def test_device_flag_wins_over_set(tmp_path, cnn_checkpoint, write_config, fake_prune):
    out = tmp_path / "out"
    result = invoke("compress", cnn_checkpoint, "-c", write_config(), "-o", out,
                    "--set", "runtime.device=cuda", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    assert yaml.safe_load((out / "config.resolved.yaml").read_text())["runtime"]["device"] == "cpu"


def test_analyze_refuses_torchrun(tmp_path, cnn_checkpoint, write_config, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = invoke("analyze", cnn_checkpoint, "-c", write_config())
    assert (result.exit_code, result.stderr.strip().splitlines()[-1]) == (
        2, "Error: analyze runs in one process; start it without torchrun (only compress shares its work "
           "between processes)")


def test_gate_range_and_accuracy_gate_without_labels(tmp_path, cnn_checkpoint, write_config):
    out = tmp_path / "out"
    bad = invoke("compress", cnn_checkpoint, "-c", write_config(), "-o", out, "--min-agreement", "1.5")
    assert bad.exit_code == 2 and "1.5 is not in the range 0<=x<=1" in bad.stderr
    result = invoke("compress", cnn_checkpoint, "-c", write_config(), "-o", out, "--max-accuracy-drop", "1")
    assert _failure(result, out) == (
        2, "Error: --max-accuracy-drop needs accuracy before and after pruning: set data.eval to a "
           "labelled dataset", [])


def test_impossible_gate_exits_3_with_outputs_written(tmp_path):
    """--max-accuracy-drop 0 on a model pruned to 30% of its FLOPs without fine-tuning: the bundled
    example loses accuracy (measured: 93.5% -> 92.8% on 1,000 images), so the gate fails."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    result = invoke("compress", root / "examples/fashion_cnn.pt", "-c", root / "configs/example.yaml",
                    "-o", out, "--set", "prune.target.flops=0.3", "--set", "finetune.epochs=0",
                    "--set", "export.formats=[pt]",
                    "--set", "evaluate.latency=false", "--set", "data.eval.num_samples=1000",
                    "--max-accuracy-drop", "0", "--min-agreement", "0.5", "--json")
    assert result.exit_code == 3, result.output
    assert "quality gate failed: max_accuracy_drop" in result.stderr
    assert "for inspection" in result.stderr
    report = json.loads((out / "report.json").read_text())
    gates = {g["name"]: g for g in report["gates"]}
    assert gates["max_accuracy_drop"]["passed"] is False and gates["max_accuracy_drop"]["value"] > 0
    assert gates["min_agreement"]["passed"] is True
    assert sorted(p.name for p in out.iterdir()) == ["config.resolved.yaml", "model.pt", "report.json"]
    assert json.loads(result.stdout)["gates"] == report["gates"]


def test_check_gates():
    ev = {"accuracy_before": 0.90, "accuracy_after": 0.88, "agreement": 0.95}
    gates = check_gates(ev, max_accuracy_drop=1.0, min_agreement=0.9)
    assert [(g["name"], g["value"], g["passed"]) for g in gates] == [("max_accuracy_drop", 2.0, False),
                                                                      ("min_agreement", 0.95, True)]
    with pytest.raises(ConfigError) as exc:
        check_gates({"agreement": 0.9}, max_accuracy_drop=1.0, min_agreement=None)
    assert str(exc.value) == ("--max-accuracy-drop needs accuracy before and after pruning: set data.eval "
                              "to a labelled dataset")


# -------------------------------------------------------------------------------------- help, version

def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout == f"specprune {__version__}\n"


def test_every_command_and_option_has_help():
    ctx = click.Context(main)
    commands = {"main": main, **{name: main.get_command(ctx, name) for name in main.list_commands(ctx)}}
    assert "compress" in commands
    for name, cmd in commands.items():
        assert (cmd.help or "").strip(), f"command {name} has no help text"
        for param in cmd.params:
            if isinstance(param, click.Option):
                assert (param.help or "").strip(), f"{name} {param.opts} has no help text"
        assert invoke(*([] if name == "main" else [name]), "--help").exit_code == 0
