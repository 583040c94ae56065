"""The Open Inference Protocol's parameters, read as types: a value of the wrong kind is a 400
with a message naming the parameter (service/v2_infer.py reads the request's, the REST route
its tensors')."""

from __future__ import annotations

import re
import reprlib
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from service.errors import APIError

INTEGER = re.compile(r"\s*[-+]?[0-9]+\s*")
MAX_INTEGER = 2**63 - 1  # an int64 parameter's range: no value past it means anything here
T = TypeVar("T")


def bad_request(message: str) -> APIError:
    return APIError(400, "bad_request", message)


def number(name: str, value: Any) -> float:
    if not isinstance(value, bool) and isinstance(value, int | float | str):
        try:
            return float(value)
        except (ValueError, OverflowError):  # float(10**400) overflows
            pass
    raise bad_request(f"parameter {name}: expected a number, got {reprlib.repr(value)}")


def integer(name: str, value: Any) -> int:
    result = None
    if isinstance(value, int) and not isinstance(value, bool):
        result = value
    elif isinstance(value, float) and value.is_integer():
        result = int(value)
    elif isinstance(value, str) and INTEGER.fullmatch(value) and len(value.strip()) <= 20:
        result = int(value)  # (int() refuses strings of thousands of digits with ValueError)
    if result is None or not -MAX_INTEGER - 1 <= result <= MAX_INTEGER:
        raise bad_request(f"parameter {name}: expected a 64-bit integer, got {reprlib.repr(value)}")
    return result


def text(name: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise bad_request(f"parameter {name}: expected a string, got {value!r}")
    return str(value)


def given(parameters: Mapping[str, Any], name: str, convert: Callable[[str, Any], T]) -> T | None:
    """The parameter `name`, converted; None when not given."""
    return convert(name, parameters[name]) if name in parameters else None


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise bad_request(f"parameter {name}: expected true or false, got {value!r}")
    return value


def check_tensor_parameters(
    kind: str, name: str, parameters: Mapping[str, Any], *allowed: str
) -> None:
    """Tensor parameters other than `allowed` (shared memory, classification) are extensions
    this server does not have."""
    unknown = [p for p in parameters if p not in allowed]
    if unknown:
        raise bad_request(f"{kind} {name!r}: parameter {unknown[0]!r} is not supported")
