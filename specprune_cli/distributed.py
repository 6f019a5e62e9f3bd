"""The process group when specprune runs as one of several processes under ``torchrun``.

One process (``WORLD_SIZE`` unset or 1) is the ordinary case, and every function here is then a no-op
that returns its input. With ``WORLD_SIZE`` > 1, :func:`process_group` joins the group torchrun set up
(gloo on CPU, nccl on CUDA), and the run uses a few collectives, all here:

* :func:`shard`: calibration batch i goes to rank ``i % world``, so the ranks read disjoint shards
  that together are the single-process batches, in a fixed order.
* :func:`all_reduce_moments`: the float64 raw sums and row counts of the second moments, one flat
  all-reduce per call, before every selection. Every rank then holds bit-identical statistics, and
  selection (deterministic given them) gives every rank the same kept channels and reconstruction;
  :func:`check_same` verifies that on the plan.
* :func:`data_parallel`: fine-tuning under DistributedDataParallel.
* :func:`broadcast_object`: rank 0 alone evaluates and writes the outputs; the others receive its
  report.

Failures. Every collective starts with a status exchange (:func:`all_ok`). A rank that raises joins
the next exchange from :func:`process_group`'s handler, so the others stop there with its message
and exit code instead of waiting, and rank 0 never reaches the output transaction. A rank that dies
or hangs is caught by the collectives' timeout (``runtime.timeout_s``).
"""
from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from specprune_cli.data import Batches
from specprune_cli.errors import ConfigError, DistributedError, SpecpruneError, reason
from specprune_cli.moments import CrossMoment

_state: dict[str, Any] = {"device": torch.device("cpu"), "broken": False}


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ConfigError(f"the environment variable {name}={value!r} is not an integer; launch specprune "
                          "with torchrun, which sets it") from None


def requested_world_size() -> int:
    """``WORLD_SIZE`` as torchrun set it (1 when unset), whether or not the group is joined yet."""
    return _env_int("WORLD_SIZE", 1)


