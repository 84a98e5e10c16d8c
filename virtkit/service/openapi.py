"""The REST API's OpenAPI 3.0 document, its schemas generated from the records the API parses.

Every request and response body has one record in :mod:`virtkit.service.model`; the API parses
request bodies into those records (:func:`virtkit.records.parse`) and answers with them, and the
schemas here are :func:`virtkit.records.json_schema` of the same records, so the published contract
and the enforced one cannot drift (``tests/unit/service/test_openapi.py`` checks every body schema
of the document against its record). The paths are written here. ``docs/openapi.json`` is this
document, written by ``python -m virtkit.service.openapi > docs/openapi.json`` (a unit test checks
it is current).
"""

from __future__ import annotations

import json
from typing import Any, Final

from virtkit.records import json_schema
from virtkit.service.model import (
    CPUS_PATTERN,
    NAME_PATTERN,
    ConsoleInput,
    ErrorBody,
    Event,
    HostInfo,
    LogChunk,
    VmCreate,
    VmStats,
    VmStatus,
)

__all__ = ["CPUS_PATTERN", "MAX_BODY", "NAME_PATTERN", "SPEC", "document"]

#: the largest request body read
MAX_BODY: Final = 64 << 10

VM_CREATE = json_schema(VmCreate)
CONSOLE_INPUT = json_schema(ConsoleInput)
ERROR = json_schema(ErrorBody)
VM = json_schema(VmStatus)
STATS = json_schema(VmStats)
LOGS = json_schema(LogChunk)
EVENTS = {"type": "array", "items": json_schema(Event)}
HOST = json_schema(HostInfo)


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
                "responses": {"200": _json(HOST, "capacity and usage")},
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
                "responses": {"200": _json(STATS, "statistics"), **_errors(400, 404)},
            }
        },
        "/v1/vms/{name}/logs": {
            "get": {
                "summary": "the guest's serial output from byte offset",
                "parameters": [NAME_PARAM, OFFSET_PARAM, LIMIT_PARAM],
                "responses": {
                    "200": _json(LOGS, "output"),
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
                "responses": {"200": _json(EVENTS, "events"), **_errors(400, 404)},
            }
        },
        "/v1/events": {
            "get": {
                "summary": "every event after id offset",
                "parameters": [OFFSET_PARAM],
                "responses": {"200": _json(EVENTS, "events"), **_errors(400)},
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


def document() -> str:
    return json.dumps(SPEC, indent=2) + "\n"


if __name__ == "__main__":
    print(document(), end="")
