"""README's figures are the benchmark results: generated from bench/results/*.json, never typed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import readme


def test_readme_says_what_the_results_say() -> None:
    text = readme.README.read_text()
    assert readme.splice(text, readme.render()) == text, "run `python -m bench.readme` (make bench does)"


def test_a_changed_result_changes_the_readme(tmp_path: Path) -> None:
    for src in readme.RESULTS.glob("*.json"):
        (tmp_path / src.name).write_text(src.read_text())
    vmm = json.loads((tmp_path / "vmm.json").read_text())
    vmm["boot"]["virtkit run (Multiboot)"]["first_byte_s"] = 1.2345
    (tmp_path / "vmm.json").write_text(json.dumps(vmm))
    assert "1234.5 ms" in readme.render(tmp_path)
    assert "1234.5 ms" not in readme.README.read_text()


def test_a_readme_without_the_markers_is_an_error() -> None:
    with pytest.raises(SystemExit, match="no .* section"):
        readme.splice("no markers here", "x")
