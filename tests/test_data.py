"""Data: the (x, y) / has_labels convention, subsets, normalisation, sample shapes of any rank, and each
format's errors, including every array dtype that would need a silent cast."""
from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_idx_file, write_npz
from specprune_cli.config import DataConfig
from specprune_cli.data import Batches, build_batches
from specprune_cli.errors import DataError


def _all(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def test_npz_labelled_subset_is_seeded_and_in_file_order(tmp_path):
    path = write_npz(tmp_path / "d.npz", n=20, x=np.arange(20, dtype=np.float32)[:, None].repeat(12, 1))
    cfg = DataConfig(format="npz", path=str(path), num_samples=6, batch_size=4, seed=3)
    loader = build_batches(cfg, [12])
    x, y = _all(loader)
    assert loader.has_labels and loader.num_samples == 6 and x.shape == (6, 12)
    picked = x[:, 0].tolist()
    assert picked == sorted(picked) and len(set(picked)) == 6      # file order, no repeats
    assert picked == _all(build_batches(cfg, [12]))[0][:, 0].tolist()  # same seed, same subset
    assert y.dtype == torch.int64


def test_npz_hw_gets_channel_and_uint8_is_scaled_then_normalised(tmp_path):
    x = np.full((4, 8, 8), 255, dtype=np.uint8)
    path = write_npz(tmp_path / "d.npz", n=4, labels=False, x=x)
    cfg = DataConfig(format="npz", path=str(path), num_samples=None, mean=[0.5], std=[0.25])
    loader = build_batches(cfg, [1, 8, 8])
    xb, yb = next(iter(loader))
    assert xb.shape == (4, 1, 8, 8)
    torch.testing.assert_close(xb, torch.full_like(xb, 2.0))   # (1.0 - 0.5) / 0.25
    assert not loader.has_labels and yb.tolist() == [-1] * 4


def test_npz_without_x_names_the_keys(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, images=np.zeros((2, 3)), labels=np.zeros(2))
    with pytest.raises(DataError) as exc:
        build_batches(DataConfig(format="npz", path=str(path)), [3])
    assert str(exc.value) == (f"data.calibration: {path} has no array 'x' (found: images, labels); save the "
                              "inputs as x and the labels (optional) as y, e.g. numpy.savez(path, x=images, "
                              "y=labels)")


def test_fewer_samples_warns_and_goes_on_zero_is_an_error(tmp_path):
    path = write_npz(tmp_path / "d.npz", n=5)
    logged: list[str] = []
    cfg = DataConfig(format="npz", path=str(path), num_samples=64)
    loader = build_batches(cfg, [3, 8, 8], log=logged.append)
    assert loader.num_samples == 5
    assert logged == [f"warning: data.calibration: asked for 64 samples (num_samples) but {path} has only 5; "
                      "using all 5"]
    empty = write_npz(tmp_path / "e.npz", n=0)
    with pytest.raises(DataError) as exc:
        build_batches(DataConfig(format="npz", path=str(empty)), [3, 8, 8], where="eval")
    assert str(exc.value) == (f"data.eval: {empty} holds no samples; point data.eval.path at a non-empty "
                              "dataset")


def test_shape_mismatch_message(tmp_path):
    path = write_npz(tmp_path / "d.npz", n=4, shape=(1, 28, 28))
    with pytest.raises(DataError) as exc:
        build_batches(DataConfig(format="npz", path=str(path)), [3, 32, 32])
    assert str(exc.value) == (f"data.calibration: samples in {path} have shape [1, 28, 28] but "
                              "model.input_shape is [3, 32, 32]; set model.input_shape to one sample's "
                              "shape (channels first), or resize the data (resize/crop for image folders)")


def test_synthetic_is_seeded_and_unlabelled():
    cfg = DataConfig(format="synthetic", num_samples=10, batch_size=4, seed=1)
    a, ya = _all(build_batches(cfg, [3, 8, 8]))
    b, _ = _all(build_batches(cfg, [3, 8, 8]))
    assert a.shape == (10, 3, 8, 8) and torch.equal(a, b) and (ya == -1).all()


def test_idx_images_and_labels_gzip_or_not(tmp_path):
    images = np.arange(6 * 4 * 4, dtype=np.uint8).reshape(6, 4, 4)
    img_path = write_idx_file(tmp_path / "imgs-idx3-ubyte", images)
    lbl_path = write_idx_file(tmp_path / "lbls-idx1-ubyte", np.arange(6, dtype=np.uint8))
    gz = tmp_path / "imgs-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(img_path.read_bytes()))
    for p in (img_path, gz):
        cfg = DataConfig(format="idx", path=str(p), labels_path=str(lbl_path), num_samples=None)
        loader = build_batches(cfg, [1, 4, 4])
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
    loader = build_batches(cfg, [1, 8, 8])
    x, y = _all(loader)
    assert x.shape == (4, 1, 8, 8) and sorted(y.tolist()) == [0, 0, 1, 1] and loader.has_labels


def test_torchvision_mnist_gz_only_suggests_idx(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (raw / name).write_bytes(gzip.compress(b"\x00"))
    cfg = DataConfig(format="torchvision", path=str(tmp_path), dataset="FashionMNIST")
    with pytest.raises(DataError) as exc:
        build_batches(cfg, [1, 28, 28])
    assert str(exc.value) == (
        f"data.calibration: torchvision FashionMNIST reads uncompressed files, but {raw} holds only "
        "compressed ones (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz); gunzip them there, or use "
        f"format: idx with path: {raw / 'train-images-idx3-ubyte.gz'} (and labels_path: the matching labels "
        "file), which reads .gz directly")


def test_torchvision_unknown_dataset_suggests_name(tmp_path):
    cfg = DataConfig(format="torchvision", path=str(tmp_path), dataset="FashionMnist")
    with pytest.raises(DataError) as exc:
        build_batches(cfg, [1, 28, 28])
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
    loader = build_batches(cfg, [1, 28, 28])
    x, y = _all(loader)
    assert x.shape == (3, 1, 28, 28) and y.tolist() == [0, 1, 2]


def test_one_and_two_dimensional_samples(tmp_path):
    flat = write_npz(tmp_path / "flat.npz", n=6, shape=(1024,))
    batches = build_batches(DataConfig(format="npz", path=str(flat), batch_size=4, num_samples=None), [1024])
    assert [tuple(x.shape) for x, _ in batches] == [(4, 1024), (2, 1024)]
    mfcc = write_npz(tmp_path / "mfcc.npz", n=5, shape=(40, 100))
    x, y = _all(build_batches(DataConfig(format="npz", path=str(mfcc), num_samples=None), [40, 100]))
    assert x.shape == (5, 40, 100) and y.shape == (5,)
    # (N, L) for a one-channel (1, L) model gains the channel axis, as (N, H, W) does for (1, H, W).
    x, _ = _all(build_batches(DataConfig(format="npz", path=str(flat), num_samples=None), [1, 1024]))
    assert x.shape == (6, 1, 1024)
    x, _ = _all(build_batches(DataConfig(format="synthetic", num_samples=3), [40, 100]))
    assert x.shape == (3, 40, 100)


def test_normalisation_is_per_channel_for_sequences(tmp_path):
    x = np.ones((2, 2, 5), dtype=np.float32)
    path = write_npz(tmp_path / "d.npz", n=2, labels=False, x=x)
    got, _ = _all(build_batches(DataConfig(format="npz", path=str(path), mean=[0.0, 1.0], std=[1.0, 2.0],
                                           num_samples=None),
                                [2, 5]))
    assert got[:, 0].unique().tolist() == [1.0] and got[:, 1].unique().tolist() == [0.0]


@pytest.mark.parametrize("array", [
    np.zeros((4, 12), dtype=np.complex64), np.zeros((4, 12), dtype=np.complex128),
    np.full((4, 12), "a"), np.full((4, 12), b"a"), np.zeros((4, 12), dtype=bool),
], ids=lambda a: str(a.dtype))
def test_input_dtypes_that_would_need_a_cast_are_refused(tmp_path, array):
    path = write_npz(tmp_path / "d.npz", n=4, x=array)
    with pytest.raises(DataError) as exc:
        build_batches(DataConfig(format="npz", path=str(path), num_samples=None), [12])
    assert str(exc.value) == (f"data.calibration: the inputs x in {path} have dtype {array.dtype}; "
                              "specprune reads float arrays as they are, uint8 arrays scaled to [0, 1] and "
                              "other integer arrays as token ids (int64), and casts nothing else: convert x, "
                              "e.g. x.astype(numpy.float32), scaled as the model expects")


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.int64, np.uint16, np.uint32])
def test_integer_inputs_other_than_uint8_are_token_ids(tmp_path, dtype):
    path = write_npz(tmp_path / "d.npz", n=4, x=np.arange(48).reshape(4, 12).astype(dtype))
    (x, _), = build_batches(DataConfig(format="npz", path=str(path), num_samples=None), [12])
    assert x.dtype == torch.int64 and x.tolist() == np.arange(48).reshape(4, 12).tolist()


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_float_inputs_of_any_width_are_read(tmp_path, dtype):
    path = write_npz(tmp_path / "d.npz", n=3, x=np.full((3, 12), 0.5, dtype=dtype))
    x, _ = _all(build_batches(DataConfig(format="npz", path=str(path), num_samples=None), [12]))
    assert x.dtype == torch.float32 and x.unique().tolist() == [0.5]


