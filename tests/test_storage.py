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


def test_parquet_batches_read_every_row_of_the_columns_in_order(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"a": list(range(1000)), "b": [f"w{i}" for i in range(1000)], "c": [0.5] * 1000})
    path = tmp_path / "t.parquet"
    pq.write_table(table, path, row_group_size=300)  # batches cross row groups
    batches = list(storage.parquet_batches(path, ["b", "a"], batch_rows=128))
    assert all(batch.schema.names == ["b", "a"] for batch in batches)
    assert max(len(batch) for batch in batches) <= 128
    assert pa.Table.from_batches(batches).to_pydict() == table.select(["b", "a"]).to_pydict()


FULL_DISK = """
import resource, signal, sys
import pandas as pd
from pipeline import storage
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
write = {"json": lambda p: storage.write_json(p, ["word"] * 100_000),
         "parquet": lambda p: storage.write_parquet(p, pd.DataFrame({"src": [f"sentence {i}" for i in range(100_000)]}))}
try:
    write[sys.argv[1]](sys.argv[2])
except OSError as error:
    print(error)
"""


@pytest.mark.parametrize("kind", ["json", "parquet"])
def test_a_write_that_the_filesystem_refuses_names_the_output_and_keeps_the_old_one(tmp_path, kind):
    """A real write fault (the file size limit, which fails writes as a full disk does, with an
    error that names no file): the message names the output, the old file is intact, no temp."""
    import subprocess
    import sys

    target = tmp_path / f"out.{kind}"
    target.write_text("old")
    result = subprocess.run([sys.executable, "-c", FULL_DISK, kind, str(target)], capture_output=True, text=True,
                            timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert f"cannot write {target}" in result.stdout, result.stdout + result.stderr[-2000:]
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_an_output_whose_folder_cannot_be_made_names_the_output_and_the_culprit(tmp_path):
    (tmp_path / "reports").write_text("a file where a folder should be")
    target = tmp_path / "reports" / "plots" / "curve.png"
    with pytest.raises(OSError) as raised:
        with storage.atomic_path(target) as tmp:
            tmp.write_text("never")
    assert f"cannot write {target}" in str(raised.value)
    assert f"({tmp_path / 'reports' / 'plots'})" in str(raised.value)  # the folder that could not be made
