"""Input from someone we do not trust, parsed once into typed, frozen records.

Everything that crosses a trust boundary into virtkit is hostile by assumption: what a VMM process
writes (exit reports, control replies), what a migration peer sends, an API client's body, an
image's config. Two steps, each bounded before any work is done:

1. :func:`load_json`: bytes -> a JSON value, with the size capped *before* parsing, the nesting
   depth checked by a linear scan (CPython's parser recurses, and 200,000 ``[`` end in a
   ``RecursionError`` deep in the C scanner), ``NaN``/``Infinity`` refused, and every failure one
   :class:`UntrustedInput` line naming the source.
2. :func:`parse`: a JSON value -> a frozen dataclass, each field checked against its annotation
   (``int``, ``float``, ``bool``, ``str``, ``bytes``, ``X | None``, ``list[X]``, ``tuple[X, ...]``,
   ``dict[str, X]``, ``Literal[...]``, enums, nested records), with bounds given as
   ``Annotated[int, Bounds(lo=0, hi=255)]``, unknown fields refused (or ignored, where a peer may be newer) and
   missing ones filled from defaults or reported.

And :func:`json_schema` states what :func:`parse` enforces as an OpenAPI 3.0 schema, so a document
published for a record is that record's.

The record is what flows inward; nothing past the edge sees a raw ``dict``.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Final, Literal, TypeVar

from virtkit.errors import VirtkitError

#: nesting deeper than this is refused; no record of ours goes beyond a handful of levels
MAX_DEPTH: Final = 32

T = TypeVar("T")


class UntrustedInput(VirtkitError):
    """Input from outside (a VMM, a peer, a client, an image) is malformed, too large or too deep."""


# --- 1. bytes -> JSON value ------------------------------------------------------------------------

# A JSON string (escapes included) or one bracket: strings are skipped whole, so brackets inside
# them are not counted. Unterminated strings leave their brackets counted, which only errs on the
# side of refusing; json.loads rejects them anyway.
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)
_OPEN = frozenset(b"[{")


def _too_deep(data: bytes, limit: int) -> bool:
    if data.count(b"[") + data.count(b"{") <= limit:  # the common case costs two C scans
        return False
    depth = 0
    for m in _TOKEN.finditer(data):
        c = data[m.start()]
        if c in _OPEN:
            depth += 1
            if depth > limit:
                return True
        elif c != 0x22:  # a closing bracket ('"' starts a string token)
            depth -= 1
    return False


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e999: Infinity by another spelling
        raise ValueError(f"{text[:40]} is beyond the range of a double")
    return value


def load_json(
    data: bytes | bytearray | str,
    *,
    what: str,
    max_bytes: int,
    max_depth: int = MAX_DEPTH,
    object_hook: Callable[[dict[str, Any]], Any] | None = None,
) -> Any:
    """Decode ``data`` (from ``what``: "the exit report of vm1", "HELO from 10.0.0.2:4711"...) as
    JSON. Raises :class:`UntrustedInput` if it is larger than ``max_bytes``, nested deeper than
    ``max_depth``, not UTF-8 or not JSON (``object_hook`` as json.loads; a ValueError it raises is
    reported the same way)."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    if len(raw) > max_bytes:
        raise UntrustedInput(f"{what} is {len(raw)} bytes, more than the {max_bytes} allowed")
    if _too_deep(raw, max_depth):
        raise UntrustedInput(f"{what} is nested more than {max_depth} levels deep")
    try:
        return json.loads(
            raw.decode("utf-8"), parse_constant=_no_constant, parse_float=_finite_float, object_hook=object_hook
        )
    except UnicodeDecodeError:
        raise UntrustedInput(f"{what} is not UTF-8") from None
    except RecursionError:  # cannot happen after the depth check; kept as a second wall
        raise UntrustedInput(f"{what} is nested too deeply") from None
    except ValueError as e:
        raise UntrustedInput(f"{what} is not valid JSON: {e}") from None


