"""The OCI runtime CLI dialect (runc, crun, youki), in-process and hermetic: flags, verbs, exit
statuses and error behaviour that need no container (runtime-spec runtime.md; runc(8))."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from virtkit.cli import main
from virtkit.container.features import features, update_resources
from virtkit.errors import ConfigError


@pytest.fixture(autouse=True)
def _unsealed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIRTKIT_UNSEALED", "1")  # in-process: never re-execute pytest


def oci(tmp_path: Path, *argv: str) -> int:
    """``virtkit-runtime ARGV`` (the runtime entry is ``virtkit oci``), with a private state root."""
    return main(["oci", "--root", str(tmp_path / "run"), *argv])


def test_features_document(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["oci", "features"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == features()
    assert doc["ociVersionMin"] == "1.0.0" and doc["linux"]["cgroup"]["v1"] and doc["linux"]["cgroup"]["v2"]
    assert set(doc["linux"]["namespaces"]) == {"pid", "network", "mount", "ipc", "uts", "user", "cgroup"}
    assert "CAP_SYS_ADMIN" in doc["linux"]["capabilities"] and "SCMP_ACT_ERRNO" in doc["linux"]["seccomp"]["actions"]
    # what is not done is not claimed
    assert doc["linux"]["cgroup"]["systemd"] is False and "createContainer" not in doc["hooks"]
    assert "shared" not in doc["mountOptions"] and "rbind" in doc["mountOptions"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["state", "nope"], "does not exist"),
        (["start", "nope"], "does not exist"),
        (["kill", "nope", "SIGKILL"], "does not exist"),
        (["delete", "nope"], "does not exist"),
        (["pause", "nope"], "does not exist"),
        (["resume", "nope"], "does not exist"),
        (["update", "--memory", "64M", "nope"], "does not exist"),
        (["update", "nope"], "nothing to change"),
        (["exec", "nope", "true"], "does not exist"),
        (["--cgroup-manager", "systemd", "create", "--bundle", ".", "x"], "systemd cgroup manager is not supported"),
        (["--systemd-cgroup", "run", "--bundle", ".", "x"], "systemd cgroup manager is not supported"),
        (["run", "--keep", "--rm", "x"], "contradict"),
        (["create", "--bundle", "/nonexistent-bundle", "x"], "no config.json"),
        (["create", "--config", "/nonexistent/c.json", "x"], "cannot read /nonexistent/c.json"),
    ],
)
def test_failures_exit_1_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    """runc and crun exit 1 on every failure (podman and conmon test for non-zero and read stderr)."""
    assert oci(tmp_path, *argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("virtkit: error: ") and err.count("\n") == 1 and message in err, err


def test_delete_force_of_a_gone_container_succeeds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert oci(tmp_path, "delete", "--force", "gone") == 0
    assert oci(tmp_path, "delete", "-f", "gone") == 0
    assert capsys.readouterr().err == ""
    assert oci(tmp_path, "delete", "-f", "bad/id") == 1  # a malformed id is still an error


def test_global_flags_in_runc_order_and_the_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """crun's suite: RUNTIME --debug --cgroup-manager cgroupfs --root R VERB ...; errors go to --log."""
    log = tmp_path / "runtime.log"
    argv = ["--debug", "--cgroup-manager", "cgroupfs", "--log", str(log), "--log-format", "json", "state", "nope"]
    assert oci(tmp_path, *argv) == 1
    entry = json.loads(log.read_text().splitlines()[-1])
    assert entry["level"] == "error" and "does not exist" in entry["msg"] and entry["time"]
    assert capsys.readouterr().err.count("\n") == 1  # --debug is the log level here, not a traceback
    assert oci(tmp_path, "--log=" + str(tmp_path / "text.log"), "state", "nope") == 1
    assert "error: container 'nope' does not exist" in (tmp_path / "text.log").read_text()


