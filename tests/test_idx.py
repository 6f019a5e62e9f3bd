"""IDX reading and writing: round trips, the dtype codes on disk, and the messages for bad files."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from specprune_cli.errors import DataError
from specprune_cli.idx import read_idx, write_idx

FASHION_LABELS = Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_round_trip_plain_and_gzip(tmp_path, name):
    x = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / name
    write_idx(path, x)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")
    got = read_idx(path)
    assert got.dtype == np.uint8 and got.shape == (2, 3, 4)
    np.testing.assert_array_equal(got, x)


def test_compression_is_detected_from_content_not_name(tmp_path):
    x = np.array([7, 8, 9], dtype=np.uint8)
    gz_without_suffix = tmp_path / "labels"
    write_idx(gz_without_suffix, x, compress=True)
    plain_with_suffix = tmp_path / "labels.gz"
    write_idx(plain_with_suffix, x, compress=False)
    np.testing.assert_array_equal(read_idx(gz_without_suffix), x)
    np.testing.assert_array_equal(read_idx(plain_with_suffix), x)


@pytest.mark.parametrize("dtype,code", [(np.uint8, 0x08), (np.int8, 0x09), (np.int16, 0x0B),
                                        (np.int32, 0x0C), (np.float32, 0x0D), (np.float64, 0x0E)])
def test_dtype_codes_and_big_endian_layout(tmp_path, dtype, code):
    x = np.array([[1, -2, 3], [4, 5, 100]]).astype(dtype)
    path = tmp_path / "a.idx"
    write_idx(path, x)
    raw = path.read_bytes()
    # Header by hand: 00 00 <code> <ndim=2>, dims 2 and 3 as big-endian uint32.
    assert raw[:12] == bytes([0, 0, code, 2, 0, 0, 0, 2, 0, 0, 0, 3])
    assert raw[12:] == x.astype(np.dtype(dtype).newbyteorder(">")).tobytes()
    got = read_idx(path)
    assert got.dtype == np.dtype(dtype) and got.dtype.isnative
    np.testing.assert_array_equal(got, x)


def test_hand_written_label_file(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(bytes([0, 0, 0x08, 1, 0, 0, 0, 3, 9, 0, 4]))
    np.testing.assert_array_equal(read_idx(path), [9, 0, 4])


def test_truncated_file_message(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx(path, np.zeros((2, 28, 28), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError) as err:
        read_idx(path)
    assert str(err.value) == (
        f"{path} is truncated: expected an IDX file like train-images-idx3-ubyte(.gz) "
        "(MNIST / Fashion-MNIST format) with shape (2, 28, 28) (1584 bytes uncompressed), "
        "found 100 bytes. Download or copy it again.")


def test_truncated_gzip_message(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx(path, np.arange(4096, dtype=np.int32))
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(DataError, match=r"is a damaged or truncated gzip file .*expected an IDX file like "
                                        r"train-images-idx3-ubyte\(\.gz\)"):
        read_idx(path)


def test_non_idx_file_message(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello world")
    with pytest.raises(DataError) as err:
        read_idx(path)
    assert str(err.value) == (
        f"{path} is not an IDX file like train-images-idx3-ubyte(.gz) (MNIST / Fashion-MNIST format): "
        "its first bytes are 68 65 6c 6c, expected 00 00 <dtype code 08/09/0b/0c/0d/0e> <ndim>")


def test_gzipped_non_idx_and_empty_file(tmp_path):
    gz = tmp_path / "x.gz"
    gz.write_bytes(gzip.compress(b"PK\x03\x04 a zip, not IDX"))
    with pytest.raises(DataError, match="its first bytes are 50 4b 03 04"):
        read_idx(gz)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="its first bytes are an empty file"):
        read_idx(empty)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"cannot read .*nope.*expected an IDX file"):
        read_idx(tmp_path / "nope")


def test_unsupported_dtype_is_refused(tmp_path):
    with pytest.raises(ValueError, match="IDX cannot store dtype int64"):
        write_idx(tmp_path / "a", np.zeros(3, dtype=np.int64))
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not FASHION_LABELS.exists(), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_test_labels():
    y = read_idx(FASHION_LABELS)
    assert y.shape == (10000,) and y.dtype == np.uint8
    assert y.min() == 0 and y.max() == 9
    np.testing.assert_array_equal(np.bincount(y), [1000] * 10)
