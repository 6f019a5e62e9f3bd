"""Reading each data format into a Dataset of the selected samples: npz, idx, synthetic, imagefolder and
torchvision (one reader each, keyed by ``data.*.format``).

A reader returns the dataset and its largest label (None without labels); ``data.py`` turns it into
batches and states the conventions every reader keeps (subset, dtypes, shapes, normalisation).
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from specprune_cli.config_inputs import DataConfig
from specprune_cli.errors import DataError, reason

Log = Callable[[str], None]
UNLABELED = -1
_FLOATS = (np.float16, np.float32, np.float64)


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


def _token_ids(x: np.ndarray) -> bool:
    """Integer inputs other than uint8 (which are images) are token ids or other indices."""
    return x.dtype.kind in "iu" and x.dtype != np.uint8


def _to_tensor(x: np.ndarray) -> torch.Tensor:
    """float32 inputs; uint8 scaled to [0, 1]; token ids as int64, as nn.Embedding takes them."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    if t.dtype == torch.uint8:
        return t.to(torch.float32) / 255.0
    return t.to(torch.int64) if _token_ids(x) else t.to(torch.float32)


def check_shape(shape: Sequence[int], input_shape: Sequence[int], where: str, path: Any) -> None:
    if tuple(shape) != tuple(input_shape):
        raise DataError(f"data.{where}: samples in {path} have shape {list(shape)} but model.input_shape is "
                        f"{list(input_shape)}; set model.input_shape to one sample's shape (channels first), "
                        "or resize the data (resize/crop for image folders)")


def _check_arrays(x: np.ndarray, y: np.ndarray | None, where: str, path: Any) -> np.ndarray | None:
    """Refuse what would have to be cast or guessed; returns y as one label per sample."""
    if x.dtype != np.uint8 and x.dtype.type not in _FLOATS and not _token_ids(x):
        raise DataError(f"data.{where}: the inputs x in {path} have dtype {x.dtype}; specprune reads float "
                        "arrays as they are, uint8 arrays scaled to [0, 1] and other integer arrays as token "
                        "ids (int64), and casts nothing else: convert x, e.g. x.astype(numpy.float32), "
                        "scaled as the model expects")
    if x.ndim < 2:
        raise DataError(f"data.{where}: the inputs x in {path} have shape {list(x.shape)}; x needs a sample "
                        "axis first and then one sample's shape, e.g. (N, 3, 32, 32) or (N, 784)")
    if x.dtype.type in _FLOATS and x.size and not np.isfinite(x).all():
        first = int(np.argwhere(~np.isfinite(x))[0][0])
        bad = int((~np.isfinite(x)).sum())
        raise DataError(f"data.{where}: the inputs x in {path} hold {bad} NaN or Inf values (the first in "
                        f"sample {first}); remove or repair those samples")
    if y is None:
        return None
    if y.dtype.kind not in "iu":
        raise DataError(f"data.{where}: the labels y in {path} have dtype {y.dtype}; labels are integer "
                        "class indices (-1 for unlabelled): convert y, e.g. y.astype(numpy.int64)")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"data.{where}: the labels y in {path} have shape {list(y.shape)}; give one class "
                        "index per sample, shape (N,) (for one-hot labels: y.argmax(1))")
    if len(y) != len(x):
        raise DataError(f"data.{where}: {path} has {len(x)} inputs but {len(y)} labels; they must match")
    return y


def _array_dataset(x: np.ndarray, y: np.ndarray | None, cfg: DataConfig, input_shape: Sequence[int],
                   where: str, log: Log) -> tuple[Dataset, int | None]:
    """Arrays -> TensorDataset of the selected subset, and the largest label (None without labels)."""
    y = _check_arrays(x, y, where, cfg.path)
    if x.ndim == len(input_shape) and len(input_shape) >= 2 and input_shape[0] == 1:
        x = x[:, None]  # (N, H, W) for a one-channel (1, H, W) model; (N, L) for (1, L)
    if len(x):
        check_shape(x.shape[1:], input_shape, where, cfg.path)
    if _token_ids(x) and cfg.mean is not None:
        raise DataError(f"data.{where}: the inputs x in {cfg.path} are integers (dtype {x.dtype}), read as "
                        f"token ids, which are not normalised: remove data.{where}.mean and "
                        f"data.{where}.std, or save x as floats")
    idx = _subset_indices(len(x), cfg, where, log)
    xs = _normalise(_to_tensor(x[idx]), cfg)
    if y is None:
        return TensorDataset(xs, torch.full((len(idx),), UNLABELED, dtype=torch.long)), None
    ys = torch.from_numpy(y[idx].astype(np.int64))
    return TensorDataset(xs, ys), int(ys.max()) if len(ys) else -1


