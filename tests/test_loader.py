"""GGUF loader and config: reads back what GGUFWriter wrote; bad files give typed errors."""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from models.config import ModelConfig, UnsupportedModelError, config_from_metadata
from models.gguf_loader import (
    GGUFFile,
    GGUFFormatError,
    UnsupportedQuantizationError,
    load_weights,
    read_config,
    unpermute_rope_rows,
)
from models.tiny import SPECS, tiny_tensors

Q = gguf.GGMLQuantizationType


def test_config_fields(tiny_path: Path, tiny_arch: str) -> None:
    spec = SPECS[tiny_arch]
    c = read_config(tiny_path)
    assert c.arch == tiny_arch
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads) == (
        spec.n_layers,
        spec.dim,
        spec.n_heads,
        spec.n_kv_heads,
    )
    assert (c.head_dim, c.ffn_dim, c.context_length) == (
        spec.head_dim,
        spec.ffn_dim,
        spec.context_length,
    )
    assert c.rope_theta == spec.rope_theta
    assert math.isclose(c.norm_eps, spec.norm_eps, rel_tol=1e-6)
    assert c.tied_output == spec.tied_output
    assert c.qkv_bias == spec.qkv_bias
    assert c.qk_norm == spec.qk_norm
    assert c.post_norms == spec.post_norms
    assert c.qk_permuted == (tiny_arch == "llama")
    assert math.isclose(c.attn_scale, 1 / math.sqrt(spec.head_dim))
    if tiny_arch == "gemma3":
        assert c.activation == "gelu_tanh"
        assert c.embed_scale == math.sqrt(spec.dim)
        assert c.sliding_window == spec.sliding_window
        # Every 6th layer is global; the tiny model has both kinds.
        assert c.sliding_layers == (True, True, True, True, True, False)
        assert c.rope_theta_local == 10000.0
    else:
        assert c.activation == "silu" and c.embed_scale == 1.0
        assert not any(c.sliding_layers) and c.sliding_window == 0


def test_config_round_trips_through_dict(tiny_path: Path) -> None:
    c = read_config(tiny_path)
    assert ModelConfig.from_dict(c.to_dict()) == c


def test_tensors_read_back_exactly(tiny_path: Path, tiny_arch: str) -> None:
    """Each tensor equals gguf's own quantize->dequantize of what the writer got, per type."""
    gf = GGUFFile(tiny_path)
    seen: set[str] = set()
    for t in tiny_tensors(tiny_arch, gf.config.vocab_size, seed=0):
        expected = gguf.quants.dequantize(gguf.quants.quantize(t.values, t.qtype), t.qtype)
        got = gf.array(t.name)
        assert got.shape == t.values.shape, t.name
        np.testing.assert_array_equal(got, expected.reshape(t.values.shape), err_msg=t.name)
        # And close to the float values written (quantization error only).
        tol = {
            Q.F32: 0,
            Q.F16: 1e-3,
            Q.BF16: 1e-2,
            Q.Q8_0: 2e-2,
            Q.Q5_0: 0.1,
            Q.Q4_0: 0.2,
            Q.Q4_1: 0.2,
        }
        scale = float(np.abs(t.values).max())
        assert np.abs(got - t.values).max() <= tol[t.qtype] * scale, (t.name, t.qtype.name)
        seen.add(gf.tensors[t.name].tensor_type.name)
    assert {"F32", "F16", "BF16", "Q8_0", "Q5_0", "Q4_0", "Q4_1"} <= seen


def test_llama_qk_rows_are_unpermuted(tiny_paths: dict[str, Path]) -> None:
    gf = GGUFFile(tiny_paths["llama"])
    c = gf.config
    block = gf.block(0, torch.float32)
    raw_q = gf.array("blk.0.attn_q.weight")
    raw_k = gf.array("blk.0.attn_k.weight")
    np.testing.assert_array_equal(block["wq"].numpy(), unpermute_rope_rows(raw_q, c.n_heads))
    np.testing.assert_array_equal(block["wk"].numpy(), unpermute_rope_rows(raw_k, c.n_kv_heads))
    np.testing.assert_array_equal(block["wv"].numpy(), gf.array("blk.0.attn_v.weight"))
    # convert_hf_to_gguf's permutation undoes ours.
    hd = raw_q.shape[0] // c.n_heads
    w = block["wq"].numpy()
    permuted = w.reshape(c.n_heads, 2, hd // 2, -1).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(permuted, raw_q)


def test_qwen2_and_gemma3_are_not_permuted(tiny_paths: dict[str, Path]) -> None:
    for arch in ("qwen2", "gemma3"):
        gf = GGUFFile(tiny_paths[arch])
        np.testing.assert_array_equal(
            gf.block(1, torch.float32)["wq"].numpy(), gf.array("blk.1.attn_q.weight")
        )


def test_layer_range_loads_only_its_layers(tiny_paths: dict[str, Path]) -> None:
    w = load_weights(tiny_paths["qwen2"], (1, 3), torch.float32)
    assert w.layers == (1, 3) and len(w.blocks) == 2
    assert w.embedding is None and w.head is None and w.norm is None
    gf = GGUFFile(tiny_paths["qwen2"])
    np.testing.assert_array_equal(w.blocks[0]["w_up"].numpy(), gf.array("blk.1.ffn_up.weight"))
    first = load_weights(tiny_paths["qwen2"], (0, 1), torch.float32)
    assert first.embedding is not None and first.head is None
    last = load_weights(tiny_paths["qwen2"], (3, 4), torch.float32)
    assert last.embedding is None and last.head is not None and last.norm is not None
    np.testing.assert_array_equal(last.head.numpy(), gf.array("output.weight"))


def test_tied_last_segment_gets_embedding_as_head(tiny_paths: dict[str, Path]) -> None:
    w = load_weights(tiny_paths["gemma3"], (4, 6), torch.bfloat16)
    assert w.embedding is None
    assert w.head is not None and w.head.dtype == torch.bfloat16
    gf = GGUFFile(tiny_paths["gemma3"])
    np.testing.assert_array_equal(
        w.head.float().numpy(), torch.from_numpy(gf.array("token_embd.weight")).bfloat16().float()
    )
    full = load_weights(tiny_paths["gemma3"])
    assert full.head is full.embedding  # one matrix, not two copies


def test_bad_layer_range(tiny_paths: dict[str, Path]) -> None:
    for bad in [(2, 2), (-1, 2), (0, 5), (3, 1)]:
        with pytest.raises(ValueError, match="layer range"):
            load_weights(tiny_paths["llama"], bad)


def _write_gguf(path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, Q]]) -> Path:
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_context_length(64)
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = _write_gguf(
        tmp_path / "m.gguf", "mamba", {"token_embd.weight": (np.zeros((10, 32), np.float32), Q.F32)}
    )
    with pytest.raises(
        UnsupportedModelError, match="'mamba' is not supported.*llama, qwen2, gemma3"
    ):
        read_config(path)


