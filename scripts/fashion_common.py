"""Fashion-MNIST from Debian's dataset-fashion-mnist, and the training recipe the example and the
benchmark reference models share.

Recipe: batch 128, AdamW (weight decay 1e-4) with a one-cycle schedule peaking at lr 2e-3, random
horizontal flips per batch (clothes are left-right symmetric). Inputs are scaled to [0, 1], then
normalised with mean 0.2860, std 0.3530 (the Fashion-MNIST training-set statistics). Everything is
seeded: the same seed and thread count give the same weights.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specprune_cli.flops import count_flops, count_params  # noqa: E402
from specprune_cli.idx import read_idx  # noqa: E402

DATA = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.2860, 0.3530
BATCH = 128
# Trained models and benchmark results; SPECPRUNE_BENCH_CACHE lets several checkouts share one cache.
CACHE = Path(os.environ.get("SPECPRUNE_BENCH_CACHE") or ROOT / "bench_cache")


def load_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N,1,28,28) uint8 and labels int64 of 'train' or 't10k'."""
    images, labels = DATA / f"{split}-images-idx3-ubyte.gz", DATA / f"{split}-labels-idx1-ubyte.gz"
    for path in (images, labels):
        if not path.exists():
            sys.exit(f"{path} not found: install the data with "
                     "`apt-get update && apt-get install -y dataset-fashion-mnist`")
    x = torch.from_numpy(read_idx(images)).unsqueeze(1)
    return x, torch.from_numpy(read_idx(labels).astype(np.int64))


def normalise(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> the float input the models were trained on."""
    return (x.float() / 255.0 - MEAN) / STD


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on uint8 images ``x``."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += int((model(normalise(x[i:i + batch])).argmax(1) == y[i:i + batch]).sum())
    return correct / len(x)


def replace_file(path: Path, write: Callable) -> None:
    """Write through ``write(file)`` to a temporary name, then rename: a failure leaves no half file."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def train(model: nn.Module, xtr: torch.Tensor, ytr: torch.Tensor, *, epochs: int, seed: int,
          xte: torch.Tensor | None = None, yte: torch.Tensor | None = None, time_steps: int = 0,
          threads: int = 1) -> float:
    """Train ``model`` in place with the recipe above; returns the training seconds.

    Seed torch before building ``model`` (its initialisation draws from the global RNG); ``seed`` drives
    the shuffling and flips. With ``time_steps`` > 0 only that many steps run and the projected epoch
    time is printed.
    """
    steps_per_epoch = len(xtr) // BATCH
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3,
                                                total_steps=max(epochs * steps_per_epoch, time_steps))
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        total = 0.0
        for i in range(steps_per_epoch):
            if time_steps and i == time_steps:
                per_step = (time.time() - t0) / i
                print(f"{per_step * 1000:.0f} ms/step with {threads} thread(s): "
                      f"{per_step * steps_per_epoch:.0f}s per epoch of {steps_per_epoch} steps")
                return time.time() - t0
            idx = perm[i * BATCH:(i + 1) * BATCH]
            x = normalise(xtr[idx])
            if torch.rand(1, generator=gen).item() < 0.5:
                x = x.flip(3)
            loss = F.cross_entropy(model(x), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        test = f", test accuracy {accuracy(model, xte, yte):.4f}" if xte is not None else ""
        print(f"epoch {epoch + 1}/{epochs}: train loss {total / steps_per_epoch:.4f}{test}, "
              f"{time.time() - t0:.0f}s", flush=True)
    model.eval()
    return time.time() - t0


def reference_model(name: str, *, epochs: int = 2, seed: int = 0, threads: int = 1,
                    cache: Path = CACHE) -> tuple[nn.Module, dict]:
    """``specprune_cli.models.<name>`` trained on full Fashion-MNIST, from ``cache`` when present.

    The cache holds ``<name>-e<epochs>-s<seed>.pt`` (a state_dict) and a ``.json`` log with the test
    accuracy; a cached file is reloaded with weights_only=True and its accuracy re-checked.
    """
    from specprune_cli import models
    torch.manual_seed(seed)
    model = getattr(models, name)()
    stem = cache / f"{name}-e{epochs}-s{seed}"
    weights, log_path = stem.with_suffix(".pt"), stem.with_suffix(".json")
    xte, yte = load_split("t10k")
    if weights.exists() and log_path.exists():
        model.load_state_dict(torch.load(weights, weights_only=True))
        log = json.loads(log_path.read_text())
        measured = accuracy(model, xte, yte)
        if abs(measured - log["test_accuracy"]) > 1e-4:
            sys.exit(f"{weights}: test accuracy {measured:.4f} differs from its log "
                     f"({log['test_accuracy']:.4f}); delete {cache} and rerun")
        return model.eval(), log
    print(f"training {name} for {epochs} epochs on full Fashion-MNIST (cached in {cache})", flush=True)
    xtr, ytr = load_split("train")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        seconds = train(model, xtr, ytr, epochs=epochs, seed=seed, xte=xte, yte=yte, threads=threads)
    finally:
        torch.set_num_threads(previous)
    log = {"model": name, "seed": seed, "epochs": epochs, "threads": threads,
           "train_seconds": round(seconds, 1), "test_accuracy": round(accuracy(model, xte, yte), 6),
           "params": count_params(model), "flops": count_flops(model, torch.zeros(1, 1, 28, 28)),
           "torch": torch.__version__}
    cache.mkdir(parents=True, exist_ok=True)
    replace_file(weights, lambda f: torch.save(model.state_dict(), f))
    replace_file(log_path, lambda f: f.write((json.dumps(log, indent=2) + "\n").encode()))
    return model.eval(), log
