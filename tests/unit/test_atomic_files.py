"""atomic_files: a write that fails leaves the previous file whole and no temporary file behind."""

from __future__ import annotations

import pytest

from aurora_spec.atomic_files import atomic_write, atomic_write_text


def test_replaces_the_file(tmp_path):
    target = tmp_path / "results.json"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "head.safetensors"
    atomic_write_text(target, "version 1")

    def torn(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("version 2, half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, torn)
    assert target.read_text() == "version 1"
    assert [p.name for p in tmp_path.iterdir()] == ["head.safetensors"]
