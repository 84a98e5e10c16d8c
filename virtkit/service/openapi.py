"""The REST API's OpenAPI 3.0 document, and the validator that enforces its request schemas.

The document is the single description of what the API accepts: :func:`validate` checks request
bodies against the very schemas published here (a small subset of JSON Schema: type, enum,
pattern, length and range bounds, required, additionalProperties), so the published contract and
the enforced one cannot drift. ``docs/openapi.json`` is this document, written by
``python -m virtkit.service.openapi > docs/openapi.json`` (a unit test checks it is current).
"""

from __future__ import annotations

import json
import re
from typing import Any

#: VM names become directory, cgroup and socket names: no path characters, no leading dot or dash
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
CPUS_PATTERN = r"^[0-9]{1,4}(-[0-9]{1,4})?(,[0-9]{1,4}(-[0-9]{1,4})?){0,63}$"
MAX_BODY = 64 << 10

VM_CREATE: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "kernel"],
    "properties": {
        "name": {"type": "string", "pattern": NAME_PATTERN, "description": "unique; letters, digits, _ . -"},
        "kernel": {
            "type": "string",
            "minLength": 1,
            "maxLength": 4096,
            "description": "absolute path of the guest kernel (Multiboot or ELF64) on the host",
        },
        "memory_mib": {"type": "integer", "minimum": 2, "maximum": 1048576, "default": 64},
        "vcpus": {"type": "integer", "minimum": 1, "maximum": 64, "default": 1},
        "cmdline": {"type": "string", "maxLength": 1024, "default": ""},
        "mode": {"type": "string", "enum": ["full", "para"], "default": "full"},
        "cpu_weight": {
            "type": "integer",
            "minimum": 1,
            "maximum": 10000,
            "default": 100,
            "description": "share of CPU against other VMs when they compete (100 = default)",
        },
        "cpu_quota_pct": {
            "type": "integer",
            "minimum": 1,
            "maximum": 6400,
            "nullable": True,
            "default": None,
            "description": "hard cap in percent of one CPU (150 = one and a half CPUs)",
        },
        "cpus": {
            "type": "string",
            "pattern": CPUS_PATTERN,
            "nullable": True,
            "default": None,
            "description": "pin the VM's vCPUs to these host CPUs, e.g. 0 or 0-1",
        },
        "restart": {
            "type": "string",
            "enum": ["never", "on-failure"],
            "default": "never",
            "description": "on-failure: restart with exponential back-off when the VMM dies or the guest crashes",
        },
        "start": {"type": "boolean", "default": False, "description": "start it at once"},
    },
}

CONSOLE_INPUT: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["data"],
    "properties": {"data": {"type": "string", "maxLength": 4096, "description": "text typed into the UART"}},
}

ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
VM = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "state": {"type": "string", "enum": ["created", "starting", "running", "restarting", "stopped", "failed"]},
        "pid": {"type": "integer", "nullable": True},
        "definition": VM_CREATE,
        "restarts": {"type": "integer"},
        "last_exit": {"type": "object", "nullable": True},
        "created": {"type": "number"},
        "started": {"type": "number", "nullable": True},
    },
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "bad request: the reason in one line",
        404: "no such VM",
        409: "conflicts with the VM's state or the host's free resources",
        411: "Content-Length missing",
        413: "body over 64 KiB",
        415: "body is not application/json",
    }
    return {str(c): _json(ERROR, text[c]) for c in codes}


NAME_PARAM = {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "pattern": NAME_PATTERN}}
OFFSET_PARAM = {"name": "offset", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0}}
LIMIT_PARAM = {
    "name": "limit",
    "in": "query",
    "required": False,
    "schema": {"type": "integer", "minimum": 1, "maximum": 1048576},
}
FORCE_PARAM = {"name": "force", "in": "query", "required": False, "schema": {"type": "boolean"}}


def _action(summary: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "parameters": [NAME_PARAM],
            "responses": {"200": _json(VM, "the VM after the action"), **_errors(400, 404, 409)},
        }
    }


