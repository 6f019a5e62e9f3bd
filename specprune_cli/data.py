"""Calibration / fine-tune / eval data from a ``DataConfig``, as a DataLoader of (x, y) batches.

Conventions, shared by every consumer:

- every batch is a pair ``(x, y)``: x float32 of shape (B, *model.input_shape); y int64 of shape (B,),
  filled with -1 when the data has no labels. The loader's ``has_labels`` attribute says which, so a
  consumer never has to inspect y (fine-tuning then distils only; evaluation reports agreement only).
- ``num_samples`` selects a seeded random subset (``seed``), kept in file order: the first N of an
  ImageFolder would be a single class, which would skew the statistics. Asking for more than there are
  is a warning (all are used); a dataset with none is a DataError.
- uint8 data is scaled to [0, 1] first, then normalised with ``mean``/``std`` when given.
"""
from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from specprune_cli.config import DataConfig
from specprune_cli.errors import DataError

Log = Callable[[str], None]
UNLABELED = -1


def _warn(message: str) -> None:
    warnings.warn(message.removeprefix("warning: "), stacklevel=3)


def _subset_indices(available: int, cfg: DataConfig, where: str, log: Log) -> np.ndarray:
    if available == 0:
        raise DataError(f"data.{where}: {cfg.path or 'the dataset'} holds no samples; point "
                        f"data.{where}.path at a non-empty dataset")
    wanted = cfg.num_samples
    if wanted is None or wanted >= available:
        if wanted is not None and wanted > available:
            log(f"warning: data.{where}: asked for {wanted} samples (num_samples) but {cfg.path} has only "
                f"{available}; using all {available}")
        return np.arange(available)
    rng = np.random.default_rng(cfg.seed)
    return np.sort(rng.choice(available, size=wanted, replace=False))


def _normalise(x: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    if cfg.mean is None:
        return x
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean = torch.tensor(cfg.mean, dtype=x.dtype).reshape(shape)
    std = torch.tensor(cfg.std, dtype=x.dtype).reshape(shape)
    return (x - mean) / std


def _to_float(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x))
    if t.dtype == torch.uint8:
        return t.to(torch.float32) / 255.0
    return t.to(torch.float32)


def _check_shape(shape: Sequence[int], input_shape: Sequence[int], where: str, path: Any) -> None:
    if tuple(shape) != tuple(input_shape):
        raise DataError(f"data.{where}: samples in {path} have shape {list(shape)} but model.input_shape is "
                        f"{list(input_shape)}; set model.input_shape to one sample's shape (channels first), "
                        "or resize the data (resize/crop for image folders)")


def _array_dataset(x: np.ndarray, y: np.ndarray | None, cfg: DataConfig, input_shape: Sequence[int],
                   where: str, log: Log) -> tuple[Dataset, bool]:
    """Arrays -> TensorDataset of the selected subset; (N, H, W) gains a channel axis when the model
    takes one channel."""
    if x.ndim == len(input_shape) and len(input_shape) == 3 and input_shape[0] == 1:
        x = x[:, None]
    if y is not None and len(y) != len(x):
        raise DataError(f"data.{where}: {cfg.path} has {len(x)} inputs but {len(y)} labels; they must match")
    if len(x):
        _check_shape(x.shape[1:], input_shape, where, cfg.path)
    idx = _subset_indices(len(x), cfg, where, log)
    xs = _normalise(_to_float(x[idx]), cfg)
    if y is None:
        ys = torch.full((len(idx),), UNLABELED, dtype=torch.long)
    else:
        ys = torch.from_numpy(np.asarray(y)[idx].astype(np.int64).reshape(-1))
    return TensorDataset(xs, ys), y is not None


