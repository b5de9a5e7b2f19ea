"""The AVX-512 VNNI matmul for 4- and 8-bit weights (vnni_matmul.cpp): build, layout, module.

The C++ kernel is compiled once per machine with torch's extension builder (g++ and ninja) into
``$XDG_CACHE_HOME/sled/kernels/``; where that cannot happen (no compiler, no AVX-512 VNNI) the
int4 format falls back to torch's own int4 kernel and says why once in the log.
Weights are 4-bit codes with a scale and offset or symmetric 8-bit codes with a scale, per (row,
group of 32); see vnni_matmul.cpp for the tiled byte layout that `pack_codes` produces.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.registry import cache_root

log = logging.getLogger(__name__)

ROWS = 16
GROUP = 32
SOURCE = Path(__file__).with_name("vnni_matmul.cpp")
CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mfma"]
# at::parallel_for is OpenMP code inlined into the extension: without -fopenmp it runs on one
# thread. Linking libgomp.so.1 resolves to the copy torch has already loaded (same soname), so
# the kernel shares torch's thread pool and thread count.
OPENMP = ["-fopenmp"]
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni")


@dataclass(frozen=True)
class KernelStatus:
    available: bool
    reason: str


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def kernel_dir() -> Path:
    flags = " ".join(CFLAGS + OPENMP).encode()
    digest = hashlib.sha256(SOURCE.read_bytes() + flags + torch.__version__.encode()).hexdigest()
    digest = digest[:16]
    return cache_root() / "kernels" / f"vnni_matmul-{digest}"


def _put_ninja_on_path() -> None:
    """The `ninja` package (a dependency) installs its binary beside this interpreter's scripts,
    which are not on PATH when sled runs from a virtualenv that was never activated."""
    try:
        import ninja
    except ImportError:
        return
    bin_dir = str(getattr(ninja, "BIN_DIR", ""))
    path = os.environ.get("PATH", "")
    if bin_dir and bin_dir not in path.split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([bin_dir, path]) if path else bin_dir


@cache
def kernel_status() -> KernelStatus:
    """Build (first time on this machine) and load the kernel; never raises."""
    if os.environ.get("SLED_NO_VNNI"):
        return KernelStatus(False, "disabled by SLED_NO_VNNI")
    missing = [f for f in REQUIRED_CPU_FLAGS if f not in _cpu_flags()]
    if missing:
        return KernelStatus(False, f"CPU lacks {', '.join(missing)}")
    _put_ninja_on_path()
    if shutil.which("g++") is None or shutil.which("ninja") is None:
        return KernelStatus(False, "g++ and ninja are needed to build it")
    try:
        from torch.utils import cpp_extension

        build = kernel_dir()
        build.mkdir(parents=True, exist_ok=True)
        if not any(build.glob("*.so")):
            log.info("building the VNNI int4 kernel (once per machine, about 30 s) in %s", build)
        cpp_extension.load(
            name="sled_vnni_matmul",
            sources=[str(SOURCE)],
            extra_cflags=CFLAGS + OPENMP,
            extra_ldflags=OPENMP,
            build_directory=str(build),
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # noqa: BLE001 - any build failure means "use the fallback"
        return KernelStatus(False, f"build failed: {str(e).strip().splitlines()[-1][:200]}")
    return KernelStatus(True, "built")


def available() -> bool:
    status = kernel_status()
    if not status.available:
        _log_fallback(status.reason)
    return status.available


@cache
def _log_fallback(reason: str) -> None:
    log.info("VNNI int4 kernel unavailable (%s): using torch's int4 kernel", reason)


def pack_codes(
    codes: np.ndarray, scale: np.ndarray, offset: np.ndarray | None, bits: int
) -> dict[str, torch.Tensor]:
    """codes uint8 [out, in] (< 2**bits), scale and offset [out, in/32] -> kernel tensors.

    4-bit: w = scale * code + offset; 8-bit: w = scale * (code - 128), no offset. Scales are kept
    as float16 (relative rounding <= 2**-11, far below the 4-bit codes' own error): the kernel
    streams every byte of them once per pass, so they are a sixth of int4's memory traffic.
    """
    out_f, n_in = codes.shape
    if n_in % GROUP:
        raise ValueError(f"input width {n_in} is not a multiple of {GROUP}")
    if (bits == 4) != (offset is not None):
        raise ValueError("4-bit codes need an offset; 8-bit codes are symmetric (no offset)")
    pad = -out_f % ROWS

    def pad_rows(a: np.ndarray) -> np.ndarray:
        return np.concatenate([a, np.zeros((pad, a.shape[1]), a.dtype)]) if pad else a

    codes, scale = pad_rows(codes), pad_rows(scale)
    tiles, groups = (out_f + pad) // ROWS, n_in // GROUP
    # [tile, row, group, step, j] -> [tile, group, step, row, j]: 4 consecutive k per int32 lane.
    c: np.ndarray = codes.astype(np.uint8).reshape(tiles, ROWS, groups, 8, 4)
    c = c.transpose(0, 2, 3, 1, 4).reshape(tiles, groups, 8, 64)
    if bits == 4:
        c = c[:, :, :4] | (c[:, :, 4:] << 4).astype(np.uint8)
    elif bits != 8:
        raise ValueError(f"bits must be 4 or 8, got {bits}")

    def per_tile(a: np.ndarray) -> torch.Tensor:
        t = a.astype(np.float16).reshape(tiles, ROWS, groups).transpose(0, 2, 1)
        return torch.from_numpy(np.ascontiguousarray(t))

    packed = {
        "codes": torch.from_numpy(np.ascontiguousarray(c)),
        "scale": per_tile(scale),
        "bits": torch.tensor(bits),
        "shape": torch.tensor([out_f, n_in], dtype=torch.int64),
    }
    if offset is not None:
        packed["offset"] = per_tile(pad_rows(offset))
    return packed


def pack_codes8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Symmetric 8-bit codes per group of 32 for a float [out, in] weight."""
    w = weight.float().reshape(weight.shape[0], -1, GROUP)
    # float16 scale first, so the codes are rounded against the scale the kernel will use.
    scale = (w.abs().amax(dim=2) / 127.0).to(torch.float16).float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(w / safe[..., None]).clamp(-127, 127) + 128
    return pack_codes(codes.to(torch.uint8).reshape(weight.shape).numpy(), scale.numpy(), None, 8)


class VnniLinear(nn.Module):
    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, packed: Mapping[str, torch.Tensor], bias: torch.Tensor | None) -> None:
        super().__init__()
        if not available():
            raise RuntimeError(f"the VNNI kernel is not available: {kernel_status().reason}")
        self.register_buffer("codes", packed["codes"])
        self.register_buffer("scale", packed["scale"])
        self.register_buffer("offset", packed.get("offset", packed["scale"][:0]))
        self.register_buffer("bias", bias)
        self.bits = int(packed["bits"])
        self.out_features = int(packed["shape"][0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.sled_vnni.matmul(
            x.reshape(-1, shape[-1]).contiguous(),
            self.codes,
            self.scale,
            self.offset,
            self.bits,
            self.out_features,
        )
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias
