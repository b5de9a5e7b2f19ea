"""Tensors on the wire: the dtypes we carry and zero-copy views in both directions.

A tensor travels as raw little-endian bytes, C order, described by (dtype name, shape, byte
length, library). Sending hands the tensor's own memory to the socket; receiving wraps the
frame's buffer with `numpy.frombuffer` / `torch.from_numpy`, so neither side copies the
payload unless the tensor is non-contiguous, big-endian or not on the CPU.

torch is imported lazily: nodes without torch (onnxruntime-only drafters) still speak the
protocol with numpy arrays, and importing torch costs about a second.
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from transport.errors import FrameError

if TYPE_CHECKING:
    import torch

# Wire name -> numpy dtype used to store it. bfloat16 has no numpy dtype: its bits travel as
# uint16 and are viewed as torch.bfloat16 on arrival.
WIRE_DTYPES: Final[Mapping[str, np.dtype[Any]]] = MappingProxyType(
    {
        "bool": np.dtype("?"),
        "uint8": np.dtype("<u1"),
        "int8": np.dtype("<i1"),
        "uint16": np.dtype("<u2"),
        "int16": np.dtype("<i2"),
        "uint32": np.dtype("<u4"),
        "int32": np.dtype("<i4"),
        "uint64": np.dtype("<u8"),
        "int64": np.dtype("<i8"),
        "float16": np.dtype("<f2"),
        "bfloat16": np.dtype("<u2"),
        "float32": np.dtype("<f4"),
        "float64": np.dtype("<f8"),
    }
)
LIB_NUMPY: Final = "np"
LIB_TORCH: Final = "pt"
MAX_NDIM: Final = 8


def _torch_module() -> Any:
    """torch if it is already imported, else None (a value cannot be a tensor without it)."""
    return sys.modules.get("torch")


def is_tensor(value: object) -> bool:
    """True for numpy arrays and torch tensors."""
    if isinstance(value, np.ndarray):
        return True
    torch_mod = _torch_module()
    return torch_mod is not None and isinstance(value, torch_mod.Tensor)


def _numpy_wire(array: np.ndarray) -> tuple[str, np.ndarray]:
    name = array.dtype.name
    if name not in WIRE_DTYPES or name == "bfloat16":
        raise FrameError("bad_tensor", f"numpy dtype {array.dtype} cannot be sent")
    # Only byte-swaps or gathers when the array is big-endian or strided (and, unlike
    # ascontiguousarray, keeps 0-d arrays 0-d).
    array = np.asarray(array, dtype=WIRE_DTYPES[name], order="C")
    return name, array


def _torch_wire(tensor: torch.Tensor) -> tuple[str, np.ndarray]:
    torch_mod = _torch_module()
    name = str(tensor.dtype).removeprefix("torch.")
    if name not in WIRE_DTYPES:
        raise FrameError("bad_tensor", f"torch dtype {tensor.dtype} cannot be sent")
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch_mod.bfloat16:
        tensor = tensor.view(torch_mod.uint16)
    return name, tensor.numpy()


# Wire names of the numpy dtypes that need no conversion (native order is the wire's
# little-endian order here; on a big-endian host nothing matches and _numpy_wire converts).
# A dict lookup: `dtype.name` runs Python code inside numpy (~20k instructions per call).
_WIRE_NAMES: Final[Mapping[np.dtype[Any], str]] = MappingProxyType(
    {np.dtype(name): name for name, dtype in WIRE_DTYPES.items() if name != "bfloat16"}
)


def to_wire(value: object) -> tuple[str, tuple[int, ...], str, memoryview]:
    """(dtype name, shape, library, bytes view) of a tensor, sharing its memory when possible."""
    if type(value) is np.ndarray:
        # Fast path: a C-contiguous, non-empty array of a wire dtype in wire byte order.
        name = _WIRE_NAMES.get(value.dtype)
        if name is not None and value.dtype == WIRE_DTYPES[name] and value.ndim <= MAX_NDIM:
            view = memoryview(value)  # type: ignore[arg-type]
            if view.c_contiguous and view.nbytes:
                return name, value.shape, LIB_NUMPY, view.cast("B")
    if isinstance(value, np.ndarray):
        name, array = _numpy_wire(value)
        lib = LIB_NUMPY
    elif is_tensor(value):
        name, array = _torch_wire(value)  # type: ignore[arg-type]
        lib = LIB_TORCH
    else:
        raise FrameError(
            "bad_tensor", f"expected a numpy array or torch tensor, got {type(value).__name__}"
        )
    if array.ndim > MAX_NDIM:
        raise FrameError("bad_tensor", f"tensor has {array.ndim} dimensions, at most {MAX_NDIM}")
    shape = tuple(int(d) for d in array.shape)
    return name, shape, lib, array.reshape(-1).view(np.uint8).data


def expected_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Byte length a tensor of this dtype and shape must have."""
    return math.prod(shape) * WIRE_DTYPES[dtype].itemsize


def from_wire(
    buffer: bytearray | np.ndarray, offset: int, dtype: str, shape: tuple[int, ...], lib: str
) -> Any:
    """A numpy array or torch tensor viewing `buffer[offset:]` (no copy).

    The caller has validated dtype, shape and bounds (see `frames.decode_body`).
    """
    # One ndarray over the buffer (rather than frombuffer + reshape): this runs per tensor.
    array = np.ndarray(shape, WIRE_DTYPES[dtype], buffer, offset)
    if lib == LIB_NUMPY and dtype != "bfloat16":
        return array
    try:
        torch_mod = importlib.import_module("torch")
    except ImportError:
        if dtype == "bfloat16":
            raise FrameError(
                "bad_tensor", "a bfloat16 tensor needs torch, which is not installed"
            ) from None
        return array
    tensor = torch_mod.from_numpy(array)
    return tensor.view(torch_mod.bfloat16) if dtype == "bfloat16" else tensor
