"""The AVX-512 VNNI matmul against an exact emulation of what it computes, and its layout."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from models import vnni_matmul as vm
from models.int4_blocks import Int4Groups
from models.weight_formats import pack_int4, storage_layout

pytestmark = pytest.mark.skipif(
    not vm.kernel_status().available, reason=f"VNNI kernel: {vm.kernel_status().reason}"
)


def _quantized_activations(x: torch.Tensor) -> torch.Tensor:
    """What the kernel multiplies: x rounded to int8 per group of 32 (scale amax / 127)."""
    g = x.double().reshape(x.shape[0], -1, 32)
    amax = g.abs().amax(dim=2, keepdim=True)
    scale = (amax.float() / 127.0).double()
    inv = torch.where(amax > 0, (127.0 / amax.float()).double(), torch.zeros_like(amax))
    q = torch.round((g.float() * inv.float()).double()).clamp(-128, 127)
    return (q * scale).reshape(x.shape)


def _random_4bit(out_f: int, n_in: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 16, (out_f, n_in), dtype=np.uint8)
    # float16-representable maps, so the packed float16 scales are exact.
    scale = rng.uniform(0.01, 0.05, (out_f, n_in // 32)).astype(np.float16).astype(np.float32)
    offset = (-8 * scale + rng.normal(0, 0.01, scale.shape)).astype(np.float16)
    return codes, scale, offset.astype(np.float32)


def _run(packed: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return vm.VnniLinear(packed, None)(x)


@pytest.fixture
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("out_f", [16, 40, 96])
@pytest.mark.parametrize("m", [1, 5, 13])
def test_4bit_equals_exact_emulation(out_f: int, m: int) -> None:
    codes, scale, offset = _random_4bit(out_f, 128, seed=out_f + m)
    w = torch.from_numpy(Int4Groups(codes, scale, offset).dequantize()).double()
    x = torch.randn(m, 128, generator=torch.Generator().manual_seed(m))
    y = _run(vm.pack_codes(codes, scale, offset, 4), x)
    assert y.shape == (m, out_f) and y.dtype == torch.float32
    expected = _quantized_activations(x) @ w.T
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)


def test_8bit_equals_exact_emulation() -> None:
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(3))
    packed = vm.pack_codes8(w)
    # The stored weight: float16 scale per group times (code - 128).
    scale = packed["scale"].float().permute(0, 2, 1).reshape(48, 3)
    codes = packed["codes"].reshape(3, 3, 8, 16, 4).permute(0, 3, 1, 2, 4).reshape(48, 96)
    stored = (codes.double() - 128) * scale.double().repeat_interleave(32, dim=1)
    assert (stored - w.double()).abs().max() <= scale.max() / 2 + 1e-6  # 8-bit rounding only
    x = torch.randn(7, 96, generator=torch.Generator().manual_seed(4))
    expected = _quantized_activations(x) @ stored.T
    torch.testing.assert_close(_run(packed, x).double(), expected, rtol=1e-4, atol=1e-4)


def test_bfloat16_in_and_out_rounds_the_float_result() -> None:
    codes, scale, offset = _random_4bit(32, 64, seed=9)
    packed = vm.pack_codes(codes, scale, offset, 4)
    x = torch.randn(6, 64).to(torch.bfloat16)
    y = _run(packed, x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, _run(packed, x.float()).to(torch.bfloat16))


def test_rows_are_independent_of_the_batch(one_thread: None) -> None:
    """Each token's output is bit-identical alone or in any batch (token tiles of 1-6)."""
    codes, scale, offset = _random_4bit(64, 256, seed=1)
    packed = vm.pack_codes(codes, scale, offset, 4)
    x = torch.randn(13, 256, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    batched = _run(packed, x)
    for i in range(13):
        assert torch.equal(batched[i : i + 1], _run(packed, x[i : i + 1]))


def test_two_threads_give_the_same_result() -> None:
    codes, scale, offset = _random_4bit(4096, 64, seed=5)
    packed = vm.pack_codes(codes, scale, offset, 4)
    x = torch.randn(3, 64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(packed, x)
        torch.set_num_threads(2)
        two = _run(packed, x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_int4_format_uses_the_kernel_on_file_blocks() -> None:
    codes, scale, offset = _random_4bit(32, 64, seed=7)
    packed = pack_int4(Int4Groups(codes, scale, offset))
    assert "codes" in packed and int(packed["bits"]) == 4
    assert storage_layout("int4") == "int4-vnni" and storage_layout("bf16") == "bf16"


def test_bad_layouts_are_refused() -> None:
    codes, scale, offset = _random_4bit(16, 64, seed=0)
    with pytest.raises(ValueError, match="multiple of 32"):
        vm.pack_codes(codes[:, :40], scale[:, :1], offset[:, :1], 4)
    with pytest.raises(ValueError, match="need an offset"):
        vm.pack_codes(codes, scale, None, 4)
    packed = vm.pack_codes(codes, scale, offset, 4)
    with pytest.raises(RuntimeError, match="input width"):
        _run(packed, torch.randn(1, 32))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        _run(packed, torch.randn(1, 64).half())
