"""The onnxruntime execution backend: DecoderCore exported to ONNX, KV cache kept outside.

A layer range is exported in chunks of a few layers (one ONNX file each, weights as external
data) so that the export never holds more than a chunk in fp32; the first chunk embeds, the last
applies the final norm and head. Each chunk has the same contract as `DecoderCore.forward`
(ids or hidden, rope tables, masks, past K/V in -> output, new K/V out), so padding, masks and
the KV cache are the torch backend's (`batch_inputs`, `KVCache`), and the two backends differ
only in who runs the graph.

Weight formats: ``fp32`` (the export as is; matches torch fp32), ``int8`` (MatMulNBits 8-bit
everywhere) and ``int4`` (4-bit where the GGUF tensor itself is ~4-bit, 8-bit where the file keeps
more precision, as Q4_K_M does for some tensors); blocks of 32, int8 compute (accuracy_level 4).
Exported files are cached under ``$XDG_CACHE_HOME/sled/onnx/<gguf digest>-<format>/``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.backend import UnsupportedBackendError
from models.batch_inputs import BadBatchError, batch_inputs, prepare_pass, rows_kept
from models.config import ModelConfig
from models.gguf_loader import GGUFFile
from models.kv_cache import KVCache
from models.registry import cache_root
from models.weight_cache import file_digest

ONNX_FORMATS = ("fp32", "int8", "int4")
DEFAULT_CHUNK_LAYERS = 7
QUANT_BLOCK = 32
EXPORT_LAYOUT_VERSION = 3
ONNX_OPSET = 18
INPUT_NAMES = (
    "x", "cos", "sin", "cos_local", "sin_local", "mask", "mask_local", "past_k", "past_v",
)  # fmt: skip
OUTPUT_NAMES = ("out", "new_k", "new_v")

log = logging.getLogger(__name__)


def default_root() -> Path:
    return cache_root() / "onnx"


def chunk_ranges(layers: tuple[int, int], chunk_layers: int) -> list[tuple[int, int]]:
    """Split [a, b) into consecutive ranges of at most `chunk_layers` layers."""
    a, b = layers
    if chunk_layers < 1:
        raise ValueError(f"chunk_layers must be >= 1, got {chunk_layers}")
    return [(s, min(s + chunk_layers, b)) for s in range(a, b, chunk_layers)]


def check_onnx_format(fmt: str) -> str:
    if fmt not in ONNX_FORMATS:
        raise UnsupportedBackendError(
            f"the onnx backend supports weight formats {', '.join(ONNX_FORMATS)}, not {fmt!r}"
        )
    return fmt


@dataclass(frozen=True)
class ExportedChunk:
    layers: tuple[int, int]
    path: Path


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter and quantizer print pages of progress; keep our logs readable."""
    names = ("onnxruntime.quantization", "onnxscript", "onnx_ir", "torch.onnx", "torch._dynamo")
    saved = [(n, logging.getLogger(n).level) for n in names]
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for n, level in saved:
            logging.getLogger(n).setLevel(level)


def _example_args(config: ModelConfig, first: bool, n_layers: int) -> tuple[torch.Tensor, ...]:
    """Inputs for tracing; sizes chosen distinct and > 1 so no dimension gets specialised."""
    b, t, p = 2, 3, 5
    c = config
    x = (
        torch.randint(0, c.vocab_size, (b, t))
        if first
        else torch.randn(b, t, c.dim, dtype=torch.float32)
    )
    bi = batch_inputs(c, [p, p - 1], [t, t - 1], torch.float32)
    past = torch.zeros(n_layers, b, c.n_kv_heads, p, c.head_dim)
    # Separate tensors for the local tables even when they equal the global ones, so each is
    # its own graph input.
    return (
        x, bi.cos, bi.sin, bi.cos_local.clone(), bi.sin_local.clone(),
        bi.mask, bi.mask_local.clone(), past, past.clone(),
    )  # fmt: skip