def test_object_arrays_are_refused(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.array([np.zeros(12), "a"], dtype=object))
    with pytest.raises(DataError) as exc:
        build_batches(DataConfig(format="npz", path=str(path), num_samples=None), [12])
    assert str(exc.value) == (f"data.calibration: {path} holds object arrays (pickled Python objects), which "
                              "specprune does not load; save numeric arrays: x as float32 or uint8, y as "
                              "int64")


def test_nan_and_inf_inputs_are_refused(tmp_path):
    x = np.zeros((5, 12), dtype=np.float32)
    x[3, 2], x[4, 0] = np.nan, np.inf
    path = write_npz(tmp_path / "d.npz", n=5, x=x)
    with pytest.raises(DataError) as exc:
        build_batches(DataConfig(format="npz", path=str(path), num_samples=None), [12], where="eval")
    assert str(exc.value) == (f"data.eval: the inputs x in {path} hold 2 NaN or Inf values (the first in "
                              "sample 3); remove or repair those samples")


@pytest.mark.parametrize("y, message", [
    (np.array([0.0, 1.0, 2.0, 1.0]), "the labels y in {path} have dtype float64; labels are integer class "
     "indices (-1 for unlabelled): convert y, e.g. y.astype(numpy.int64)"),
    (np.eye(4, dtype=np.int64), "the labels y in {path} have shape [4, 4]; give one class index per sample, "
     "shape (N,) (for one-hot labels: y.argmax(1))"),
    (np.arange(3), "{path} has 4 inputs but 3 labels; they must match"),
])
def test_bad_labels(tmp_path, y, message):
    path = write_npz(tmp_path / "d.npz", n=4, shape=(12,), y=y)
    with pytest.raises(DataError) as exc:
        build_batches(DataConfig(format="npz", path=str(path), num_samples=None), [12])
    assert str(exc.value) == "data.calibration: " + message.format(path=path)


