#!/usr/bin/env python
"""Reach over Hugging Face transformers: prune small, randomly initialised models of its main families
and say what happened to each.

Models written with transformers carry idioms plain PyTorch code rarely has: decorated forwards with
``**kwargs``, position ids kept in buffers, ``ModelOutput`` classes, caches, attention-mask helpers.
For each architecture below, a small config (a few layers, width 32 to 64) with random weights is
built and ``prune_model`` runs at half of every unit's width (``allocation: ratio``) on two random
inputs: token ids (2 x 16), images (2 x 3 x 32 x 32, or 64 x 64) or waveforms (2 x 1,600 samples).
Each model ends in one of:

- pruned: units were cut and the pruned model runs (the first skip reasons are shown);
- no units: nothing could be pruned; the first reasons say why;
- refused: a specprune error with its message;
- CRASH: any other exception, which is a bug: an internal error must never reach a user;
- no build: transformers itself could not build the small config (not specprune's doing).

transformers is not a dependency of specprune: install it where this runs, e.g.
``pip install --target /tmp/hf transformers`` and ``PYTHONPATH=/tmp/hf``. Nothing is downloaded.
Writes its section of docs/benchmarks.md.

Usage:
  python scripts/sweep_hf.py [--only NAME ...] [--out docs/benchmarks.md]
"""
from __future__ import annotations

import argparse
import collections
import datetime
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import format_table, write_section  # noqa: E402
from fashion_common import ROOT  # noqa: E402
from quality_cache import library_commit  # noqa: E402
from sweep_common import half_width  # noqa: E402

TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            vocab_size=100, max_position_embeddings=64)
DECODER = dict(TEXT, num_key_value_heads=2)
IMAGE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             image_size=32, patch_size=8)
AUDIO = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
             num_conv_pos_embedding_groups=4)

#: name -> (model class, config class, config keywords, input kind, forward keywords)
MODELS = {
    "bert": ("BertForSequenceClassification", "BertConfig", TEXT, "tokens", {}),
    "roberta": ("RobertaForSequenceClassification", "RobertaConfig", dict(TEXT, pad_token_id=1), "tokens",
                {}),
    "distilbert": ("DistilBertForSequenceClassification", "DistilBertConfig",
                   dict(dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=100), "tokens", {}),
    "albert": ("AlbertForSequenceClassification", "AlbertConfig", dict(TEXT, embedding_size=32), "tokens",
               {}),
    "electra": ("ElectraForSequenceClassification", "ElectraConfig", dict(TEXT, embedding_size=32), "tokens",
                {}),
    "deberta_v2": ("DebertaV2ForSequenceClassification", "DebertaV2Config", TEXT, "tokens", {}),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, vocab_size=100,
                                                    n_positions=64), "tokens", {"use_cache": False}),
    "llama": ("LlamaForCausalLM", "LlamaConfig", DECODER, "tokens", {"use_cache": False}),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", DECODER, "tokens", {"use_cache": False}),
    "vit": ("ViTForImageClassification", "ViTConfig", IMAGE, "image32", {}),
    "deit": ("DeiTForImageClassification", "DeiTConfig", IMAGE, "image32", {}),
    "beit": ("BeitForImageClassification", "BeitConfig", IMAGE, "image32", {}),
    "swin": ("SwinForImageClassification", "SwinConfig",
             dict(image_size=32, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4),
             "image32", {}),
    "resnet": ("ResNetForImageClassification", "ResNetConfig",
               dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1]), "image32", {}),
    "convnext": ("ConvNextForImageClassification", "ConvNextConfig",
                 dict(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1]), "image32", {}),
    "regnet": ("RegNetForImageClassification", "RegNetConfig",
               dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8), "image32", {}),
    "mobilenet_v2": ("MobileNetV2ForImageClassification", "MobileNetV2Config",
                     dict(image_size=64, depth_multiplier=0.35), "image64", {}),
    "efficientnet": ("EfficientNetForImageClassification", "EfficientNetConfig",
                     dict(image_size=64, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320),
                     "image64", {}),
    "mobilevit": ("MobileViTForImageClassification", "MobileViTConfig", dict(image_size=64), "image64", {}),
    "segformer": ("SegformerForSemanticSegmentation", "SegformerConfig",
                  dict(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                       patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2],
                       decoder_hidden_size=32), "image64", {}),
    "wav2vec2": ("Wav2Vec2ForSequenceClassification", "Wav2Vec2Config", AUDIO, "audio", {}),
    "hubert": ("HubertForSequenceClassification", "HubertConfig", AUDIO, "audio", {}),
}


def _input(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if kind == "tokens":
        return torch.randint(3, 100, (2, 16), generator=g)
    if kind == "audio":
        return torch.randn(2, 1600, generator=g)
    size = 64 if kind == "image64" else 32
    return torch.randn(2, 3, size, size, generator=g)


def run_one(name: str) -> dict:
    import transformers

    model_cls, config_cls, config, kind, forward_kwargs = MODELS[name]
    row: dict = {"model": name, "outcome": "", "params": None, "units": None, "kept": None, "why": ""}
    started = time.perf_counter()
    try:
        torch.manual_seed(0)
        model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(num_labels=3, **config))
        model.eval()
        x = _input(kind)
        with torch.no_grad():
            model(x, **forward_kwargs)
    except Exception as exc:  # noqa: BLE001 - transformers' own failure to build or run the toy config
        row["outcome"], row["why"] = "no build", f"{type(exc).__name__}: {exc}"
        row["seconds"] = time.perf_counter() - started
        return row
    row["params"] = sum(p.numel() for p in model.parameters())
    half_width(model, x, row, forward_kwargs)
    row["seconds"] = time.perf_counter() - started
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=sorted(MODELS), help="these models instead of all")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = ap.parse_args()
    try:
        import transformers
    except ImportError:
        sys.exit("transformers is not installed here: pip install transformers (see this script's docstring)")
    torch.set_num_threads(1)
    commit = library_commit()[:12]
    names = args.only or list(MODELS)
    rows = []
    for i, name in enumerate(names, 1):
        row = run_one(name)
        rows.append(row)
        print(f"[{i}/{len(names)}] {name}: {row['outcome']} {row['why'][:100]}", flush=True)
    tally = collections.Counter(r["outcome"] for r in rows)
    table = [[r["model"], MODELS[r["model"]][0], f"{r['params'] / 1e6:.2f}M" if r["params"] else "-",
              r["outcome"], r["units"] if r["units"] is not None else "-",
              f"{r['kept']:.3f}" if r["kept"] else "-", f"{r['seconds']:.1f}",
              r["why"][:160].replace("|", "/").replace("\n", " ")] for r in rows]
    text = (f"## Reach over Hugging Face transformers (`scripts/sweep_hf.py`)\n\n"
            f"transformers {transformers.__version__}, torch {torch.__version__}, specprune at commit "
            f"{commit} (the last change to specprune_cli/), {datetime.date.today()}, one thread. Small "
            "configs (2 layers, width 64 or less) with random weights, 3 labels, `allocation: ratio` 0.5 "
            "(every unit to half its width) on two random inputs; decoders run with `use_cache=False` "
            "(`model.forward_kwargs`). *kept*: parameters kept. *why*: the first reasons something was "
            "left whole, or the error.\n\n"
            + ", ".join(f"{k}: {v}" for k, v in sorted(tally.items())) + f" (of {len(rows)})\n\n"
            + format_table(["name", "class", "params", "outcome", "units", "kept", "s", "why"], table))
    if not args.only:
        write_section(args.out, "sweep-hf", text)
    print(text)


if __name__ == "__main__":
    main()
