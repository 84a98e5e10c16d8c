"""Parsing of user-given sizes, counts and durations, with errors that say what was wrong."""

from __future__ import annotations

import re

from virtkit.errors import ConfigError

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_FACTORS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int, *, what: str = "size", default_unit: str = "") -> int:
    """Parse ``64M``, ``1G``, ``512KiB``, ``1048576`` (binary units) into bytes."""
    if isinstance(text, int):
        if text <= 0:
            raise ConfigError(f"{what} must be positive, got {text}")
        return text
    m = _SIZE.match(text)
    if not m:
        raise ConfigError(
            f"{what} {text!r} is not a size: use a number with an optional unit K, M, G or T (e.g. 64M, 1G)"
        )
    number, unit = int(m.group(1)), (m.group(2) or default_unit).upper()
    value = number * _FACTORS[unit]
    if value <= 0:
        raise ConfigError(f"{what} must be positive, got {text!r}")
    return value


def parse_count(text: str | int, *, what: str, minimum: int = 1, maximum: int | None = None) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} {text!r} is not a whole number") from None
    if value < minimum:
        raise ConfigError(f"{what} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{what} must be at most {maximum} on this host, got {value}")
    return value


def format_size(n: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor:
            value = n / factor
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} B"


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_SECONDS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str, what: str) -> float:
    """``5s``, ``500ms``, ``2m``, ``1h`` or plain seconds, as seconds."""
    m = _DURATION.match(text)
    if not m:
        raise ConfigError(f"{what} {text!r} is not a duration: use e.g. 5s, 500ms, 2m")
    value = float(m.group(1)) * _SECONDS[m.group(2)]
    if value <= 0:
        raise ConfigError(f"{what} must be positive, got {text!r}")
    return value
