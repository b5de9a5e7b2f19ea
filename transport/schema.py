"""Message schemas: frozen dataclasses whose annotated fields are validated generically.

Adding a message type is a few lines, and the codec needs nothing else:

    @message("verify_request")
    @dataclass(frozen=True)
    class VerifyRequest(Message):
        session_id: str
        tokens: Tensor
        draft_probs: Tensor | None = None

Field annotations may be int, float, str, bytes, bool, `X | None`, `tuple[X, ...]`,
`dict[str, X]`, a nested frozen dataclass (sent as a map), or `Tensor` (top-level fields only;
sent out of band as raw bytes). Values are checked both when sending (a bug surfaces at the
sender, not as a closed connection) and when receiving (a peer's bad input is refused).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias, TypeVar

from transport.errors import FrameError
from transport.tensors import is_tensor

if TYPE_CHECKING:
    import numpy as np
    import torch

    Tensor: TypeAlias = np.ndarray[Any, Any] | torch.Tensor
else:

    class Tensor:
        """Annotation marker for tensor fields (numpy array or torch tensor at runtime)."""


class Message:
    """Base of every wire message. Subclasses are frozen dataclasses decorated with `message`."""

    __sled_schema__: ClassVar[MessageSchema]


M = TypeVar("M", bound=Message)


class Mismatch(Exception):
    """A value did not fit its annotation; `where` collects the path as it propagates up."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text
        self.where: list[str] = []

    def at(self, part: str) -> Mismatch:
        self.where.append(part)
        return self

    def as_frame_error(self, root: str) -> FrameError:
        return FrameError("bad_field", f"{root}{''.join(reversed(self.where))}: {self.text}")


class ValueSpec:
    """How one annotated type is checked and converted in each direction (no paths on the
    happy path: building them eagerly cost more than the checks)."""

    label = "value"

    def outgoing(self, value: object) -> object:
        """Checks a Python value and returns its msgpack-ready form."""
        raise NotImplementedError

    def incoming(self, value: object) -> object:
        """Checks a decoded msgpack value and returns the Python value."""
        raise NotImplementedError

    def mismatch(self, value: object) -> Mismatch:
        return Mismatch(f"expected {self.label}, got {type(value).__name__}")


def _int(value: object) -> object:
    # msgpack carries int64 and uint64; bool is an int to Python but not on the wire
    if type(value) is int and -(2**63) <= value < 2**64:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**64:
        return int(value)  # an IntEnum or other int subclass
    raise _mismatch("int", value)


def _float(value: object) -> object:
    if type(value) is float:
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise _mismatch("float", value)


def _str(value: object) -> object:
    if isinstance(value, str):
        return value
    raise _mismatch("str", value)


def _bytes(value: object) -> object:
    if type(value) is bytes:
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise _mismatch("bytes", value)


def _bool(value: object) -> object:
    if isinstance(value, bool):
        return value
    raise _mismatch("bool", value)


def _mismatch(label: str, value: object) -> Mismatch:
    return Mismatch(f"expected {label}, got {type(value).__name__}")


_SCALAR_CHECKS: Mapping[type, Callable[[object], object]] = MappingProxyType(
    {int: _int, float: _float, str: _str, bytes: _bytes, bool: _bool}
)


@dataclass(frozen=True)
class ScalarSpec(ValueSpec):
    """int, float, str, bytes or bool: the same check both ways."""

    python_type: type

    @property
    def label(self) -> str:  # type: ignore[override]
        return self.python_type.__name__

    def __post_init__(self) -> None:
        # Bound once: the checks run for every field of every frame.
        check = _SCALAR_CHECKS[self.python_type]
        object.__setattr__(self, "outgoing", check)
        object.__setattr__(self, "incoming", check)


@dataclass(frozen=True)
class OptionalSpec(ValueSpec):
    inner: ValueSpec

    @property
    def label(self) -> str:  # type: ignore[override]
        return f"{self.inner.label} or None"

    def outgoing(self, value: object) -> object:
        return None if value is None else self.inner.outgoing(value)

    def incoming(self, value: object) -> object:
        return None if value is None else self.inner.incoming(value)


@dataclass(frozen=True)
class TupleSpec(ValueSpec):
    """`tuple[X, ...]`: a msgpack array."""

    item: ValueSpec

    @property
    def label(self) -> str:  # type: ignore[override]
        return f"array of {self.item.label}"

    def _convert(self, value: object, check: Callable[[object], object]) -> list[object]:
        if not isinstance(value, (tuple, list)):
            raise self.mismatch(value)
        out = []
        for v in value:
            try:
                out.append(check(v))
            except Mismatch as exc:
                raise exc.at(f"[{len(out)}]") from None
        return out

    def outgoing(self, value: object) -> object:
        return self._convert(value, self.item.outgoing)

    def incoming(self, value: object) -> object:
        return tuple(self._convert(value, self.item.incoming))


