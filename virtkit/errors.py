"""The one exception hierarchy of virtkit.

Every message says what was wrong and what to do about it, in one line: the CLI prints
``virtkit: error: <message>`` and exits non-zero, never with a traceback.
"""

from __future__ import annotations


class VirtkitError(Exception):
    """Base of every error virtkit raises on purpose."""

    #: process exit status the CLI uses for this kind of error
    exit_status: int = 2


class ConfigError(VirtkitError):
    """The user asked for something invalid (a size, a count, a path, a flag combination)."""


class KvmError(VirtkitError):
    """/dev/kvm is missing, not permitted, or refused an operation virtkit needs."""


class BootError(VirtkitError):
    """The kernel image (or a module) cannot be loaded as asked."""


class GuestError(VirtkitError):
    """The guest did something that ends the VM abnormally (triple fault, emulation failure...)."""

    exit_status = 1


class DeviceError(VirtkitError):
    """A device cannot be set up as configured (file missing, address collision...)."""


class ContainerError(VirtkitError):
    """An OCI container operation failed (bad config.json, bad id, invalid state transition...)."""