def test_labels_as_a_column_the_largest_label_and_all_unlabelled(tmp_path):
    path = write_npz(tmp_path / "d.npz", n=4, shape=(12,), y=np.array([[0], [7], [2], [-1]], dtype=np.int8))
    batches = build_batches(DataConfig(format="npz", path=str(path), num_samples=None), [12])
    assert isinstance(batches, Batches) and batches.has_labels and batches.max_label == 7
    assert _all(batches)[1].tolist() == [0, 7, 2, -1]
    none = write_npz(tmp_path / "n.npz", n=4, shape=(12,), y=np.full(4, -1))
    assert not build_batches(DataConfig(format="npz", path=str(none), num_samples=None), [12]).has_labels


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "{path} is a directory; format npz reads one .npz file (for a folder of images per "
     "class use format: imagefolder)"),
    (lambda p: p.write_bytes(b""), "cannot read {path} as .npz ("),
    (lambda p: p.write_bytes(b"PK\x03\x04garbage"), "cannot read {path} as .npz ("),
    (lambda p: np.save(open(p, "wb"), np.zeros((2, 12))), "{path} is a single .npy array, not an .npz "
                                                          "archive; "
     "save it with numpy.savez(path, x=inputs, y=labels)"),
], ids=["directory", "empty", "not-a-zip", "npy"])
def test_npz_paths_that_are_not_npz_files(tmp_path, make, message):
    path = tmp_path / "d.npz"
    make(path)
    with pytest.raises(DataError) as exc:
        build_batches(DataConfig(format="npz", path=str(path), num_samples=None), [12])
    assert str(exc.value).startswith("data.calibration: " + message.format(path=path))


def test_image_formats_need_an_image_shape(tmp_path):
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    with pytest.raises(DataError) as exc:
        build_batches(DataConfig(format="imagefolder", path=str(tmp_path / "imgs")), [1024])
    assert str(exc.value) == ("data.calibration: format imagefolder gives images of shape (1 or 3, H, W), "
                              "but "
                              "model.input_shape is [1024]; use format npz for other inputs")


def test_a_damaged_image_is_a_data_error_naming_the_section(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "imgs" / cls / "0.png")
    (tmp_path / "imgs" / "b" / "1.png").write_bytes(b"not a png")
    batches = build_batches(DataConfig(format="imagefolder", path=str(tmp_path / "imgs"), num_samples=None,
                                       batch_size=2), [3, 8, 8], where="eval")
    with pytest.raises(DataError) as exc:
        _all(batches)
    assert str(exc.value).startswith("data.eval: reading a batch failed (UnidentifiedImageError: cannot "
                                     "identify "
                                     "image file")
