"""Frame codec (pure): message <-> bytes, with every limit checked before memory is spent.

Wire format of one frame:

    u32 big-endian  body length N (checked against Limits.max_frame before anything is allocated)
    body, N bytes:
      msgpack map   {"v": protocol version, "k": frame kind, "i": request id,
                     "m": message type, "f": {plain fields},
                     "t": [[field, dtype, shape, nbytes, lib], ...]}   ("t" only with tensors)
      zero padding  to a multiple of 16 bytes (from the start of the body)
      per tensor    its raw little-endian C-order bytes, zero-padded to a multiple of 16

Tensors never go through msgpack: the receiver views them in the frame's buffer, and the
16-byte alignment keeps those views aligned for every dtype.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from types import MappingProxyType
from typing import Any, Final, NamedTuple, TypeAlias

import msgpack
import numpy as np

from transport.errors import FrameError
from transport.schema import Message, MessageSchema, Mismatch, Registry, schema_of
from transport.tensors import (
    LIB_NUMPY,
    LIB_TORCH,
    MAX_NDIM,
    WIRE_DTYPES,
    from_wire,
    to_wire,
)

# A received frame body: bytearray for small frames, a uint8 array for large ones.
Body: TypeAlias = bytearray | np.ndarray[Any, np.dtype[np.uint8]]

PROTOCOL_VERSION: Final = 1
PREFIX: Final = struct.Struct(">I")
ALIGN: Final = 16
MAX_REQUEST_ID: Final = 2**63 - 1
_PAD: Final = bytes(ALIGN)
_HEADER_KEYS: Final = frozenset({"v", "k", "i", "m", "f", "t"})
_REQUIRED_KEYS: Final = frozenset({"v", "k", "i", "m", "f"})
_FIRST_HEADER_READ: Final = 4096
_RECENT_HEADERS: Final = 4
_TENSOR_TABLES: Final = 64
# Packed header pieces: the map with 5 (6 with tensors) entries, "v": version, "k": kind.
_HEADER_START: Final = b"\x85\xa1v" + msgpack.packb(PROTOCOL_VERSION) + b"\xa1k"
_TENSOR_HEADER_START: Final = b"\x86" + _HEADER_START[1:]
_NO_TENSORS: Final[Mapping[str, object]] = MappingProxyType({})
_unpackb: Final = msgpack.unpackb


class Kind(IntEnum):
    """What a frame is in the request/stream machinery."""

    NOTIFY = 0  # one-way message; a request id names its subject (cancel, credit) or is 0
    REQUEST = 1  # expects exactly one REPLY with the same id
    REPLY = 2
    STREAM = 3  # opens a server-pushed stream: ITEM* then END with the same id
    ITEM = 4
    END = 5


_KINDS: Final = tuple(Kind)
_KIND_BYTES: Final = tuple(msgpack.packb(int(kind)) for kind in Kind)
# A frame without tensors starts with one of these: 5 entries, "v": version, "k": kind, "i".
_PLAIN_HEADS: Final = tuple(_HEADER_START + k + b"\xa1i" for k in _KIND_BYTES)
# Request ids packed as msgpack uint 16, 32, 64 (big-endian, after the marker at byte 9).
_U16: Final = struct.Struct(">H").unpack_from
_U32: Final = struct.Struct(">I").unpack_from
_U64: Final = struct.Struct(">Q").unpack_from


@dataclass(frozen=True)
class Limits:
    """Bounds on what a peer may make us allocate or parse."""

    max_frame: int = 64 * 1024 * 1024
    max_header: int = 1024 * 1024
    max_tensors: int = 16

    def __post_init__(self) -> None:
        if not 0 < self.max_header <= self.max_frame <= 2**32 - 1:
            raise ValueError("need 0 < max_header <= max_frame < 4 GiB")
        if self.max_tensors < 0:
            raise ValueError("max_tensors must be >= 0")


class Frame(NamedTuple):
    """One decoded frame (a NamedTuple: immutable, and cheaper to build on the hot path)."""

    kind: Kind
    request_id: int
    message: Message


# Builds a Frame from a ready tuple, skipping the generated Python __new__ (hot path).
_new_frame: Final = tuple.__new__


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def encode_frame(frame: Frame, limits: Limits) -> list[bytes | memoryview]:
    """Buffers to write in order (length prefix included); tensor memory is shared, not copied."""
    return Codec(Registry.of([]), limits).encode(*frame)


def encode_frame_bytes(frame: Frame, limits: Limits) -> bytes:
    """The whole frame as one bytes object (tests, fuzzing; copies the tensors)."""
    return b"".join(encode_frame(frame, limits))


def body_length(prefix: bytes | bytearray | memoryview, limits: Limits) -> int:
    """The body length a 4-byte prefix announces; FrameError if it exceeds the limit."""
    (length,) = PREFIX.unpack(prefix)
    if length > limits.max_frame:
        raise FrameError(
            "frame_too_large", f"peer announced a frame of {length} bytes, limit {limits.max_frame}"
        )
    return length


def _unpack_header(body: memoryview, limits: Limits, try_whole: bool = True) -> tuple[object, int]:
    """(header object, bytes it used). Feeds msgpack only the header's bytes, a few KiB at a time."""
    if try_whole and len(body) <= min(_FIRST_HEADER_READ, limits.max_header):
        # Small frames (most of them): parse in place; a frame with tensors raises ExtraData
        # and takes the streaming path below.
        try:
            return msgpack.unpackb(body, raw=False, use_list=False, strict_map_key=True), len(body)
        except msgpack.ExtraData:
            pass
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise FrameError("bad_header", f"header is not valid msgpack ({exc})") from None
    unpacker = msgpack.Unpacker(
        raw=False,
        use_list=False,
        strict_map_key=True,
        read_size=min(_FIRST_HEADER_READ, limits.max_header),  # else it mallocs max_header
        max_buffer_size=limits.max_header,
    )
    fed = 0
    step = _FIRST_HEADER_READ
    while True:
        end = min(len(body), limits.max_header, fed + step)
        unpacker.feed(body[fed:end])
        fed = end
        try:
            return unpacker.unpack(), unpacker.tell()
        except msgpack.OutOfData:
            if fed == len(body):
                raise FrameError("bad_header", "frame ends inside its header") from None
            if fed >= limits.max_header:
                raise FrameError(
                    "header_too_large", f"header longer than the limit of {limits.max_header} bytes"
                ) from None
            step *= 4
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise FrameError("bad_header", f"header is not valid msgpack ({exc})") from None