def load_object(
    data: bytes | bytearray | str,
    *,
    what: str,
    max_bytes: int,
    max_depth: int = MAX_DEPTH,
    object_hook: Callable[[dict[str, Any]], Any] | None = None,
) -> dict[str, Any]:
    """:func:`load_json`, and the value must be a JSON object."""
    value = load_json(data, what=what, max_bytes=max_bytes, max_depth=max_depth, object_hook=object_hook)
    if not isinstance(value, dict):
        raise UntrustedInput(f"{what} is a JSON {_json_kind(value)}, not an object")
    return value


def _json_kind(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if value is None:
        return "null"
    return "object"


# --- 2. JSON value -> record -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Bounds:
    """Bounds :func:`parse` enforces on a field, given as ``Annotated[int, Bounds(lo=0, hi=255)]``:
    ``lo``/``hi`` for numbers, ``min_len``/``max_len`` for strings, bytes, lists and dicts,
    ``pattern`` (a full match) for strings."""

    lo: float | None = None
    hi: float | None = None
    max_len: int | None = None
    min_len: int | None = None
    pattern: str | None = None


#: the integer widths records hold most
U8 = Annotated[int, Bounds(lo=0, hi=0xFF)]
U16 = Annotated[int, Bounds(lo=0, hi=0xFFFF)]
U32 = Annotated[int, Bounds(lo=0, hi=0xFFFF_FFFF)]
U64 = Annotated[int, Bounds(lo=0, hi=0xFFFF_FFFF_FFFF_FFFF)]
Count = Annotated[int, Bounds(lo=0)]


def _meta(bounds: Bounds) -> dict[str, Any]:
    return {
        "lo": bounds.lo,
        "hi": bounds.hi,
        "max_len": bounds.max_len,
        "min_len": bounds.min_len,
        "pattern": re.compile(bounds.pattern) if bounds.pattern else None,
    }


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls, include_extras=True)
    return hints


