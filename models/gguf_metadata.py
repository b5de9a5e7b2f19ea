"""Read the key/value metadata of a GGUF file without touching its tensors.

`gguf.GGUFReader` builds a numpy view for every element of every array, which takes 10-16 s on
the Qwen2.5 file here (151,936 tokens and 151,387 merges). The tokenizer needs only the
metadata, so this walks the key/value section once with `struct` (well under a second) and stops
before the tensor table. Tests check it against `gguf.GGUFReader` field by field.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)

# GGUF value types (gguf.GGUFValueType) with fixed width: struct format per type.
_SCALAR_FORMATS = {
    0: "<B",  # UINT8
    1: "<b",  # INT8
    2: "<H",  # UINT16
    3: "<h",  # INT16
    4: "<I",  # UINT32
    5: "<i",  # INT32
    6: "<f",  # FLOAT32
    7: "<?",  # BOOL
    10: "<Q",  # UINT64
    11: "<q",  # INT64
    12: "<d",  # FLOAT64
}
_NUMPY_DTYPES: dict[int, np.dtype[Any]] = {
    0: np.dtype("<u1"),
    1: np.dtype("<i1"),
    2: np.dtype("<u2"),
    3: np.dtype("<i2"),
    4: np.dtype("<u4"),
    5: np.dtype("<i4"),
    6: np.dtype("<f4"),
    7: np.dtype("?"),
    10: np.dtype("<u8"),
    11: np.dtype("<i8"),
    12: np.dtype("<f8"),
}
_STRING = 8
_ARRAY = 9
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


class GGUFMetadataError(ValueError):
    """The file is not a readable GGUF (wrong magic, unsupported version, truncated metadata)."""


def read_metadata(path: str | Path) -> dict[str, Any]:
    """All metadata of a GGUF file: scalars as Python values, string arrays as tuples of str,
    numeric arrays as numpy arrays."""
    path = Path(path)
    try:
        with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return _parse(memoryview(m), path)
    except FileNotFoundError:
        raise GGUFMetadataError(f"{path}: no such GGUF file") from None
    except ValueError as exc:  # mmap of an empty file
        if isinstance(exc, GGUFMetadataError):
            raise
        raise GGUFMetadataError(f"{path}: cannot map file ({exc})") from exc


def _parse(buf: memoryview, path: Path) -> dict[str, Any]:
    try:
        if bytes(buf[:4]) != GGUF_MAGIC:
            raise GGUFMetadataError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r})")
        (version,) = _U32.unpack_from(buf, 4)
        if version not in SUPPORTED_VERSIONS:
            raise GGUFMetadataError(
                f"{path}: GGUF version {version} is not supported (expected one of "
                f"{SUPPORTED_VERSIONS}; a big-endian file also shows up this way)"
            )
        _tensor_count, kv_count = struct.unpack_from("<QQ", buf, 8)
        pos = 24
        out: dict[str, Any] = {}
        for _ in range(kv_count):
            key, pos = _read_string(buf, pos)
            (value_type,) = _U32.unpack_from(buf, pos)
            out[key], pos = _read_value(buf, pos + 4, value_type, path, key)
        return out
    except (struct.error, IndexError, UnicodeDecodeError) as exc:
        raise GGUFMetadataError(f"{path}: truncated or corrupt GGUF metadata ({exc})") from exc
    finally:
        buf.release()


def _read_string(buf: memoryview, pos: int) -> tuple[str, int]:
    (length,) = _U64.unpack_from(buf, pos)
    end = pos + 8 + length
    if end > len(buf):
        raise GGUFMetadataError(f"string of {length} bytes runs past the end of the file")
    return str(buf[pos + 8 : end], "utf-8"), end


def _read_value(
    buf: memoryview, pos: int, value_type: int, path: Path, key: str
) -> tuple[Any, int]:
    fmt = _SCALAR_FORMATS.get(value_type)
    if fmt is not None:
        (value,) = struct.unpack_from(fmt, buf, pos)
        return value, pos + struct.calcsize(fmt)
    if value_type == _STRING:
        return _read_string(buf, pos)
    if value_type == _ARRAY:
        (item_type,) = _U32.unpack_from(buf, pos)
        (count,) = _U64.unpack_from(buf, pos + 4)
        pos += 12
        if item_type == _STRING:
            items: list[str] = []
            append = items.append
            unpack = _U64.unpack_from
            for _ in range(count):  # hot loop: ~300k strings for a Qwen vocabulary
                (length,) = unpack(buf, pos)
                pos += 8
                append(str(buf[pos : pos + length], "utf-8"))
                pos += length
            if pos > len(buf):
                raise GGUFMetadataError(f"array {key!r} runs past the end of the file")
            return tuple(items), pos
        dtype = _NUMPY_DTYPES.get(item_type)
        if dtype is None:
            raise GGUFMetadataError(
                f"{path}: key {key!r} holds an array of unsupported type {item_type}"
            )
        nbytes = dtype.itemsize * count
        if pos + nbytes > len(buf):
            raise GGUFMetadataError(f"array {key!r} runs past the end of the file")
        return np.frombuffer(buf[pos : pos + nbytes], dtype=dtype).copy(), pos + nbytes
    raise GGUFMetadataError(f"{path}: key {key!r} has unknown value type {value_type}")
