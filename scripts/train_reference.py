#!/usr/bin/env python
"""Train the benchmark reference models on full Fashion-MNIST and cache them in bench_cache/.

The models are ``specprune_cli.models`` vgg_small (VGG-style, flatten -> Linear head), resnet_small
(basic residual blocks) and mobilenetv2_small (inverted residuals, depthwise convs), trained with the
recipe in scripts/fashion_common.py (seed 0). ``scripts/bench_quality.py`` calls the same code and
reuses the cache, so running this first only moves the training out of the benchmark.

Usage:
  python scripts/train_reference.py                       # all three, 2 epochs each
  python scripts/train_reference.py --models resnet_small --threads 2
  python scripts/train_reference.py --time-steps 50       # time 50 steps per model, write nothing
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fashion_common import load_split, reference_model, train  # noqa: E402
from specprune_cli import models  # noqa: E402

REFERENCE = ("vgg_small", "resnet_small", "mobilenetv2_small")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(REFERENCE), choices=REFERENCE)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--time-steps", type=int, default=0, metavar="N",
                    help="only time N training steps per model and print the projected epoch time")
    args = ap.parse_args()
    if args.time_steps:
        torch.set_num_threads(args.threads)
        xtr, ytr = load_split("train")
        for name in args.models:
            print(name, end=": ")
            train(getattr(models, name)(), xtr, ytr, epochs=1, seed=args.seed, time_steps=args.time_steps,
                  threads=args.threads)
        return
    for name in args.models:
        _, log = reference_model(name, epochs=args.epochs, seed=args.seed, threads=args.threads)
        print(json.dumps(log))


if __name__ == "__main__":
    main()