def parse(cls: type[T], value: object, *, what: str, unknown: Literal["reject", "ignore"] = "reject") -> T:
    """``value`` (a decoded JSON object) as a ``cls`` record; :class:`UntrustedInput` names the
    first field that is missing, unknown, of the wrong type or out of bounds (``what.field``)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    return typing.cast(T, _record(cls, value, what, unknown))


def _record(cls: type, value: object, path: str, unknown: str) -> object:
    if not isinstance(value, Mapping):
        raise UntrustedInput(f"{path} must be an object, not a {_json_kind(value)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if unknown == "reject":
        extra = sorted(k for k in value if k not in fields)
        if extra:
            names = ", ".join(repr(str(k)[:40]) for k in extra[:5])
            raise UntrustedInput(
                f"{path} has unknown field{'s' if len(extra) > 1 else ''} {names} (known: {', '.join(fields)})"
            )
    hints = _hints(cls)
    kwargs: dict[str, object] = {}
    for name, f in fields.items():
        if name not in value:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise UntrustedInput(f"{path}.{name} is missing")
            continue
        kwargs[name] = _value(hints[name], value[name], f"{path}.{name}", {}, unknown)
    return cls(**kwargs)


def _short_number(x: float) -> str:
    """``x`` for a message: whole numbers in full up to 20 digits, the rest as ``%g``."""
    if isinstance(x, int) or (x.is_integer() and abs(x) < 1e20):
        text = str(int(x))
        return text if len(text) <= 20 else f"{text[:3]}... ({len(text)} digits)"
    return f"{x:g}"


def _check_bounds(v: object, path: str, meta: Mapping[str, Any]) -> None:
    if not meta:
        return
    lo, hi, pattern = meta.get("lo"), meta.get("hi"), meta.get("pattern")
    max_len, min_len = meta.get("max_len"), meta.get("min_len")
    if isinstance(v, int | float) and not isinstance(v, bool):
        if lo is not None and v < lo:
            raise UntrustedInput(f"{path} is {_short_number(v)}, less than {_short_number(lo)}")
        if hi is not None and v > hi:
            raise UntrustedInput(f"{path} is {_short_number(v)}, more than {_short_number(hi)}")
    if isinstance(v, str | bytes | list | tuple | dict):
        if max_len is not None and len(v) > max_len:
            raise UntrustedInput(f"{path} is longer than {max_len}")
        if min_len is not None and len(v) < min_len:
            raise UntrustedInput(f"{path} is shorter than {min_len}")
    if pattern is not None and isinstance(v, str) and not pattern.fullmatch(v):
        raise UntrustedInput(f"{path} {v[:40]!r} does not match {pattern.pattern}")


def _value(tp: Any, v: object, path: str, meta: Mapping[str, Any], unknown: str) -> object:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        bounds = [a for a in tp.__metadata__ if isinstance(a, Bounds)]
        return _value(args[0], v, path, _meta(bounds[0]) if bounds else meta, unknown)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _value(options[0], v, path, meta, unknown)
        for a in options:  # e.g. int | str: the first that fits
            try:
                return _value(a, v, path, meta, unknown)
            except UntrustedInput:
                continue
        raise UntrustedInput(f"{path} has the wrong type ({_json_kind(v)})")
    if origin is Literal:
        if v not in args or isinstance(v, bool) != any(isinstance(a, bool) for a in args):
            raise UntrustedInput(f"{path} must be one of {', '.join(repr(a) for a in args)}")
        return v
    if origin in (list, tuple):
        if not isinstance(v, list):
            raise UntrustedInput(f"{path} must be an array, not a {_json_kind(v)}")
        _check_bounds(v, path, meta)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(v) != len(args):
                raise UntrustedInput(f"{path} must have {len(args)} elements")
            pairs = enumerate(zip(args, v, strict=True))
            return tuple(_value(a, x, f"{path}[{i}]", {}, unknown) for i, (a, x) in pairs)
        item = args[0] if args else Any
        out = [_value(item, x, f"{path}[{i}]", {}, unknown) for i, x in enumerate(v)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(v, dict):
            raise UntrustedInput(f"{path} must be an object, not a {_json_kind(v)}")
        _check_bounds(v, path, meta)
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _value(vt, x, f"{path}.{k}", {}, unknown) for k, x in v.items()}
    if tp is Any or tp is object:
        return v
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _record(tp, v, path, unknown)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(v)
        except ValueError:
            raise UntrustedInput(f"{path} must be one of {', '.join(repr(m.value) for m in tp)}") from None
    if tp is bool:
        if not isinstance(v, bool):
            raise UntrustedInput(f"{path} must be true or false, not a {_json_kind(v)}")
        return v
    if tp is int:
        if not isinstance(v, int) or isinstance(v, bool):
            raise UntrustedInput(f"{path} must be an integer, not a {_json_kind(v)}")
        _check_bounds(v, path, meta)
        return v
    if tp is float:
        if not isinstance(v, int | float) or isinstance(v, bool):
            raise UntrustedInput(f"{path} must be a number, not a {_json_kind(v)}")
        try:
            f = float(v)
        except OverflowError:  # an integer of 400 digits is valid JSON
            raise UntrustedInput(f"{path} is beyond the range of a double") from None
        _check_bounds(f, path, meta)
        return f
    if tp is bytes:  # what the snapshot format's {"$bytes": ...} decodes to
        if not isinstance(v, bytes):
            raise UntrustedInput(f"{path} must be a byte string, not a {_json_kind(v)}")
        _check_bounds(v, path, meta)
        return v
    if tp is str:
        if not isinstance(v, str):
            raise UntrustedInput(f"{path} must be a string, not a {_json_kind(v)}")
        _check_bounds(v, path, meta)
        return v
    raise TypeError(f"records cannot hold a {tp!r} ({path})")


def _plain(v: object) -> object:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def to_json(record: object) -> dict[str, Any]:
    """A record back as a JSON-ready dict (enums by value, tuples as lists)."""
    return typing.cast(dict[str, Any], _plain(record))


# --- 3. record -> schema ---------------------------------------------------------------------------

#: the key of a field's ``dataclasses.field(metadata=...)`` whose text becomes its schema description
DESCRIPTION: Final = "description"


def _anchored(pattern: str) -> str:
    """``pattern`` as :func:`parse` applies it (a full match), written for a search (JSON Schema's
    ``pattern`` is an unanchored ECMA-262 regular expression)."""
    if pattern.startswith("^") and pattern.endswith("$") and not pattern.endswith("\\$"):
        return pattern
    return f"^(?:{pattern})$"


def _bounds_schema(kind: str, b: Bounds) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if kind in ("integer", "number"):
        if b.lo is not None:
            out["minimum"] = int(b.lo) if kind == "integer" and float(b.lo).is_integer() else b.lo
        if b.hi is not None:
            out["maximum"] = int(b.hi) if kind == "integer" and float(b.hi).is_integer() else b.hi
    sizes = {"string": "Length", "array": "Items", "object": "Properties"}.get(kind)
    if sizes is not None:
        if b.min_len is not None:
            out[f"min{sizes}"] = b.min_len
        if b.max_len is not None:
            out[f"max{sizes}"] = b.max_len
    if kind == "string" and b.pattern is not None:
        out["pattern"] = _anchored(b.pattern)
    return out


def _literal_kind(values: tuple[object, ...]) -> str:
    kinds = {_json_kind(v) if not isinstance(v, int) or isinstance(v, bool) else "integer" for v in values}
    if len(kinds) != 1:
        raise TypeError(f"a Literal of mixed types {values!r} has no single schema type")
    kind = kinds.pop()
    return "boolean" if kind == "boolean" else kind


def _type_schema(tp: Any, bounds: Bounds | None) -> dict[str, Any]:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        found = [a for a in tp.__metadata__ if isinstance(a, Bounds)]
        return _type_schema(args[0], found[0] if found else bounds)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) != 1:
            raise TypeError(f"a union of {options!r} has no OpenAPI 3.0 schema here")
        out = _type_schema(options[0], bounds)
        if type(None) in args:
            out["nullable"] = True
        return out
    if origin is Literal:
        return {"type": _literal_kind(args), "enum": list(args)}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        values = tuple(m.value for m in tp)
        return {"type": _literal_kind(values), "enum": list(values)}
    if origin in (list, tuple):
        out = {"type": "array"}
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            items = []
            for a in args:  # OpenAPI 3.0 has no per-position items: each is one of these
                sub = _type_schema(a, None)
                if sub not in items:
                    items.append(sub)
            out.update(items=items[0] if len(items) == 1 else {"anyOf": items}, minItems=len(args), maxItems=len(args))
        else:
            out["items"] = _type_schema(args[0], None) if args else {}
        out.update(_bounds_schema("array", bounds) if bounds else {})
        return out
    if origin is dict:
        out = {"type": "object", "additionalProperties": _type_schema(args[1], None) if len(args) == 2 else {}}
        out.update(_bounds_schema("object", bounds) if bounds else {})
        return out
    if tp is Any or tp is object:
        return {}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return json_schema(tp)
    kind = {bool: "boolean", int: "integer", float: "number", str: "string"}.get(tp)
    if kind is None:
        raise TypeError(f"records of {tp!r} have no JSON schema")
    out = {"type": kind}
    out.update(_bounds_schema(kind, bounds) if bounds else {})
    return out


def _default(f: dataclasses.Field[Any]) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def json_schema(cls: type, *, unknown: Literal["reject", "ignore"] = "reject") -> dict[str, Any]:
    """The OpenAPI 3.0 schema (a subset of JSON Schema) of what :func:`parse` accepts as a ``cls``
    record: types, bounds, enums, ``nullable`` for ``X | None``, defaults, the fields without a
    default as ``required``, and (``unknown="reject"``) ``additionalProperties: false``. A field's
    ``metadata={"description": ...}`` becomes its description."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = _hints(cls)
    props: dict[str, Any] = {}
    required: list[str] = []
    for f in dataclasses.fields(cls):
        prop = _type_schema(hints[f.name], None)
        default = _default(f)
        if default is dataclasses.MISSING:
            required.append(f.name)
        elif default is not None or prop.get("nullable"):
            prop["default"] = _plain(default)
        if f.metadata.get(DESCRIPTION):
            prop["description"] = f.metadata[DESCRIPTION]
        props[f.name] = prop
    out: dict[str, Any] = {"type": "object"}
    if required:
        out["required"] = required
    out["properties"] = props
    if unknown == "reject":
        out["additionalProperties"] = False
    return out