def _npz(cfg: DataConfig, input_shape: Sequence[int], where: str, log: Log) -> tuple[Dataset, bool]:
    path = Path(cfg.path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = list(npz.files)
            if "x" not in keys:
                found = ", ".join(keys) or "none"
                raise DataError(f"data.{where}: {path} has no array 'x' (found: {found}); "
                                "save the inputs as x and the labels (optional) as y, e.g. "
                                "numpy.savez(path, x=images, y=labels)")
            x = npz["x"]
            y = npz["y"] if "y" in keys else None
    except (OSError, ValueError) as exc:
        raise DataError(f"data.{where}: cannot read {path} as .npz ({exc}); "
                        f"check data.{where}.path") from None
    return _array_dataset(x, y, cfg, input_shape, where, log)


def _idx(cfg: DataConfig, input_shape: Sequence[int], where: str, log: Log) -> tuple[Dataset, bool]:
    from specprune_cli.idx import read_idx

    def read(p: str, key: str) -> np.ndarray:
        try:
            return read_idx(p)
        except DataError as exc:  # read_idx says what is wrong with the file; add which key points at it
            raise DataError(f"data.{where}.{key}: {exc}") from None

    x = read(cfg.path, "path")
    y = read(cfg.labels_path, "labels_path") if cfg.labels_path else None
    return _array_dataset(x, y, cfg, input_shape, where, log)


def _synthetic(cfg: DataConfig, input_shape: Sequence[int], where: str, log: Log) -> tuple[Dataset, bool]:
    n = cfg.num_samples if cfg.num_samples is not None else 1024
    g = torch.Generator().manual_seed(cfg.seed)
    x = _normalise(torch.randn(n, *input_shape, generator=g), cfg)
    return TensorDataset(x, torch.full((n,), UNLABELED, dtype=torch.long)), False


def _image_transform(cfg: DataConfig, input_shape: Sequence[int]):
    from torchvision import transforms

    channels = input_shape[0]
    steps: list[Any] = [transforms.Lambda(lambda im: im.convert("L" if channels == 1 else "RGB"))]
    if cfg.resize:
        steps.append(transforms.Resize(cfg.resize))
    if cfg.crop:
        steps.append(transforms.CenterCrop(cfg.crop))
    steps.append(transforms.ToTensor())  # uint8 -> [0, 1]
    if cfg.mean is not None:
        steps.append(transforms.Normalize(list(cfg.mean), list(cfg.std)))
    return transforms.Compose(steps)


class _Labelled(Dataset):
    """(image, int label) from a torchvision dataset -> (tensor, int64 tensor), over a subset."""

    def __init__(self, base: Dataset, indices: np.ndarray):
        self.base, self.indices = base, [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.base[self.indices[i]]
        return x, torch.tensor(int(y), dtype=torch.long)


def _imagefolder(cfg: DataConfig, input_shape: Sequence[int], where: str, log: Log) -> tuple[Dataset, bool]:
    from torchvision.datasets import ImageFolder

    root = Path(cfg.path)
    if not root.is_dir():
        raise DataError(f"data.{where}: {root} is not a directory; imagefolder expects one folder per class")
    try:
        base = ImageFolder(str(root), transform=_image_transform(cfg, input_shape))
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"data.{where}: {root} is not an image folder ({exc}); it must hold one "
                        "sub-folder per class with the images inside") from None
    return _Labelled(base, _subset_indices(len(base), cfg, where, log)), True


def _mnist_gz_only(root: Path, name: str) -> list[str]:
    raw = root / name / "raw"
    if not raw.is_dir():
        return []
    gz = sorted(p.name for p in raw.glob("*.gz"))
    return gz if gz and not any(raw.joinpath(g[:-3]).is_file() for g in gz) else []


def _torchvision(cfg: DataConfig, input_shape: Sequence[int], where: str, log: Log) -> tuple[Dataset, bool]:
    import torchvision.datasets as tvd

    cls = getattr(tvd, cfg.dataset, None)
    if not (isinstance(cls, type) and issubclass(cls, Dataset)):
        import difflib

        names = [n for n in dir(tvd) if isinstance(getattr(tvd, n), type) and n[0].isupper()]
        close = difflib.get_close_matches(cfg.dataset, names, n=1)
        hint = f"did you mean {close[0]}?" if close else "see torchvision.datasets for the class names"
        raise DataError(f"data.{where}.dataset: torchvision.datasets has no dataset {cfg.dataset!r}; {hint}")
    root = Path(cfg.path)
    gz = _mnist_gz_only(root, cfg.dataset)
    if gz:
        raw = root / cfg.dataset / "raw"
        raise DataError(
            f"data.{where}: torchvision {cfg.dataset} reads uncompressed files, but {raw} holds only "
            f"compressed ones ({', '.join(gz)}); gunzip them there, or use format: idx with "
            f"path: {raw / gz[0]} (and labels_path: the matching labels file), which reads .gz directly")
    params = inspect.signature(cls).parameters
    kwargs: dict[str, Any] = {"root": str(root), "transform": _image_transform(cfg, input_shape)}
    if "download" in params:
        kwargs["download"] = False  # never reach the network from a pruning run
    if "train" in params:
        kwargs["train"] = cfg.train
    elif "split" in params:
        kwargs["split"] = "train" if cfg.train else "test"
    try:
        base = cls(**kwargs)
    except (RuntimeError, FileNotFoundError, OSError, ValueError) as exc:
        raise DataError(f"data.{where}: torchvision {cfg.dataset} could not be loaded from {root} ({exc}); "
                        "specprune never downloads: place the dataset files under that root, laid out as "
                        "torchvision expects") from None
    return _Labelled(base, _subset_indices(len(base), cfg, where, log)), True


_BUILDERS = {"npz": _npz, "idx": _idx, "synthetic": _synthetic, "imagefolder": _imagefolder,
             "torchvision": _torchvision}


def build_loader(data_cfg: DataConfig, input_shape: Sequence[int], *, shuffle: bool = False,
                 where: str = "calibration", log: Log | None = None) -> DataLoader:
    """A DataLoader of ``(x, y)`` batches for ``data_cfg`` (see the module docstring for conventions).

    Args:
        data_cfg: one data section of the config.
        input_shape: ``model.input_shape``; every sample must have this shape.
        shuffle: reshuffle each epoch (fine-tuning), with a generator seeded from ``data_cfg.seed``.
        where: the section name (calibration, finetune, eval), for messages.
        log: receives warnings (prefixed "warning: "); default: ``warnings.warn``.

    Returns:
        A DataLoader with two extra attributes: ``has_labels`` (bool) and ``num_samples`` (int).

    Raises:
        DataError: missing/malformed files, no samples, or samples whose shape is not ``input_shape``.
    """
    log = log or _warn
    dataset, has_labels = _BUILDERS[data_cfg.format](data_cfg, input_shape, where, log)
    if len(dataset) == 0:
        raise DataError(f"data.{where}: {data_cfg.path} holds no samples")
    if not isinstance(dataset, TensorDataset):
        x0 = dataset[0][0]  # transformed datasets: check one sample, the rest share the transform
        _check_shape(x0.shape, input_shape, where, data_cfg.path)
    generator = torch.Generator().manual_seed(data_cfg.seed) if shuffle else None
    loader = DataLoader(dataset, batch_size=data_cfg.batch_size, shuffle=shuffle, generator=generator,
                        num_workers=0)
    loader.has_labels = has_labels
    loader.num_samples = len(dataset)
    return loader


__all__ = ["build_loader", "UNLABELED"]
