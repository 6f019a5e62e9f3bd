"""Config contract: defaults < YAML < --set, exact error messages, dict round-trip."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from specprune_cli.config import Config, DataConfig, DataSection, ExportConfig, Int8Config, PruneConfig
from specprune_cli.config_file import apply_overrides, dump_resolved, load_config
from specprune_cli.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_defaults_round_trip_through_dict():
    cfg = Config()
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert cfg.prune.target_kind == "flops" and cfg.prune.target_value == 0.5


def test_default_yaml_matches_dataclass_defaults():
    """configs/default.yaml documents the defaults: the sections without user choices must equal them."""
    cfg = load_config(REPO / "configs" / "default.yaml")
    for section in ("prune", "finetune", "evaluate", "export", "runtime"):
        assert getattr(cfg, section) == getattr(Config(), section), section
    assert cfg.data.calibration == DataConfig(format="npz", path="calibration.npz")


def test_precedence_defaults_yaml_set(tmp_path):
    p = _write(tmp_path, "prune:\n  ridge: 1.0e-2\n  theta: 0.25\n")
    cfg = load_config(p, ["prune.theta=0.75"])
    assert cfg.prune.ridge == 0.01          # YAML beats default
    assert cfg.prune.theta == 0.75          # --set beats YAML
    assert cfg.prune.round_to == 8          # default stays


def test_set_target_kind_replaces_target(tmp_path):
    p = _write(tmp_path, "prune:\n  target: {flops: 0.5}\n")
    cfg = load_config(p, ["prune.target.params=0.3"])
    assert cfg.prune.target == {"params": 0.3}
    assert (cfg.prune.target_kind, cfg.prune.target_value) == ("params", 0.3)


def test_yaml_1_1_exponent_without_dot_is_a_number(tmp_path):
    # PyYAML reads `1e-3` as a string; a user writing it means a number.
    cfg = load_config(_write(tmp_path, "prune:\n  ridge: 1e-3\n"), ["finetune.lr=5e-4"])
    assert cfg.prune.ridge == 1e-3 and cfg.finetune.lr == 5e-4


def test_lists_become_tuples_and_dump_resolved_reloads(tmp_path):
    cfg = load_config(None, ["prune.exclude=[fc, 're:head\\..*']", "data.calibration.format=synthetic",
                             "data.calibration.num_samples=8"])
    assert cfg.prune.exclude == ("fc", "re:head\\..*")
    out = tmp_path / "config.resolved.yaml"
    dump_resolved(cfg, out)
    assert load_config(out) == cfg
    assert yaml.safe_load(out.read_text())["prune"]["exclude"] == ["fc", "re:head\\..*"]


def test_prune_config_direct_construction_is_validated_and_replaceable():
    cfg = PruneConfig(exclude=["fc"], ridge=1e-9)
    assert cfg.exclude == ("fc",)
    assert dataclasses.replace(cfg, allocation="ratio", ratio=0.3).ratio == 0.3
    with pytest.raises(ConfigError) as exc:
        PruneConfig(theta=2)
    assert str(exc.value) == "config key prune.theta must be in [0, 1], got 2.0"


@pytest.mark.parametrize("text, message", [
    ("prune:\n  ridg: 0.1\n", "unknown config key prune.ridg; did you mean prune.ridge?"),
    ("prun: {}\n", "unknown config key prun; did you mean prune?"),
    ("data:\n  calibration:\n    format: npz\n    path: a.npz\n    nm_samples: 3\n",
     "unknown config key data.calibration.nm_samples; did you mean data.calibration.num_samples?"),
    ("prune:\n  zzz: 1\n", "unknown config key prune.zzz; valid keys under prune: target, allocation, ratio, "
     "overrides, ridge, theta, order, exclude, round_to, min_channels, max_positions, dof_rows, "
     "dof_min_samples, seed, reconstruct, target_signal, intercept, kernel_refit, allow_partial"),
    ("prune:\n  dof_rows: 0\n", "config key prune.dof_rows must be positive, got 0.0"),
    ("prune:\n  dof_min_samples: 0\n", "config key prune.dof_min_samples must be 1 or more, got 0"),
    ("prune:\n  ridge: abc\n", "config key prune.ridge must be a number, got 'abc' (str)"),
    ("prune:\n  round_to: true\n", "config key prune.round_to must be an integer, got True (bool)"),
    ("prune:\n  order: random\n",
     "config key prune.order must be one of sequential, oneshot, got 'random' (str)"),
    ("prune:\n  target: {flops: 1.5}\n", "config key prune.target.flops must be in (0, 1], got 1.5"),
    ("prune:\n  target: {flops: 0}\n", "config key prune.target.flops must be in (0, 1], got 0.0"),
    ("prune:\n  target: {flops: 0.5, params: 0.5}\n",
     "config key prune.target must hold exactly one of flops or params (the fraction to keep), e.g. "
     "{flops: 0.5}; got {'flops': 0.5, 'params': 0.5}"),
    ("model:\n  input_shape: [3, a]\n", "config key model.input_shape[1] must be an integer, got 'a' (str)"),
    ("model:\n  arch: resnet18\n", "config key model.arch must have the form 'package.module:callable' or "
     "'path/to/file.py:callable', got 'resnet18'"),
    ("data:\n  eval: {format: npz}\n", "config key data.eval.path is required for format npz"),
    ("data:\n  calibration: {format: synthetic, mean: [0.5, 0.5], std: [1, 1]}\n",
     "config key data.calibration.mean has 2 values but model.input_shape [3, 32, 32] has 3 channels; "
     "give one value or one per channel"),
    ("model:\n  forward_kwargs: {a-b: 1}\n", "config key model.forward_kwargs has the key 'a-b', which is "
                                             "not "
     "a Python argument name; use the name of a keyword argument of forward"),
    ("prune:\n  target_signal: both\n",
     "config key prune.target_signal must be one of original, pruned, got 'both' (str)"),
    ("prune:\n  intercept: 1\n", "config key prune.intercept must be true or false, got 1 (int)"),
    ("prune:\n  allow_partial: yes please\n",
     "config key prune.allow_partial must be true or false, got 'yes please' (str)"),
    ("prune:\n  allocation: greedy\n",
     "config key prune.allocation must be one of dof, uniform, loss, ratio, got 'greedy' (str)"),
    ("evaluate:\n  output: true\n",
     "config key evaluate.output must be an integer or a string or null, got True (bool)"),
    ("evaluate:\n  output: -1\n", "config key evaluate.output must be 0 or more, got -1"),
    ("evaluate:\n  latency_seconds: 0\n", "config key evaluate.latency_seconds must be positive, got 0.0"),
    ("evaluate:\n  gate_on: fp16\n", "config key evaluate.gate_on must be one of float, int8 or null, got "
                                     "'fp16' (str)"),
    ("evaluate:\n  gate_on: int8\n", "config key evaluate.gate_on is int8 but export.formats does not list "
     "onnx-int8; add onnx-int8 to export.formats, or set evaluate.gate_on to float or null"),
    ("export:\n  formats: [pt, onnx-int8]\n", "config key export.formats lists onnx-int8 without onnx; the "
     "int8 model is quantized from model.onnx, so add onnx to export.formats"),
    ("export:\n  int8: {activations: int4}\n",
     "config key export.int8.activations must be one of uint8, int8, got 'int4' (str)"),
    ("export:\n  int8: {method: kl}\n",
     "config key export.int8.method must be one of minmax, entropy, percentile, got 'kl' (str)"),
    ("export:\n  int8: {nm_samples: 3}\n",
     "unknown config key export.int8.nm_samples; did you mean export.int8.num_samples?"),
    ("export:\n  int8: {num_samples: 0}\n", "config key export.int8.num_samples must be positive, got 0"),
    ("export:\n  int8: {exclude: ['re:(']}\n", "config key export.int8.exclude has an invalid regex 're:(' "
     "(missing ), unterminated subpattern at position 0); patterns are module names or 're:' followed by a "
     "Python regular expression matching whole names"),
    ("runtime:\n  device: tpu\n", "config key runtime.device must be one of auto, cpu, cuda, got 'tpu' "
                                  "(str)"),
    ("runtime:\n  timeout_s: -5\n", "config key runtime.timeout_s must be positive, got -5.0"),
    ("runtim: {}\n", "unknown config key runtim; did you mean runtime?"),
    ("export:\n  formats: [pt, tflite]\n",
     "config key export.formats[1] must be one of pt, onnx, onnx-int8, torchscript, module, got 'tflite' "
     "(str)"),
])
def test_bad_config_messages(tmp_path, text, message):
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, text))
    assert str(exc.value) == message
    assert exc.value.exit_code == 2


def test_direct_construction_converts_nested_mappings_and_names_their_path():
    assert ExportConfig(int8={"method": "entropy"}).int8 == Int8Config(method="entropy")
    assert Config.from_dict({"model": None, "data": {"eval": None}}) == Config()  # null section: defaults
    with pytest.raises(ConfigError) as exc:
        DataSection(eval={"format": "npz"})
    assert str(exc.value) == "config key data.eval.path is required for format npz"
    with pytest.raises(ConfigError) as exc:
        Config(model=None)
    assert str(exc.value) == "config key model must be a mapping, got None (NoneType)"
    with pytest.raises(ConfigError) as exc:
        Config.from_dict([1])
    assert str(exc.value) == ("the config must be a mapping of sections (model, data, prune, finetune, "
                              "evaluate, "
                              "export, runtime), got list")


def test_new_keys_are_read_into_their_attributes(tmp_path):
    text = ("model:\n  forward_kwargs: {embed: false, mode: eval}\n"
            "prune:\n  target_signal: pruned\n  intercept: true\n  allocation: loss\n  allow_partial: true\n"
            "evaluate:\n  output: logits\n  latency_seconds: 0.5\n  gate_on: int8\n"
            "export:\n  formats: [pt, onnx, onnx-int8]\n  int8: "
            "{num_samples: 64, method: entropy, exclude: [conv1], activations: int8}\n"
            "runtime:\n  device: cpu\n  timeout_s: 60\n")
    cfg = load_config(_write(tmp_path, text), ["evaluate.output=2"])
    assert cfg.model.forward_kwargs == {"embed": False, "mode": "eval"}
    assert (cfg.prune.target_signal, cfg.prune.intercept, cfg.prune.allocation, cfg.prune.allow_partial) == (
        "pruned", True, "loss", True)
    assert (cfg.evaluate.output, cfg.evaluate.latency_seconds, cfg.evaluate.gate_on) == (2, 0.5, "int8")
    assert cfg.export.formats == ("pt", "onnx", "onnx-int8")
    assert (cfg.export.int8.num_samples, cfg.export.int8.method, cfg.export.int8.exclude,
            cfg.export.int8.activations) == (64, "entropy", ("conv1",), "int8")
    assert (cfg.runtime.device, cfg.runtime.timeout_s) == ("cpu", 60.0)
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_malformed_yaml_names_file_and_line(tmp_path):
    p = _write(tmp_path, "prune:\n  ridge: 1\n   theta: 2\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    where = "in this context" if yaml.__with_libyaml__ else "here"  # libyaml's wording, when it is used
    assert str(exc.value) == (f"config file {p} is not valid YAML (line 3, column 9: mapping values are not "
                              f"allowed {where}); fix the syntax there: check the indentation and that "
                              f"every key "
                              "is followed by ': '")


_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n" for p, n in zip("abcd", "bcde"))


@pytest.mark.parametrize("text, message", [
    ("model:\n  kwargs: !!python/object/apply:os.system [echo hi]\n",
     "line 2, column 11: the tag !!python/object/apply:os.system is not allowed; a config holds plain "
     "mappings, "
     "lists, strings, numbers, booleans and null: remove the tag"),
    ("prune: !custom {ridge: 1}\n", "line 1, column 8: the tag !custom is not allowed; a config holds plain "
     "mappings, lists, strings, numbers, booleans and null: remove the tag"),
    ("prune:\n  ridge: 0.1\n  theta: 0.2\n  ridge: 0.3\n", "line 4, column 3: the key 'ridge' is given twice "
     "in one mapping (first on line 2); YAML would keep only the last: delete one"),
    ("model:\n  kwargs: {a: " + "[" * 40 + "]" * 40 + "}\n",
     "line 2, column 44: values are nested more than 32 levels deep; a config needs a few"),
    (_LAUGHS, "line 5, column 4: the document expands to more than 100,000 values (through aliases?); a "
              "config "
     "holds a few hundred"),
])
def test_hostile_yaml_is_refused_with_the_line(tmp_path, text, message):
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert str(exc.value) == f"config file {p}: {message}"


def test_aliases_and_merge_keys_still_work(tmp_path):
    text = ("data:\n  calibration: &d {format: synthetic, num_samples: 8}\n  eval: *d\n"
            "  finetune: {<<: *d, num_samples: 4}\n")
    cfg = load_config(_write(tmp_path, text))
    assert cfg.data.eval == cfg.data.calibration == DataConfig(format="synthetic", num_samples=8)
    assert cfg.data.finetune == DataConfig(format="synthetic", num_samples=4)


def test_files_that_are_not_configs(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * 200_000)
    binary = tmp_path / "model.pt"
    binary.write_bytes(b"PK\x03\x04\x80\x81\x00")
    for path, message in [
        (big, f"config file {big} is 2,000,000 bytes; a config is a few kilobytes and at most 1,048,576 are "
              "read: check the --config path"),
        (binary, f"config file {binary} is not UTF-8 text (is it the checkpoint?); --config takes a YAML "
                 f"file"),
        (tmp_path, f"config file {tmp_path} is not a regular file; --config takes a YAML file"),
    ]:
        with pytest.raises(ConfigError) as exc:
            load_config(path)
        assert str(exc.value) == message
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["model.kwargs=!!python/name:os.system"])
    assert str(exc.value).startswith("--set model.kwargs: the value '!!python/name:os.system' is not valid "
                                     "YAML "
                                     "(line 1, column 1: the tag !!python/name:os.system is not allowed")


def test_not_a_mapping_and_unreadable(tmp_path):
    p = _write(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert str(exc.value) == (f"config file {p} must hold a mapping of sections (model, data, prune, ...) at "
                              "the top level, got list; see configs/default.yaml")
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as exc:
        load_config(missing)
    assert str(exc.value) == (f"cannot read config file {missing}: No such file or directory; check the "
                              "--config path")


@pytest.mark.parametrize("override, message", [
    ("prune.ridge", "--set expects KEY=VALUE with a dotted key, e.g. --set prune.target.flops=0.3; got "
                    "'prune.ridge'"),
    ("prune..ridge=1", "--set expects KEY=VALUE with a dotted key, e.g. --set prune.target.flops=0.3; got "
                       "'prune..ridge=1'"),
    ("prune.ridge.x=1", "--set prune.ridge.x: prune.ridge is 0.1, not a mapping"),
])
def test_bad_set_overrides(override, message):
    with pytest.raises(ConfigError) as exc:
        apply_overrides({"prune": {"ridge": 0.1}}, [override])
    assert str(exc.value) == message
