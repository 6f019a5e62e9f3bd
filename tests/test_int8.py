"""export format onnx-int8: ONNX Runtime static quantization of model.onnx (issue 15).

The int8 file is written, loads, runs at two batch sizes, and agrees with the float model on data;
calibration reads exactly the first export.int8.num_samples samples with the chosen method; an exclude
entry keeps its node in float, a wrong one is a ConfigError naming the closest names; a failure leaves no
file; and the quality gates judge the int8 model when it is exported.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

from conftest import make_cnn
from specprune_cli.config import ExportConfig, Int8Config
from specprune_cli.errors import ConfigError, ExportError
from specprune_cli.export import export_model
from specprune_cli.quantize import evaluate_int8, node_modules, resolve_exclude

EXAMPLE = torch.zeros(1, 3, 8, 8)


def batches(n: int = 48) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Labelled random batches of 16."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)]


def int8_export(out, **int8) -> dict:
    cfg = ExportConfig(formats=("onnx", "onnx-int8"), int8=Int8Config(**int8))
    return export_model(make_cnn(), EXAMPLE, out, cfg, calibration=batches())


def graph(path) -> tuple[dict, dict, dict]:
    """Nodes by name, the producer of every tensor, and the initializers as arrays."""
    proto = onnx.load(str(path))
    nodes = {n.name: n for n in proto.graph.node}
    producer = {o: n for n in proto.graph.node for o in n.output}
    return nodes, producer, {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("int8")
    return out, int8_export(out)


def test_int8_file_is_written_loads_and_runs_at_two_batch_sizes(exported):
    out, info = exported
    int8 = info["onnx-int8"]
    assert int8["path"] == str(out / "model.int8.onnx") and int8["verified"] and int8["batch_sizes"] == [2, 3]
    assert sorted(p.name for p in out.iterdir()) == ["model.int8.onnx", "model.onnx"]
    assert int8["bytes"] < info["onnx"]["bytes"]  # int8 weights: a quarter of the float ones, plus scales
    onnx.checker.check_model(str(out / "model.int8.onnx"))
    nodes, producer, init = graph(out / "model.int8.onnx")
    convs = [n for n in nodes.values() if n.op_type == "Conv"]
    gemm = [n.name for n in nodes.values() if n.op_type == "Gemm"]
    assert len(convs) == 2 and set(int8["int8_nodes"]) >= {convs[0].name, convs[1].name, *gemm}
    for conv in convs:  # activation and weight both come through QDQ; the weight is stored as int8
        weight = producer[conv.input[1]]
        assert weight.op_type == "DequantizeLinear" and init[weight.input[0]].dtype == np.int8
        assert init[weight.input[1]].shape == (init[weight.input[0]].shape[0],)  # one scale per channel
        assert producer[conv.input[0]].op_type == "DequantizeLinear"
    assert init["input_zero_point"].dtype == np.uint8 and int8["activations"] == "uint8"  # the default
    session = ort.InferenceSession(str(out / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    for b in (1, 7):
        (logits,) = session.run(None, {"input": np.random.default_rng(b).standard_normal((b, 3, 8, 8),
                                                                                      dtype=np.float32)})
        assert logits.shape == (b, 10) and np.isfinite(logits).all()


def test_int8_agreement_error_and_accuracy_are_measured_on_data(exported):
    out, _ = exported
    model, data = make_cnn().eval(), batches()
    result = evaluate_int8(out / "model.int8.onnx", model, model, data, template=model(EXAMPLE))
    session = ort.InferenceSession(str(out / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    x, y = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0]).double()
    with torch.no_grad():
        ref = model(x).double()
    assert result["samples"] == 48
    assert result["accuracy"] == pytest.approx(float((got.argmax(1) == y).double().mean()))
    assert result["agreement"] == result["agreement_with_float"] == float((got.argmax(1) == ref.argmax(1))
                                                                          .double().mean())
    assert result["relative_error"] == pytest.approx(float((got - ref).norm() / ref.norm()))
    assert result["agreement"] >= 0.9 and result["relative_error"] < 0.05  # int8 is close, not equal
    assert result["accuracy_float"] == pytest.approx(float((ref.argmax(1) == y).double().mean()))


@pytest.mark.parametrize("method, counts", [("minmax", (560, 640)), ("entropy", (640,)),
                                            ("percentile", (640,))])
def test_calibration_reads_the_first_num_samples_with_the_method(tmp_path, method, counts):
    """One input pixel of 50 in sample 600 of 640 (the rest ~N(0, 1)). minmax spans exactly the range of
    the samples it read (scale = range / 255 for int8 activations), so with num_samples 560 the outlier
    is never seen; percentile (99.999% of 122,880 values) clips it; entropy (ONNX Runtime's KL search)
    never widens the range."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(640, 3, 8, 8, generator=gen)
    x[600, 0, 0, 0] = 50.0
    model, scales = make_cnn(), {}
    for n in counts:
        cfg = ExportConfig(formats=("onnx", "onnx-int8"), int8=Int8Config(method=method, num_samples=n))
        info = export_model(model, EXAMPLE, tmp_path / f"{n}", cfg, calibration=list(x.split(64)))
        assert info["onnx-int8"]["calibration_samples"] == n and info["onnx-int8"]["method"] == method
        scales[n] = float(graph(tmp_path / f"{n}" / "model.int8.onnx")[2]["input_scale"])
    minmax = {n: (max(float(x[:n].max()), 0.0) - min(float(x[:n].min()), 0.0)) / 255 for n in (560, 640)}
    assert minmax[560] < 0.05 < 0.19 < minmax[640]
    if method == "minmax":
        assert scales == pytest.approx(minmax, rel=1e-6)
    elif method == "percentile":
        assert scales[640] < 1.2 * minmax[560]
    else:
        assert scales[640] <= minmax[640] * (1 + 1e-6)


def test_int8_activations_are_a_setting(tmp_path):
    info = int8_export(tmp_path, activations="int8")["onnx-int8"]
    _, _, init = graph(tmp_path / "model.int8.onnx")
    assert info["activations"] == "int8" and init["input_zero_point"].dtype == np.int8


def test_exclude_by_module_or_node_name_keeps_the_node_in_float(tmp_path):
    """features.0 is the first conv (features.1, its BatchNorm, is folded into it); the head's node is
    named as the exporter named it."""
    head = next(n for n in onnx.load(str(int8_export(tmp_path / "a")["onnx"]["path"])).graph.node
                if n.op_type == "Gemm").name
    info = int8_export(tmp_path / "b", exclude=("features.0", head))["onnx-int8"]
    nodes, producer, init = graph(tmp_path / "b" / "model.int8.onnx")
    conv = info["excluded"]["features.0"]
    assert len(conv) == 1 and info["excluded"][head] == [head]
    for name in (conv[0], head):
        assert name in info["float_nodes"] and name not in info["int8_nodes"]
        assert nodes[name].input[1] in init and init[nodes[name].input[1]].dtype == np.float32  # float weight
    assert all(i not in producer for i in nodes[conv[0]].input)  # reads the raw input, no Q/DQ pair
    second = next(n for n in nodes.values() if n.op_type == "Conv" and n.name != conv[0])
    assert second.name in info["int8_nodes"]


def test_a_bad_exclude_name_is_a_config_error_naming_close_matches_and_leaves_no_int8_file(tmp_path):
    with pytest.raises(ConfigError) as exc:
        int8_export(tmp_path, exclude=("featurs.0",))
    assert exc.value.exit_code == 2
    assert str(exc.value).startswith("config key export.int8.exclude: 'featurs.0' matches no node of the "
                                     "ONNX model; did you mean features.0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_a_module_that_left_no_node_is_named_as_such():
    proto = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="/features/features.2/Relu")], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]))
    assert node_modules(proto.graph.node[0]) == {"features", "features.2"}  # the legacy exporter's names
    assert resolve_exclude(proto, ["features", "re:feat.*\\.2"]) == {
        "features": ["/features/features.2/Relu"], "re:feat.*\\.2": ["/features/features.2/Relu"]}
    with pytest.raises(ConfigError) as exc:
        resolve_exclude(proto, ["drop"], module_names=["features", "drop"])
    assert str(exc.value) == ("config key export.int8.exclude: 'drop' matches no node of the ONNX model: "
                              "module drop left no node in the export (a Dropout or Identity is removed); "
                              "remove the entry")


