"""Frame codec: round trips (property-based), limits, validation, zero copy, stream splitting."""

from __future__ import annotations

import random
import struct
import tracemalloc
from dataclasses import dataclass

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz_frames import (
    assert_same_message,
    check_body,
    check_stream,
    fuzz_inputs,
    message_strategy,
    run_campaign,
    tensors,
)
from transport.errors import FrameError
from transport.frames import (
    PREFIX,
    PROTOCOL_VERSION,
    Codec,
    Frame,
    Kind,
    Limits,
    body_length,
    decode_body,
    encode_frame,
    encode_frame_bytes,
)
from transport.messages import (
    CORE_MESSAGES,
    Activations,
    Error,
    Heartbeat,
    Load,
    PeerAddress,
    Ping,
    Pong,
    Tokens,
)
from transport.reader import SCRATCH_BYTES, FrameReader
from transport.schema import Message, Registry, Tensor, message
from transport.tensors import WIRE_DTYPES


@message("test_everything")
@dataclass(frozen=True)
class Everything(Message):
    """Every kind of field the schema supports, to exercise the generic validator."""

    count: int
    ratio: float
    name: str
    blob: bytes
    flag: bool
    maybe: int | None
    names: tuple[str, ...]
    weights: dict[str, float]
    peers: tuple[PeerAddress, ...]
    load: Load
    first: Tensor
    second: Tensor | None = None
    note: str = "default"


REGISTRY = CORE_MESSAGES.extend([Everything])
LIMITS = Limits()


def roundtrip(msg: Message, kind: Kind = Kind.REQUEST, rid: int = 7) -> Frame:
    data = encode_frame_bytes(Frame(kind, rid, msg), LIMITS)
    assert body_length(data[: PREFIX.size], LIMITS) == len(data) - PREFIX.size
    return decode_body(bytearray(data[PREFIX.size :]), REGISTRY, LIMITS)


def header_of(data: bytes) -> dict:
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data[PREFIX.size :])
    return unpacker.unpack()


def raw_body(header: object, tail: bytes = b"") -> bytearray:
    return bytearray(msgpack.packb(header) + tail)


# ----------------------------------------------------------------------------- round trips

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


@pytest.mark.parametrize("name", sorted(REGISTRY.by_name))
@SETTINGS
@given(data=st.data(), kind=st.sampled_from(list(Kind)), rid=st.integers(0, 2**63 - 1))
def test_every_message_type_round_trips(
    name: str, data: st.DataObject, kind: Kind, rid: int
) -> None:
    msg = data.draw(message_strategy(REGISTRY.by_name[name]))
    frame = roundtrip(msg, kind, rid)
    assert frame.kind is kind and frame.request_id == rid
    assert_same_message(msg, frame.message)


@pytest.mark.parametrize("name", sorted(REGISTRY.by_name))
@SETTINGS
@given(data=st.data(), kind=st.sampled_from(list(Kind)), rid=st.integers(0, 2**63 - 1))
def test_headers_are_the_bytes_msgpack_gives_for_the_header_map(
    name: str, data: st.DataObject, kind: Kind, rid: int
) -> None:
    """The encoder composes header bytes from packed pieces; they must be exactly what
    msgpack packs for the map {"v", "k", "i", "m", "f"[, "t"]}, whatever the message."""
    msg = data.draw(message_strategy(REGISTRY.by_name[name]))
    codec = Codec(REGISTRY, LIMITS)
    for _ in range(2):  # the second time with the remembered tensor table
        first = bytes(codec.encode(kind, rid, msg)[0])
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=True)
        unpacker.feed(first[PREFIX.size :])
        header = unpacker.unpack()
        assert list(header)[:5] == ["v", "k", "i", "m", "f"] and len(header) in (5, 6)
        assert (header["k"], header["i"], header["m"]) == (kind, rid, name)
        assert msgpack.packb(header) == first[PREFIX.size : PREFIX.size + unpacker.tell()]


