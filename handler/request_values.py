"""Request parameter values -> typed Python values, or an :class:`InvalidParameter` naming the problem.

Values arrive as ``bytearray`` (query parameters and multipart text fields) or already parsed (fields of
a JSON body); each parser accepts both. The task modules (``handler/tasks/``) build their per-request
options from these.
"""

from __future__ import annotations

from typing import Any, Sequence

from handler.errors import InvalidParameter


def text(name: str, value: Any) -> Any:
    """Row values are bytearray for query/form fields; JSON values stay as parsed."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("utf-8").strip()
        except UnicodeDecodeError:
            raise InvalidParameter(f"parameter {name!r} is not UTF-8 text") from None
    return value


def number(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise InvalidParameter(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InvalidParameter(f"{name} must be a number, got {value!r}") from None


def integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise InvalidParameter(f"{name} must be an integer, got {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InvalidParameter(f"{name} must be an integer, got {value!r}") from None


def boolean(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "false", "0"):
        return value.lower() in ("true", "1")
    raise InvalidParameter(f"{name} must be true or false, got {value!r}")


def class_ids(value: Any, names: Sequence[str]) -> tuple[int, ...]:
    """``"0,person"`` or ``[0, "person"]`` -> class ids (unique, in the given order). The range is checked
    by the task's options (``Thresholds.validate``)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise InvalidParameter(f"classes must be comma-separated class ids or names (or a JSON list), got {value!r}")
    ids: list[int] = []
    for item in items:
        if isinstance(item, bool):
            raise InvalidParameter(f"classes: {item!r} is neither a class id nor a class name")
        if isinstance(item, int):
            ids.append(item)
            continue
        if not isinstance(item, str) or not item.strip():
            raise InvalidParameter(f"classes: {item!r} is neither a class id nor a class name")
        item = item.strip()
        if item.lstrip("-").isdigit():
            ids.append(int(item))
        elif item in names:
            ids.append(list(names).index(item))
        else:
            shown = ", ".join(list(names)[:10]) + (", ..." if len(names) > 10 else "")
            raise InvalidParameter(f"classes: {item!r} is not a class of this model ({shown})")
    return tuple(dict.fromkeys(ids))
