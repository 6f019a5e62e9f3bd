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
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fashion_common import (MEAN, ROOT, STD, accuracy, load_split, replace_file,  # noqa: E402
                            train)
from specprune_cli.flops import count_flops, count_params  # noqa: E402
from specprune_cli.models import fashion_cnn  # noqa: E402

SUBSET_SIZE, SUBSET_SEED = 2000, 1234


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
    seconds = train(model, xtr, ytr, epochs=args.epochs, seed=args.seed, xte=xte, yte=yte,
                    time_steps=args.time_steps, threads=args.threads)
    if args.time_steps:
        return
    test_acc = accuracy(model, xte, yte)

    args.out.mkdir(parents=True, exist_ok=True)
    weights = args.out / "fashion_cnn.pt"
    replace_file(weights, lambda f: torch.save(model.state_dict(), f))
    # The example must load without unpickling code, and must be the model that was measured.
    reloaded = fashion_cnn()
    reloaded.load_state_dict(torch.load(weights, weights_only=True))
    if accuracy(reloaded, xte, yte) != test_acc:
        sys.exit(f"{weights} reloaded with a different test accuracy; the file is not the trained model")

    subset_gen = torch.Generator().manual_seed(SUBSET_SEED)
    pick = torch.randperm(len(xte), generator=subset_gen)[:SUBSET_SIZE].sort().values
    replace_file(args.out / "fashion_subset.npz",
                 lambda f: np.savez_compressed(f, x=xte[pick].numpy(), y=yte[pick].numpy()))
    model.eval()
    log = {"seed": args.seed, "epochs": args.epochs, "threads": args.threads,
           "train_seconds": round(seconds, 1), "test_accuracy": round(test_acc, 4),
           "subset_accuracy": round(accuracy(model, xte[pick], yte[pick]), 4),
           "params": count_params(model), "flops": count_flops(model, torch.zeros(1, 1, 28, 28)),
           "mean": MEAN, "std": STD, "torch": torch.__version__}
    replace_file(args.out / "train_log.json", lambda f: f.write((json.dumps(log, indent=2) + "\n").encode()))
    print(json.dumps(log, indent=2))


if __name__ == "__main__":
    main()