@pytest.mark.parametrize(
    ("dtype", "lib"),
    [
        (d, lib)
        for d in sorted(WIRE_DTYPES)
        for lib in ("np", "pt")
        if (d, lib) != ("bfloat16", "np")
    ],
)
@SETTINGS
@given(data=st.data())
def test_tensors_of_every_dtype_round_trip(dtype: str, lib: str, data: st.DataObject) -> None:
    first = data.draw(tensors(dtype, lib))
    second = data.draw(st.none() | tensors())
    msg = Everything(1, 0.5, "n", b"b", True, None, (), {}, (), Load(), first, second)
    got = roundtrip(msg).message
    assert_same_message(msg, got)
    assert isinstance(got, Everything)
    if lib == "pt":
        assert isinstance(got.first, torch.Tensor) and str(got.first.dtype) == f"torch.{dtype}"
    else:
        assert isinstance(got.first, np.ndarray) and got.first.dtype.name == dtype


def test_tensors_are_neither_msgpack_lists_nor_copied() -> None:
    hidden = np.arange(12, dtype=np.float32).reshape(3, 4)
    positions = torch.arange(3)
    buffers = encode_frame(Frame(Kind.NOTIFY, 0, Activations("s", positions, hidden)), LIMITS)
    # The payloads go out as views of the tensors' own memory...
    payload_views = [b for b in buffers if isinstance(b, memoryview)]
    assert any(np.shares_memory(np.frombuffer(v, np.uint8), hidden) for v in payload_views)
    assert any(
        np.shares_memory(np.frombuffer(v, np.uint8), positions.numpy()) for v in payload_views
    )
    data = b"".join(buffers)
    header = header_of(data)
    # ...described, not carried, by the header.
    assert header["t"] == [
        ["positions", "int64", [3], 24, "pt"],
        ["hidden", "float32", [3, 4], 48, "np"],
    ]
    assert header["f"] == {"session_id": "s"}
    # And they come back as views of the received buffer.
    body = bytearray(data[PREFIX.size :])
    got = decode_body(body, REGISTRY, LIMITS).message
    assert isinstance(got, Activations)
    assert np.shares_memory(got.hidden, np.frombuffer(body, np.uint8))
    assert got.hidden.ctypes.data % 16 == 0 and got.positions.data_ptr() % 16 == 0


def test_decoded_tensor_writes_land_in_frame_buffer() -> None:
    body = bytearray(
        encode_frame_bytes(Frame(Kind.NOTIFY, 0, Tokens("s", np.zeros(4, np.int32))), LIMITS)[4:]
    )
    got = decode_body(body, REGISTRY, LIMITS).message
    assert isinstance(got, Tokens)
    got.tokens[:] = 7
    assert np.frombuffer(body, np.int32)[-4:].tolist() == [7, 7, 7, 7]


# ----------------------------------------------------------------------------- limits


def test_4gib_length_prefix_is_refused_without_allocating() -> None:
    reader = FrameReader(Limits(max_frame=64 << 20))
    tracemalloc.start()
    try:
        buf = reader.get_buffer()
        buf[:4] = b"\xff\xff\xff\xff"
        with pytest.raises(FrameError) as info:
            reader.feed(4)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.code == "frame_too_large"
    assert "4294967295" in str(info.value)
    assert peak < 1 << 20  # nothing near 4 GiB (or even the 64 MiB limit) was allocated


def test_frame_at_the_limit_passes_and_one_byte_more_fails() -> None:
    limits = Limits(max_frame=4096, max_header=1024)
    assert body_length(struct.pack(">I", 4096), limits) == 4096
    with pytest.raises(FrameError, match="frame_too_large"):
        body_length(struct.pack(">I", 4097), limits)
    big = Tokens("s", np.zeros(1024, np.int64))
    with pytest.raises(FrameError, match="frame_too_large"):
        encode_frame(Frame(Kind.NOTIFY, 0, big), limits)


def test_header_size_limit() -> None:
    limits = Limits(max_frame=1 << 20, max_header=256)
    with pytest.raises(FrameError, match="header_too_large"):
        encode_frame(Frame(Kind.NOTIFY, 0, Error("x", "y" * 300)), limits)
    body = bytearray(encode_frame_bytes(Frame(Kind.NOTIFY, 0, Error("x", "y" * 300)), LIMITS)[4:])
    with pytest.raises(FrameError) as info:
        decode_body(body, REGISTRY, limits)
    assert info.value.code == "header_too_large"
    # A long header at the front of a large frame is found by reading in steps.
    long_header = bytearray(
        encode_frame_bytes(
            Frame(Kind.NOTIFY, 0, Tokens("s" * 20000, np.zeros(3000, np.int64))), LIMITS
        )[4:]
    )
    assert decode_body(long_header, REGISTRY, LIMITS).message.session_id == "s" * 20000  # type: ignore[attr-defined]
    with pytest.raises(FrameError, match="header_too_large"):
        decode_body(long_header, REGISTRY, Limits(max_header=8192))


