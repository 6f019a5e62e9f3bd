"""Reading and writing IDX files, the format MNIST and Fashion-MNIST are distributed in.

Layout: two zero bytes, a dtype code, the number of dimensions, one big-endian uint32 per dimension,
then the data in C order, big-endian. The distribution files are gzip-compressed; compression is
detected from the gzip magic bytes (1f 8b), never from the file name, because renamed or
decompressed copies are common.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from specprune_cli.errors import DataError

# dtype code -> big-endian numpy dtype, as in the IDX specification.
_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}
_CODES: dict[np.dtype, int] = {dt.newbyteorder("="): code for code, dt in _DTYPES.items()}

_EXPECTED = "an IDX file like train-images-idx3-ubyte(.gz) (MNIST / Fashion-MNIST format)"
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file, gzip-compressed or plain.

    Args:
        path: the file; ``.gz`` in the name is neither needed nor trusted.

    Returns:
        A native-byte-order array with the file's dtype and shape.

    Raises:
        DataError: the file is missing, is not IDX, or is truncated; the message says what was found.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}; expected {_EXPECTED}") from None
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path} is a damaged or truncated gzip file ({exc}); expected {_EXPECTED}. "
                            "Download or copy it again.") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        found = raw[:4].hex(" ") if raw else "an empty file"
        raise DataError(f"{path} is not {_EXPECTED}: its first bytes are {found}, expected "
                        "00 00 <dtype code 08/09/0b/0c/0d/0e> <ndim>")
    dtype, ndim = _DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated: expected {_EXPECTED} whose {ndim}-dimension header needs "
                        f"{header} bytes, found {len(raw)} bytes. Download or copy it again.")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    count = int(np.prod(dims, dtype=np.int64))
    need = header + count * dtype.itemsize
    if len(raw) < need:
        raise DataError(f"{path} is truncated: expected {_EXPECTED} with shape {tuple(dims)} "
                        f"({need} bytes uncompressed), found {len(raw)} bytes. Download or copy it again.")
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray, *, compress: bool | None = None) -> None:
    """Write ``array`` as an IDX file (written to a temporary name, then renamed).

    Args:
        path: destination.
        array: uint8, int8, int16, int32, float32 or float64 data of any rank up to 255.
        compress: gzip the file; ``None`` means "if the name ends in .gz".

    Raises:
        ValueError: the dtype has no IDX code.
    """
    path = Path(path)
    array = np.asarray(array)
    code = _CODES.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"IDX cannot store dtype {array.dtype}; use one of "
                         f"{sorted(str(dt) for dt in _CODES)}")
    payload = (bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
               + np.ascontiguousarray(array, dtype=_DTYPES[code]).tobytes())
    if compress or (compress is None and path.suffix == ".gz"):
        payload = gzip.compress(payload)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(payload)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
