#!/usr/bin/env python
"""Train the bundled example: `fashion_cnn` on full Fashion-MNIST, from Debian's dataset-fashion-mnist.

Writes (all small, committed; each written to a temporary name, then renamed):
  examples/fashion_cnn.pt       plain state_dict of tensors (loads with weights_only=True; checked here)
  examples/fashion_subset.npz   2,000 test-split images (x uint8 (N,1,28,28), y int64), a random subset
                                drawn with seed 1234 (not stratified), kept in file order
  examples/train_log.json       seed, epochs, seconds, test accuracy on the full 10k test set, params, FLOPs

Recipe: seed 0 (torch.manual_seed and the shuffling generator), batch 128, AdamW (weight decay 1e-4) with a
one-cycle schedule peaking at lr 2e-3, random horizontal flips per batch, 3 epochs. Inputs are scaled to
[0, 1], then normalised with mean 0.2860, std 0.3530 (the Fashion-MNIST training-set statistics).

Usage:
  python scripts/make_example.py                    # 3 epochs on one thread (about 10 minutes)
  python scripts/make_example.py --time-steps 200   # time 200 steps, print the epoch time, write nothing
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specprune_cli.flops import count_flops, count_params  # noqa: E402
from specprune_cli.idx import read_idx  # noqa: E402
from specprune_cli.models import fashion_cnn  # noqa: E402

DATA = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.2860, 0.3530
BATCH = 128
SUBSET_SIZE, SUBSET_SEED = 2000, 1234


def load_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N,1,28,28) uint8 and labels int64 of 'train' or 't10k'."""
    images, labels = DATA / f"{split}-images-idx3-ubyte.gz", DATA / f"{split}-labels-idx1-ubyte.gz"
    for path in (images, labels):
        if not path.exists():
            sys.exit(f"{path} not found: install the data with `apt-get install -y dataset-fashion-mnist`")
    x = torch.from_numpy(read_idx(images)).unsqueeze(1)
    return x, torch.from_numpy(read_idx(labels).astype(np.int64))


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x.float() / 255.0 - MEAN) / STD


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), 1000):
            correct += int((model(normalise(x[i:i + 1000])).argmax(1) == y[i:i + 1000]).sum())
    return correct / len(x)


def _replace(path: Path, write) -> None:
    """Write through ``write(file)`` to a temporary name, then rename: a failure leaves no half file."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    ap.add_argument("--time-steps", type=int, default=0, metavar="N",
                    help="only time N training steps and print the projected epoch time")
    ap.add_argument("--out", type=Path, default=ROOT / "examples")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    xtr, ytr = load_split("train")
    xte, yte = load_split("t10k")
    model = fashion_cnn()
    steps_per_epoch = len(xtr) // BATCH
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = args.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=max(steps, args.time_steps))
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        total = 0.0
        for i in range(steps_per_epoch):
            if args.time_steps and i == args.time_steps:
                per_step = (time.time() - t0) / i
                print(f"{per_step * 1000:.0f} ms/step with {args.threads} thread(s): "
                      f"{per_step * steps_per_epoch:.0f}s per epoch of {steps_per_epoch} steps")
                return
            idx = perm[i * BATCH:(i + 1) * BATCH]
            x = normalise(xtr[idx])
            if torch.rand(1, generator=gen).item() < 0.5:
                x = x.flip(3)  # horizontal flips: clothes are left-right symmetric
            loss = F.cross_entropy(model(x), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {total / steps_per_epoch:.4f}, "
              f"test accuracy {accuracy(model, xte, yte):.4f}, {time.time() - t0:.0f}s", flush=True)
    seconds = time.time() - t0
    test_acc = accuracy(model, xte, yte)

    args.out.mkdir(parents=True, exist_ok=True)
    weights = args.out / "fashion_cnn.pt"
    _replace(weights, lambda f: torch.save(model.state_dict(), f))
    # The example must load without unpickling code, and must be the model that was measured.
    reloaded = fashion_cnn()
    reloaded.load_state_dict(torch.load(weights, weights_only=True))
    if accuracy(reloaded, xte, yte) != test_acc:
        sys.exit(f"{weights} reloaded with a different test accuracy; the file is not the trained model")

    subset_gen = torch.Generator().manual_seed(SUBSET_SEED)
    pick = torch.randperm(len(xte), generator=subset_gen)[:SUBSET_SIZE].sort().values
    _replace(args.out / "fashion_subset.npz",
             lambda f: np.savez_compressed(f, x=xte[pick].numpy(), y=yte[pick].numpy()))
    model.eval()
    log = {"seed": args.seed, "epochs": args.epochs, "threads": args.threads,
           "train_seconds": round(seconds, 1), "test_accuracy": round(test_acc, 4),
           "subset_accuracy": round(accuracy(model, xte[pick], yte[pick]), 4),
           "params": count_params(model), "flops": count_flops(model, torch.zeros(1, 1, 28, 28)),
           "mean": MEAN, "std": STD, "torch": torch.__version__}
    _replace(args.out / "train_log.json", lambda f: f.write((json.dumps(log, indent=2) + "\n").encode()))
    print(json.dumps(log, indent=2))


if __name__ == "__main__":
    main()