@dataclass(frozen=True)
class DictSpec(ValueSpec):
    """`dict[str, X]`: a msgpack map with string keys."""

    value: ValueSpec

    @property
    def label(self) -> str:  # type: ignore[override]
        return f"map of str to {self.value.label}"

    def _convert(self, value: object, check: Callable[[object], object]) -> object:
        if not isinstance(value, dict):
            raise self.mismatch(value)
        out: dict[str, object] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise Mismatch(f"map key {key!r} is not a string")
            try:
                out[key] = check(item)
            except Mismatch as exc:
                raise exc.at(f"[{key!r}]") from None
        return out

    def outgoing(self, value: object) -> object:
        return self._convert(value, self.value.outgoing)

    def incoming(self, value: object) -> object:
        return self._convert(value, self.value.incoming)


@dataclass(frozen=True)
class FieldSpec:
    name: str
    spec: ValueSpec | None  # None for tensor fields
    required: bool
    nullable: bool


@dataclass(frozen=True)
class FieldTable:
    """The plain (non-tensor) fields of a record or message, checked as a msgpack map.

    The (name, exact type, check) triples are precomputed: these loops run for every frame. A
    scalar value of exactly the field's type (an int within msgpack's range) is taken as is,
    which is what its check would return, without calling the check.
    """

    fields: tuple[FieldSpec, ...]
    names: frozenset[str]
    incoming_checks: tuple[tuple[str, type | None, Callable[[object], object], bool], ...]
    outgoing_checks: tuple[tuple[str, type | None, Callable[[object], object]], ...]

    @staticmethod
    def of(fields: Iterable[FieldSpec]) -> FieldTable:
        plain = tuple(f for f in fields if f.spec is not None)
        return FieldTable(
            plain,
            frozenset(f.name for f in plain),
            tuple((f.name, _exact(f.spec), f.spec.incoming, f.required) for f in plain if f.spec),
            tuple((f.name, _exact(f.spec), f.spec.outgoing) for f in plain if f.spec),
        )

    def incoming(self, raw: Mapping[Any, object]) -> dict[str, object]:
        out: dict[str, object] = {}
        for name, exact, check, required in self.incoming_checks:
            if name in raw:
                value = raw[name]
                if type(value) is not exact or (exact is int and not _INT_MIN <= value < _INT_END):  # type: ignore[operator]
                    try:
                        value = check(value)
                    except Mismatch as exc:
                        raise exc.at(f".{name}") from None
                out[name] = value
            elif required:
                raise Mismatch(f"required field {name!r} is missing")
        if len(out) != len(raw):  # cheaper than a key-set comparison when all is well
            unknown = sorted(str(k) for k in raw if k not in self.names)
            raise Mismatch(f"unknown field(s) {unknown}")
        return out

    def outgoing(self, value: object) -> dict[str, object]:
        out: dict[str, object] = {}
        for name, exact, check in self.outgoing_checks:
            item = getattr(value, name)
            if type(item) is not exact or (exact is int and not _INT_MIN <= item < _INT_END):  # type: ignore[operator]
                try:
                    item = check(item)
                except Mismatch as exc:
                    raise exc.at(f".{name}") from None
            out[name] = item
        return out


# msgpack's integer range: what _int accepts without converting (chained comparisons:
# `in range(...)` is several times slower for bounds this large).
_INT_MIN = -(2**63)
_INT_END = 2**64


def _exact(spec: ValueSpec) -> type | None:
    """The type whose values a scalar spec's check returns unchanged (None: always check)."""
    return spec.python_type if isinstance(spec, ScalarSpec) else None


def _dataclass_fields(cls: type, allow_tensors: bool) -> tuple[FieldSpec, ...]:
    hints = typing.get_type_hints(cls)
    fields = []
    for field in dataclasses.fields(cls):
        annotation = hints[field.name]
        nullable = _is_union(annotation) and type(None) in typing.get_args(annotation)
        required = (
            field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        )
        where = f"{cls.__name__}.{field.name}"
        if _strip_none(annotation, where) is Tensor:
            if not allow_tensors:
                raise TypeError(f"{where}: tensors only as top-level message fields")
            fields.append(FieldSpec(field.name, None, required, nullable))
        else:
            fields.append(FieldSpec(field.name, value_spec(annotation, where), required, nullable))
    return tuple(fields)