def test_unsupported_quantization_names_tensor_and_type(tmp_path: Path) -> None:
    f32 = np.zeros((32, 32), np.float32)
    q8_1 = np.zeros((32, 40), np.uint8)  # one Q8_1 block (32 values) per row
    path = _write_gguf(
        tmp_path / "q.gguf",
        "llama",
        {
            "token_embd.weight": (np.zeros((10, 32), np.float32), Q.F32),
            "blk.0.attn_q.weight": (q8_1, Q.Q8_1),
            "blk.0.attn_k.weight": (f32, Q.F32),
        },
    )
    gf = GGUFFile(path)
    with pytest.raises(UnsupportedQuantizationError, match=r"blk\.0\.attn_q\.weight.*Q8_1"):
        gf.array("blk.0.attn_q.weight")
    with pytest.raises(GGUFFormatError, match="no tensor 'blk.0.ffn_up.weight'"):
        gf.array("blk.0.ffn_up.weight")


def test_not_a_gguf_file(tmp_path: Path, tiny_paths: dict[str, Path]) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"definitely not a gguf file" * 10)
    with pytest.raises(GGUFFormatError, match="not a readable GGUF"):
        read_config(junk)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_paths["llama"].read_bytes()[:5000])
    with pytest.raises(GGUFFormatError):
        read_config(truncated)
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        read_config(tmp_path / "missing.gguf")


def _fields(**overrides: object) -> dict[str, object]:
    fields: dict[str, object] = {
        "general.architecture": "qwen2",
        "qwen2.block_count": 2,
        "qwen2.embedding_length": 64,
        "qwen2.feed_forward_length": 128,
        "qwen2.attention.head_count": 4,
        "qwen2.attention.head_count_kv": 2,
    }
    fields.update(overrides)
    return fields


SHAPES = {"token_embd.weight": (100, 64), "blk.0.attn_q.weight": (64, 64)}


def test_config_from_metadata_is_pure_and_checks_fields() -> None:
    c = config_from_metadata(_fields(), SHAPES)
    assert c.vocab_size == 100 and c.head_dim == 16 and c.tied_output
    assert config_from_metadata(_fields(), SHAPES) == c
    with pytest.raises(UnsupportedModelError, match="lacks required key 'qwen2.block_count'"):
        config_from_metadata(
            {k: v for k, v in _fields().items() if k != "qwen2.block_count"}, SHAPES
        )
    with pytest.raises(UnsupportedModelError, match="should be an integer"):
        config_from_metadata(_fields(**{"qwen2.block_count": "two"}), SHAPES)
    with pytest.raises(UnsupportedModelError, match="inconsistent sizes"):
        config_from_metadata(_fields(**{"qwen2.attention.head_count_kv": 3}), SHAPES)
    with pytest.raises(UnsupportedModelError, match="rope scaling 'yarn'"):
        config_from_metadata(_fields(**{"qwen2.rope.scaling.type": "yarn"}), SHAPES)
    with pytest.raises(UnsupportedModelError, match="no general.architecture"):
        config_from_metadata({}, SHAPES)
    with pytest.raises(UnsupportedModelError, match="token_embd.weight has shape"):
        config_from_metadata(_fields(), {**SHAPES, "token_embd.weight": (100, 32)})


def test_int4_groups_equal_dequantized_weights(tiny_paths: dict[str, Path]) -> None:
    """4-bit codes + maps read from the blocks reproduce the dequantized (and, for llama,
    un-permuted) matrices."""
    count = 0
    for arch in ("llama", "qwen2"):
        gf = GGUFFile(tiny_paths[arch])
        for i in range(gf.config.n_layers):
            block = gf.block(i, torch.float32)
            for name, groups in gf.block_int4(i).items():
                np.testing.assert_allclose(
                    groups.dequantize(), block[name].numpy(), rtol=1e-6, atol=1e-7
                )
                count += 1
    assert count >= 8
    assert GGUFFile(tiny_paths["qwen2"]).int4_groups("blk.0.attn_q.weight") is None  # Q8_0
