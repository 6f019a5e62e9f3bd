#!/usr/bin/env python
"""Train the bundled example: `fashion_cnn` on full Fashion-MNIST, from Debian's dataset-fashion-mnist.

Writes (all small, committed):
  examples/fashion_cnn.pt       plain state_dict (loads with weights_only=True)
  examples/fashion_subset.npz   2,000 test images (x uint8 (N,1,28,28), y int64), seeded random subset
  examples/train_log.json       seed, epochs, seconds, test accuracy on the full 10k test set, params, FLOPs

Usage: python scripts/make_example.py [--epochs 3] [--seed 0] [--threads 2]
Normalisation: mean 0.2860, std 0.3530 (Fashion-MNIST training-set statistics), after scaling to [0,1].
"""
from __future__ import annotations

import argparse
import json
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


def load_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N,1,28,28) uint8 and labels int64 of 'train' or 't10k'."""
    images, labels = DATA / f"{split}-images-idx3-ubyte.gz", DATA / f"{split}-labels-idx1-ubyte.gz"
    if not images.exists():
        sys.exit(f"{images} not found: install the data with `apt-get install -y dataset-fashion-mnist`")
    return torch.from_numpy(read_idx(images)).unsqueeze(1), torch.from_numpy(read_idx(labels).astype(np.int64))


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x.float() / 255.0 - MEAN) / STD


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), 1000):
            correct += int((model(normalise(x[i:i + 1000])).argmax(1) == y[i:i + 1000]).sum())
    return correct / len(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "examples")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    xtr, ytr = load_split("train")
    xte, yte = load_split("t10k")
    model = fashion_cnn()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = args.epochs * (len(xtr) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        total = 0.0
        for i in range(len(xtr) // 128):
            idx = perm[i * 128:(i + 1) * 128]
            x = normalise(xtr[idx])
            if torch.rand(1, generator=gen).item() < 0.5:
                x = x.flip(3)  # horizontal flips: clothes are left-right symmetric
            loss = F.cross_entropy(model(x), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {total / (len(xtr) // 128):.4f}, "
              f"test accuracy {accuracy(model, xte, yte):.4f}, {time.time() - t0:.0f}s", flush=True)
    seconds = time.time() - t0
    test_acc = accuracy(model, xte, yte)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out / "fashion_cnn.pt")
    pick = torch.randperm(len(xte), generator=torch.Generator().manual_seed(1234))[:2000].sort().values
    np.savez_compressed(args.out / "fashion_subset.npz", x=xte[pick].numpy(), y=yte[pick].numpy())
    model.eval()
    log = {"seed": args.seed, "epochs": args.epochs, "threads": args.threads, "train_seconds": round(seconds, 1),
           "test_accuracy": round(test_acc, 4), "subset_accuracy": round(accuracy(model, xte[pick], yte[pick]), 4),
           "params": count_params(model), "flops": count_flops(model, torch.zeros(1, 1, 28, 28)),
           "mean": MEAN, "std": STD, "torch": torch.__version__}
    (args.out / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(json.dumps(log, indent=2))


if __name__ == "__main__":
    main()
