"""virtkit.records: hostile JSON is bounded before it is parsed, and parsed into typed records."""

from __future__ import annotations

import contextlib
import enum
import json
from dataclasses import dataclass, field
from typing import Annotated, Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtkit.records import U64, Bounds, UntrustedInput, load_json, load_object, parse, to_json


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass(frozen=True, slots=True)
class Inner:
    gpa: U64
    size: Annotated[int, Bounds(lo=1)]


@dataclass(frozen=True, slots=True)
class Outer:
    name: Annotated[str, Bounds(max_len=8, pattern=r"[a-z]+")]
    count: Annotated[int, Bounds(lo=0, hi=10)]
    ratio: float = 1.0
    on: bool = False
    color: Color = Color.RED
    mode: Literal["full", "para"] = "full"
    note: str | None = None
    regions: tuple[Inner, ...] = ()
    tags: dict[str, int] | None = None
    pair: tuple[Annotated[int, Bounds(hi=3)], str] | None = None


def test_a_valid_object_becomes_a_record() -> None:
    rec = parse(
        Outer,
        {
            "name": "vm",
            "count": 3,
            "ratio": 2,
            "on": True,
            "color": "blue",
            "mode": "para",
            "regions": [{"gpa": 0, "size": 4096}],
            "tags": {"a": 1},
        },
        what="def",
    )
    assert rec == Outer("vm", 3, 2.0, True, Color.BLUE, "para", None, (Inner(0, 4096),), {"a": 1}, None)
    assert to_json(rec)["color"] == "blue"
    assert to_json(rec)["regions"] == [{"gpa": 0, "size": 4096}]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"count": 1}, "def.name is missing"),
        ({"name": "vm", "count": 1, "evil": 1}, "unknown field 'evil'"),
        ({"name": "vm", "count": True}, "def.count must be an integer, not a boolean"),
        ({"name": "vm", "count": 11}, "def.count is 11, more than 10"),
        ({"name": "vm", "count": -1}, "less than 0"),
        ({"name": "toolongname", "count": 1}, "def.name is longer than 8"),
        ({"name": "VM", "count": 1}, "does not match"),
        ({"name": "vm", "count": 1, "color": "green"}, "def.color must be one of"),
        ({"name": "vm", "count": 1, "mode": "other"}, "def.mode must be one of"),
        ({"name": "vm", "count": 1, "regions": [{"gpa": -1, "size": 1}]}, "def.regions[0].gpa is -1"),
        ({"name": "vm", "count": 1, "regions": {}}, "def.regions must be an array"),
        ({"name": "vm", "count": 1, "tags": {"a": "x"}}, "def.tags.a must be an integer"),
        ({"name": "vm", "count": 1, "pair": [4, "x"]}, "def.pair[0] is 4, more than 3"),
        ({"name": "vm", "count": 1, "pair": [1]}, "def.pair must have 2 elements"),
        ([1, 2], "def must be an object, not a array"),
        ("text", "def must be an object"),
    ],
)
def test_what_does_not_fit_is_refused_with_the_field_named(value: object, message: str) -> None:
    with pytest.raises(UntrustedInput, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        parse(Outer, value, what="def")


def test_unknown_fields_can_be_ignored_for_a_newer_peer() -> None:
    assert parse(Inner, {"gpa": 1, "size": 2, "new": 3}, what="x", unknown="ignore") == Inner(1, 2)


@pytest.mark.parametrize("depth", [33, 1000, 200_000])
def test_deep_nesting_is_refused_before_the_parser_recurses(depth: int) -> None:
    for doc in (b"[" * depth, b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth):
        with pytest.raises(UntrustedInput, match="nested more than 32"):
            load_json(doc, what="report", max_bytes=1 << 30)


def test_nesting_within_the_limit_and_brackets_in_strings_pass() -> None:
    assert load_json(b"[" * 32 + b"]" * 32, what="x", max_bytes=1000) == eval("[" * 32 + "]" * 32)
    text = json.dumps({"s": "[[[[" * 1000 + '\\"[[', "t": ["{" * 100]})
    assert load_object(text, what="x", max_bytes=1 << 20)["s"].startswith("[[[[")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"x" * 101, "is 101 bytes, more than the 100 allowed"),
        (b"\xff\xfe", "not UTF-8"),
        (b"{", "not valid JSON"),
        (b"NaN", "not valid JSON"),
        (b"[Infinity]", "not valid JSON"),
        (b"1" * 5000, "not valid JSON"),  # more digits than int() converts
        (b"1e999", "not valid JSON"),  # overflows to inf: Infinity by another spelling
        (b"[-1e400]", "not valid JSON"),
    ],
)
def test_malformed_input_is_one_line(data: bytes, message: str) -> None:
    with pytest.raises(UntrustedInput, match=message) as e:
        load_json(data, what="reply", max_bytes=100 if len(data) > 100 and message.startswith("is") else 10_000)
    assert "\n" not in str(e.value)


def test_an_object_is_required_where_asked() -> None:
    with pytest.raises(UntrustedInput, match="is a JSON array, not an object"):
        load_object(b"[]", what="report", max_bytes=10)


