"""Before/after evaluation: accuracy where labels exist, agreement and relative error always, CPU latency.

Latency is noisy on a shared machine. For stable timings, run with glibc's allocator told to keep freed
memory mapped, so that each forward pass does not page-fault its activations in again::

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2147483647 specprune compress ...

Environment variables are read when the process starts, so ``measure_latency`` applies the same two
settings in-process through ``mallopt`` (``keep_memory_mapped``) where glibc is available.
"""
from __future__ import annotations

import ctypes
import statistics
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from specprune_cli.errors import DataError, ModelError

# glibc <malloc.h>: mallopt parameter numbers.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit (4 * 1024 * 1024 * sizeof(long))
_TRIM_NEVER = 2**31 - 1  # mallopt takes a C int
_memory_kept: bool | None = None


def keep_memory_mapped() -> bool:
    """Ask glibc to keep freed memory mapped (process-wide, once), for stable latency numbers.

    Sets ``M_TRIM_THRESHOLD`` so the heap top is never returned to the OS and ``M_MMAP_THRESHOLD`` to
    its maximum (32 MiB) so activation buffers come from the heap instead of fresh ``mmap`` calls that
    page-fault on every forward pass. Equivalent to starting the process with ``MALLOC_TRIM_THRESHOLD_``
    and ``MALLOC_MMAP_THRESHOLD_`` set.

    Returns:
        True when both settings were accepted; False without glibc (macOS, Windows, musl).
    """
    global _memory_kept
    if _memory_kept is None:
        try:
            libc = ctypes.CDLL("libc.so.6")
            _memory_kept = bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_NEVER)) and bool(
                libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX))
        except (OSError, AttributeError):
            _memory_kept = False
    return _memory_kept


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x, y) from a loader item: a tensor, or an (x, y) pair (y < 0 marks an unlabelled sample)."""
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def logits_of(out: Any, who: str, purpose: str = "evaluated") -> torch.Tensor:
    """``out`` if it is a (batch, classes) tensor, else a ModelError saying how to wrap the model."""
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"the {who} model must return logits of shape (batch, classes) to be {purpose}, "
                         f"got {shape}; wrap the model so that forward returns one logits tensor")
    return out


_split, _logits = split_batch, logits_of


def _topk_correct(logits: torch.Tensor, y: torch.Tensor, k: int) -> int:
    top = logits.topk(k, dim=1).indices
    return int((top == y[:, None]).any(dim=1).sum())


def evaluate_model(model: nn.Module, reference: nn.Module, loader: Iterable, *,
                   max_samples: int | None = None) -> dict:
    """Compare ``model`` with ``reference`` (usually pruned vs original) on a loader.

    Args:
        model: the model evaluated.
        reference: the model it is compared with; its own accuracy is reported too.
        loader: yields ``(x, y)``; ``y < 0`` marks an unlabelled sample.
        max_samples: stop after this many samples (None: the whole loader).

    Returns:
        ``samples``, ``labelled_samples``; ``top1``/``top5`` of ``model`` and ``reference_top1``/
        ``reference_top5`` as fractions over labelled samples (None without labels; top-5 also None
        with fewer than 5 classes); ``agreement``: fraction of samples where both argmaxes match;
        ``relative_error``: ||out - ref|| / ||ref|| over all outputs (0 when both are zero, inf when only
        the reference is).
    """
    modes = (model.training, reference.training)
    model.eval()
    reference.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    n = labelled = agree = 0
    correct = {"top1": 0, "top5": 0, "reference_top1": 0, "reference_top5": 0}
    diff_sq = ref_sq = 0.0
    classes = None
    try:
        with torch.inference_mode():
            for batch in loader:
                if max_samples is not None and n >= max_samples:
                    break
                x, y = _split(batch)
                if max_samples is not None:
                    x = x[:max_samples - n]
                    y = y[:max_samples - n] if y is not None else None
                x = x.to(device)
                out = _logits(model(x), "evaluated").double()
                ref = _logits(reference(x), "reference").double()
                if out.shape != ref.shape:
                    raise ModelError(f"the evaluated model returns {tuple(out.shape)} but the reference "
                                     f"returns {tuple(ref.shape)}; both must predict the same classes")
                classes = out.shape[1]
                n += x.shape[0]
                agree += int((out.argmax(1) == ref.argmax(1)).sum())
                diff_sq += float(((out - ref) ** 2).sum())
                ref_sq += float((ref ** 2).sum())
                if y is None:
                    continue
                mask = (y >= 0).to(device)
                if not bool(mask.any()):
                    continue
                yl = y.to(device)[mask]
                labelled += int(mask.sum())
                for name, logits in (("top1", out), ("reference_top1", ref)):
                    correct[name] += _topk_correct(logits[mask], yl, 1)
                if classes >= 5:
                    for name, logits in (("top5", out), ("reference_top5", ref)):
                        correct[name] += _topk_correct(logits[mask], yl, 5)
    finally:
        model.train(modes[0])
        reference.train(modes[1])
    if n == 0:
        raise DataError("the evaluation data is empty; give data.eval at least one sample "
                        "(or raise evaluate.max_eval_samples above 0)")

    def frac(name: str) -> float | None:
        if labelled == 0 or (name.endswith("top5") and classes < 5):
            return None
        return correct[name] / labelled

    if ref_sq > 0:
        rel = (diff_sq / ref_sq) ** 0.5
    else:
        rel = 0.0 if diff_sq == 0 else float("inf")
    return {"samples": n, "labelled_samples": labelled, "top1": frac("top1"), "top5": frac("top5"),
            "reference_top1": frac("reference_top1"), "reference_top5": frac("reference_top5"),
            "agreement": agree / n, "relative_error": rel}


def _batch(example_input: torch.Tensor, batch_size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch_size, *example_input.shape[1:]), generator=gen, dtype=example_input.dtype)
    return x.to(example_input.device)


def _summary(samples_ms: list[float]) -> dict:
    return {"median_ms": statistics.median(samples_ms), "min_ms": min(samples_ms), "samples": len(samples_ms)}


def _warmups(repeats: int) -> int:
    return max(2, min(10, repeats // 5))


def measure_latency(model: nn.Module, example_input: torch.Tensor, batch_sizes: Sequence[int],
                    repeats: int) -> dict[int, dict]:
    """Median wall-clock time of one eager forward pass on CPU, per batch size.

    Runs under ``torch.inference_mode`` with the model in eval mode (its mode is restored), after a few
    untimed warm-up passes, with the current ``torch.get_num_threads()``. Calls ``keep_memory_mapped``
    first (see the module docstring for the equivalent environment variables).

    Args:
        model: the model timed.
        example_input: one batch; only its shape after dim 0, dtype and device are used.
        batch_sizes: batch sizes to time.
        repeats: timed passes per batch size.

    Returns:
        ``{batch_size: {"median_ms", "min_ms", "samples"}}``, ``samples`` being the number of timed passes.
    """
    keep_memory_mapped()
    training = model.training
    model.eval()
    results: dict[int, dict] = {}
    try:
        with torch.inference_mode():
            for b in batch_sizes:
                x = _batch(example_input, b)
                for _ in range(_warmups(repeats)):
                    model(x)
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    model(x)
                    times.append((time.perf_counter() - start) * 1e3)
                results[int(b)] = _summary(times)
    finally:
        model.train(training)
    return results


def measure_onnx_latency(path: str, example_input: torch.Tensor, batch_sizes: Sequence[int],
                         repeats: int, threads: int | None = None) -> dict[int, dict]:
    """Median time of one ONNX Runtime run (CPUExecutionProvider) per batch size.

    Args:
        path: an ONNX file with one input whose first dimension is dynamic.
        example_input: one batch; only its shape after dim 0 and dtype are used.
        batch_sizes: batch sizes to time.
        repeats: timed runs per batch size.
        threads: ONNX Runtime's intra-op threads (None: its default, one per core), e.g. the same
            count torch uses, to compare the two runtimes like for like.

    Returns:
        ``{batch_size: {"median_ms", "min_ms", "samples"}}``, as ``measure_latency``.
    """
    import onnxruntime as ort  # optional at import time: only needed when ONNX latency is asked for

    keep_memory_mapped()
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    results: dict[int, dict] = {}
    for b in batch_sizes:
        feed = {name: _batch(example_input.cpu(), b).numpy()}
        for _ in range(_warmups(repeats)):
            session.run(None, feed)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            session.run(None, feed)
            times.append((time.perf_counter() - start) * 1e3)
        results[int(b)] = _summary(times)
    return results