def _npz(cfg: DataConfig, input_shape: Sequence[int], where: str, log: Log) -> tuple[Dataset, int | None]:
    path = Path(cfg.path)
    if path.is_dir():
        raise DataError(f"data.{where}: {path} is a directory; format npz reads one .npz file (for a folder "
                        "of images per class use format: imagefolder)")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataError(f"data.{where}: {path} is a single .npy array, not an .npz archive; save it "
                            "with numpy.savez(path, x=inputs, y=labels)")
        with loaded as npz:
            keys = list(npz.files)
            if "x" not in keys:
                found = ", ".join(keys) or "none"
                raise DataError(f"data.{where}: {path} has no array 'x' (found: {found}); "
                                "save the inputs as x and the labels (optional) as y, e.g. "
                                "numpy.savez(path, x=images, y=labels)")
            x = npz["x"]
            y = npz["y"] if "y" in keys else None
    except DataError:
        raise
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise DataError(f"data.{where}: {path} holds object arrays (pickled Python objects), which "
                            "specprune does not load; save numeric arrays: x as float32 or uint8, y as "
                            "int64") from None
        raise DataError(f"data.{where}: cannot read {path} as .npz ({exc}); check "
                        f"data.{where}.path") from None
    except Exception as exc:  # a damaged archive fails in zipfile, zlib or numpy, each its own way
        raise DataError(f"data.{where}: cannot read {path} as .npz ({reason(exc)}); check "
                        f"data.{where}.path") from None
    return _array_dataset(x, y, cfg, input_shape, where, log)


def _idx(cfg: DataConfig, input_shape: Sequence[int], where: str, log: Log) -> tuple[Dataset, int | None]:
    from specprune_cli.idx import read_idx

    def read(p: str, key: str) -> np.ndarray:
        try:
            return read_idx(p)
        except DataError as exc:  # read_idx says what is wrong with the file; add which key points at it
            raise DataError(f"data.{where}.{key}: {exc}") from None

    x = read(cfg.path, "path")
    y = read(cfg.labels_path, "labels_path") if cfg.labels_path else None
    return _array_dataset(x, y, cfg, input_shape, where, log)


def _synthetic(cfg: DataConfig, input_shape: Sequence[int], where: str, log: Log
               ) -> tuple[Dataset, int | None]:
    n = cfg.num_samples if cfg.num_samples is not None else 1024
    g = torch.Generator().manual_seed(cfg.seed)
    x = _normalise(torch.randn(n, *input_shape, generator=g), cfg)
    return TensorDataset(x, torch.full((n,), UNLABELED, dtype=torch.long)), None


def _image_transform(cfg: DataConfig, input_shape: Sequence[int], where: str):
    from torchvision import transforms

    if len(input_shape) != 3 or input_shape[0] not in (1, 3):
        raise DataError(f"data.{where}: format {cfg.format} gives images of shape (1 or 3, H, W), but "
                        f"model.input_shape is {list(input_shape)}; use format npz for other inputs")
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


def _imagefolder(cfg: DataConfig, input_shape: Sequence[int], where: str, log: Log
                 ) -> tuple[Dataset, int | None]:
    from torchvision.datasets import ImageFolder

    root = Path(cfg.path)
    if not root.is_dir():
        raise DataError(f"data.{where}: {root} is not a directory; imagefolder expects one folder per class")
    transform = _image_transform(cfg, input_shape, where)
    try:
        base = ImageFolder(str(root), transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"data.{where}: {root} is not an image folder ({exc}); it must hold one "
                        "sub-folder per class with the images inside") from None
    return _Labelled(base, _subset_indices(len(base), cfg, where, log)), len(base.classes) - 1


def _mnist_gz_only(root: Path, name: str) -> list[str]:
    raw = root / name / "raw"
    if not raw.is_dir():
        return []
    gz = sorted(p.name for p in raw.glob("*.gz"))
    return gz if gz and not any(raw.joinpath(g[:-3]).is_file() for g in gz) else []


def _torchvision(cfg: DataConfig, input_shape: Sequence[int], where: str, log: Log
                 ) -> tuple[Dataset, int | None]:
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
    kwargs: dict[str, Any] = {"root": str(root), "transform": _image_transform(cfg, input_shape, where)}
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
    classes = getattr(base, "classes", None)
    return _Labelled(base, _subset_indices(len(base), cfg, where, log)), len(classes) - 1 if classes else None


_BUILDERS = {"npz": _npz, "idx": _idx, "synthetic": _synthetic, "imagefolder": _imagefolder,
             "torchvision": _torchvision}


def read_dataset(cfg: DataConfig, input_shape: Sequence[int], where: str, log: Log
                 ) -> tuple[Dataset, int | None]:
    """The selected samples of ``cfg``'s dataset, and the largest label (None without labels).

    Args:
        cfg: one data section of the config; ``cfg.format`` picks the reader.
        input_shape: ``model.input_shape``.
        where: the section name (calibration, finetune, eval), for messages.
        log: receives warnings (prefixed "warning: ").

    Raises:
        DataError: the files are missing, malformed or hold no samples, or what they hold is refused.
    """
    return _BUILDERS[cfg.format](cfg, input_shape, where, log)