@pytest.mark.parametrize("big", [10**400, -(10**400)], ids=["positive", "negative"])
def test_an_integer_beyond_float_range_in_a_float_field_is_refused(big: int) -> None:
    # valid JSON (400 digits is under int()'s limit), and float() of it raised OverflowError
    with pytest.raises(UntrustedInput, match="fuzz.ratio"):
        parse(Outer, {"name": "a", "count": 1, "ratio": big}, what="fuzz")


@given(st.binary(max_size=300))
def test_any_bytes_give_a_value_or_untrusted_input(data: bytes) -> None:
    with contextlib.suppress(UntrustedInput):
        load_json(data, what="fuzz", max_bytes=200)


@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.integers(-(10**400), 10**400)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=5),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3),
        max_leaves=20,
    )
)
def test_any_json_value_gives_a_record_or_untrusted_input(value: object) -> None:
    with contextlib.suppress(UntrustedInput):
        parse(Outer, value, what="fuzz")


# --- json_schema: the schema of what parse accepts -------------------------------------------------


def test_the_schema_of_a_record_states_what_parse_enforces() -> None:
    from virtkit.records import json_schema

    schema = json_schema(Outer)
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    assert schema["required"] == ["name", "count"]
    props = schema["properties"]
    assert props["name"] == {"type": "string", "maxLength": 8, "pattern": "^(?:[a-z]+)$"}
    assert props["count"] == {"type": "integer", "minimum": 0, "maximum": 10}
    assert props["ratio"] == {"type": "number", "default": 1.0}
    assert props["color"] == {"type": "string", "enum": ["red", "blue"], "default": "red"}
    assert props["mode"] == {"type": "string", "enum": ["full", "para"], "default": "full"}
    assert props["note"] == {"type": "string", "nullable": True, "default": None}
    assert props["regions"]["items"] == {
        "type": "object",
        "required": ["gpa", "size"],
        "properties": {
            "gpa": {"type": "integer", "minimum": 0, "maximum": 0xFFFF_FFFF_FFFF_FFFF},
            "size": {"type": "integer", "minimum": 1},
        },
        "additionalProperties": False,
    }
    assert props["regions"]["default"] == []
    assert props["tags"] == {
        "type": "object",
        "additionalProperties": {"type": "integer"},
        "nullable": True,
        "default": None,
    }
    assert json_schema(Inner, unknown="ignore").get("additionalProperties") is None


@dataclass(frozen=True, slots=True)
class Described:
    size: Annotated[list[int], Bounds(min_len=1, max_len=3)] = field(metadata={"description": "one to three"})
    triple: tuple[float, float, float] = (0.0, 0.0, 0.0)


def test_descriptions_array_bounds_and_fixed_tuples_reach_the_schema() -> None:
    from virtkit.records import json_schema

    props = json_schema(Described)["properties"]
    assert props["size"] == {
        "type": "array",
        "items": {"type": "integer"},
        "minItems": 1,
        "maxItems": 3,
        "description": "one to three",
    }
    assert props["triple"] == {
        "type": "array",
        "items": {"type": "number"},
        "minItems": 3,
        "maxItems": 3,
        "default": [0.0, 0.0, 0.0],
    }
    with pytest.raises(UntrustedInput, match="shorter than 1"):
        parse(Described, {"size": []}, what="d")


@given(
    st.dictionaries(
        st.sampled_from(["name", "count", "ratio", "mode", "extra"]), st.integers(-3, 12) | st.text(max_size=3)
    )
)
def test_parse_accepts_exactly_what_the_schema_describes(value: dict[str, object]) -> None:
    """A small JSON Schema check of the generated schema against parse, on generated objects."""
    import re

    from virtkit.records import json_schema

    schema = json_schema(Outer)

    def fits(v: object, s: dict[str, object]) -> bool:
        kind = s.get("type")
        if v is None:
            return bool(s.get("nullable"))
        if kind == "integer" and not (isinstance(v, int) and not isinstance(v, bool)):
            return False
        if kind == "number" and not (isinstance(v, int | float) and not isinstance(v, bool)):
            return False
        if kind == "string" and not isinstance(v, str):
            return False
        if "enum" in s and v not in s["enum"]:  # type: ignore[operator]
            return False
        if isinstance(v, int) and ("minimum" in s and v < s["minimum"] or "maximum" in s and v > s["maximum"]):  # type: ignore[operator]
            return False
        if isinstance(v, str):
            if "maxLength" in s and len(v) > s["maxLength"]:  # type: ignore[operator]
                return False
            if "pattern" in s and not re.search(str(s["pattern"]), v):
                return False
        return True

    props: dict[str, dict[str, object]] = schema["properties"]
    expected = (
        all(k in value for k in schema["required"])
        and all(k in props for k in value)
        and all(fits(v, props[k]) for k, v in value.items() if k in props)
    )
    try:
        parse(Outer, value, what="x")
        accepted = True
    except UntrustedInput:
        accepted = False
    assert accepted == expected, value
