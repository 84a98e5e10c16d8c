"""The container CLI, in-process and hermetic: parsing, spec, and errors that touch nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from virtkit.cli import main


@pytest.fixture(autouse=True)
def _unsealed(monkeypatch: pytest.MonkeyPatch) -> None:
    # in-process: never re-execute pytest from a sealed interpreter copy
    monkeypatch.setenv("VIRTKIT_UNSEALED", "1")


def test_spec_writes_a_parsable_config(tmp_path: Path) -> None:
    assert main(["spec", "--bundle", str(tmp_path), "--args", "sh -c 'echo hi'"]) == 0
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["process"]["args"] == ["sh", "-c", "echo hi"]
    assert main(["spec", "--bundle", str(tmp_path)]) == 2  # does not overwrite


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["create", "bad/id", "--bundle", "."], "invalid container id"),
        (["create", "ok", "--bundle", "/nonexistent-bundle"], "no config.json"),
        (["start", "nope"], "does not exist"),
        (["kill", "nope", "KILL"], "does not exist"),
        (["kill", "nope", "BOGUS"], "unknown signal"),
        (["delete", "nope"], "does not exist"),
        (["state", "nope"], "does not exist"),
        (["exec", "nope", "--", "true"], "does not exist"),
        (["oci", "run", "x y", "--bundle", "."], "invalid container id"),
    ],
)
def test_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    status = main(["--root", str(tmp_path / "run"), *argv])
    err = capsys.readouterr().err
    assert status != 0
    assert message in err
    assert err.count("\n") == 1 and err.startswith("virtkit: error: ")
    assert not (tmp_path / "run").exists() or os.listdir(tmp_path / "run") == []


def test_list_on_an_empty_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--root", str(tmp_path), "list", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_oci_accepts_global_flags_after_oci(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["oci", "--root", str(tmp_path), "list", "-q"]) == 0
    assert capsys.readouterr().out == ""


def test_log_file_gets_the_error(tmp_path: Path) -> None:
    log = tmp_path / "log.json"
    assert main(["--root", str(tmp_path), "--log", str(log), "--log-format", "json", "start", "nope"]) != 0
    entry = json.loads(log.read_text().splitlines()[-1])
    assert entry["level"] == "error" and "does not exist" in entry["msg"]


def test_unexpected_system_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from virtkit.container.runtime import Runtime

    def denied(self: Runtime, warn: object = None) -> list[dict[str, str]]:
        raise PermissionError(13, "Permission denied", "/run/virtkit")

    monkeypatch.setattr(Runtime, "containers", denied)
    assert main(["--root", str(tmp_path), "list"]) == 2
    err = capsys.readouterr().err
    assert err == "virtkit: error: Permission denied (/run/virtkit); containers need root (or a rootless bundle)\n"


def test_state_root_that_cannot_be_made(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("")
    b = tmp_path / "b"
    b.mkdir()
    (b / "rootfs").mkdir()
    assert main(["spec", "--bundle", str(b)]) == 0
    assert main(["--root", str(tmp_path / "file" / "sub"), "create", "x", "--bundle", str(b)]) == 2
    assert "cannot create the state directory" in capsys.readouterr().err