def test_a_quantization_failure_is_an_export_error_and_leaves_no_int8_file(tmp_path, monkeypatch):
    import onnxruntime.quantization as q

    def broken(*args, **kwargs):
        raise RuntimeError("calibrator exploded")

    monkeypatch.setattr(q, "quantize_static", broken)
    with pytest.raises(ExportError) as exc:
        int8_export(tmp_path)
    assert str(exc.value).startswith("int8 quantization failed: RuntimeError: calibrator exploded; try "
                                     "another export.int8.method")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_compress_writes_int8_reports_it_and_gates_judge_it(tmp_path, cnn_checkpoint, write_config, npz_data):
    """Through the CLI: int8 rows in the report and the summary, ORT latency of the int8 file beside the
    float ones, and --min-agreement 1 failing on the int8 model's agreement (exit 3, outputs written)."""
    from test_cli import invoke

    data = {"format": "npz", "path": str(npz_data), "batch_size": 8}
    cfg = write_config(data=data, export={"formats": ["pt", "onnx", "onnx-int8"]},
                       evaluate={"latency": True, "latency_batch_sizes": [1, 4], "latency_repeats": 3,
                                 "latency_seconds": 1.0})
    out = tmp_path / "out"
    result = invoke("compress", cnn_checkpoint, "-c", cfg, "-o", out, "--quiet", "--min-agreement", "1")
    report = json.loads((out / "report.json").read_text())
    int8 = report["evaluation"]["int8"]
    assert sorted(p.name for p in out.iterdir()) == ["config.resolved.yaml", "model.int8.onnx", "model.onnx",
                                                     "model.pt", "report.json"]
    assert int8["samples"] == 32 and int8["accuracy"] is not None
    assert [(g["model"], g["value"]) for g in report["gates"]] == [("int8", round(int8["agreement"], 6))]
    assert int8["agreement"] < 1, "the gate is meant to fail here; pick a stricter case if this changed"
    assert result.exit_code == 3 and "(int8 model)" in result.stderr
    assert "int8 top-1 agreement" in result.stdout and "onnxruntime int8 ms @ batch 4" in result.stdout
    ort_latency = report["latency"]["onnxruntime"]
    assert set(ort_latency["int8"]) == set(ort_latency["speedup_int8"]) == {"1", "4"}
    assert report["exports"]["onnx-int8"]["path"] == "model.int8.onnx"

    floats = invoke("compress", cnn_checkpoint, "-c", cfg, "-o", out, "--quiet", "--overwrite",
                    "--set", "evaluate.gate_on=float", "--set", "evaluate.latency=false",
                    "--min-agreement", "0")
    report = json.loads((out / "report.json").read_text())
    assert floats.exit_code == 0
    assert [(g["model"], g["value"]) for g in report["gates"]] == [
        ("float", round(report["evaluation"]["agreement"], 6))]


def test_compress_with_a_bad_exclude_exits_2_and_writes_nothing(tmp_path, cnn_checkpoint, write_config):
    from test_cli import _failure, invoke

    cfg = write_config(export={"formats": ["pt", "onnx", "onnx-int8"], "int8": {"exclude": ["head.1"]}})
    out = tmp_path / "out"
    result = invoke("compress", cnn_checkpoint, "-c", cfg, "-o", out, "--quiet")
    code, last, left = _failure(result, out)
    assert (code, left) == (2, [])
    assert last.startswith("Error: config key export.int8.exclude: 'head.1' matches no node of the ONNX "
                           "model; did you mean head")
