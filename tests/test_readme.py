"""The README documents exactly the config schema, and its quick start is the two make targets."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from specprune_cli.config import Config, DataConfig

ROOT = Path(__file__).resolve().parents[1]


def _keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict) and k not in ("kwargs", "target", "overrides"):
            out |= _keys(v, prefix + k + ".")
    return out


def _readme_config() -> dict:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Configuration", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    return yaml.safe_load(block)


def test_readme_config_keys_match_the_schema():
    documented = _readme_config()
    schema = Config().to_dict()
    schema["data"]["calibration"] = DataConfig().to_dict()
    assert _keys(documented) == _keys(schema)


def test_readme_defaults_match_the_schema_defaults():
    documented = _readme_config()
    for section in ("prune", "finetune", "evaluate", "export", "runtime"):
        defaults = Config().to_dict()[section]
        assert {k: (list(v) if isinstance(v, tuple) else v) for k, v in defaults.items()} == \
            {k: v for k, v in documented[section].items()}, section


def test_quick_start_is_the_two_make_targets():
    quick = (ROOT / "README.md").read_text().split("## Quick start", 1)[1].split("##", 1)[0]
    commands = [line.split("#")[0].strip() for line in quick.splitlines() if line.startswith("    ")]
    assert commands == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("make test")