_DTYPE_SIZES: Final = {name: dtype.itemsize for name, dtype in WIRE_DTYPES.items()}


def _tensor_specs(raw: object, limits: Limits) -> list[tuple[str, str, tuple[int, ...], int, str]]:
    # Runs for every frame with tensors: plain loops and exact type checks (msgpack gives
    # exact ints, strs and tuples; `type(d) is int` also refuses bools, as it must).
    if type(raw) is not tuple:
        raise FrameError("bad_header", "tensor table ('t') must be an array")
    if len(raw) > limits.max_tensors:
        raise FrameError("too_many_tensors", f"{len(raw)} tensors, limit {limits.max_tensors}")
    specs = []
    for index, entry in enumerate(raw):
        if type(entry) is not tuple or len(entry) != 5:
            raise FrameError(
                "bad_tensor", f"tensor #{index}: expected [field, dtype, shape, nbytes, lib]"
            )
        name, dtype, shape, nbytes, lib = entry
        if type(name) is not str:
            raise FrameError("bad_tensor", f"tensor #{index}: field name must be a string")
        itemsize = _DTYPE_SIZES.get(dtype) if type(dtype) is str else None
        if itemsize is None:
            raise FrameError("bad_tensor", f"tensor #{index} ({name}): unknown dtype {dtype!r}")
        count = 1
        if type(shape) is tuple and len(shape) <= MAX_NDIM:
            for d in shape:
                if type(d) is not int or d < 0:
                    count = -1
                    break
                count *= d
        else:
            count = -1
        if count < 0:
            raise FrameError(
                "bad_tensor",
                f"tensor #{index} ({name}): shape must be at most {MAX_NDIM} integers >= 0",
            )
        if type(nbytes) is not int or nbytes != count * itemsize:
            raise FrameError(
                "bad_tensor",
                f"tensor #{index} ({name}): byte length {nbytes!r} != "
                f"shape {list(shape)} x {dtype} size",
            )
        if lib != LIB_NUMPY and lib != LIB_TORCH:
            raise FrameError("bad_tensor", f"tensor #{index} ({name}): unknown library tag {lib!r}")
        specs.append((name, dtype, shape, nbytes, lib))
    return specs