def test_tensor_count_limit() -> None:
    limits = Limits(max_tensors=1)
    msg = Activations("s", np.zeros(2), np.zeros(2))
    with pytest.raises(FrameError, match="too_many_tensors"):
        encode_frame(Frame(Kind.NOTIFY, 0, msg), limits)
    body = bytearray(encode_frame_bytes(Frame(Kind.NOTIFY, 0, msg), LIMITS)[4:])
    with pytest.raises(FrameError, match="too_many_tensors"):
        decode_body(body, REGISTRY, limits)


# ----------------------------------------------------------------------------- validation

GOOD = {"v": PROTOCOL_VERSION, "k": 1, "i": 3, "m": "ping", "f": {"nonce": 5}}


@pytest.mark.parametrize(
    ("change", "code", "text"),
    [
        ({"v": 2}, "bad_version", "protocol version 2 is not supported"),
        ({"v": "1"}, "bad_version", "not supported"),
        ({"m": "no_such_type"}, "unknown_type", "unknown message type 'no_such_type'"),
        ({"m": 5}, "bad_header", "message type"),
        ({"k": 9}, "bad_header", "unknown frame kind 9"),
        ({"i": -1}, "bad_header", "request id"),
        ({"f": {}}, "bad_field", "required field 'nonce' is missing"),
        ({"f": {"nonce": "5"}}, "bad_field", "ping.nonce: expected int, got str"),
        ({"f": {"nonce": True}}, "bad_field", "expected int, got bool"),
        ({"f": {"nonce": 1, "extra": 2}}, "bad_field", "unknown field(s) ['extra']"),
        ({"f": [1]}, "bad_header", "fields ('f') must be a map"),
        ({"x": 1}, "bad_header", "unknown header keys ['x']"),
    ],
)
def test_bad_headers_get_typed_errors(change: dict, code: str, text: str) -> None:
    with pytest.raises(FrameError) as info:
        decode_body(raw_body(GOOD | change), REGISTRY, LIMITS)
    assert info.value.code == code
    assert text in str(info.value)


def test_missing_header_key_and_non_map_header() -> None:
    header = dict(GOOD)
    del header["m"]
    with pytest.raises(FrameError, match=r"lacks keys \['m'\]"):
        decode_body(raw_body(header), REGISTRY, LIMITS)
    with pytest.raises(FrameError, match="header must be a map"):
        decode_body(raw_body([1, 2]), REGISTRY, LIMITS)
    with pytest.raises(FrameError, match="not valid msgpack"):
        decode_body(bytearray(b"\xc1"), REGISTRY, LIMITS)
    with pytest.raises(FrameError, match="bad_header"):
        decode_body(bytearray(), REGISTRY, LIMITS)


def test_nested_field_errors_name_the_path() -> None:
    header = GOOD | {"m": "peer_list", "f": {"peers": [{"node_id": "a", "host": "h", "port": "x"}]}}
    with pytest.raises(FrameError, match=r"peer_list\.peers\[0\]\.port: expected int, got str"):
        decode_body(raw_body(header), REGISTRY, LIMITS)
    header = GOOD | {
        "m": "heartbeat",
        "f": {"load": {"queue_depth": 1, "bogus": 1}, "sent_at": 0.0},
    }
    with pytest.raises(FrameError, match=r"heartbeat\.load: unknown field"):
        decode_body(raw_body(header), REGISTRY, LIMITS)


def _tensor_frame(spec: list, payload: bytes) -> bytearray:
    packed = msgpack.packb(GOOD | {"m": "tokens", "f": {"session_id": "s"}, "t": [spec]})
    pad = (-len(packed)) % 16
    return bytearray(packed + bytes(pad) + payload + bytes((-len(payload)) % 16))


