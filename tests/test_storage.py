"""Atomic outputs: readable by teammates (the umask decides, not mkstemp), on disk before the rename."""
import os
import stat

import pytest

from pipeline import storage


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_outputs_get_the_mode_that_the_umask_gives(tmp_path, umask, mask, mode):
    umask(mask)
    storage.write_json(tmp_path / "reports" / "m.json", {"bleu": 1.0})
    assert stat.S_IMODE((tmp_path / "reports" / "m.json").stat().st_mode) == mode


def test_a_failed_block_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.txt"
    storage.write_text(target, "old")
    with pytest.raises(RuntimeError), storage.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_the_file_then_its_directory_are_fsynced_around_the_rename(tmp_path, monkeypatch):
    """A spy on the real os.fsync: which path each flushed descriptor is, and whether the rename had happened."""
    target, synced, real_fsync = tmp_path / "out.txt", [], os.fsync

    def spy(fd):
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), target.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    storage.write_text(target, "new")
    (file_path, renamed_yet), (dir_path, renamed) = synced
    assert file_path.startswith(str(tmp_path / ".out.txt.")) and not renamed_yet
    assert dir_path == str(tmp_path) and renamed
