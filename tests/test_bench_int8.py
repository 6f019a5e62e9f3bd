"""The benchmark scripts' pure logic for the int8 rows (issue 15): the target's verdict, and where a new
section of docs/benchmarks.md goes."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from bench_common import write_section  # noqa: E402
from int8_bench import target_verdict  # noqa: E402

NAMES = [f"{v} {p}" for v in ("original", "pruned 50%", "pruned 30%") for p in ("fp32", "int8")]


def result(original_ms: list[float], pruned_int8_ms: list[float], original_acc: float,
           pruned_int8_acc: float) -> dict:
    """An int8_variants result where only the two rows the target compares matter."""
    variants = {n: {"accuracy": 0.5} for n in NAMES}
    variants["original fp32"]["accuracy"] = original_acc
    variants["pruned 50% int8"]["accuracy"] = pruned_int8_acc
    at_64 = {n: [1.0] * len(original_ms) for n in NAMES}
    at_64["original fp32"], at_64["pruned 50% int8"] = original_ms, pruned_int8_ms
    return {"variants": variants, "latency_ms": {"1": {n: [9.0] * len(original_ms) for n in NAMES},
                                                 "64": at_64}}


@pytest.mark.parametrize(("pruned_ms", "pruned_acc", "verdict"), [
    ([10.0, 10.0, 10.0], 0.9137, "met"),                  # 3.00x, 1.00 point: both at the target
    ([10.0, 10.0, 12.0], 0.9137, "met"),                  # the median ratio (3.00x) counts, not the mean
    ([11.0, 11.0, 11.0], 0.9237, "missed (speed)"),        # 2.73x
    ([10.0, 10.0, 10.0], 0.9136, "missed (accuracy)"),     # 1.01 points
    ([12.0, 12.0, 12.0], 0.9000, "missed (speed and accuracy)"),
])
def test_target_verdict(pruned_ms, pruned_acc, verdict):
    line = target_verdict("vgg_small", result([30.0, 30.0, 30.0], pruned_ms, 0.9237, pruned_acc))
    assert line.startswith("- vgg_small: pruned 50% + int8 runs ")
    assert line.endswith(f": {verdict}")
    assert "at batch 64" in line  # the largest batch timed, not batch 1


def test_target_verdict_text():
    line = target_verdict("resnet_small", result([30.0, 33.0, 36.0], [10.0, 10.0, 10.0], 0.9144, 0.9000))
    assert line == ("- resnet_small: pruned 50% + int8 runs 3.30x (spread 0.09) as fast as the original "
                    "float32 at batch 64, accuracy -1.44 points against it: missed (accuracy)")


def test_write_section_after(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# B\n\n<!-- a:begin -->\nA\n<!-- a:end -->\n\n<!-- c:begin -->\nC\n<!-- c:end -->\n")
    write_section(doc, "b", "B1", after="a")
    assert doc.read_text() == ("# B\n\n<!-- a:begin -->\nA\n<!-- a:end -->\n\n<!-- b:begin -->\nB1\n"
                               "<!-- b:end -->\n\n<!-- c:begin -->\nC\n<!-- c:end -->\n")
    write_section(doc, "b", "B2", after="c")  # present: replaced where it is
    write_section(doc, "d", "D", after="missing")  # no such section: appended
    assert doc.read_text() == ("# B\n\n<!-- a:begin -->\nA\n<!-- a:end -->\n\n<!-- b:begin -->\nB2\n"
                               "<!-- b:end -->\n\n<!-- c:begin -->\nC\n<!-- c:end -->\n\n"
                               "<!-- d:begin -->\nD\n<!-- d:end -->\n")
