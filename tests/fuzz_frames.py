"""Hypothesis strategies for wire messages, and the frame-decoder fuzz campaign.

Strategies are derived from the message schemas, so every message type (the daemon's too)
gets round-trip coverage without writing a strategy by hand. The campaign feeds the decoder
random bytes, mutated valid frames and hostile-but-well-formed headers; the property is that
decoding returns a frame or raises FrameError, never anything else. Run it with
`python bench/fuzz_frames.py --count 100000`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from transport.errors import FrameError
from transport.frames import (
    PREFIX,
    PROTOCOL_VERSION,
    Frame,
    Kind,
    Limits,
    decode_body,
    encode_frame_bytes,
)
from transport.messages import CORE_MESSAGES
from transport.reader import FrameReader
from transport.schema import (
    DictSpec,
    Message,
    MessageSchema,
    OptionalSpec,
    RecordSpec,
    Registry,
    ScalarSpec,
    TupleSpec,
    ValueSpec,
)
from transport.tensors import LIB_NUMPY, LIB_TORCH, WIRE_DTYPES, is_tensor

# Small limits so that the fuzzer reaches them.
FUZZ_LIMITS = Limits(max_frame=1 << 20, max_header=1 << 14, max_tensors=4)


def value_strategy(spec: ValueSpec, allow_nan: bool = False) -> st.SearchStrategy[Any]:
    if isinstance(spec, ScalarSpec):
        kind = spec.python_type
        if kind is int:
            return st.integers(-(2**63), 2**64 - 1)
        if kind is float:
            return st.floats(allow_nan=allow_nan)
        if kind is str:
            return st.text(max_size=20)
        if kind is bytes:
            return st.binary(max_size=40)
        return st.booleans()
    if isinstance(spec, OptionalSpec):
        return st.none() | value_strategy(spec.inner, allow_nan)
    if isinstance(spec, TupleSpec):
        return st.lists(value_strategy(spec.item, allow_nan), max_size=4).map(tuple)
    if isinstance(spec, DictSpec):
        return st.dictionaries(
            st.text(max_size=8), value_strategy(spec.value, allow_nan), max_size=3
        )
    if isinstance(spec, RecordSpec):
        return st.builds(
            spec.cls,
            **{f.name: value_strategy(f.spec, allow_nan) for f in spec.table.fields if f.spec},
        )
    raise TypeError(f"no strategy for {spec!r}")


@st.composite
def tensors(draw: st.DrawFn, dtype: str | None = None, lib: str | None = None) -> Any:
    """A numpy array or torch tensor of any wire dtype, 0-3 dimensions, maybe non-contiguous."""
    dtype = dtype or draw(st.sampled_from(sorted(WIRE_DTYPES)))
    lib = lib or (
        LIB_TORCH if dtype == "bfloat16" else draw(st.sampled_from([LIB_NUMPY, LIB_TORCH]))
    )
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
    storage = WIRE_DTYPES[dtype]
    array = draw(hnp.arrays(storage, shape))
    if draw(st.booleans()) and array.ndim >= 2:
        array = array.T  # non-contiguous: the encoder must gather it
    if lib == LIB_NUMPY:
        if draw(st.booleans()) and array.dtype.itemsize > 1:
            array = array.astype(array.dtype.newbyteorder(">"))  # big-endian input
        return array
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


def message_strategy(schema: MessageSchema, allow_nan: bool = False) -> st.SearchStrategy[Message]:
    fields: dict[str, st.SearchStrategy[Any]] = {
        f.name: value_strategy(f.spec, allow_nan) for f in schema.table.fields if f.spec
    }
    for f in schema.tensor_fields:
        fields[f.name] = (st.none() | tensors()) if f.nullable else tensors()
    return st.builds(schema.cls, **fields)


def frame_strategy(registry: Registry = CORE_MESSAGES) -> st.SearchStrategy[Frame]:
    messages = st.one_of([message_strategy(s) for s in registry.by_name.values()])
    return st.builds(Frame, st.sampled_from(list(Kind)), st.integers(0, 2**63 - 1), messages)


def tensor_bytes(value: Any) -> tuple[str, tuple[int, ...], bytes]:
    """(dtype name, shape, little-endian C-order bytes) of a tensor, for exact comparison."""
    if isinstance(value, np.ndarray):
        name = value.dtype.name
        return name, value.shape, np.asarray(value, WIRE_DTYPES[name]).tobytes(order="C")
    name = str(value.dtype).removeprefix("torch.")
    flat = value.contiguous()
    if name == "bfloat16":
        flat = flat.view(torch.uint16)
    return name, tuple(value.shape), flat.numpy().tobytes()


def assert_same_message(sent: Message, got: Message) -> None:
    assert type(got) is type(sent), (type(sent), type(got))
    for field in dataclasses.fields(sent):
        a, b = getattr(sent, field.name), getattr(got, field.name)
        if is_tensor(a):
            assert is_tensor(b), field.name
            assert isinstance(a, np.ndarray) == isinstance(b, np.ndarray), field.name
            assert tensor_bytes(a) == tensor_bytes(b), field.name
        else:
            assert a == b, (field.name, a, b)


# ----------------------------------------------------------------------------- fuzz inputs


def _mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        if op == 0 and buf:  # flip bits
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # set a byte to an edge value
            buf[rng.randrange(len(buf))] = rng.choice([0, 0x7F, 0x80, 0xC1, 0xFF])
        elif op == 2:  # insert random bytes
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = rng.randbytes(rng.randint(1, 8))
        elif op == 3 and buf:  # delete a run
            i = rng.randrange(len(buf))
            del buf[i : i + rng.randint(1, 8)]
        elif op == 4:  # truncate
            del buf[rng.randrange(len(buf) + 1) :]
        else:  # duplicate a slice
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = buf[i : i + rng.randint(1, 32)]
    return bytes(buf)


_HEADER_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=10)
    | st.binary(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def hostile_header(draw: st.DrawFn) -> bytes:
    """A well-formed msgpack header whose values are wrong in the ways a peer could get wrong."""
    names = sorted(CORE_MESSAGES.by_name) + ["nope"]
    header: dict[Any, Any] = {
        "v": draw(st.sampled_from([PROTOCOL_VERSION, 0, 2, -1, "1", None])),
        "k": draw(st.integers(-2, 7) | _HEADER_VALUES),
        "i": draw(st.integers(-1, 2**64 - 1) | _HEADER_VALUES),
        "m": draw(st.sampled_from(names) | _HEADER_VALUES),
        "f": draw(
            st.dictionaries(
                st.sampled_from(
                    ["nonce", "items", "code", "text", "session_id", "peers", "load", "x"]
                ),
                _HEADER_VALUES,
                max_size=4,
            )
            | _HEADER_VALUES
        ),
    }
    if draw(st.booleans()):
        header["t"] = draw(
            st.lists(
                st.tuples(
                    st.sampled_from(["positions", "hidden", "tokens", "x"]),
                    st.sampled_from(sorted(WIRE_DTYPES) + ["complex64", ""]),
                    st.lists(st.integers(-2, 2**33), max_size=9),
                    st.integers(-1, 2**34),
                    st.sampled_from([LIB_NUMPY, LIB_TORCH, "tf"]),
                ).map(list)
                | _HEADER_VALUES,
                max_size=6,
            )
            | _HEADER_VALUES
        )
    for key in draw(st.lists(st.sampled_from(["v", "k", "i", "m", "f"]), max_size=2)):
        header.pop(key, None)
    packed = msgpack.packb(header)
    tail = draw(st.binary(max_size=64))
    return packed + tail


def fuzz_inputs() -> st.SearchStrategy[bytes]:
    """Frame bodies: random, mutated valid, and hostile headers."""
    valid = frame_strategy().map(lambda f: encode_frame_bytes(f, Limits())[PREFIX.size :])
    mutated = st.tuples(valid, st.integers(0, 2**32)).map(
        lambda t: _mutate(t[0], random.Random(t[1]))
    )
    return st.one_of(st.binary(max_size=256), mutated, hostile_header(), valid)


def check_body(body: bytes) -> None:
    """The property: decode_body returns a Frame or raises FrameError; nothing else."""
    try:
        frame = decode_body(bytearray(body), CORE_MESSAGES, FUZZ_LIMITS)
    except FrameError:
        return
    assert isinstance(frame, Frame)


def check_stream(data: bytes, chunk_seed: int) -> None:
    """The same property for a byte stream cut into random chunks by the reader."""
    reader = FrameReader(FUZZ_LIMITS)
    rng = random.Random(chunk_seed)
    pos = 0
    while pos < len(data):
        buf = reader.get_buffer()
        n = min(len(buf), rng.randint(1, 4096), len(data) - pos)
        buf[:n] = data[pos : pos + n]
        pos += n
        try:
            bodies = reader.feed(n)
        except FrameError:
            return
        for body in bodies:
            with contextlib.suppress(FrameError):
                decode_body(body, CORE_MESSAGES, FUZZ_LIMITS)


def _random_input(corpus: list[bytes], rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.1 or not corpus:
        return rng.randbytes(rng.randint(0, 256))
    seed = rng.choice(corpus)
    if roll < 0.2:  # splice two corpus entries
        other = rng.choice(corpus)
        return seed[: rng.randint(0, len(seed))] + other[rng.randint(0, len(other)) :]
    return _mutate(seed, rng)


def run_campaign(count: int, seed: int = 0, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs `count` inputs through the decoder; returns counts and the first crashes.

    A tenth of the inputs (at most 5,000) come from hypothesis (random, valid, mutated and
    hostile bodies); they also form the corpus from which the rest are made by mutation and
    splicing, which is ~100x cheaper per input than hypothesis generation.
    """
    crashes: list[dict[str, str]] = []
    seen = {"count": 0, "decoded": 0, "typed_errors": 0, "crashes": 0}
    corpus: list[bytes] = []
    start = time.perf_counter()

    def check(body: bytes, rng: random.Random) -> None:
        seen["count"] += 1
        try:
            decode_body(bytearray(body), CORE_MESSAGES, FUZZ_LIMITS)
            seen["decoded"] += 1
        except FrameError:
            seen["typed_errors"] += 1
        except Exception:
            seen["crashes"] += 1
            if len(crashes) < 10:
                crashes.append({"input": body.hex(), "error": traceback.format_exc(limit=3)})
            return
        if rng.random() < 0.125:  # also through the stream splitter, behind a length prefix
            try:
                check_stream(PREFIX.pack(len(body)) + body, rng.randrange(2**16))
            except Exception:
                seen["crashes"] += 1
                if len(crashes) < 10:
                    crashes.append({"input": body.hex(), "error": traceback.format_exc(limit=3)})
        if seen["count"] % 20000 == 0:
            log(
                f"{seen['count']} inputs, {seen['crashes']} crashes, "
                f"{time.perf_counter() - start:.0f}s"
            )

    generated = max(1, min(count // 10, 5000))
    rng = random.Random(seed)

    @settings(
        max_examples=generated,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        derandomize=True,
    )
    @given(body=fuzz_inputs())
    def from_hypothesis(body: bytes) -> None:
        if len(corpus) < 2000:
            corpus.append(body)
        check(body, rng)

    from_hypothesis()
    while seen["count"] < count:
        check(_random_input(corpus, rng), rng)
    return {
        **seen,
        "from_hypothesis": generated,
        "seed": seed,
        "seconds": round(time.perf_counter() - start, 1),
        "first_crashes": crashes,
    }


if __name__ == "__main__":
    result = run_campaign(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)  # noqa: T201
    print(json.dumps({k: v for k, v in result.items() if k != "first_crashes"}))
