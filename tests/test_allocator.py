"""The allocator `vamos train` runs under (pipeline.allocator): tcmalloc, installed by the set-up,
taken on by re-executing the same process, and the same trained bits as the C library's malloc.
An allocator holds for a whole process, so each case runs in a fresh one."""
import os
import subprocess
import sys
from ctypes.util import find_library
from importlib.metadata import entry_points

from pipeline.allocator import TCMALLOC, preloaded
from pipeline.storage import file_md5, read_json
from tests.test_train import MODEL, copy_of, embedded, set_train  # noqa: F401

# Prints its pid and allocator before and after asking for tcmalloc: a re-exec runs it twice.
PROBE = ("import os; from pipeline import allocator as a; print(os.getpid(), a.in_use(), flush=True); "
         "a.reexec_with_tcmalloc(); print(os.getpid(), a.in_use())")


def probe(**environment) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "VAMOS_ALLOCATOR")} | environment
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60)


def test_the_process_re_executes_itself_once_under_tcmalloc():
    done = probe()
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split("\n")[:-1]
    pid = lines[0].split()[0]
    # Before: the C library's; then the same pid again from the top, under tcmalloc, and no third run.
    assert lines == [f"{pid} system", f"{pid} tcmalloc", f"{pid} tcmalloc"]


def test_the_system_allocator_on_request_and_a_bad_choice_named():
    done = probe(VAMOS_ALLOCATOR="system")
    assert done.returncode == 0, done.stderr
    pid = done.stdout.split()[0]
    assert done.stdout.split("\n")[:-1] == [f"{pid} system", f"{pid} system"]

    done = probe(VAMOS_ALLOCATOR="jemalloc")
    assert done.returncode == 2  # bad input, as a bad params.yaml
    assert "VAMOS_ALLOCATOR='jemalloc': use one of tcmalloc, system" in done.stderr


def test_preloaded_libraries_split_as_ld_so_splits_them(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", " a.so:b.so  c.so:")
    assert preloaded() == ["a.so", "b.so", "c.so"]


def test_a_preload_that_did_not_load_is_reported_and_not_tried_again(monkeypatch, caplog):
    """ld.so ignores a library it cannot load; LD_PRELOAD still names it, and we say so and go on
    with the C library's allocator instead of re-executing again (in this process, which pytest
    runs under glibc)."""
    import pipeline.allocator as allocator

    assert allocator.in_use() == "system"
    found = allocator.ctypes.util.find_library
    monkeypatch.setattr(allocator.ctypes.util, "find_library",
                        lambda name: "libtcmalloc_gone.so.4" if name == allocator.TCMALLOC else found(name))
    monkeypatch.setenv("LD_PRELOAD", "libtcmalloc_gone.so.4")
    monkeypatch.delenv("VAMOS_ALLOCATOR", raising=False)
    allocator.reexec_with_tcmalloc()  # returns: no exec
    assert "LD_PRELOAD names libtcmalloc_gone.so.4 but it did not load" in caplog.text


def test_a_tcmalloc_preloaded_among_others_is_seen_and_not_loaded_twice():
    done = probe(LD_PRELOAD=f"libm.so.6:{find_library(TCMALLOC)}")
    assert done.returncode == 0, done.stderr
    pid = done.stdout.split()[0]
    assert done.stdout.split("\n")[:-1] == [f"{pid} tcmalloc", f"{pid} tcmalloc"]


def test_keeping_freed_memory_takes_on_glibc_only_where_it_serves():
    """The setting holds for a whole process, so try it in fresh ones."""
    code = ("from pipeline import allocator as a; print(a.keep_freed_memory()); a.reexec_with_tcmalloc(); "
            "print(a.tune_for_training('cpu'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if k != "LD_PRELOAD"} | {"VAMOS_ALLOCATOR": "system"})
    assert out.stdout.split() == ["True", "system"]  # this Debian's C library is glibc


def test_the_vamos_command_is_the_one_that_re_executes():
    (vamos,) = (e for e in entry_points(group="console_scripts") if e.name == "vamos")
    assert vamos.value == "pipeline.cli:main"  # `app` would train under the C library's allocator


def test_training_gives_the_same_bits_under_either_allocator(embedded, tmp_path):  # noqa: F811
    assert find_library(TCMALLOC), "no tcmalloc on this machine: run scripts/setup.sh"
    models = {}
    for choice in ("system", "tcmalloc"):
        root = copy_of(embedded, tmp_path / choice)
        set_train(root, epochs=2)
        # The params under another name: the re-executed process must get the same arguments.
        (root / "params.yaml").rename(root / "other.yaml")
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"} | {"VAMOS_ALLOCATOR": choice}
        done = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", "-p", "other.yaml"], cwd=root,
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert read_json(root / "reports/train_speed.json")["allocator"] == choice
        models[choice] = file_md5(root / MODEL)
    assert models["system"] == models["tcmalloc"]
