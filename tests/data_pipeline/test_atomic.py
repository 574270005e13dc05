"""atomic_write: the file is the old one or the whole new one, never a part, and readable."""

from __future__ import annotations

import stat

import pytest

from data_pipeline.atomic import atomic_write


def test_a_clean_write_replaces_the_file_readable_by_all(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with atomic_write(path) as fh:
        fh.write("new")
        assert path.read_text() == "old"          # nothing visible before the rename
    assert path.read_text() == "new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_an_error_mid_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(path, "wb") as fh:
        fh.write(b"half")
        raise RuntimeError("disk full")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