@pytest.mark.parametrize(
    ("spec", "payload", "text"),
    [
        (["tokens", "complex64", [2], 16, "np"], bytes(16), "unknown dtype 'complex64'"),
        (["tokens", "int32", [3], 16, "np"], bytes(16), "byte length 16 != shape [3] x int32"),
        (["tokens", "int32", [-1], 0, "np"], b"", "shape must be"),
        (["tokens", "int32", [1] * 9, 4, "np"], bytes(4), "shape must be at most 8"),
        (["tokens", "int32", [4], 16, "tf"], bytes(16), "unknown library tag 'tf'"),
        (["other", "int32", [4], 16, "np"], bytes(16), "no tensor field(s) named ['other']"),
        (["tokens", "int32", [4], 16], bytes(16), "expected [field, dtype, shape, nbytes, lib]"),
        (["tokens", "int32", [8], 32, "np"], bytes(16), "header describes"),
    ],
)
def test_bad_tensor_descriptions_are_refused(spec: list, payload: bytes, text: str) -> None:
    with pytest.raises(FrameError) as info:
        decode_body(_tensor_frame(spec, payload), REGISTRY, LIMITS)
    assert text in str(info.value)


def test_missing_required_tensor_and_trailing_bytes() -> None:
    with pytest.raises(FrameError, match="required tensor 'tokens' is missing"):
        decode_body(raw_body(GOOD | {"m": "tokens", "f": {"session_id": "s"}}), REGISTRY, LIMITS)
    with pytest.raises(FrameError, match="length_mismatch"):
        decode_body(raw_body(GOOD, b"junk"), REGISTRY, LIMITS)


def test_outgoing_messages_are_validated_at_the_sender() -> None:
    with pytest.raises(FrameError, match=r"ping\.nonce: expected int, got str"):
        encode_frame(Frame(Kind.REQUEST, 1, Ping("1")), LIMITS)  # type: ignore[arg-type]
    with pytest.raises(FrameError, match=r"tokens\.tokens: expected a tensor, got list"):
        encode_frame(Frame(Kind.REQUEST, 1, Tokens("s", [1, 2])), LIMITS)  # type: ignore[arg-type]
    with pytest.raises(FrameError, match="numpy dtype complex64 cannot be sent"):
        encode_frame(Frame(Kind.REQUEST, 1, Tokens("s", np.zeros(2, np.complex64))), LIMITS)
    with pytest.raises(FrameError, match=r"heartbeat\.load\.load_avg: expected float, got str"):
        encode_frame(Frame(Kind.NOTIFY, 0, Heartbeat(Load(load_avg="x"), 0.0)), LIMITS)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not a registered message"):
        encode_frame(Frame(Kind.NOTIFY, 0, Message()), LIMITS)


def test_message_decorator_rejects_bad_definitions() -> None:
    with pytest.raises(TypeError, match="on top of @dataclass"):

        @message("x")
        @dataclass
        class NotFrozen(Message):
            a: int

    with pytest.raises(TypeError, match="unsupported field type"):

        @message("y")
        @dataclass(frozen=True)
        class BadField(Message):
            a: list[int]

    with pytest.raises(TypeError, match="unions other than"):

        @message("z")
        @dataclass(frozen=True)
        class BadUnion(Message):
            a: int | str

    @message("ping")
    @dataclass(frozen=True)
    class OtherPing(Message):
        nonce: int

    with pytest.raises(ValueError, match="used by two classes"):
        Registry.of([Ping, OtherPing])


# ----------------------------------------------------------------------------- byte streams


