"""`analyze`: degrees of freedom on known-rank signals, agreement with compress, plots
(docs/method.md §2, §5, §8)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from specprune_cli.analyze import analyze_model, energy_width, prunability
from specprune_cli.prune import prune_model
from specprune_cli.report import analysis_table, plot_dof, plot_spectrum
from helpers import prune_cfg
from zoo import build


class Bottleneck(nn.Module):
    """fc_b's 24 outputs are W_b (W_a x + b_a): they span exactly a 4-dimensional subspace."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc_a = nn.Linear(32, 4)
        self.fc_b = nn.Linear(4, 24, bias=False)
        self.fc_c = nn.Linear(24, 10)
        with torch.no_grad():
            q, _ = torch.linalg.qr(torch.randn(32, 4, generator=g))
            self.fc_a.weight.copy_(q.T)  # orthonormal rows: fc_a's output is N(b_a, I_4) for x ~ N(0, I)
            self.fc_a.bias.zero_()
            q, _ = torch.linalg.qr(torch.randn(24, 4, generator=g))
            self.fc_b.weight.copy_(q)  # orthonormal columns: four equal eigenvalues
            # fc_c is Z in the output-aware loss: seeded too, or the loss at 25% depends on what ran
            # before (it reached 1.02e-3 for one global seed in 60).
            self.fc_c.weight.copy_(torch.randn(10, 24, generator=g) / 24 ** 0.5)
            self.fc_c.bias.zero_()

    def forward(self, x):
        return self.fc_c(self.fc_b(self.fc_a(x)))


def _data(n=4, bs=256, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(bs, d, generator=g) for _ in range(n)]


def test_known_rank_gives_dof_and_energy_width_equal_to_rank():
    batches = _data()
    a = analyze_model(Bottleneck(), batches, example_input=batches[0][:1],
                      cfg=prune_cfg(allocation="ratio", ratio=0.5, round_to=1, min_channels=1),
                      ridges=(1e-6, 1e-3), progress=False)
    units = {u["name"]: u for u in a["units"]}
    assert set(units) == {"fc_a", "fc_b"}
    b = units["fc_b"]
    assert b["width"] == 24
    assert b["dof"]["1e-06"] == pytest.approx(4.0, abs=1e-3)
    assert b["energy99"] == 4 and b["energy90"] == 4
    # At ridge 1e-3, lambda = 1e-3 * Tr/m = 1e-3 * 4/24 relative to eigenvalues ~1: N = 4 / (1 + 1.7e-4)
    assert b["dof"]["0.001"] == pytest.approx(4.0, abs=5e-3)
    assert units["fc_a"]["dof"]["1e-06"] == pytest.approx(4.0, abs=1e-3)
    # Keeping 25% of fc_b (6 of 24 >= rank 4) loses nothing of the input-aware part.
    assert b["loss"]["0.25"] < 1e-3
    assert len(b["spectrum"]) == 24 and sum(b["spectrum"][4:]) < 1e-9


def test_energy_width_counts_eigenvalues_until_the_fraction():
    mu = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.5])  # trace 10
    assert energy_width(mu, 0.5) == 1
    assert energy_width(mu, 0.8) == 2
    assert energy_width(mu, 0.9) == 3
    assert energy_width(mu, 0.99) == 5


def test_suggested_widths_equal_what_compress_allocates():
    model, shape = build("flatten_cnn")
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(16, *shape, generator=g) for _ in range(3)]
    cfg = prune_cfg(target={"flops": 0.4}, round_to=4, min_channels=4)
    a = analyze_model(model, batches, example_input=batches[0][:1], cfg=cfg, progress=False)
    result = prune_model(model, batches, example_input=batches[0][:1], cfg=cfg, progress=False)
    assert a["suggested"]["widths"] == {u["name"]: u["kept"] for u in result.plan["units"]}
    assert a["suggested"]["flops_after"] == result.report["flops_after"]
    assert a["suggested"]["params_after"] == result.report["params_after"]


