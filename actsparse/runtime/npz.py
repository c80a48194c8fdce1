"""A checked .npz reader: numpy only, so the device-side runtime and CLI can use it."""

from __future__ import annotations

import math
import zipfile
import zlib
from pathlib import Path

import numpy as np

from actsparse.errors import ActsparseError


def read_npz(path: str | Path, what: str = "file", check=None) -> dict[str, np.ndarray]:
    """The arrays of an .npz, refusing anything else before reading data.

    Each member's header is checked first: a shape that claims more bytes than the member
    holds (a few edited header bytes can claim terabytes) is refused before numpy allocates
    it, and object arrays are refused (they would need pickle).
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            if handle.read(6) == b"\x93NUMPY":
                raise ActsparseError(f"{path}: a single array (.npy); give an .npz with one array per input name")
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                shape, dtype = _check_npy_member(archive, info)
                if check is not None:
                    check(info.filename[:-len(".npy")], shape, dtype)
        with np.load(path, allow_pickle=False) as arrays:
            return {name: arrays[name] for name in arrays.files}
    except ActsparseError:
        raise
    except (_BadMember, zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError, KeyError,
            NotImplementedError, RuntimeError, zlib.error) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ActsparseError(f"{path}: not a readable .npz {what} ({reason})") from None


class _BadMember(Exception):
    """An .npz member that must not be loaded."""


def _check_npy_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    where = f"member {info.filename!r}"
    if not info.filename.endswith(".npy"):
        raise _BadMember(f"{where} is not an .npy array")
    with archive.open(info) as handle:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
        else:
            raise _BadMember(f"{where}: unsupported .npy version {version}")
        header = handle.tell()
    if dtype.hasobject:
        raise _BadMember(f"{where} holds Python objects, which need pickle")
    claimed = math.prod(shape) * dtype.itemsize
    if claimed > info.file_size - header:
        raise _BadMember(f"{where} claims {claimed} bytes of data but holds {info.file_size - header}")
    return tuple(shape), dtype