def export_chunk(gf: GGUFFile, layers: tuple[int, int], path: Path) -> None:
    """Export layers [a, b) of the GGUF model as one fp32 ONNX graph.

    The TorchScript exporter takes a fraction of a second where the dynamo exporter takes ~10 s
    per chunk for the same graph (measured on the tiny models); both give the same outputs.
    Weights larger than protobuf's 2 GB limit go to external data files next to `path`.
    """
    from models.decoder import DecoderCore
    from models.weight_formats import pack_segment

    segment = pack_segment(gf, layers, "fp32")
    core = DecoderCore(segment).eval()
    first = layers[0] == 0
    args = _example_args(gf.config, first, layers[1] - layers[0])
    bt = {0: "batch", 1: "new"}
    mask = {0: "batch", 2: "new", 3: "past_plus_new"}
    past = {1: "batch", 3: "past"}
    new = {1: "batch", 3: "new"}
    dynamic = {
        "x": bt, "cos": bt, "sin": bt, "cos_local": bt, "sin_local": bt,
        "mask": mask, "mask_local": mask, "past_k": past, "past_v": past,
        "out": bt, "new_k": new, "new_v": new,
    }  # fmt: skip
    with (
        _quiet(),
        warnings.catch_warnings(),
        contextlib.redirect_stdout(sys.stderr),
        torch.inference_mode(False),
    ):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            core,
            args,
            str(path),
            dynamo=False,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=dynamic,
            opset_version=ONNX_OPSET,
        )


