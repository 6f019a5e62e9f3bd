"""Latency: interleaved rounds, the time budget, and a speed-up only where the paired rounds agree.

No assertion here depends on how fast the machine is: sleeps give lower bounds, and the verdicts are
computed from hand-written timings.
"""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from specprune_cli.config import ExportConfig
from specprune_cli.export import export_model
from specprune_cli.latency import (TOO_FEW, UNSTABLE, _side_by_side, compare_latency, measure_latency,
                                   measure_onnx_latency, time_rounds)
from specprune_cli.report import _latency_rows
from test_evaluate import mlp  # noqa: F401 - a fixture


def test_rounds_alternate_the_order_of_the_models():
    calls = []
    times = time_rounds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=4)
    warmup = 2 * 2  # two warm-up calls each, untimed
    assert calls[warmup:] == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert [len(t) for t in times.values()] == [4, 4]


def test_the_time_budget_stops_the_rounds():
    # Each call sleeps at least 50 ms, so a 0.1 s budget is spent after one warm-up call and one round,
    # whatever the machine: sleep never returns early.
    times = time_rounds({"slow": lambda: time.sleep(0.05), "fast": lambda: None}, repeats=30, seconds=0.1)
    assert len(times["slow"]) == len(times["fast"]) == 1


@pytest.mark.parametrize("original, pruned, ratio, stable", [
    ([10.0, 10.0, 10.0, 10.0], [5.0, 5.0, 5.0, 5.0], 2.0, True),
    ([10.0, 11.0, 9.0, 10.0, 10.0], [5.0, 5.5, 4.5, 5.0, 5.0], 2.0, True),
    ([284.0, 10.0, 300.0, 9.0, 250.0], [0.5, 5.0, 0.5, 5.0, 0.5], None, False),  # a busy machine
    ([10.0, 10.0], [5.0, 5.0], None, False),  # two rounds tell no spread
])
def test_a_speedup_only_where_the_paired_rounds_agree(original, pruned, ratio, stable):
    side = _side_by_side({1: {"original": original, "pruned": pruned}})
    assert side["speedup"]["1"]["ratio"] == ratio and side["speedup"]["1"]["stable"] is stable
    assert side["speedup"]["1"]["runs"] == len(original)
    row = _latency_rows({"torch": side})[0]
    verdict = f"{ratio:.2f}x faster" if stable else UNSTABLE if len(original) >= 3 else TOO_FEW
    assert row[-1] == f"{verdict} ({len(original)} runs)"


def test_compare_latency_reports_both_models_and_how_many_ran(mlp, tmp_path):
    narrow = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 5)).eval()
    onnx = ExportConfig(formats=("onnx",))
    path = export_model(mlp, torch.zeros(1, 6), tmp_path / "a", onnx)["onnx"]["path"]
    path2 = export_model(narrow, torch.zeros(1, 6), tmp_path / "b", onnx)["onnx"]["path"]
    mlp.train()
    out = compare_latency(mlp, narrow, torch.zeros(1, 6), batch_sizes=[1, 4], repeats=5, seconds=10.0,
                          onnx={"original": path, "pruned": path2})
    assert mlp.training  # the mode is restored
    assert out["batch_sizes"] == [1, 4] and out["repeats"] == 5 and out["seconds"] == 10.0
    for runtime in ("torch", "onnxruntime"):
        for name in ("original", "pruned"):
            assert set(out[runtime][name]) == {"1", "4"}
            assert all(0 < s["min_ms"] <= s["median_ms"] and 1 <= s["samples"] <= 5
                       for s in out[runtime][name].values())
        speedup = out[runtime]["speedup"]
        assert all(s["runs"] == out[runtime]["original"][b]["samples"] for b, s in speedup.items())


def test_measure_latency_and_onnx_latency_per_batch_size(mlp, tmp_path):
    result = measure_latency(mlp, torch.zeros(1, 6), [1, 4], repeats=5)
    assert sorted(result) == [1, 4] and all(s["samples"] == 5 for s in result.values())
    path = export_model(mlp, torch.zeros(1, 6), tmp_path, ExportConfig(formats=("onnx",)))["onnx"]["path"]
    result = measure_onnx_latency(path, torch.zeros(1, 6), [1, 3], repeats=4)
    assert sorted(result) == [1, 3] and all(s["samples"] == 4 for s in result.values())


def test_onnx_latency_runs_with_the_threads_asked_for(mlp, tmp_path, monkeypatch):
    import onnxruntime as ort

    path = export_model(mlp, torch.zeros(1, 6), tmp_path, ExportConfig(formats=("onnx",)))["onnx"]["path"]
    seen = []
    real = ort.InferenceSession

    def session(file, sess_options=None, **kwargs):
        seen.append(sess_options.intra_op_num_threads)
        return real(file, sess_options=sess_options, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", session)
    measure_onnx_latency(path, torch.zeros(1, 6), [2], repeats=2, threads=1)
    measure_onnx_latency(path, torch.zeros(1, 6), [2], repeats=2)
    assert seen == [1, 0]  # 0 is ONNX Runtime's "choose for me"
