"""CPU latency of the original and the pruned model side by side, in torch eager and ONNX Runtime.

Latency is noisy on a shared machine. The two models are timed in alternating rounds, so a burst of
load hits both; the report gives each model's median and spread, and the speed-up only where the
per-round ratios agree (their interquartile range within ``MAX_SPREAD`` of their median); otherwise it
says "unstable (machine busy?)", or, below three rounds, that there were too few. Timing stops after
``latency_repeats`` rounds or once a model has used ``latency_seconds`` at a batch size, whichever
comes first, and the report says how many ran.

For stable timings, run with glibc's allocator told to keep freed memory mapped, so that each forward
pass does not page-fault its activations in again::

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2147483647 specprune compress ...

Environment variables are read when the process starts, so ``measure_latency`` applies the same two
settings in-process through ``mallopt`` (``keep_memory_mapped``) where glibc is available.
"""
from __future__ import annotations

import ctypes
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from specprune_cli.model_io import ModelCall, eval_mode, random_batch

# glibc <malloc.h>: mallopt parameter numbers.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit (4 * 1024 * 1024 * sizeof(long))
_TRIM_NEVER = 2**31 - 1  # mallopt takes a C int
#: The same settings as environment variables, which glibc reads when a process starts (for children).
MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": str(_TRIM_NEVER), "MALLOC_MMAP_THRESHOLD_": str(_MMAP_THRESHOLD_MAX)}
_memory_kept: bool | None = None
MAX_SPREAD = 0.3  # largest interquartile range of the per-round ratios, relative to their median
UNSTABLE = "unstable (machine busy?)"
TOO_FEW = "too few runs to tell (raise evaluate.latency_seconds)"
MIN_RUNS = 3  # fewer paired rounds tell no spread


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


def _batch(example_input: torch.Tensor, batch_size: int) -> torch.Tensor:
    return random_batch(example_input, batch_size, torch.Generator().manual_seed(0))


def _spread(values: Sequence[float]) -> float:
    """Interquartile range over the median (inf with fewer than 3 values: no spread can be told)."""
    if len(values) < MIN_RUNS:
        return float("inf")
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    median = statistics.median(values)
    return (q3 - q1) / median if median > 0 else float("inf")


def _summary(samples_ms: list[float]) -> dict:
    spread = _spread(samples_ms)
    return {"median_ms": statistics.median(samples_ms), "min_ms": min(samples_ms),
            "spread": round(spread, 4) if spread != float("inf") else None, "samples": len(samples_ms)}


def time_rounds(runs: Mapping[str, Callable[[], Any]], *, repeats: int, seconds: float | None = None
                ) -> dict[str, list[float]]:
    """Time each of ``runs`` in rounds of one call each, the order reversed every other round.

    Each callable first runs a few untimed warm-up calls. Rounds stop after ``repeats``, or once any
    callable has spent ``seconds`` (warm-up included) and at least one round is done.

    Args:
        runs: name -> a callable doing one pass.
        repeats: the most timed rounds.
        seconds: the time budget per callable (None: no budget).

    Returns:
        name -> the milliseconds of each timed call, in round order (one per round, so ratios pair up).
    """
    names = list(runs)
    spent = dict.fromkeys(names, 0.0)
    budget = float("inf") if seconds is None else seconds
    for name in names:
        for _ in range(_warmups(repeats)):
            start = time.perf_counter()
            runs[name]()
            spent[name] += time.perf_counter() - start
            if spent[name] >= budget / 2:  # a slow model: the budget is for timing, not warming up
                break
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            runs[name]()
            elapsed = time.perf_counter() - start
            spent[name] += elapsed
            times[name].append(elapsed * 1e3)
        if max(spent.values()) >= budget:
            break
    return times


