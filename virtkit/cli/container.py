"""Container commands (OCI runtime CLI). Filled in by the containers work."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Container commands are registered here."""


def cmd_run_container(args: argparse.Namespace) -> int:
    from virtkit.errors import ConfigError

    raise ConfigError("--mode container is not implemented yet")