@dataclass(frozen=True)
class RecordSpec(ValueSpec):
    """A nested frozen dataclass (not itself a message), sent as a map of its fields."""

    cls: type
    table: FieldTable

    @property
    def label(self) -> str:  # type: ignore[override]
        return self.cls.__name__

    def outgoing(self, value: object) -> object:
        if not isinstance(value, self.cls):
            raise self.mismatch(value)
        return self.table.outgoing(value)

    def incoming(self, value: object) -> object:
        if not isinstance(value, dict):
            raise self.mismatch(value)
        try:
            return self.cls(**self.table.incoming(value))
        except (TypeError, ValueError) as exc:  # the record's own __post_init__ refused it
            raise Mismatch(str(exc)) from None


def _is_union(annotation: object) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _strip_none(annotation: object, where: str) -> object:
    if not _is_union(annotation):
        return annotation
    rest = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(rest) != 1:
        raise TypeError(f"{where}: unions other than `X | None` are not supported ({annotation})")
    return rest[0]


_SCALARS: Mapping[object, ValueSpec] = MappingProxyType(
    {t: ScalarSpec(t) for t in (int, float, str, bytes, bool)}
)


def value_spec(annotation: object, where: str) -> ValueSpec:
    """The checker for one field annotation; TypeError names the field if it is unsupported."""
    if _is_union(annotation):
        return OptionalSpec(value_spec(_strip_none(annotation, where), where))
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return TupleSpec(value_spec(args[0], where))
    if origin is dict and len(args) == 2 and args[0] is str:
        return DictSpec(value_spec(args[1], where))
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        if issubclass(annotation, Message):
            raise TypeError(f"{where}: nest plain dataclasses, not messages")
        if not annotation.__dataclass_params__.frozen:  # type: ignore[attr-defined]
            raise TypeError(f"{where}: nested dataclass {annotation.__name__} must be frozen")
        fields = _dataclass_fields(annotation, allow_tensors=False)
        return RecordSpec(annotation, FieldTable.of(fields))
    raise TypeError(f"{where}: unsupported field type {annotation!r}")


@dataclass(frozen=True)
class MessageSchema:
    """What the codec needs to know about one message type."""

    name: str
    cls: type[Message]
    table: FieldTable
    tensor_fields: tuple[FieldSpec, ...]
    tensor_names: frozenset[str]
    # Number of fields once all are given, when instances may then be made by filling their
    # __dict__ (see `_direct`); -1 when they must go through the class.
    direct_fields: int = -1
    # For types whose fields are all plain scalars (see `_compile_fast`): the message from
    # decoded fields when all are present and of their exact types, else None (then `build`
    # decides); and the msgpack-ready fields of a message under the same condition.
    fast_build: Callable[[object], Message | None] | None = None
    fast_plain: Callable[[Message], dict[str, object] | None] | None = None

    def split(self, msg: Message) -> tuple[dict[str, object], list[tuple[str, object]]]:
        """(msgpack-ready plain fields, [(name, tensor)]) of an outgoing message, validated."""
        try:
            plain = self.table.outgoing(msg)
        except Mismatch as exc:
            raise exc.as_frame_error(self.name) from None
        tensors: list[tuple[str, object]] = []
        for f in self.tensor_fields:
            value = getattr(msg, f.name)
            if value is None and f.nullable:
                continue
            if not is_tensor(value):
                raise FrameError(
                    "bad_field",
                    f"{self.name}.{f.name}: expected a tensor, got {type(value).__name__}",
                )
            tensors.append((f.name, value))
        return plain, tensors

    def build(self, plain: object, tensors: Mapping[str, object]) -> Message:
        """The message from decoded plain fields and tensors; FrameError if anything is off."""
        if not isinstance(plain, dict):
            raise FrameError("bad_header", f"{self.name}: fields ('f') must be a map")
        try:
            values = self.table.incoming(plain)
        except Mismatch as exc:
            raise exc.as_frame_error(self.name) from None
        if tensors or self.tensor_fields:
            if not self.tensor_names.issuperset(tensors):
                stray = sorted(name for name in tensors if name not in self.tensor_names)
                raise FrameError("bad_tensor", f"{self.name}: no tensor field(s) named {stray}")
            for f in self.tensor_fields:
                if f.name in tensors:
                    values[f.name] = tensors[f.name]
                elif f.required and not f.nullable:
                    raise FrameError(
                        "bad_field", f"{self.name}: required tensor {f.name!r} is missing"
                    )
                elif f.required:
                    values[f.name] = None
        if len(values) == self.direct_fields:
            # Every field given and checked: what the generated __init__ would store.
            msg = _new_object(self.cls)
            msg.__dict__.update(values)
            return msg
        try:
            return self.cls(**values)
        except (TypeError, ValueError) as exc:  # the message's own __post_init__ refused it
            raise FrameError("bad_field", f"{self.name}: {exc}") from None


