"""Typed reads of JSON request fields, each failure naming the field (`param`) it is about.

Shared by the OpenAI and Ollama request parsers. JSON booleans are Python ints, so numeric
readers reject them explicitly: `"max_tokens": true` is a client bug, not 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from agent.service import BadRequestError


class InvalidFieldError(BadRequestError):
    """A request field with a wrong type or value; `param` names it (e.g. "options.top_k")."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def type_name(value: Any) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def require_object(value: Any, param: str | None = None) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        where = f"'{param}'" if param else "the request body"
        raise InvalidFieldError(f"{where} must be a JSON object, got {type_name(value)}", param)
    return value


def optional_str(body: Mapping[str, Any], key: str, param: str | None = None) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        name = param or key
        raise InvalidFieldError(f"'{name}' must be a string, got {type_name(value)}", name)
    return value


def required_str(body: Mapping[str, Any], key: str, param: str | None = None) -> str:
    value = optional_str(body, key, param)
    if value is None:
        name = param or key
        raise InvalidFieldError(f"'{name}' is required", name)
    return value


def optional_bool(body: Mapping[str, Any], key: str, param: str | None = None) -> bool | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        name = param or key
        raise InvalidFieldError(f"'{name}' must be a boolean, got {type_name(value)}", name)
    return value


def optional_number(
    body: Mapping[str, Any],
    key: str,
    param: str | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    name = param or key
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidFieldError(f"'{name}' must be a number, got {type_name(value)}", name)
    number = float(value)
    if not math.isfinite(number):
        raise InvalidFieldError(f"'{name}' must be a finite number", name)
    if minimum is not None and number < minimum:
        raise InvalidFieldError(f"'{name}' must be >= {minimum:g}, got {number:g}", name)
    if maximum is not None and number > maximum:
        raise InvalidFieldError(f"'{name}' must be <= {maximum:g}, got {number:g}", name)
    return number


def optional_int(
    body: Mapping[str, Any],
    key: str,
    param: str | None = None,
    minimum: int | None = None,
    maximum: int | None = None,
) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    name = param or key
    # Some clients send whole numbers as floats (3.0); accept those, refuse 3.5.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidFieldError(f"'{name}' must be an integer, got {type_name(value)}", name)
    if minimum is not None and value < minimum:
        raise InvalidFieldError(f"'{name}' must be >= {minimum}, got {value}", name)
    if maximum is not None and value > maximum:
        raise InvalidFieldError(f"'{name}' must be <= {maximum}, got {value}", name)
    return value


def stop_strings(value: Any, param: str, max_count: int | None = None) -> tuple[str, ...]:
    """A stop field: null, one string or a list of strings (empty strings are dropped)."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise InvalidFieldError(
            f"'{param}' must be a string or an array of strings, got {type_name(value)}", param
        )
    if max_count is not None and len(items) > max_count:
        raise InvalidFieldError(
            f"'{param}' takes at most {max_count} strings, got {len(items)}", param
        )
    return tuple(s for s in items if s)


def reject_if_set(body: Mapping[str, Any], key: str, why: str, param: str | None = None) -> None:
    """Refuse a field that would change what the client expects back, when sled cannot do it."""
    value = body.get(key)
    if value not in (None, False, "", [], {}):
        name = param or key
        raise InvalidFieldError(f"'{name}' is not supported: {why}", name)