def test_table_json_and_plots(tmp_path):
    model, shape = build("flatten_cnn")
    batches = [torch.randn(8, *shape) for _ in range(2)]
    a = analyze_model(model, batches, example_input=batches[0][:1], cfg=prune_cfg(), progress=False)
    parsed = json.loads(json.dumps(a))
    assert [u["name"] for u in parsed["units"]] == ["features.0", "features.4", "features.8", "fc1"]
    table = analysis_table(a)
    assert table.splitlines()[0].split()[:3] == ["unit", "kind", "m"]
    assert "fc2: its channels reach the model output" in table
    plot_spectrum(a, tmp_path / "spectrum.png")
    plot_dof(a, tmp_path / "dof.png")
    from PIL import Image

    for name in ("spectrum.png", "dof.png"):
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200


def test_prunability_is_the_smallest_fraction_within_tolerance():
    batches = _data(n=2, bs=128)
    model = Bottleneck()
    with torch.no_grad():
        model.fc_c.weight.mul_(20)  # confident predictions: losing a direction of fc_b costs cross-entropy
        labelled = [(x, model(x).argmax(1)) for x in batches]
    cfg = prune_cfg(round_to=1, min_channels=1, exclude=["fc_a"])
    p = prunability(model, labelled, example_input=batches[0][:1], cfg=cfg, tolerance=1e-3)
    assert p["loss_kind"] == "cross_entropy"
    passing = [q["fraction"] for q in p["probes"] if q["loss"] <= p["loss_original"] + 1e-3]
    failing = [q["fraction"] for q in p["probes"] if q["loss"] > p["loss_original"] + 1e-3]
    assert p["fraction"] == min(passing)
    assert all(f < p["fraction"] for f in failing)
    # fc_b spans 4 dimensions of 24: 4 channels (fraction > 1/8) lose nothing, 3 (fraction 1/8) do.
    assert 0.125 < p["fraction"] <= 0.1875


def test_analyze_cli_writes_json_and_plots_and_agrees_with_compress(tmp_path):
    """The command end to end on the bundled example: every unit in --json, files written, and the
    suggested widths equal to the plan compress writes for the same config."""
    from click.testing import CliRunner

    from specprune_cli.cli import main

    root = Path(__file__).resolve().parents[1]
    sets = ["--set", "data.calibration.num_samples=200", "--set", "data.eval=null",
            "--set", "finetune.epochs=0", "--set", "export.formats=[pt]"]
    runner = CliRunner()
    res = runner.invoke(main, ["analyze", str(root / "examples/fashion_cnn.pt"),
                               "-c", str(root / "configs/example.yaml"),
                               "-o", str(tmp_path / "an"), "--json", "-q", *sets])
    assert res.exit_code == 0, res.output
    analysis = json.loads(res.stdout)
    assert [u["name"] for u in analysis["units"]] == ["features.0", "features.4", "features.8", "features.11",
                                                      "classifier.1"]
    assert sorted(p.name for p in (tmp_path / "an").iterdir()) == ["analysis.json", "config.resolved.yaml",
                                                                    "dof.png", "spectrum.png"]
    res = runner.invoke(main, ["compress", str(root / "examples/fashion_cnn.pt"),
                               "-c", str(root / "configs/example.yaml"),
                               "-o", str(tmp_path / "out"), "--json", "-q", *sets])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert {u["name"]: u["kept"] for u in report["plan"]["units"]} == analysis["suggested"]["widths"]


def test_analyze_cli_rejects_a_bad_ridge_grid(tmp_path):
    from click.testing import CliRunner

    from specprune_cli.cli import main

    root = Path(__file__).resolve().parents[1]
    res = CliRunner().invoke(main, ["analyze", str(root / "examples/fashion_cnn.pt"), "-c",
                                    str(root / "configs/example.yaml"), "--ridge", "1e-3,abc"])
    assert res.exit_code == 2
    assert "'1e-3,abc' is not a comma-separated list of numbers, e.g. 1e-4,1e-3,1e-2" in res.output