# GGUF source types that hold at most ~4.5 bits per weight: re-quantizing them to 4 bits keeps
# their precision; anything finer (Q5_*, Q6_K, Q8_0, F16, ...) goes to 8 bits.
FOUR_BIT_SOURCES = frozenset({"Q4_0", "Q4_1", "Q4_K", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS"})
# Our fused linears and the GGUF tensors they are made of.
LINEAR_SOURCES = {
    "qkv": ("attn_q", "attn_k", "attn_v"),
    "wo": ("attn_output",),
    "gate_up": ("ffn_gate", "ffn_up"),
    "down": ("ffn_down",),
}


def weight_bits(gf: GGUFFile, layers: tuple[int, int], fmt: str) -> dict[str, int]:
    """Bits per exported weight node name prefix (``/blocks.{i}/{linear}``, ``/head``,
    ``/embedding``) for a format: int8 is 8 everywhere; int4 follows the GGUF's own precision
    (4 where every source tensor is ~4-bit, else 8), as a Q4_K_M file mixes Q4_K with Q6_K/Q8_0."""

    def bits(*names: str) -> int:
        if fmt == "int8":
            return 8
        types = {gf.tensors[n].tensor_type.name for n in names if n in gf.tensors}
        return 4 if types and types <= FOUR_BIT_SOURCES else 8

    out = {}
    for local, layer in enumerate(range(*layers)):
        for linear, sources in LINEAR_SOURCES.items():
            out[f"/blocks.{local}/{linear}/"] = bits(*(f"blk.{layer}.{s}.weight" for s in sources))
    head = "token_embd.weight" if gf.config.tied_output else "output.weight"
    out["/head/"] = bits(head)
    out["/embedding"] = bits("token_embd.weight")
    return out


def quantize_chunk(src: Path, dst: Path, bits_by_prefix: dict[str, int]) -> None:
    """Weight-only MatMulNBits quantization of an exported chunk, node by node.

    4-bit weights are quantized asymmetrically in blocks of 32 (the sub-block layout of Q4_K),
    8-bit ones symmetrically; compute is int8 (accuracy_level 4). The embedding lookup is
    quantized only when it is 4-bit (onnxruntime's GatherBlockQuantized is 4-bit only);
    otherwise it stays float.
    """
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    consts = {init.name for init in model.graph.initializer}
    groups: dict[int, list[str]] = {4: [], 8: []}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in consts:
            prefix = next((p for p in bits_by_prefix if node.name.startswith(p)), None)
            groups[bits_by_prefix[prefix] if prefix else 8].append(node.name)
        elif node.op_type == "Gather" and node.input[0] in consts:
            big = _initializer_size(model, node.input[0]) > 1 << 16
            if big and bits_by_prefix.get("/embedding") == 4:
                groups[4].append(node.name)
    # The quantizer takes every node of the listed op types unless excluded, so each pass
    # excludes all MatMul/Gather nodes outside its group.
    candidates = {n.name for n in model.graph.node if n.op_type in ("MatMul", "Gather")}
    with _quiet():
        for bits, nodes in groups.items():
            if not nodes:
                continue
            q = MatMulNBitsQuantizer(
                model,
                bits=bits,
                block_size=QUANT_BLOCK,
                is_symmetric=bits == 8,
                accuracy_level=4,
                nodes_to_exclude=sorted(candidates - set(nodes)),
                op_types_to_quantize=("MatMul", "Gather"),
            )
            q.process()
            model = q.model.model
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True)


def _initializer_size(model: object, name: str) -> int:
    import numpy as _np

    for init in model.graph.initializer:  # type: ignore[attr-defined]
        if init.name == name:
            return int(_np.prod(init.dims))
    return 0


class OnnxExportCache:
    """Exported (and quantized) chunks on disk, made on first use."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()

    def directory(self, gguf_path: Path, fmt: str, chunk_layers: int) -> Path:
        key = f"{file_digest(gguf_path)}-{fmt}-c{chunk_layers}-v{EXPORT_LAYOUT_VERSION}"
        return self.root / key

    def prepare(
        self,
        gguf_path: Path,
        layers: tuple[int, int] | None,
        fmt: str,
        chunk_layers: int = DEFAULT_CHUNK_LAYERS,
        progress: bool = True,
    ) -> tuple[ModelConfig, torch.Tensor | None, list[ExportedChunk]]:
        """Config, rope frequency factors and the chunks covering `layers`, exporting missing
        chunks. The GGUF is opened only when something is missing (opening Qwen takes ~10 s)."""
        from tqdm import tqdm

        fmt = check_onnx_format(fmt)
        gguf_path = Path(gguf_path)
        if not gguf_path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
        directory = self.directory(gguf_path, fmt, chunk_layers)
        directory.mkdir(parents=True, exist_ok=True)
        opened: list[GGUFFile] = []

        def gguf_file() -> GGUFFile:
            if not opened:
                opened.append(GGUFFile(gguf_path))
            return opened[0]

        config, rope = self._meta(directory, gguf_file)
        a, b = config.check_layers(layers if layers is not None else (0, config.n_layers))
        # Chunks are aligned to multiples of chunk_layers so that overlapping ranges share files.
        ranges = [
            (max(lo, a), min(hi, b)) for lo, hi in chunk_ranges((0, b), chunk_layers) if hi > a
        ]
        todo = [r for r in ranges if not (directory / _chunk_name(r)).is_file()]
        with tqdm(
            total=len(todo),
            desc=f"exporting {gguf_path.name} layers {a}-{b} to ONNX ({fmt})",
            unit="chunk",
            disable=not (progress and todo),
            file=sys.stderr,
        ) as bar:
            for r in todo:
                self._make(gguf_file(), r, fmt, directory / _chunk_name(r))
                bar.update(1)
        return config, rope, [ExportedChunk(r, directory / _chunk_name(r)) for r in ranges]

    @staticmethod
    def _meta(
        directory: Path, gguf_file: Callable[[], GGUFFile]
    ) -> tuple[ModelConfig, torch.Tensor | None]:
        cfg_path, rope_path = directory / "config.json", directory / "rope_freqs.npy"
        if cfg_path.is_file():
            with contextlib.suppress(ValueError, TypeError, KeyError):
                config = ModelConfig.from_dict(json.loads(cfg_path.read_text()))
                if not config.has_rope_freq_factors:
                    return config, None
                if rope_path.is_file():
                    return config, torch.from_numpy(np.load(rope_path))
        gf = gguf_file()
        rope = gf.rope_freq_factors()
        if rope is not None:
            np.save(rope_path, rope.numpy())
        tmp = cfg_path.with_name(f".config.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(gf.config.to_dict(), indent=1))
        os.replace(tmp, cfg_path)
        return gf.config, rope

    @staticmethod
    def _make(gf: GGUFFile, layers: tuple[int, int], fmt: str, final: Path) -> None:
        work = final.parent / f".work-{_chunk_name(layers)}-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        try:
            exported = work / "fp32.onnx"
            export_chunk(gf, layers, exported)
            result = work / "model.onnx"
            if fmt == "fp32":
                result = exported
            else:
                quantize_chunk(exported, result, weight_bits(gf, layers, fmt))
            _save_single_file(result, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _chunk_name(layers: tuple[int, int]) -> str:
    return f"chunk_{layers[0]:04d}_{layers[1]:04d}.onnx"


def _save_single_file(src: Path, final: Path) -> None:
    """Write the graph at `src` (with whatever external data it has) as `final` plus one
    external data file `final.data`, atomically replacing any earlier copy."""
    import onnx

    model = onnx.load(str(src))  # also reads external data files next to src
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    data_name = final.name + ".data"
    tmp_data = final.parent / f".{data_name}.{os.getpid()}.tmp"
    onnx.save_model(
        model,
        str(tmp),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=tmp_data.name,
        size_threshold=1024,
    )
    # Point the graph at the final data file name, then move both into place (data first).
    model = onnx.load(str(tmp), load_external_data=False)
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = data_name
    onnx.save(model, str(tmp))
    if tmp_data.exists():
        os.replace(tmp_data, final.parent / data_name)
    os.replace(tmp, final)


class OnnxBackend:
    """Runs layers [a, b) with onnxruntime; same contract as the torch backend."""

    name = "onnx"

    def __init__(
        self,
        config: ModelConfig,
        chunks: Sequence[ExportedChunk],
        fmt: str,
        rope_freq_factors: torch.Tensor | None,
        max_slots: int = 8,
        max_len: int = 2048,
        threads: int = 0,
    ) -> None:
        import onnxruntime as ort

        self.config = config
        self.layers = (chunks[0].layers[0], chunks[-1].layers[1])
        self.weight_format = fmt
        self.dtype = torch.float32
        self.rope_freq_factors = rope_freq_factors
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads if threads > 0 else (os.cpu_count() or 1)
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._sessions = []
        for ch in chunks:
            sess = ort.InferenceSession(str(ch.path), opts, providers=["CPUExecutionProvider"])
            wanted = {i.name for i in sess.get_inputs()}
            self._sessions.append((ch.layers, sess, wanted))
        self.cache = KVCache(
            n_layers=self.layers[1] - self.layers[0],
            n_kv_heads=config.n_kv_heads,
            head_dim=config.head_dim,
            max_slots=max_slots,
            max_len=min(max_len, config.context_length),
            dtype=self.dtype,
        )

    @property
    def first(self) -> bool:
        return self.layers[0] == 0

    @property
    def last(self) -> bool:
        return self.layers[1] == self.config.n_layers

    def forward(
        self,
        slots: Sequence[int],
        inputs: Sequence[torch.Tensor],
        last_only: bool = False,
        keep: Sequence[int] | None = None,
    ) -> list[torch.Tensor]:
        """One padded pass over several sessions (see models.backend.Backend.forward)."""
        if len(slots) != len(inputs):
            raise BadBatchError(f"{len(slots)} slots for {len(inputs)} inputs")
        self.cache.check_room(slots, [int(x.shape[0]) for x in inputs])
        past = [self.cache.length(s) for s in slots]
        prepared = prepare_pass(
            self.config, self.first, past, inputs, self.dtype, self.rope_freq_factors
        )
        counts, bi = prepared.counts, prepared.inputs
        x = prepared.x.numpy()
        past_k, past_v = self.cache.gather(slots, bi.past_len)
        shared = {
            "cos": bi.cos.numpy(),
            "sin": bi.sin.numpy(),
            "cos_local": bi.cos_local.numpy(),
            "sin_local": bi.sin_local.numpy(),
            "mask": bi.mask.numpy(),
            "mask_local": bi.mask_local.numpy(),
        }
        pk, pv = past_k.numpy(), past_v.numpy()
        a0 = self.layers[0]
        new_k, new_v = [], []
        h: np.ndarray = x
        for (la, lb), sess, wanted in self._sessions:
            feed = {"x": h, "past_k": pk[la - a0 : lb - a0], "past_v": pv[la - a0 : lb - a0]}
            feed.update(shared)
            h, nk, nv = sess.run(None, {k: v for k, v in feed.items() if k in wanted})
            new_k.append(nk)
            new_v.append(nv)
        self.cache.write(
            slots,
            torch.from_numpy(np.concatenate(new_k)),
            torch.from_numpy(np.concatenate(new_v)),
            counts,
        )
        out = torch.from_numpy(h)
        if last_only or keep is not None:
            kept = rows_kept(counts, keep, last_only)
            return [out[i, n - m : n].clone() for i, (n, m) in enumerate(kept)]
        return [out[i, :n].clone() for i, n in enumerate(counts)]


def load_onnx_backend(
    model_path: Path,
    layers: tuple[int, int] | None,
    fmt: str,
    max_slots: int = 8,
    max_len: int = 2048,
    threads: int = 0,
    cache_root: Path | None = None,
    chunk_layers: int = DEFAULT_CHUNK_LAYERS,
) -> OnnxBackend:
    config, rope, chunks = OnnxExportCache(cache_root).prepare(
        Path(model_path), layers, fmt, chunk_layers
    )
    return OnnxBackend(
        config, chunks, fmt, rope, max_slots=max_slots, max_len=max_len, threads=threads
    )
