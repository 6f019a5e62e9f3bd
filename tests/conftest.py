"""Shared fixtures: a tiny trained-looking CNN checkpoint, npz/IDX data files, config writers.

Everything is small (8x8 inputs, a few dozen samples) because the suite shares 2 CPU cores.
"""
from __future__ import annotations

import struct
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import yaml

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))  # models_small, helpers, zoo import by plain name

from helpers import warm_batchnorm  # noqa: E402
from models_small import SmallCNN  # noqa: E402

ARCH = f"{TESTS / 'models_small.py'}:SmallCNN"
INPUT_SHAPE = [3, 8, 8]


def make_cnn(seed: int = 0, **kwargs: Any) -> SmallCNN:
    """A SmallCNN with seeded weights and warmed BatchNorm statistics (so pruning sees real scales)."""
    torch.manual_seed(seed)
    return warm_batchnorm(SmallCNN(**kwargs), (kwargs.get("in_channels", 3), 8, 8))


def write_npz(path: Path, n: int = 32, shape: tuple[int, ...] = (3, 8, 8), labels: bool = True,
              seed: int = 0, **arrays: np.ndarray) -> Path:
    """An npz with float32 x of (n, *shape) and int64 y; extra arrays replace/add keys."""
    rng = np.random.default_rng(seed)
    content: dict[str, np.ndarray] = {"x": rng.standard_normal((n, *shape)).astype(np.float32)}
    if labels:
        content["y"] = rng.integers(0, 10, n).astype(np.int64)
    content.update(arrays)
    np.savez(path, **content)
    return path


def write_idx_file(path: Path, array: np.ndarray) -> Path:
    """A plain (uncompressed) uint8 IDX file, written by hand so the test does not trust the reader's
    own writer: magic 00 00 08 <ndim>, big-endian uint32 dims, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.tobytes())
    return path


@pytest.fixture
def cnn_checkpoint(tmp_path: Path) -> Path:
    """A state_dict checkpoint of ``make_cnn()``."""
    path = tmp_path / "cnn.pt"
    torch.save(make_cnn().state_dict(), path)
    return path


@pytest.fixture
def npz_data(tmp_path: Path) -> Path:
    """32 labelled samples of shape (3, 8, 8)."""
    return write_npz(tmp_path / "calib.npz")


def base_config(data: dict | None = None, **sections: Any) -> dict:
    """A small, fast config dict for SmallCNN: ratio allocation, few positions, pt export only."""
    cfg: dict[str, Any] = {
        "model": {"arch": ARCH, "input_shape": INPUT_SHAPE},
        "data": {"calibration": data or {"format": "synthetic", "num_samples": 16, "batch_size": 8}},
        "prune": {"target": {"flops": 0.6}, "round_to": 1, "min_channels": 2, "max_positions": 16},
        "evaluate": {"latency": False},
        "export": {"formats": ["pt"]},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """``write_config(data=..., prune={...})`` -> path of a YAML file built by ``base_config``."""

    def write(data: dict | None = None, name: str = "cfg.yaml", **sections: Any) -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(base_config(data, **sections), sort_keys=False))
        return path

    return write