def _warmups(repeats: int) -> int:
    return max(2, min(10, repeats // 5))


def _torch_runs(models: Mapping[str, nn.Module], x: torch.Tensor, call: ModelCall) -> dict[str, Callable]:
    def one(model: nn.Module) -> Callable[[], Any]:
        return lambda: call(model, x)

    return {name: one(m) for name, m in models.items()}


def _onnx_runs(paths: Mapping[str, str | Path], x: torch.Tensor, threads: int | None) -> dict[str, Callable]:
    import onnxruntime as ort  # imported only when ONNX latency is asked for

    from specprune_cli.ort_run import ort_feed

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    runs = {}
    for name, path in paths.items():
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        feed = ort_feed(session, x)
        runs[name] = lambda session=session, feed=feed: session.run(None, feed)
    return runs


def _per_batch(make_runs: Callable[[torch.Tensor], dict[str, Callable]], example_input: torch.Tensor,
               batch_sizes: Sequence[int], repeats: int, seconds: float | None) -> dict[int, dict[str, list]]:
    keep_memory_mapped()
    return {int(b): time_rounds(make_runs(_batch(example_input, b)), repeats=repeats, seconds=seconds)
            for b in batch_sizes}


def measure_latency(model: nn.Module, example_input: torch.Tensor, batch_sizes: Sequence[int], repeats: int,
                    *, seconds: float | None = None, call: ModelCall | None = None) -> dict[int, dict]:
    """Wall-clock time of one eager forward pass, per batch size.

    Runs under ``torch.inference_mode`` with the model in eval mode (its mode is restored), after a few
    untimed warm-up passes, with the current ``torch.get_num_threads()``. Calls ``keep_memory_mapped``
    first (see the module docstring for the equivalent environment variables).

    Args:
        model: the model timed.
        example_input: one batch; only its shape after dim 0, dtype and device are used.
        batch_sizes: batch sizes to time.
        repeats: the most timed passes per batch size.
        seconds: the time budget per batch size (None: none).
        call: the forward keyword arguments.

    Returns:
        ``{batch_size: {"median_ms", "min_ms", "spread", "samples"}}``: ``spread`` is the interquartile
        range over the median (None below 3 passes), ``samples`` the number of timed passes.
    """
    with eval_mode(model), torch.inference_mode():
        timed = _per_batch(lambda x: _torch_runs({"m": model}, x, call or ModelCall()), example_input,
                           batch_sizes, repeats, seconds)
    return {b: _summary(t["m"]) for b, t in timed.items()}


def measure_onnx_latency(path: str | Path, example_input: torch.Tensor, batch_sizes: Sequence[int],
                         repeats: int, threads: int | None = None, *, seconds: float | None = None
                         ) -> dict[int, dict]:
    """Time of one ONNX Runtime run (CPUExecutionProvider) per batch size.

    Args:
        path: an ONNX file with one input whose first dimension is dynamic.
        example_input: one batch; only its shape after dim 0 and dtype are used.
        batch_sizes: batch sizes to time.
        repeats: the most timed runs per batch size.
        threads: ONNX Runtime's intra-op threads (None: its default, one per core), e.g. the same
            count torch uses, to compare the two runtimes like for like.
        seconds: the time budget per batch size (None: none).

    Returns:
        ``{batch_size: {"median_ms", "min_ms", "spread", "samples"}}``, as ``measure_latency``.
    """
    timed = _per_batch(lambda x: _onnx_runs({"m": path}, x, threads), example_input, batch_sizes, repeats,
                       seconds)
    return {b: _summary(t["m"]) for b, t in timed.items()}


def time_onnx_models(paths: Mapping[str, str | Path], example_input: torch.Tensor, batch_sizes: Sequence[int],
                     repeats: int, threads: int | None = None, *, seconds: float | None = None
                     ) -> dict[int, dict[str, list[float]]]:
    """ONNX Runtime time of several files, per batch size, timed in the same rounds (``time_rounds``).

    Args:
        paths: name -> ONNX file (one input, dynamic first dimension).
        example_input, batch_sizes, repeats, threads, seconds: as for ``measure_onnx_latency``.

    Returns:
        ``{batch_size: {name: milliseconds of each round}}``: round i of every file ran in the same round,
        so their ratios pair up.
    """
    return _per_batch(lambda x: _onnx_runs(paths, x, threads), example_input, batch_sizes, repeats, seconds)


def _side_by_side(timed: dict[int, dict[str, list[float]]]) -> dict:
    """Per model and batch size its summary; per batch size the speed-up over the original, or why there
    is none: ``speedup`` for the pruned model, ``speedup_int8`` for an ``int8`` one when timed."""
    names = list(next(iter(timed.values()), {}))
    out: dict[str, Any] = {name: {} for name in names}
    for name in names[1:]:
        out["speedup" if name == "pruned" else f"speedup_{name}"] = {}
    for b, t in timed.items():
        for name in names:
            out[name][str(b)] = _summary(t[name])
        for name in names[1:]:
            ratios = [o / p for o, p in zip(t["original"], t[name]) if p > 0]
            spread = _spread(ratios)
            stable = spread <= MAX_SPREAD
            key = "speedup" if name == "pruned" else f"speedup_{name}"
            out[key][str(b)] = {"ratio": round(statistics.median(ratios), 3) if stable and ratios else None,
                                "spread": round(spread, 4) if spread != float("inf") else None,
                                "stable": stable, "runs": len(ratios)}
    return out


def verdict(speedup: Mapping[str, Any]) -> str:
    """How the summary states one batch size's speed-up: the ratio, or why it cannot be told."""
    if speedup["stable"]:
        return f"{speedup['ratio']:.2f}x faster"
    return TOO_FEW if speedup["runs"] < MIN_RUNS else UNSTABLE


def compare_latency(original: nn.Module, pruned: nn.Module, example_input: torch.Tensor, *,
                    batch_sizes: Sequence[int], repeats: int, seconds: float | None,
                    call: ModelCall | None = None, onnx: Mapping[str, str | Path] | None = None) -> dict:
    """Latency of the original and the pruned model, timed in alternating rounds (see the module docstring).

    Args:
        original, pruned: the two models (torch eager, eval mode, ``inference_mode``).
        example_input: one batch; its shape after dim 0 and dtype are used.
        batch_sizes: batch sizes to time.
        repeats: the most rounds per batch size.
        seconds: the time budget per (model, batch size).
        call: the forward keyword arguments.
        onnx: ``{"original": path, "pruned": path}`` to time in ONNX Runtime too, with ``"int8": path``
            to time the int8 model in the same rounds.

    Returns:
        ``batch_sizes``, ``repeats``, ``seconds``, ``threads``, and per runtime (``torch``,
        ``onnxruntime``): ``original`` and ``pruned`` (batch size -> median_ms, min_ms, spread, samples)
        and ``speedup`` (batch size -> ratio of medians of the paired rounds, or None when unstable;
        spread; stable; runs); with an int8 file, ``onnxruntime`` also has ``int8`` and ``speedup_int8``
        (its speed-up over the original float model).
    """
    call = call or ModelCall()
    models = {"original": original, "pruned": pruned}
    with eval_mode(*models.values()), torch.inference_mode():
        timed = _per_batch(lambda x: _torch_runs(models, x, call), example_input, batch_sizes, repeats,
                           seconds)
    out = {"batch_sizes": [int(b) for b in batch_sizes], "repeats": repeats, "seconds": seconds,
           "threads": torch.get_num_threads(), "torch": _side_by_side(timed)}
    if onnx:
        threads = torch.get_num_threads()  # like for like with torch
        ordered = {name: onnx[name] for name in ("original", "pruned", "int8") if name in onnx}
        out["onnxruntime"] = _side_by_side(_per_batch(lambda x: _onnx_runs(ordered, x, threads),
                                                      example_input, batch_sizes, repeats, seconds))
    return out