def test_virtkit_errors_keep_their_own_status(tmp_path: Path) -> None:
    """Outside 'oci', virtkit's own statuses stay (2 for a usage or config error)."""
    assert main(["--root", str(tmp_path), "state", "nope"]) == 2


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ex:
        main(["oci", "--version"])
    assert ex.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("virtkit-runtime version ") and "\nspec: 1.0.2" in out
    with pytest.raises(SystemExit) as ex:
        main(["oci", "update", "--help"])
    assert ex.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--memory", "--cpu-quota", "--cpu-period", "--cpu-shares", "--pids-limit", "--resources"):
        assert flag in out


def test_runtime_entry_is_virtkit_oci(monkeypatch: pytest.MonkeyPatch) -> None:
    from virtkit.cli import container

    monkeypatch.setattr("sys.argv", ["/usr/local/bin/virtkit-runtime", "--root", "/r", "state", "x"])
    assert container._is_the_program()
    assert container._argv() == ["oci", "--root", "/r", "state", "x"]
    assert container._command_word(container._argv()) == "oci"
    # create/run/exec re-execute sealed; the word after the global flags decides
    assert container._needs_seal(["oci", "--cgroup-manager", "cgroupfs", "--root", "/r", "run", "x"])
    assert not container._needs_seal(["oci", "--cgroup-manager", "cgroupfs", "--root", "/r", "state", "x"])


def test_update_flags_become_linux_resources() -> None:
    flags: dict[str, str | None] = {
        "memory": "64M",
        "memory_swap": "-1",
        "cpu_quota": "50000",
        "cpu_period": "100000",
        "cpu_shares": "512",
        "pids_limit": "100",
        "cpuset_cpus": "0",
    }
    raw = update_resources(flags, {}, None)
    assert raw == {
        "memory": {"limit": 64 << 20, "swap": -1},
        "cpu": {"quota": 50000, "period": 100000, "shares": 512, "cpus": "0"},
        "pids": {"limit": 100},
    }
    from virtkit.container.config import parse_resources

    res = parse_resources(raw)  # the same checks as a config.json's linux.resources
    assert res.memory.limit == 64 << 20 and res.pids_limit == 100 and res.cpu.cpus == "0"


def test_update_resources_file_and_flags_merge() -> None:
    text = json.dumps({"memory": {"limit": 1 << 30, "reservation": 1 << 20}, "pids": {"limit": 5}}).encode()
    raw = update_resources({"memory": "128M"}, {}, text, what="r.json")
    assert raw["memory"] == {"limit": 128 << 20, "reservation": 1 << 20} and raw["pids"] == {"limit": 5}


@pytest.mark.parametrize(
    ("flags", "unsupported", "text", "message"),
    [
        ({"cpu_quota": "lots"}, {}, None, "--cpu-quota 'lots' is not a number"),
        ({"cpu_shares": "1"}, {}, None, "--cpu-shares 1 is below 2"),
        ({"pids_limit": "-5"}, {}, None, "--pids-limit -5 is below 0"),
        ({"blkio_weight": "5000"}, {}, None, "above 1000"),
        ({}, {"--kernel-memory": "1G"}, None, "--kernel-memory is not supported"),
        ({}, {}, b"[1, 2]", "resources file r.json"),
        ({}, {}, b"{" * 5000, "resources file r.json"),
        ({}, {}, None, "nothing to change"),
    ],
)
def test_update_bad_input_is_one_line(
    flags: dict[str, str | None], unsupported: dict[str, str | None], text: bytes | None, message: str
) -> None:
    with pytest.raises(ConfigError) as ex:
        update_resources(flags, unsupported, text, what="r.json")
    assert message in str(ex.value) and "\n" not in str(ex.value)


def test_log_drivers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """crun's --log takes DRIVER:ARG; a driver virtkit cannot write to is refused up front."""
    assert oci(tmp_path, "--log=invalid:/path", "list") == 1
    assert "the invalid: log driver is not supported" in capsys.readouterr().err
    log = tmp_path / "via-file.log"
    assert oci(tmp_path, f"--log=file:{log}", "state", "nope") == 1
    assert "does not exist" in log.read_text()


def test_delete_regex(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert oci(tmp_path, "delete", "--force", "--regex", "^test-") == 0  # nothing matches: nothing to do
    assert oci(tmp_path, "delete", "--regex", "(unclosed") == 1
    assert "not a regular expression" in capsys.readouterr().err
