"""The source's side of the control socket: a migrate request is parsed strictly, and a migration
never starts without the key."""

from __future__ import annotations

from typing import Any, cast

import pytest

from virtkit.errors import VirtkitError
from virtkit.migration.protocol import MigrationError
from virtkit.migration.source import MigrationOptions
from virtkit.vm import Machine


@pytest.mark.parametrize(
    "req,match",
    [
        ({"cmd": "migrate", "to": "h:1"}, 'migrate needs "key"'),
        ({"cmd": "migrate", "to": "h:1", "key": "zz" * 32}, "does not match"),
        ({"cmd": "migrate", "to": "h:1", "key": "00" * 8}, "8-byte key"),
        ({"cmd": "migrate", "to": "h:1", "key": "00" * 32, "max_rounds": "many"}, "max_rounds must be an integer"),
        ({"cmd": "migrate", "to": "h:1", "key": "00" * 32, "downtime_ms": -1}, "downtime_ms is -1"),
        ({"cmd": "migrate", "to": "h:1", "key": "00" * 32, "keyfile": "/etc/shadow"}, "unknown field 'keyfile'"),
    ],
)
def test_migrate_requests_are_parsed_strictly(req: dict[str, Any], match: str) -> None:
    with pytest.raises(VirtkitError, match=match):
        MigrationOptions.from_request(req)


def test_a_good_migrate_request() -> None:
    opts = MigrationOptions.from_request(
        {"cmd": "migrate", "to": "h:1", "key": "ab" * 32, "downtime_ms": 5, "max_rounds": 3}
    )
    assert opts.key == b"\xab" * 32 and opts.downtime_ms == 5.0 and opts.max_rounds == 3


def test_migrating_without_a_key_is_refused() -> None:
    from virtkit.migration.source import migrate

    with pytest.raises(MigrationError, match="needs the pre-shared key"):
        migrate(cast(Machine, object()), "127.0.0.1:1", MigrationOptions())
