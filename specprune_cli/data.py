"""Calibration / fine-tune / eval data from a ``DataConfig``, as :class:`Batches` of (x, y).

Conventions, shared by every consumer:

- every batch is a pair ``(x, y)``: x of shape (B, *model.input_shape), float32 (int64 for token ids,
  see below); y int64 of shape (B,),
  filled with -1 when the data has no labels. ``Batches.has_labels`` says which, so a consumer never
  has to inspect y (fine-tuning then distils only; evaluation reports agreement only).
- ``num_samples`` selects a seeded random subset (``seed``), kept in file order: the first N of an
  ImageFolder would be a single class, which would skew the statistics. Asking for more than there are
  is a warning (all are used); a dataset with none is a DataError.
- arrays (npz, idx) hold float16/32/64 inputs, used as they are, uint8, scaled to [0, 1], or other
  integers, read as token ids (int64, never normalised); any other dtype is refused rather than cast,
  and so are NaN and Inf. Labels are integers, one per sample. Then ``mean``/``std`` normalise float
  inputs, when given.
- a sample may have any shape: (C, H, W) images, (C, L) sequences, (L,) feature vectors. Arrays of
  shape (N, *rest) gain a channel axis when ``model.input_shape`` is (1, *rest).

Under torchrun each process reads its share of the batches (``Batches.shard``), re-batched so that
together the shares are the single-process batches, in the same order and shuffling.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, RandomSampler, Sampler, TensorDataset

from specprune_cli.config_inputs import DataConfig
from specprune_cli.data_formats import UNLABELED, Log, check_shape, read_dataset
from specprune_cli.errors import ConfigError, DataError, SpecpruneError, reason


def _warn(message: str) -> None:
    warnings.warn(message.removeprefix("warning: "), stacklevel=3)


@dataclass
class Batches:
    """The ``(x, y)`` batches of one data section, and what is known about them.

    Iterating reads the data; a sample that fails to load (a damaged image, say) is a DataError that
    names the section, not an exception from deep inside a dataset class.

    Attributes:
        loader: the DataLoader the batches come from.
        where: the section (calibration, finetune, eval), for messages.
        num_samples: how many samples one pass yields.
        has_labels: whether y holds labels (else every y is -1).
        max_label: the largest label (None without labels), to check against the model's classes.
    """

    loader: DataLoader
    where: str
    num_samples: int
    has_labels: bool
    max_label: int | None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = iter(self.loader)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except SpecpruneError:
                raise
            except Exception as exc:  # reading user files: PIL, OSError, a dataset's own errors
                raise DataError(f"data.{self.where}: reading a batch failed ({reason(exc)}); fix or remove "
                                "the file it names") from exc
            yield batch

    def __len__(self) -> int:
        return len(self.loader)

    def shard(self, me: int, world: int, *, even: bool = False) -> Batches:
        """Rank ``me``'s share out of ``world`` processes: batch i goes to rank ``i % world``,
        re-batched so that the rank reads only its own samples (``distributed.shard``).

        Args:
            me, world: this process's rank and the number of processes.
            even: drop the last incomplete round of batches so that every rank gets as many.

        Raises:
            ConfigError: fewer batches than processes.
        """
        loader = self.loader
        generator = None
        if isinstance(loader.sampler, RandomSampler):
            generator = torch.Generator()
            generator.set_state(loader.sampler.generator.get_state())
        sampler = _ShardSampler(len(loader.dataset), loader.batch_size, me, world, generator, even)
        if len(sampler) == 0:
            raise ConfigError(f"data.{self.where} has {len(loader)} batch(es) of {loader.batch_size}, fewer "
                              f"than the {world} processes{' (whole rounds)' if even else ''}; give every "
                              "process at least one: lower the batch size or run fewer processes")
        shared = DataLoader(loader.dataset, batch_sampler=sampler, num_workers=0, generator=generator)
        samples = sum(len(b) for b in sampler._batches(list(range(sampler.n))))
        return dataclasses.replace(self, loader=shared, num_samples=samples)


def build_batches(data_cfg: DataConfig, input_shape: Sequence[int], *, shuffle: bool = False,
                  where: str = "calibration", batch_size: int | None = None,
                  log: Log | None = None) -> Batches:
    """The batches of one data section (see the module docstring for the conventions).

    Args:
        data_cfg: one data section of the config.
        input_shape: ``model.input_shape``; every sample must have this shape.
        shuffle: reshuffle each epoch (fine-tuning), with a generator seeded from ``data_cfg.seed``.
        where: the section name (calibration, finetune, eval), for messages.
        batch_size: overrides ``data_cfg.batch_size`` (``finetune.batch_size``).
        log: receives warnings (prefixed "warning: "); default: ``warnings.warn``.

    Returns:
        The Batches.

    Raises:
        DataError: missing/malformed files, no samples, refused dtypes or values, or samples whose shape
            is not ``input_shape``.
    """
    log = log or _warn
    dataset, max_label = read_dataset(data_cfg, input_shape, where, log)
    if len(dataset) == 0:
        raise DataError(f"data.{where}: {data_cfg.path} holds no samples")
    if not isinstance(dataset, TensorDataset):
        try:
            x0 = dataset[0][0]  # transformed datasets: check one sample, the rest share the transform
        except Exception as exc:  # a damaged first image
            raise DataError(f"data.{where}: reading the first sample of {data_cfg.path} failed "
                            f"({reason(exc)}); fix or remove that file") from exc
        check_shape(x0.shape, input_shape, where, data_cfg.path)
    generator = torch.Generator().manual_seed(data_cfg.seed) if shuffle else None
    loader = DataLoader(dataset, batch_size=batch_size or data_cfg.batch_size, shuffle=shuffle,
                        generator=generator, num_workers=0)
    labelled = max_label is not None and max_label >= 0  # a y of -1 throughout is no labels
    return Batches(loader=loader, where=where, num_samples=len(dataset), has_labels=labelled,
                   max_label=max_label)


class _ShardSampler(Sampler[list[int]]):
    """The batches of ``rank`` out of the single-process batching: batch i goes to rank i % world.

    Shuffled, each epoch draws the permutation a single-process DataLoader would draw (same seeded
    generator, the same on every rank). ``even`` keeps only whole rounds of ``world`` batches, so that
    every rank takes the same number of steps (what DistributedDataParallel needs).
    """

    def __init__(self, n: int, batch_size: int, me: int, world: int, generator: torch.Generator | None,
                 even: bool):
        self.n, self.batch_size, self.me, self.world = n, batch_size, me, world
        self.generator, self.even = generator, even

    def _batches(self, order: list[int]) -> list[list[int]]:
        batches = [order[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        if self.even:
            batches = batches[:len(batches) - len(batches) % self.world]
        return batches[self.me::self.world]

    def __iter__(self) -> Iterator[list[int]]:
        # A generator function: the permutation is drawn at the first batch, after the DataLoader has
        # drawn its base seed from the same generator, as it does before a RandomSampler's draw.
        if self.generator is None:
            yield from self._batches(list(range(self.n)))
            return
        yield from self._batches(torch.randperm(self.n, generator=self.generator).tolist())
        # A RandomSampler draws one more (empty) permutation when it runs out; so does this epoch, so
        # that the next one draws what a single process's next epoch draws.
        torch.randperm(self.n, generator=self.generator)

    def __len__(self) -> int:
        return len(self._batches(list(range(self.n))))


__all__ = ["Batches", "build_batches", "UNLABELED"]