@settings(max_examples=80, deadline=None, database=None)
@given(
    msgs=st.lists(
        st.sampled_from([0, 1, 100, 3000, 5000, 40000, 40000, 40000]).map(
            lambda n: Tokens("s", np.arange(n))
        ),
        min_size=1,
        max_size=12,
    ),
    seed=st.integers(0, 2**32),
)
def test_reader_splits_any_chunking(msgs: list[Tokens], seed: int) -> None:
    """Any split of the byte stream gives the frames back; frames of equal length in a row
    exercise the landing reads, others the mispredictions. Some decoded tensors are kept
    (their buffers must not be reused), others dropped (theirs are recycled)."""
    data = b"".join(
        encode_frame_bytes(Frame(Kind.NOTIFY, i, m), LIMITS) for i, m in enumerate(msgs)
    )
    reader = FrameReader(LIMITS)
    rng = random.Random(seed)
    kept: list[tuple[int, np.ndarray]] = []
    count = 0
    pos = 0
    while pos < len(data):
        buf = reader.get_buffer()
        if rng.random() < 0.2:
            buf = reader.get_buffer()  # a read that found nothing asks again
        assert len(buf) > 0
        n = min(len(buf), rng.choice([1, 3, 100, 5000, 70000, 1 << 30]), len(data) - pos)
        buf[:n] = data[pos : pos + n]
        pos += n
        for body in reader.feed(n):
            frame = decode_body(body, REGISTRY, LIMITS)
            assert frame.request_id == count
            assert_same_message(msgs[count], frame.message)
            if isinstance(body, np.ndarray):
                assert body.ctypes.data % 16 == 0  # tensors in it are aligned
            if rng.random() < 0.5:
                assert isinstance(frame.message, Tokens)
                kept.append((count, frame.message.tokens))
            count += 1
    assert count == len(msgs)
    for i, tokens in kept:  # not overwritten by later frames
        assert tokens.tolist() == msgs[i].tokens.tolist()


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(body=fuzz_inputs(), seed=st.integers(0, 2**16))
def test_random_and_mutated_bodies_give_only_typed_errors(body: bytes, seed: int) -> None:
    check_body(body)
    check_stream(PREFIX.pack(len(body)) + body, seed)


def test_fuzz_campaign_quick_subset() -> None:
    result = run_campaign(3000, seed=1, log=lambda line: None)
    assert result["count"] == 3000
    assert result["crashes"] == 0, result["first_crashes"][:1]
    assert result["typed_errors"] > 0 and result["decoded"] > 0


def _read_one(reader: FrameReader, data: bytes) -> Tokens:
    pos = 0
    while True:
        buf = reader.get_buffer()
        n = min(len(buf), len(data) - pos)
        buf[:n] = data[pos : pos + n]
        pos += n
        bodies = reader.feed(n)
        if bodies:
            msg = decode_body(bodies[0], REGISTRY, LIMITS).message
            assert isinstance(msg, Tokens)
            return msg


def test_large_frame_buffers_are_reused_only_once_released() -> None:
    reader = FrameReader(LIMITS)
    data = encode_frame_bytes(Frame(Kind.NOTIFY, 0, Tokens("s", np.arange(20_000))), LIMITS)
    first = _read_one(reader, data).tokens
    held_address = first.ctypes.data
    second = _read_one(reader, data).tokens
    assert second.ctypes.data != held_address  # `first` still views its buffer
    del first
    third = _read_one(reader, data).tokens
    assert third.ctypes.data == held_address  # released, so recycled
    assert third.tolist() == list(range(20_000)) and second.tolist() == list(range(20_000))


def test_equal_large_frames_land_in_one_read_each() -> None:
    reader = FrameReader(LIMITS)
    first = encode_frame_bytes(Frame(Kind.NOTIFY, 0, Tokens("s", np.arange(20_000))), LIMITS)
    second = encode_frame_bytes(Frame(Kind.NOTIFY, 1, Tokens("s", np.arange(1, 20_001))), LIMITS)
    assert len(reader.get_buffer()) == SCRATCH_BYTES and not reader.large_frame_done
    _read_one(reader, first)
    assert reader.large_frame_done  # the connection lets handlers run before reading on
    offered = np.frombuffer(reader.get_buffer(), np.uint8).ctypes.data
    buf = reader.get_buffer()  # asked again (a read found nothing): the same free buffer
    assert np.frombuffer(buf, np.uint8).ctypes.data == offered
    assert len(buf) == len(second)  # room for exactly one more frame of the same length
    buf[:] = second
    (body,) = reader.feed(len(second))
    assert isinstance(body, np.ndarray) and body.ctypes.data % 16 == 0
    frame = decode_body(body, REGISTRY, LIMITS)
    assert frame.request_id == 1 and isinstance(frame.message, Tokens)
    assert frame.message.tokens.tolist() == list(range(1, 20_001))
    # A small frame where a large one was predicted goes through the scratch buffer.
    small = encode_frame_bytes(Frame(Kind.NOTIFY, 2, Tokens("s", np.arange(3))), LIMITS)
    reader.get_buffer()[: len(small)] = small
    (body,) = reader.feed(len(small))
    assert decode_body(body, REGISTRY, LIMITS).request_id == 2
    assert not reader.large_frame_done and len(reader.get_buffer()) == SCRATCH_BYTES