def message(name: str) -> Callable[[type[M]], type[M]]:
    """Class decorator: give a frozen dataclass a wire name and a checked schema."""

    def register(cls: type[M]) -> type[M]:
        if not (dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen):
            raise TypeError(f"{cls.__name__}: apply @message on top of @dataclass(frozen=True)")
        if not issubclass(cls, Message):
            raise TypeError(
                f"{cls.__name__}: message classes must subclass transport.schema.Message"
            )
        fields = _dataclass_fields(cls, allow_tensors=True)
        tensor_fields = tuple(f for f in fields if f.spec is None)
        table = FieldTable.of(fields)
        direct = _direct(cls)
        cls.__sled_schema__ = MessageSchema(
            name,
            cls,
            table,
            tensor_fields,
            frozenset(f.name for f in tensor_fields),
            len(fields) if direct else -1,
            *(_compile_fast(cls, table) if direct and not tensor_fields else (None, None)),
        )
        return cls

    return register


_new_object = object.__new__


def _direct(cls: type) -> bool:
    """True when filling a new instance's __dict__ with its checked field values builds it
    exactly as `cls(**values)` would: dataclass's own generated __init__ (its code comes from a
    string), every field an init field, no __post_init__, and instances with a __dict__."""
    init = getattr(cls.__init__, "__code__", None)  # type: ignore[misc]
    return (
        init is not None
        and init.co_filename == "<string>"
        and all(f.init for f in dataclasses.fields(cls))
        and not hasattr(cls, "__post_init__")
        and cls.__dictoffset__ != 0
    )


def _compile_fast(
    cls: type, table: FieldTable
) -> tuple[Callable[[object], Message | None] | None, Callable[[Message], Any] | None]:
    """Straight-line code for the usual case of a message whose fields are all int, float,
    str, bytes or bool (generated, as dataclass generates __init__: these run for every
    small frame, and a loop over field specs costs several times more). They accept exactly
    what FieldTable's checks return unchanged, and leave everything else to them."""
    exact = [e for _, e, _, _ in table.incoming_checks]
    if None in exact:
        return None, None
    names = [f.name for f in table.fields]
    namespace: dict[str, object] = {
        "cls": cls,
        "new": _new_object,
        "MIN": _INT_MIN,
        "END": _INT_END,
    }
    tests = []
    for i, kind in enumerate(exact):
        assert kind is not None
        namespace[f"T{i}"] = kind
        tests.append(f"type(v{i}) is T{i}" + (f" and MIN <= v{i} < END" if kind is int else ""))
    ok = " and ".join(tests) or "True"
    values = "{" + ", ".join(f"{name!r}: v{i}" for i, name in enumerate(names)) + "}"
    missing = "f"  # f.get(name, f): a missing field reads as the dict itself, never a scalar
    source = "\n".join(
        [
            "def fast_build(f):",
            f"    if type(f) is dict and len(f) == {len(names)}:",
            *(f"        v{i} = f.get({name!r}, {missing})" for i, name in enumerate(names)),
            f"        if {ok}:",
            "            m = new(cls)",
            # Item by item into the instance's own (key-sharing) dict, in field order, as the
            # generated __init__ stores them: a third cheaper than assigning a new __dict__.
            *(["            d = m.__dict__"] if names else []),
            *(f"            d[{name!r}] = v{i}" for i, name in enumerate(names)),
            "            return m",
            "    return None",
            "def fast_plain(m):",
            *(f"    v{i} = m.{name}" for i, name in enumerate(names)),
            f"    if {ok}:",
            f"        return {values}",
            "    return None",
        ]
    )
    exec(source, namespace)  # noqa: S102 (names are dataclass field identifiers)
    return namespace["fast_build"], namespace["fast_plain"]  # type: ignore[return-value]


def schema_of(msg: Message) -> MessageSchema:
    """The schema of a message instance; TypeError for classes never decorated."""
    schema = getattr(type(msg), "__sled_schema__", None)
    if schema is None or schema.cls is not type(msg):
        raise TypeError(f"{type(msg).__name__} is not a registered message (use @message)")
    return schema


@dataclass(frozen=True)
class Registry:
    """The message types a node understands, by wire name. Immutable; `extend` returns a new one."""

    by_name: Mapping[str, MessageSchema]

    @staticmethod
    def of(classes: Iterable[type[Message]]) -> Registry:
        by_name: dict[str, MessageSchema] = {}
        for cls in classes:
            schema = getattr(cls, "__sled_schema__", None)
            if schema is None or schema.cls is not cls:
                raise TypeError(f"{cls.__name__} is not decorated with @message")
            if schema.name in by_name and by_name[schema.name].cls is not cls:
                raise ValueError(f"message name {schema.name!r} used by two classes")
            by_name[schema.name] = schema
        return Registry(MappingProxyType(by_name))

    def extend(self, classes: Iterable[type[Message]]) -> Registry:
        return Registry.of([s.cls for s in self.by_name.values()] + list(classes))

    def get(self, name: str) -> MessageSchema | None:
        return self.by_name.get(name)
