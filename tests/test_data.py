"""Data loaders: the (x, y) / has_labels convention, subsets, normalisation, and each format's errors."""
from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_idx_file, write_npz
from specprune_cli.config import DataConfig
from specprune_cli.data import build_loader
from specprune_cli.errors import DataError


def _all(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def test_npz_labelled_subset_is_seeded_and_in_file_order(tmp_path):
    path = write_npz(tmp_path / "d.npz", n=20, x=np.arange(20, dtype=np.float32)[:, None].repeat(12, 1))
    cfg = DataConfig(format="npz", path=str(path), num_samples=6, batch_size=4, seed=3)
    loader = build_loader(cfg, [12])
    x, y = _all(loader)
    assert loader.has_labels and loader.num_samples == 6 and x.shape == (6, 12)
    picked = x[:, 0].tolist()
    assert picked == sorted(picked) and len(set(picked)) == 6      # file order, no repeats
    assert picked == _all(build_loader(cfg, [12]))[0][:, 0].tolist()  # same seed, same subset
    assert y.dtype == torch.int64


def test_npz_hw_gets_channel_and_uint8_is_scaled_then_normalised(tmp_path):
    x = np.full((4, 8, 8), 255, dtype=np.uint8)
    path = write_npz(tmp_path / "d.npz", n=4, labels=False, x=x)
    cfg = DataConfig(format="npz", path=str(path), num_samples=None, mean=[0.5], std=[0.25])
    loader = build_loader(cfg, [1, 8, 8])
    xb, yb = next(iter(loader))
    assert xb.shape == (4, 1, 8, 8)
    torch.testing.assert_close(xb, torch.full_like(xb, 2.0))   # (1.0 - 0.5) / 0.25
    assert not loader.has_labels and yb.tolist() == [-1] * 4


def test_npz_without_x_names_the_keys(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, images=np.zeros((2, 3)), labels=np.zeros(2))
    with pytest.raises(DataError) as exc:
        build_loader(DataConfig(format="npz", path=str(path)), [3])
    assert str(exc.value) == (f"data.calibration: {path} has no array 'x' (found: images, labels); save the "
                              "inputs as x and the labels (optional) as y, e.g. numpy.savez(path, x=images, "
                              "y=labels)")


def test_fewer_samples_warns_and_goes_on_zero_is_an_error(tmp_path):
    path = write_npz(tmp_path / "d.npz", n=5)
    logged: list[str] = []
    cfg = DataConfig(format="npz", path=str(path), num_samples=64)
    loader = build_loader(cfg, [3, 8, 8], log=logged.append)
    assert loader.num_samples == 5
    assert logged == [f"warning: data.calibration: asked for 64 samples (num_samples) but {path} has only 5; "
                      "using all 5"]
    empty = write_npz(tmp_path / "e.npz", n=0)
    with pytest.raises(DataError) as exc:
        build_loader(DataConfig(format="npz", path=str(empty)), [3, 8, 8], where="eval")
    assert str(exc.value) == (f"data.eval: {empty} holds no samples; point data.eval.path at a non-empty "
                              "dataset")


def test_shape_mismatch_message(tmp_path):
    path = write_npz(tmp_path / "d.npz", n=4, shape=(1, 28, 28))
    with pytest.raises(DataError) as exc:
        build_loader(DataConfig(format="npz", path=str(path)), [3, 32, 32])
    assert str(exc.value) == (f"data.calibration: samples in {path} have shape [1, 28, 28] but "
                              "model.input_shape is [3, 32, 32]; set model.input_shape to one sample's "
                              "shape (channels first), or resize the data (resize/crop for image folders)")


def test_synthetic_is_seeded_and_unlabelled():
    cfg = DataConfig(format="synthetic", num_samples=10, batch_size=4, seed=1)
    a, ya = _all(build_loader(cfg, [3, 8, 8]))
    b, _ = _all(build_loader(cfg, [3, 8, 8]))
    assert a.shape == (10, 3, 8, 8) and torch.equal(a, b) and (ya == -1).all()


def test_idx_images_and_labels_gzip_or_not(tmp_path):
    images = np.arange(6 * 4 * 4, dtype=np.uint8).reshape(6, 4, 4)
    img_path = write_idx_file(tmp_path / "imgs-idx3-ubyte", images)
    lbl_path = write_idx_file(tmp_path / "lbls-idx1-ubyte", np.arange(6, dtype=np.uint8))
    gz = tmp_path / "imgs-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(img_path.read_bytes()))
    for p in (img_path, gz):
        cfg = DataConfig(format="idx", path=str(p), labels_path=str(lbl_path), num_samples=None)
        loader = build_loader(cfg, [1, 4, 4])
        x, y = _all(loader)
        assert loader.has_labels and y.tolist() == list(range(6))
        torch.testing.assert_close(x[:, 0] * 255, torch.from_numpy(images).float())


def test_imagefolder_resize_crop_channels(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(2):
            image = Image.fromarray(np.full((12, 10, 3), 40 * i, dtype=np.uint8))
            image.save(tmp_path / "imgs" / cls / f"{i}.png")
    cfg = DataConfig(format="imagefolder", path=str(tmp_path / "imgs"), resize=9, crop=8, num_samples=None)
    loader = build_loader(cfg, [1, 8, 8])
    x, y = _all(loader)
    assert x.shape == (4, 1, 8, 8) and sorted(y.tolist()) == [0, 0, 1, 1] and loader.has_labels


def test_torchvision_mnist_gz_only_suggests_idx(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (raw / name).write_bytes(gzip.compress(b"\x00"))
    cfg = DataConfig(format="torchvision", path=str(tmp_path), dataset="FashionMNIST")
    with pytest.raises(DataError) as exc:
        build_loader(cfg, [1, 28, 28])
    assert str(exc.value) == (
        f"data.calibration: torchvision FashionMNIST reads uncompressed files, but {raw} holds only "
        "compressed ones (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz); gunzip them there, or use "
        f"format: idx with path: {raw / 'train-images-idx3-ubyte.gz'} (and labels_path: the matching labels "
        "file), which reads .gz directly")


def test_torchvision_unknown_dataset_suggests_name(tmp_path):
    cfg = DataConfig(format="torchvision", path=str(tmp_path), dataset="FashionMnist")
    with pytest.raises(DataError) as exc:
        build_loader(cfg, [1, 28, 28])
    assert str(exc.value) == ("data.calibration.dataset: torchvision.datasets has no dataset 'FashionMnist'; "
                              "did you mean FashionMNIST?")


def test_torchvision_mnist_from_raw_files(tmp_path):
    """torchvision's MNIST reads the four uncompressed raw files; tiny ones are enough."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", 5), ("t10k", 3)):
        write_idx_file(raw / f"{split}-images-idx3-ubyte", np.zeros((n, 28, 28), dtype=np.uint8))
        write_idx_file(raw / f"{split}-labels-idx1-ubyte", np.arange(n, dtype=np.uint8))
    cfg = DataConfig(format="torchvision", path=str(tmp_path), dataset="MNIST", train=False, num_samples=None)
    loader = build_loader(cfg, [1, 28, 28])
    x, y = _all(loader)
    assert x.shape == (3, 1, 28, 28) and y.tolist() == [0, 1, 2]