# ----------------------------------------------------------------------------- header memo


def _large_body(msg: Message, rid: int = 0, kind: Kind = Kind.NOTIFY) -> bytes:
    data = encode_frame_bytes(Frame(kind, rid, msg), LIMITS)
    assert len(data) > 8192  # past the size from which the codec remembers headers
    return data[PREFIX.size :]


def _outcome(codec: Codec | None, body: bytes) -> tuple:
    buffer = np.frombuffer(body, np.uint8).copy()
    try:
        frame = codec.decode(buffer) if codec else decode_body(buffer, REGISTRY, LIMITS)
    except FrameError as exc:
        return ("error", exc.code, str(exc))
    return ("frame", frame.kind, frame.request_id, frame.message)


def _same_outcome(got: tuple, expected: tuple) -> None:
    assert got[:-1] == expected[:-1] if got[0] == "frame" else got == expected, (got, expected)
    if got[0] == "frame":
        assert_same_message(expected[-1], got[-1])


def test_a_remembered_header_decodes_the_next_frames_payload() -> None:
    codec = Codec(REGISTRY, LIMITS)
    first = Activations("s", np.arange(8), np.zeros((8, 512), np.float32))
    second = Activations("s", np.arange(8, 16), np.ones((8, 512), np.float32))
    assert _outcome(codec, _large_body(first))[0] == "frame"
    got = _outcome(codec, _large_body(second))  # same header bytes, new tensors
    assert got[0] == "frame"
    assert_same_message(second, got[-1])
    assert np.array_equal(got[-1].positions, np.arange(8, 16))


def test_a_header_one_byte_off_a_remembered_one_is_checked_in_full() -> None:
    codec = Codec(REGISTRY, LIMITS)
    body = _large_body(Activations("s", np.arange(8), np.zeros((8, 512), np.float32)))
    codec.decode(np.frombuffer(body, np.uint8).copy())
    bad = body.replace(b"float32", b"floatXX", 1)  # same length, unknown dtype
    with pytest.raises(FrameError, match="unknown dtype 'floatXX'"):
        codec.decode(np.frombuffer(bad, np.uint8).copy())
    with pytest.raises(FrameError, match="length_mismatch"):  # the same header, a short body
        codec.decode(np.frombuffer(body[:-16], np.uint8).copy())
    fields = body.replace(b"\xa1s", b"\xcc\x05", 1)  # session_id "s" -> 5: a bad field
    with pytest.raises(FrameError, match="session_id"):
        codec.decode(np.frombuffer(fields, np.uint8).copy())


@settings(max_examples=150, deadline=None, database=None)
@given(
    rid=st.integers(0, 2**63 - 1),
    kind=st.sampled_from(list(Kind)),
    edits=st.lists(st.tuples(st.integers(0, 160), st.integers(0, 255)), max_size=3),
    resize=st.sampled_from([0, 0, 0, -16, 16, -1]),
)
def test_decoding_with_remembered_headers_equals_decoding_afresh(
    rid: int, kind: Kind, edits: list[tuple[int, int]], resize: int
) -> None:
    """A codec that has seen a valid large frame decodes edited copies of it (header bytes
    changed, body cut or extended) exactly as a fresh codec does: same frame or same error."""
    codec = Codec(REGISTRY, LIMITS)
    body = _large_body(Activations("s", np.arange(8), np.zeros((8, 512), np.float32)), rid, kind)
    assert _outcome(codec, body)[0] == "frame"
    edited = bytearray(body)
    for at, value in edits:
        edited[at] = value
    if resize < 0:
        del edited[resize:]
    elif resize:
        edited += bytes(resize)
    for _ in range(2):  # the second time, the edited header may be the remembered one
        _same_outcome(_outcome(codec, bytes(edited)), _outcome(None, bytes(edited)))


# ----------------------------------------------------------------------------- small-frame paths


@message("test_checked")
@dataclass(frozen=True)
class Checked(Message):
    """A message whose own __post_init__ validates: never built by setting its __dict__."""

    count: int

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError("count must be >= 0")


PLAIN_TYPES = sorted(name for name, s in REGISTRY.by_name.items() if not s.tensor_fields)
EDGE_IDS = [0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1]