def world_size() -> int:
    """How many processes take part (1 without torchrun)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank, 0 to world_size - 1 (``RANK`` from torchrun, also outside the group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else _env_int("RANK", 0)


def is_main() -> bool:
    """True on rank 0, the process that evaluates, prints and writes the outputs."""
    return rank() == 0


def active() -> bool:
    """True when there are other processes to talk to."""
    return world_size() > 1


@contextlib.contextmanager
def process_group(device: str = "cpu", timeout_s: float = 1800.0) -> Iterator[None]:
    """Join torchrun's process group for the block when ``WORLD_SIZE`` > 1, and leave it in ``finally``.

    Args:
        device: "cpu" (gloo backend) or "cuda" (nccl, one GPU per process: ``LOCAL_RANK``).
        timeout_s: how long a collective waits for the other processes before failing.

    Raises:
        ConfigError: torchrun's variables are incomplete. An error in the block is raised again after
            the other processes have been told, so that they stop with the same message.
    """
    if requested_world_size() <= 1 or dist.is_initialized():
        yield  # one process, or a caller that manages its own group
        return
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT", "RANK") if not os.environ.get(v)]
    if missing:
        raise ConfigError(f"WORLD_SIZE is set but {', '.join(missing)} is not: start several processes with "
                          "torchrun --nproc_per_node=N -m specprune_cli compress ..., which sets them all")
    if device == "cuda":
        local = _env_int("LOCAL_RANK", 0)
        torch.cuda.set_device(local)
        _state["device"] = torch.device("cuda", local)
    _state["broken"] = False
    try:
        dist.init_process_group("nccl" if device == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(f"could not join the other processes ({reason(exc)}); check the torchrun "
                               "rendezvous (--rdzv-endpoint, --master-addr/--master-port) and that every "
                               f"node can reach it within runtime.timeout_s ({timeout_s:g} s)") from exc
    failed = False
    try:
        yield
    except KeyboardInterrupt:
        raise  # ^C reaches every process
    except DistributedError:
        failed = True  # it came from an exchange: every process knows already
        raise
    except BaseException as exc:  # noqa: B036 - the others must hear of any failure, then it goes on
        failed = True
        _announce(exc)
        raise
    finally:
        if failed and not _state["broken"]:
            # Leave together: torchrun stops the other processes as soon as one exits with an error,
            # and each should have printed the message by then.
            with contextlib.suppress(RuntimeError):
                dist.barrier()
        dist.destroy_process_group()
        _state["device"] = torch.device("cpu")


def _announce(exc: BaseException) -> None:
    """Tell the other processes, waiting at their next exchange, that this one failed and why."""
    if _state["broken"]:
        return
    if isinstance(exc, SpecpruneError):
        message, code = str(exc), exc.exit_code
    else:  # the CLI calls this a bug in the failing process; the others say the same
        message, code = (f"unexpected error ({reason(exc)}); this is a bug in specprune: please report it "
                         "with the command, the config and the model architecture"), 1
    with contextlib.suppress(DistributedError):
        all_ok(False, message, code)


def _collective(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except RuntimeError as exc:  # DistBackendError and gloo's errors: a peer died, or the timeout passed
        _state["broken"] = True
        raise DistributedError(f"process {rank()} lost contact with the others ({reason(exc)}): another "
                               "process stopped (its own message says why) or did not answer within "
                               "runtime.timeout_s") from exc


def all_ok(ok: bool = True, message: str = "", exit_code: int = 1, size: int = 0) -> None:
    """The status exchange every collective starts with; raises on every rank if one rank is not ok.

    Args:
        ok: this rank's status.
        message, exit_code: what every rank fails with when this rank is the first that is not ok.
        size: the length of the payload that follows, which must be the same on every rank.

    Raises:
        DistributedError: some rank is not ok (its message and exit code, on every rank), or the sizes
            differ.
    """
    if not active():
        if not ok:
            raise DistributedError(message, exit_code)
        return
    world, me = world_size(), rank()
    status = torch.tensor([0 if ok else world - me, size, -size], dtype=torch.int64, device=_state["device"])
    _collective(dist.all_reduce, status, op=dist.ReduceOp.MAX)
    first_failed, largest, smallest = int(status[0]), int(status[1]), -int(status[2])
    if first_failed:
        source = world - first_failed
        payload = [(message, exit_code) if source == me else None]
        _collective(dist.broadcast_object_list, payload, src=source, device=_state["device"])
        text, code = payload[0]
        raise DistributedError(text if source == me else f"process {source} of {world} failed: {text}", code)
    if largest != smallest:
        raise DistributedError(f"the processes disagree on the size of the data they exchange ({smallest} "
                               f"to {largest} values); this is a bug in specprune: please report it")


def check_peers() -> None:
    """Stop here, on every rank, if another rank has failed (a status exchange)."""
    all_ok(True)


def all_reduce_moments(*moment_maps: Mapping[Any, CrossMoment] | None) -> None:
    """Sum the accumulators' raw float64 sums and row counts over all ranks, in place.

    Accumulators that appear in several maps (or twice in one) are reduced once. Every rank must pass
    the same keys in the same order. One flat all-reduce per call.

    Args:
        moment_maps: (unit, tap) -> accumulator mappings; None entries are skipped.
    """
    if not active():
        return
    accumulators: dict[int, CrossMoment] = {}
    for moments in moment_maps:
        for acc in (moments or {}).values():
            accumulators.setdefault(id(acc), acc)
    layout: list[tuple[CrossMoment, str, torch.Size]] = []
    chunks: list[torch.Tensor] = []
    for acc in accumulators.values():
        for key, value in sorted(acc.sums().items()):
            layout.append((acc, key, value.shape))
            chunks.append(value.reshape(-1))
    flat = torch.cat(chunks).to(_state["device"])
    del chunks
    all_ok(True, size=flat.numel())
    _collective(dist.all_reduce, flat)
    flat = flat.cpu()
    offset, loaded = 0, {}
    for acc, key, shape in layout:
        n = shape.numel()
        loaded.setdefault(id(acc), {})[key] = flat[offset:offset + n].view(shape)
        offset += n
    for acc in accumulators.values():
        acc.load_sums(loaded[id(acc)])


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (picklable) on every rank."""
    if not active():
        return obj
    check_peers()
    payload = [obj if rank() == src else None]
    _collective(dist.broadcast_object_list, payload, src=src, device=_state["device"])
    return payload[0]


def check_same(obj: Any, what: str) -> None:
    """Fail on every rank unless ``obj`` equals rank 0's (a cheap guard on deterministic results)."""
    if not active():
        return
    same = broadcast_object(obj) == obj
    all_ok(same, f"process {rank()} computed a different {what} than process 0 from the same reduced "
                 "statistics; this is a bug in specprune: please report it with the config")


def all_sum(*values: float) -> list[float]:
    """The sums over all ranks of each of ``values`` (float64)."""
    if not active():
        return [float(v) for v in values]
    check_peers()
    t = torch.tensor(values, dtype=torch.float64, device=_state["device"])
    _collective(dist.all_reduce, t)
    return t.tolist()


def data_parallel(model: nn.Module) -> nn.Module:
    """``model`` under DistributedDataParallel (gradients averaged over ranks), or as it is in one process.

    Buffers are not broadcast at each forward: BatchNorm's running statistics stay each rank's own,
    and rank 0's are the ones written.
    """
    if not active():
        return model
    check_peers()  # the constructor broadcasts rank 0's weights: a failed peer must stop us before it
    device_ids = [_state["device"].index] if _state["device"].type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def shard(batches: Batches | Iterable[Any], *, even: bool = False) -> Batches | Iterable[Any]:
    """This rank's share of ``batches``: batch i goes to rank ``i % world`` (disjoint, deterministic).

    A :class:`~specprune_cli.data.Batches` is re-batched so that a rank reads only its own samples.

    Args:
        batches: the single-process batches.
        even: drop the last incomplete round of batches so that every rank gets as many (fine-tuning).

    Raises:
        ConfigError: fewer batches than processes.
    """
    world, me = world_size(), rank()
    if world == 1:
        return batches
    if not isinstance(batches, Batches):
        return [b for i, b in enumerate(batches) if i % world == me]
    return batches.shard(me, world, even=even)
