"""The memory allocator `vamos train` runs under: tcmalloc where the system has it.

Training allocates and frees tensors of ever-changing shapes (each batch has its own lengths).
glibc's malloc either gives large blocks back to the OS at once (a page fault for every fresh
page, several times a step) or, told to keep them (`keep_freed_memory`), fragments: on the
default Bible run the process grew to 7 GB while about 1.5 GB was live. tcmalloc keeps freed memory
in size classes and reuses it: one epoch of the default run took 1.97 GB at peak instead of
4.30 GB, and ran 1.29x as fast (docs/decisions.md, "The allocator"). It computes the same bits.

An allocator must be in place before the first allocation, so `vamos train` re-executes itself
with tcmalloc in LD_PRELOAD (as torch.backends.xeon.run_cpu does). No torch import here: that
happens after the re-exec. `VAMOS_ALLOCATOR=system` keeps the C library's own."""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import re
import sys

log = logging.getLogger(__name__)

TCMALLOC = "tcmalloc_minimal"  # Debian: libtcmalloc-minimal4 (scripts/setup.sh installs it)
CHOICE_VARIABLE = "VAMOS_ALLOCATOR"
CHOICES = ("tcmalloc", "system")


def _address(function) -> int:
    return ctypes.cast(function, ctypes.c_void_p).value


def in_use() -> str:
    """Whose `malloc` this process calls: `tcmalloc`, `system` (the C library's), or `other` (an
    allocator the user preloaded, such as jemalloc)."""
    process = ctypes.CDLL(None)  # symbols as the process resolves them: a preloaded library first
    if hasattr(process, "tc_malloc") and _address(process.malloc) == _address(process.tc_malloc):
        return "tcmalloc"
    libc = ctypes.util.find_library("c")
    return "system" if libc is None or _address(process.malloc) == _address(ctypes.CDLL(libc).malloc) else "other"


def wanted() -> str:
    choice = os.environ.get(CHOICE_VARIABLE, "tcmalloc")
    if choice not in CHOICES:
        print(f"{CHOICE_VARIABLE}={choice!r}: use one of {', '.join(CHOICES)}", file=sys.stderr)
        raise SystemExit(2)  # bad input, as a bad params.yaml
    return choice


def preloaded() -> list[str]:
    """The libraries of LD_PRELOAD, which ld.so separates by spaces or colons."""
    return [name for name in re.split(r"[\s:]+", os.environ.get("LD_PRELOAD", "")) if name]


def reexec_with_tcmalloc() -> None:
    """Replace this process by itself (same pid, arguments and environment) with tcmalloc
    preloaded, where it is wanted and found and the C library's malloc serves now; otherwise
    return. An allocator the user preloaded is left alone. A preload that fails leaves LD_PRELOAD
    naming the library, so this never loops."""
    if sys.platform != "linux" or wanted() != "tcmalloc" or in_use() != "system":
        return
    library = ctypes.util.find_library(TCMALLOC)
    if library is None:
        log.warning("no lib%s on this system: training with the C library's allocator, which needs "
                    "more memory (install libtcmalloc-minimal4, or set %s=system)", TCMALLOC, CHOICE_VARIABLE)
        return
    if library in preloaded():
        log.warning("LD_PRELOAD names %s but it did not load (see ld.so's message above): training with the "
                    "C library's allocator", library)
        return
    environment = dict(os.environ, LD_PRELOAD=" ".join([*preloaded(), library]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)


def tune_for_training(device_type: str) -> str:
    """After the re-exec, in the training process: where the C library's malloc serves a CPU run,
    let it keep freed memory (faster, though its heap fragments). Returns the allocator in use."""
    allocator = in_use()
    if device_type == "cpu" and allocator == "system":
        keep_freed_memory()
    return allocator


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed memory for reuse: blocks above its mmap limit (32 MiB at most)
    go back to the OS when freed, and each fresh page then costs a page fault. Full-softmax logits
    (batch tokens x vocabulary, 160 MB) are such blocks, allocated several times a step: the
    reference model trained 1.2x as fast with this. Nothing changes in what is computed. It holds
    for the whole process, so only training (tune_for_training, where tcmalloc is not in use) calls
    it; False where the C library is not glibc."""
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):
        return False
    # M_MMAP_MAX 0: every block from the heap; M_TRIM_THRESHOLD: give back only a free GiB at its top.
    return bool(libc.mallopt(-4, 0)) and bool(libc.mallopt(-1, 1 << 30))