SPEC: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "virtkitd",
        "version": "1",
        "description": "virtkit's hypervisor service: VMs, each in its own confined VMM process, with "
        "quotas. Served on a Unix socket (default /run/virtkitd/api.sock). Every answer "
        'is JSON (errors: {"error": "<one line>"}), HTTP-level errors included; a '
        "request must arrive within 5 s a part (line, headers, body) or the connection "
        "is closed (a short body is a 400); past 64 connections at once, one more gets "
        "a 503 at once.",
    },
    "paths": {
        "/v1/host": {
            "get": {
                "summary": "host capacity and what running VMs hold",
                "responses": {"200": _json({"type": "object"}, "capacity and usage")},
            }
        },
        "/v1/vms": {
            "get": {"summary": "every VM", "responses": {"200": _json({"type": "array", "items": VM}, "VMs")}},
            "post": {
                "summary": "define a VM (and with start=true start it)",
                "requestBody": {"required": True, "content": {"application/json": {"schema": VM_CREATE}}},
                "responses": {"201": _json(VM, "defined"), **_errors(400, 409, 411, 413, 415)},
            },
        },
        "/v1/vms/{name}": {
            "get": {
                "summary": "one VM",
                "parameters": [NAME_PARAM],
                "responses": {"200": _json(VM, "the VM"), **_errors(400, 404)},
            },
            "delete": {
                "summary": "delete a VM that is not running (force=true: kill it first)",
                "parameters": [NAME_PARAM, FORCE_PARAM],
                "responses": {"204": {"description": "deleted"}, **_errors(400, 404, 409)},
            },
        },
        "/v1/vms/{name}/start": _action("start the VM in a new confined VMM process"),
        "/v1/vms/{name}/stop": _action("ask the guest's VMM to stop the VM (SIGKILL after 10 s)"),
        "/v1/vms/{name}/kill": _action("SIGKILL the VM's VMM"),
        "/v1/vms/{name}/stats": {
            "get": {
                "summary": "CPU time, memory, exits by reason, device I/O",
                "parameters": [NAME_PARAM],
                "responses": {"200": _json({"type": "object"}, "statistics"), **_errors(400, 404)},
            }
        },
        "/v1/vms/{name}/logs": {
            "get": {
                "summary": "the guest's serial output from byte offset",
                "parameters": [NAME_PARAM, OFFSET_PARAM, LIMIT_PARAM],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "offset": {"type": "integer"},
                                "next": {"type": "integer"},
                                "data": {"type": "string"},
                            },
                        },
                        "output",
                    ),
                    **_errors(400, 404),
                },
            }
        },
        "/v1/vms/{name}/console": {
            "post": {
                "summary": "type into the guest's serial console",
                "parameters": [NAME_PARAM],
                "requestBody": {"required": True, "content": {"application/json": {"schema": CONSOLE_INPUT}}},
                "responses": {"204": {"description": "sent"}, **_errors(400, 404, 409, 411, 413, 415)},
            }
        },
        "/v1/vms/{name}/events": {
            "get": {
                "summary": "the VM's events",
                "parameters": [NAME_PARAM, OFFSET_PARAM],
                "responses": {"200": _json({"type": "array"}, "events"), **_errors(400, 404)},
            }
        },
        "/v1/events": {
            "get": {
                "summary": "every event after id offset",
                "parameters": [OFFSET_PARAM],
                "responses": {"200": _json({"type": "array"}, "events"), **_errors(400)},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus text exposition of host and per-VM metrics",
                "responses": {
                    "200": {
                        "description": "text/plain; version=0.0.4",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {"summary": "this document", "responses": {"200": _json({"type": "object"}, "OpenAPI 3.0")}}
        },
    },
}


class SchemaError(ValueError):
    """A value does not match its schema; the message names the field and says what it must be."""


_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def validate(schema: dict[str, Any], value: Any, where: str = "body") -> None:
    if value is None:
        if schema.get("nullable"):
            return
        raise SchemaError(f"{where} must not be null")
    kind = schema.get("type")
    if kind is not None:
        ok = isinstance(value, _TYPES[kind]) and not (kind in ("integer", "number") and isinstance(value, bool))
        if not ok:
            raise SchemaError(f"{where} must be {'an' if kind[0] in 'aeiou' else 'a'} {kind} (got {_short(value)})")
    if "enum" in schema and value not in schema["enum"]:
        raise SchemaError(f"{where} must be one of {', '.join(map(str, schema['enum']))} (got {_short(value)})")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            raise SchemaError(f"{where} must not be empty" if schema["minLength"] == 1 else f"{where} is too short")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            raise SchemaError(f"{where} is longer than {schema['maxLength']} characters")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            raise SchemaError(f"{where} {_short(value)} must match {schema['pattern']}")
        if "\0" in value:
            raise SchemaError(f"{where} must not contain NUL characters")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            raise SchemaError(f"{where} must be at least {schema['minimum']} (got {_short(value)})")
        if "maximum" in schema and value > schema["maximum"]:
            raise SchemaError(f"{where} must be at most {schema['maximum']} (got {_short(value)})")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                raise SchemaError(f"{where}.{key} is required")
        if schema.get("additionalProperties") is False:
            unknown = sorted(k for k in value if k not in props)
            if unknown:
                raise SchemaError(f"{where} has unknown field {_short(unknown[0])} (known: {', '.join(props)})")
        for key, sub in props.items():
            if key in value:
                validate(sub, value[key], f"{where}.{key}")


def with_defaults(schema: dict[str, Any], value: dict[str, Any]) -> dict[str, Any]:
    out = {k: sub["default"] for k, sub in schema.get("properties", {}).items() if "default" in sub}
    out.update(value)
    return out


def document() -> str:
    return json.dumps(SPEC, indent=2) + "\n"


if __name__ == "__main__":
    print(document(), end="")
