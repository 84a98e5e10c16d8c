"""Live migration of a running VM between two virtkit processes, and the control socket that
starts it.

``protocol`` is the wire format and the handshake (pure: authenticated messages, their records
and size caps); ``keys`` makes and reads the pre-shared key; ``shape`` describes a machine and
compares two descriptions; ``source`` pre-copies memory with KVM dirty logging and hands the VM
over; ``target`` receives it into a machine built from the receiver's own configuration, in a
strict order (the ``virtkit migrate-receive`` process around it, which confines itself, is
``virtkit.cli.migrate_receive``); ``control`` serves a running VMM's Unix control socket
(snapshot, migrate, pause, resume, stop). See docs/FAILOVER.md.

May import: ``virtkit.snapshot`` and everything below it.
"""

from __future__ import annotations

from virtkit.migration.protocol import PROTOCOL_VERSION, MigrationError

__all__ = ["PROTOCOL_VERSION", "MigrationError"]