def _small_outcome(body: bytes, general: bool) -> tuple:
    """Decoded from a bytearray (as the reader hands small frames over) a frame takes the
    small-frame path where it applies; from a uint8 array, always the general path."""
    buffer = np.frombuffer(body, np.uint8).copy() if general else bytearray(body)
    try:
        frame = Codec(REGISTRY, LIMITS).decode(buffer)
    except FrameError as exc:
        return ("error", exc.code, str(exc))
    return ("frame", frame.kind, frame.request_id, frame.message)


@pytest.mark.parametrize("name", PLAIN_TYPES)
@settings(max_examples=60, deadline=None, database=None)
@given(
    data=st.data(),
    kind=st.sampled_from(list(Kind)),
    rid=st.sampled_from(EDGE_IDS) | st.integers(0, 2**63 - 1),
    edits=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 255)), max_size=3),
    resize=st.sampled_from([0, 0, 0, -1, -3, 1, 4]),
)
def test_small_frames_decode_exactly_as_the_general_path(
    name: str, data: st.DataObject, kind: Kind, rid: int, edits: list, resize: int
) -> None:
    """Valid small frames and edited copies of them (header bytes changed, cut, extended)
    give the same frame or the same error through the small-frame path as through the
    general one."""
    msg = data.draw(message_strategy(REGISTRY.by_name[name]))
    body = bytearray(encode_frame_bytes(Frame(kind, rid, msg), LIMITS)[PREFIX.size :])
    got = _small_outcome(bytes(body), general=False)
    assert got[0] == "frame" and got[1:3] == (kind, rid)
    assert_same_message(msg, got[-1])
    for at, value in edits:
        body[at % len(body)] = value
    if resize < 0:
        del body[resize:]
    elif resize:
        body += bytes(resize)
    _same_outcome(_small_outcome(bytes(body), False), _small_outcome(bytes(body), True))


def test_small_frames_written_otherwise_take_the_general_path() -> None:
    header = {"v": PROTOCOL_VERSION, "k": 1, "i": 5, "m": "ping", "f": {"nonce": 9}}
    canonical = raw_body(header)
    assert _small_outcome(bytes(canonical), False)[:3] == ("frame", Kind.REQUEST, 5)
    # The same header with the request id as an int64 and the keys in another order: valid.
    wide = canonical.replace(b"\xa1i\x05", b"\xa1i\xd3" + (5).to_bytes(8, "big"))
    for body in (wide, raw_body(dict(reversed(header.items())))):
        assert _small_outcome(bytes(body), False)[:3] == ("frame", Kind.REQUEST, 5)
    # A request id past 2**63 - 1 as a uint64: refused by the general checks.
    big = canonical.replace(b"\xa1i\x05", b"\xa1i\xcf" + (2**63).to_bytes(8, "big"))
    assert _small_outcome(bytes(big), False)[:2] == ("error", "bad_header")


def test_small_frame_building_keeps_every_check() -> None:
    codec = Codec(REGISTRY.extend([Checked]), LIMITS)
    header = {"v": PROTOCOL_VERSION, "k": 0, "i": 0, "m": "test_checked", "f": {"count": -1}}
    with pytest.raises(FrameError, match="count must be >= 0"):  # its __post_init__ ran
        codec.decode(raw_body(header))
    for value, text in ((True, "expected int, got bool"), (1.0, "expected int, got float")):
        header["m"], header["f"] = "ping", {"nonce": value}
        with pytest.raises(FrameError, match=text):
            codec.decode(raw_body(header))
    for bad in (Ping(True), Ping(2**64), Ping("1")):  # type: ignore[arg-type]
        with pytest.raises(FrameError, match="ping.nonce"):
            codec.encode(Kind.REQUEST, 1, bad)
    # An int subclass is sent as the int it is (the general check converts it).
    frame = codec.decode(bytearray(codec.encode(Kind.REQUEST, 1, Ping(Kind.END))[0][4:]))
    assert frame.message == Ping(5) and type(frame.message.nonce) is int
    assert codec.encode_fields(Kind.REPLY, 3, Pong, {"nonce": 7}) == encode_frame_bytes(
        Frame(Kind.REPLY, 3, Pong(7)), LIMITS
    )
