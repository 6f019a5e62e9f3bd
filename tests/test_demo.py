"""The demo's config (configs/example.yaml, what `make demo` runs) end to end, with fewer samples."""
from __future__ import annotations

import json
from pathlib import Path

import onnx
import torch
from click.testing import CliRunner

from specprune_cli import load_pruned
from specprune_cli.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_demo_config_compresses_finetunes_exports_and_reports(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, [
        "compress", str(ROOT / "examples/fashion_cnn.pt"), "--config", str(ROOT / "configs/example.yaml"),
        "--output", str(out), "--json", "--quiet",
        "--set", "data.calibration.num_samples=300", "--set", "data.eval.num_samples=500",
        "--set", "finetune.max_steps=3", "--set", "evaluate.latency_repeats=3"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert sorted(p.name for p in out.iterdir()) == ["config.resolved.yaml", "model.int8.onnx", "model.onnx",
                                                     "model.pt", "report.json"]
    assert report["prune"]["flops_after"] / report["prune"]["flops_before"] <= 0.5
    assert report["prune"]["params_after"] < report["prune"]["params_before"]
    ev = report["evaluation"]
    assert ev["labelled"] and ev["finetuned"] and ev["samples"] == 500
    assert 0.85 < ev["accuracy_before"] <= 1.0 and 0.5 < ev["accuracy_after"] <= 1.0
    ft = report["finetune"]
    assert ft["steps"] == 3
    if ft["kept"] == "fine-tuned":
        assert ft["distillation_loss_after"] <= ft["distillation_loss_before"]
    else:  # three steps only raised the loss: the model before fine-tuning is the one written
        assert ft["kept"] == "before fine-tuning"
        assert ft["distillation_loss_after"] > ft["distillation_loss_before"]
        assert ev["accuracy_after"] == ev["accuracy_after_pruning"]
    assert report["exports"]["onnx"]["verified"] and report["exports"]["onnx"]["path"] == "model.onnx"
    assert set(report["latency"]["torch"]["pruned"]) == {"1", "32"}
    assert set(report["latency"]["onnxruntime"]["original"]) == {"1", "32"}
    # The int8 file: a quarter of model.onnx plus scales, timed beside it, and close to the float model.
    int8 = ev["int8"]
    assert report["exports"]["onnx-int8"]["bytes"] < 0.35 * report["exports"]["onnx"]["bytes"]
    assert int8["samples"] == 500 and int8["agreement_with_float"] > 0.97
    assert abs(int8["accuracy"] - ev["accuracy_after"]) < 0.02
    assert set(report["latency"]["onnxruntime"]["int8"]) == {"1", "32"}
    # The summary table went to stderr, with the accuracy line a person reads first.
    assert "top-1 accuracy" in result.stderr and "wrote model.pt, report.json, config.resolved.yaml, " \
        "model.onnx, model.int8.onnx" in result.stderr
    # model.pt loads without pickled code and reproduces the ONNX file's model.
    model = load_pruned(out / "model.pt")
    widths = {u["name"]: u["kept"] for u in report["plan"]["units"]}
    assert model.features[0].out_channels == widths["features.0"]
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")))
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
