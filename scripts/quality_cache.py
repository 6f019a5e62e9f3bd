"""Per-row result cache of scripts/bench_quality.py: one JSON file per (model, method, budget), and one
per model for its int8 rows.

A row is reused only when its key, everything its result depends on, equals the key of the run being
asked for: the method's settings, the data and fine-tune settings, the reference model, the tool versions
and, for rows that call the library, the specprune commit (the last one that touched ``specprune_cli/``,
plus a hash of any uncommitted change there). So a re-run computes only what is missing or what changed,
and separate processes may fill rows of one model at the same time (each file is written to a temporary
name, then renamed).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from functools import cache
from pathlib import Path

from fashion_common import ROOT


@cache
def library_commit() -> str:
    """The last commit that touched specprune_cli/, with ``+<hash>`` of uncommitted changes there."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout

    try:
        commit = git("log", "-1", "--format=%H", "--", "specprune_cli").strip() or "none"
        dirty = git("status", "--porcelain", "--untracked-files=all", "--", "specprune_cli")
    except (OSError, subprocess.CalledProcessError):
        return "no-git-" + files_hash(sorted((ROOT / "specprune_cli").rglob("*.py")))
    if not dirty.strip():
        return commit
    changed = sorted(ROOT / line[3:].split(" -> ")[-1] for line in dirty.splitlines())
    return f"{commit}+{files_hash([p for p in changed if p.is_file()])}"


def files_hash(paths: list[Path]) -> str:
    """A short hash of the files' names and contents."""
    h = hashlib.sha256()
    for p in paths:
        name = p.relative_to(ROOT) if p.is_relative_to(ROOT) else p.name
        h.update(str(name).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9=.]+", "_", text).strip("_")


class RowCache:
    """The cached rows of one model under ``root/<model>/``."""

    def __init__(self, root: Path, model: str):
        self.dir = root / model

    def path(self, method: str, budget: float | None) -> Path:
        """The file of one (method, budget) row; budget None: an entry that spans budgets (the int8 rows)."""
        name = _slug(method) if budget is None else f"{budget:.3f}-{_slug(method)}"
        return self.dir / f"{name}.json"

    def get(self, method: str, budget: float | None, key: dict) -> dict | None:
        """The cached row when its key equals ``key``, else None."""
        path = self.path(method, budget)
        if not path.exists():
            return None
        stored = json.loads(path.read_text())
        return stored["row"] if stored.get("key") == _normal(key) else None

    def put(self, method: str, budget: float | None, key: dict, row: dict) -> None:
        """Store ``row`` under ``key`` (atomically: temporary name, then rename)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.path(method, budget)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"key": _normal(key), "row": row}, indent=1))
        tmp.replace(path)


def _normal(key: dict) -> dict:
    """``key`` as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(key, sort_keys=True))
