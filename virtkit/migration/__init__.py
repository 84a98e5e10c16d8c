"""Live migration of a running VM between two virtkit processes, and the control socket that
starts it.

``protocol`` is the wire format (pure); ``source`` pre-copies memory with KVM dirty logging and
hands the VM over; ``target`` receives it and runs it; ``control`` serves a running VMM's Unix
control socket (snapshot, migrate, pause, resume, stop). See docs/FAILOVER.md.

May import: ``virtkit.snapshot`` and everything below it.
"""

from __future__ import annotations

from virtkit.migration.protocol import PROTOCOL_VERSION, MigrationError

__all__ = ["PROTOCOL_VERSION", "MigrationError"]