def decode_body(body: Body, registry: Registry, limits: Limits) -> Frame:
    """A frame from its body (the bytes after the length prefix). Never raises anything but
    FrameError. Tensors in the result are views into `body`, which they keep alive."""
    return Codec(registry, limits).decode(body)


class Codec:
    """Encoder and decoder for one connection (reuses its msgpack packer between frames)."""

    def __init__(self, registry: Registry, limits: Limits) -> None:
        self.limits = limits
        self._schemas = dict(registry.by_name)
        self._packer = msgpack.Packer(autoreset=True)
        self._small = min(_FIRST_HEADER_READ, limits.max_header)
        self._max_small = min(limits.max_header, limits.max_frame)  # a frame without tensors
        self._recent: list[_Header] = []  # headers of recent large frames, newest first
        self._named: dict[str, bytes] = {}  # packed "m" entry and "f" key, by message name
        self._named_by_type: dict[type, bytes] = {}  # the same by type (see encode_fields)
        self._plain_types: dict[type, _PlainType | None] = {}  # see encode_small
        # Packed "m" entry and "f" key -> type, for names packed as fixstr (see decode).
        self._named_types: dict[bytes, MessageSchema] = {
            self._name_bytes(schema): schema
            for name, schema in self._schemas.items()
            if len(name.encode()) < 32
        }
        self._tables: dict[tuple[object, ...], bytes] = {}  # packed "t" entries, see encode
        self._probe = 0  # bytes to compare with them: the longest one

    def encode(self, kind: Kind, request_id: int, message: Message) -> list[bytes | memoryview]:
        """Buffers to write in order (length prefix included); tensors are not copied."""
        small = self.encode_small(kind, request_id, message)
        if small is not None:
            return [small]
        return self.encode_tensors(kind, request_id, message)

    def encode_tensors(
        self, kind: Kind, request_id: int, message: Message
    ) -> list[bytes | memoryview]:
        """`encode` for a message type with tensor fields (`encode_small` returned None)."""
        schema = message.__sled_schema__
        plain, tensors = schema.split(message)
        pack = self._packer.pack
        named = self._name_bytes(schema)
        if not tensors:  # only nullable tensor fields, all None
            return [self._small_frame(kind, request_id, named, plain)]
        limits = self.limits
        if len(tensors) > limits.max_tensors:
            raise FrameError(
                "too_many_tensors", f"{len(tensors)} tensors, limit {limits.max_tensors}"
            )
        views: list[memoryview] = []
        described = []
        for name, value in tensors:
            dtype, shape, lib, view = to_wire(value)
            described.append((name, dtype, shape, lib))
            views.append(view)
        # The tensor table depends only on names, dtypes, shapes and libraries (all strs and
        # ints): a series of frames of the same shapes packs it once.
        key = tuple(described)
        table = self._tables.get(key)
        if table is None:
            specs = [
                [n, d, list(sh), v.nbytes, lb] for (n, d, sh, lb), v in zip(key, views, strict=True)
            ]
            table = b"\xa1t" + pack(specs)
            if len(self._tables) >= _TENSOR_TABLES:
                self._tables.clear()
            self._tables[key] = table
        packed = b"".join(
            (
                _TENSOR_HEADER_START,
                _KIND_BYTES[kind],
                b"\xa1i",
                pack(request_id),
                named,
                pack(plain),
                table,
            )
        )
        if len(packed) > limits.max_header:
            self._refuse_header(len(packed))
        head_len = (len(packed) + ALIGN - 1) & -ALIGN
        body_len = head_len
        for view in views:
            body_len += (view.nbytes + ALIGN - 1) & -ALIGN
        if body_len > limits.max_frame:
            raise FrameError(
                "frame_too_large", f"frame of {body_len} bytes, limit {limits.max_frame}"
            )
        out: list[bytes | memoryview] = [
            b"".join((PREFIX.pack(body_len), packed, _PAD[: head_len - len(packed)]))
        ]
        for view in views:
            out.append(view)
            pad = -view.nbytes & (ALIGN - 1)
            if pad:
                out.append(_PAD[:pad])
        return out

    def encode_small(self, kind: Kind, request_id: int, message: Message) -> bytes | None:
        """The whole frame of a message type without tensor fields, as one bytes object;
        None for types with tensor fields (use `encode`)."""
        known = self._plain_types.get(type(message), _UNSEEN)
        if known is _UNSEEN:
            known = self._plain_type(message)
        if known is None:
            return None
        fast, named, schema = known
        plain = fast(message) if fast is not None else None
        if plain is None:  # the general checks convert it or say why not
            try:
                plain = schema.table.outgoing(message)
            except Mismatch as exc:
                raise exc.as_frame_error(schema.name) from None
        pack = self._packer.pack
        # The header map, key by key, in the order {"v", "k", "i", "m", "f"[, "t"]}: the very
        # bytes msgpack gives for that dict, without building it (tests compare the two).
        packed = b"".join((_PLAIN_HEADS[kind], pack(request_id), named, pack(plain)))
        if len(packed) > self._max_small:
            self._refuse_small(len(packed))
        return PREFIX.pack(len(packed)) + packed

    def _plain_type(self, message: Message) -> _PlainType | None:
        """What encode_small needs about a message's type (None: it has tensor fields)."""
        schema = getattr(message, "__sled_schema__", None)
        if schema is None or schema.cls is not type(message):
            schema = schema_of(message)  # raises the TypeError that explains it
        known = (
            None if schema.tensor_fields else (schema.fast_plain, self._name_bytes(schema), schema)
        )
        self._plain_types[schema.cls] = known  # bounded by the message types sent
        return known

    def _name_bytes(self, schema: MessageSchema) -> bytes:
        """The packed "m" entry and "f" key of a message type."""
        named = self._named.get(schema.name)
        if named is None:
            named = self._named[schema.name] = b"\xa1m" + self._packer.pack(schema.name) + b"\xa1f"
        return named

    def encode_fields(
        self, kind: Kind, request_id: int, cls: type[Message], plain: dict[str, object]
    ) -> bytes:
        """The frame of a `cls` message (a type without tensor fields) given its plain fields
        already checked and msgpack-ready, without building the message: for answers made of
        checked input (the connection's pong echoes a decoded ping's nonce)."""
        named = self._named_by_type.get(cls)
        if named is None:
            named = self._named_by_type[cls] = self._name_bytes(cls.__sled_schema__)
        pack = self._packer.pack  # _small_frame, inlined (round-trip path)
        packed = b"".join((_PLAIN_HEADS[kind], pack(request_id), named, pack(plain)))
        if len(packed) > self._max_small:
            self._refuse_small(len(packed))
        return PREFIX.pack(len(packed)) + packed

    def _small_frame(
        self, kind: Kind, request_id: int, named: bytes, plain: dict[str, object]
    ) -> bytes:
        pack = self._packer.pack
        packed = b"".join((_PLAIN_HEADS[kind], pack(request_id), named, pack(plain)))
        if len(packed) > self._max_small:
            self._refuse_small(len(packed))
        return PREFIX.pack(len(packed)) + packed

    def _refuse_small(self, length: int) -> None:
        self._refuse_header(length)
        raise FrameError(
            "frame_too_large", f"frame of {length} bytes, limit {self.limits.max_frame}"
        )

    def _refuse_header(self, length: int) -> None:
        if length > self.limits.max_header:
            raise FrameError(
                "header_too_large", f"header of {length} bytes, limit {self.limits.max_header}"
            )

    def decode(self, body: Body) -> Frame:
        """See `decode_body`."""
        size = len(body)
        small = self._small
        if 16 <= size <= small and type(body) is bytearray and body.startswith(_PLAIN_HEADS):
            # A small frame as this codec writes it: a map of 5 entries, "v": this version,
            # "k": a valid kind, "i": the request id as an unsigned msgpack int, "m": a known
            # type's name, "f": the fields map, nothing after it. msgpack is self-delimiting,
            # so these bytes settle every header check; only the fields go through msgpack
            # (parsing the whole header costs ~6x more: a dict and interned keys per frame).
            # Anything else, valid or not, takes the general path.
            first = body[9]
            if first < 0x80:  # positive fixint
                request_id, at = first, 10
            elif first == 0xCD:  # uint 16 (ids from 256 on)
                request_id, at = _U16(body, 10)[0], 12
            elif first == 0xCC:  # uint 8
                request_id, at = body[10], 11
            elif first == 0xCE:  # uint 32
                request_id, at = _U32(body, 10)[0], 14
            elif first == 0xCF and size > 20:  # uint 64 (shorter: not a whole frame)
                request_id, at = _U64(body, 10)[0], 18
            else:
                request_id, at = -1, 0
            if 0 <= request_id <= MAX_REQUEST_ID and at + 2 < size:
                # "m", a fixstr name and "f": 5 + (marker - 0xA0) bytes (see _name_bytes).
                end = at + body[at + 2] - 0x9B
                schema = self._named_types.get(bytes(body[at:end]))
                if schema is not None:
                    try:  # raw=False and strict_map_key are msgpack's defaults
                        fields = _unpackb(body[end:])
                    except (ValueError, TypeError, msgpack.UnpackException):
                        pass  # not one whole map (ExtraData is a ValueError): general path
                    else:
                        fast = schema.fast_build
                        msg = fast(fields) if fast is not None else None
                        if msg is None:  # arrays come as lists here: the checks take both
                            msg = schema.build(fields, _NO_TENSORS)
                        return _new_frame(Frame, (_KINDS[body[6]], request_id, msg))
        return self._decode(body, size)

    def _decode(self, body: Body, size: int) -> Frame:
        """`decode` of any frame, with every check (its fast path declined this one)."""
        small = self._small
        limits = self.limits
        if size > limits.max_frame:
            raise FrameError("frame_too_large", f"frame of {size} bytes, limit {limits.max_frame}")
        if size > small and self._recent:
            known = self._known_header(body)
            if known is not None:
                return self._with_tensors(known, body, size)
        used = size if size <= small else small
        try:
            # Most headers fit in the first `small` bytes: parse them in place. A frame with
            # tensors then raises ExtraData, which tells where the header ends.
            header = _unpackb(
                body if size <= small else body[:small],
                raw=False,
                use_list=False,
                strict_map_key=True,
            )
        except msgpack.ExtraData as extra:
            header, used = extra.unpacked, used - len(extra.extra)
        except (ValueError, TypeError, msgpack.UnpackException):
            # Invalid, or a header longer than `small`: the incremental parser says which.
            view = memoryview(body) if isinstance(body, bytearray) else body.data
            header, used = _unpack_header(view, limits, try_whole=False)
        if type(header) is not dict:
            raise FrameError("bad_header", f"header must be a map, got {type(header).__name__}")
        try:
            version, kind_value, request_id = header["v"], header["k"], header["i"]
            name, fields = header["m"], header["f"]
        except KeyError:
            missing = sorted(_REQUIRED_KEYS - header.keys())
            raise FrameError("bad_header", f"header lacks keys {missing}") from None
        has_tensors = "t" in header
        if len(header) != 5 + has_tensors:
            unknown = sorted(str(k) for k in header.keys() - _HEADER_KEYS)
            raise FrameError("bad_header", f"unknown header keys {unknown}")
        if type(version) is not int or version != PROTOCOL_VERSION:
            raise FrameError(
                "bad_version",
                f"protocol version {version!r} is not supported "
                f"(this node speaks {PROTOCOL_VERSION})",
            )
        if type(kind_value) is not int or not 0 <= kind_value < len(_KINDS):
            raise FrameError("bad_header", f"unknown frame kind {kind_value!r}")
        if type(request_id) is not int or not 0 <= request_id <= MAX_REQUEST_ID:
            raise FrameError(
                "bad_header", f"request id {request_id!r} is not an integer in [0, 2**63)"
            )
        schema = self._schemas.get(name) if type(name) is str else None
        if schema is None:
            if type(name) is not str:
                raise FrameError("bad_header", "message type ('m') must be a string")
            raise FrameError("unknown_type", f"unknown message type {name!r}")
        if not has_tensors:
            if used != size:
                raise FrameError(
                    "length_mismatch", f"frame has {size} bytes, its header describes {used}"
                )
            return _new_frame(
                Frame, (_KINDS[kind_value], request_id, schema.build(fields, _NO_TENSORS))
            )
        specs = _tensor_specs(header["t"], limits)
        offset = (used + ALIGN - 1) & -ALIGN if specs else used
        placed: list[tuple[str, str, tuple[int, ...], int, str]] = []
        for tname, dtype, shape, nbytes, lib in specs:
            if any(tname == p[0] for p in placed):
                raise FrameError("bad_tensor", f"{name}: tensor {tname!r} sent twice")
            placed.append((tname, dtype, shape, offset, lib))
            offset += (nbytes + ALIGN - 1) & -ALIGN
        head = _Header(b"", _KINDS[kind_value], request_id, schema, fields, tuple(placed), offset)
        frame = self._with_tensors(head, body, size)
        if size > small:  # remember the header of a valid large frame (see _known_header)
            start = body[:used]
            raw = start.tobytes() if isinstance(start, np.ndarray) else bytes(start)
            self._recent = [head._replace(raw=raw), *self._recent[: _RECENT_HEADERS - 1]]
            self._probe = max(len(h.raw) for h in self._recent)
        return frame

    def _known_header(self, body: Body) -> _Header | None:
        """A recent large frame's header if `body` starts with the very same bytes.

        msgpack is self-delimiting: a parser fed these bytes stops after exactly them, so the
        header, and every check made on it, would come out the same. Consecutive frames of a
        stream or a series of notifications share their header (shapes included), and this
        spares them the parsing and validation (the plain fields are still checked by build).
        """
        prefix = body[: self._probe]
        start = prefix.tobytes() if isinstance(prefix, np.ndarray) else bytes(prefix)
        for head in self._recent:
            if start.startswith(head.raw):
                return head
        return None

    def _with_tensors(self, head: _Header, body: Body, size: int) -> Frame:
        _, kind, request_id, schema, fields, placed, expected = head
        if expected != size:
            raise FrameError(
                "length_mismatch", f"frame has {size} bytes, its header describes {expected}"
            )
        tensors = {
            tname: from_wire(body, at, dtype, shape, lib) for tname, dtype, shape, at, lib in placed
        }
        return _new_frame(Frame, (kind, request_id, schema.build(fields, tensors)))


# A message type without tensor fields: its fast_plain, packed name entry, and schema.
_PlainType: TypeAlias = tuple[
    Callable[[Message], dict[str, object] | None] | None, bytes, MessageSchema
]


_UNSEEN: Final[Any] = object()  # a message type encode_small has not looked at yet


class _Header(NamedTuple):
    """A validated header of a frame with tensors, as `Codec._known_header` reuses it."""

    raw: bytes  # its exact bytes (empty until remembered)
    kind: Kind
    request_id: int
    schema: MessageSchema
    fields: object  # plain fields as msgpack gave them; build() checks them per frame
    placed: tuple[
        tuple[str, str, tuple[int, ...], int, str], ...
    ]  # name, dtype, shape, offset, lib
    size: int  # body length the header describes
