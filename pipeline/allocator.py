"""The memory allocator `vamos train` runs under: tcmalloc where the system has it.

Training allocates and frees tensors of ever-changing shapes (each batch has its own lengths).
glibc's malloc either gives large blocks back to the OS at once (a page fault for every fresh
page, several times a step) or, told to keep them (`device.keep_freed_memory`), fragments: on the
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
import sys

log = logging.getLogger(__name__)

TCMALLOC = "tcmalloc_minimal"  # Debian: libtcmalloc-minimal4 (scripts/setup.sh installs it)
CHOICE_VARIABLE = "VAMOS_ALLOCATOR"
CHOICES = ("tcmalloc", "system")


def in_use() -> str:
    """`tcmalloc` when this process allocates with it, else `system`."""
    return "tcmalloc" if hasattr(ctypes.CDLL(None), "tc_malloc") else "system"


def wanted() -> str:
    choice = os.environ.get(CHOICE_VARIABLE, "tcmalloc")
    if choice not in CHOICES:
        raise SystemExit(f"{CHOICE_VARIABLE}={choice!r}: use one of {', '.join(CHOICES)}")
    return choice


def reexec_with_tcmalloc() -> None:
    """Replace this process by itself (same pid, arguments and environment) with tcmalloc
    preloaded, where it is wanted, found and not yet loaded; otherwise return. A preload that
    fails leaves LD_PRELOAD naming it, so this never loops."""
    if sys.platform != "linux" or wanted() != "tcmalloc" or in_use() == "tcmalloc":
        return
    library = ctypes.util.find_library(TCMALLOC)
    preloaded = os.environ.get("LD_PRELOAD", "")
    if library is None or library in preloaded.split():
        if library is None:
            log.warning("no lib%s on this system: training with the C library's allocator, which needs "
                        "more memory (install libtcmalloc-minimal4, or set %s=system)", TCMALLOC, CHOICE_VARIABLE)
        return
    environment = dict(os.environ, LD_PRELOAD=f"{preloaded} {library}".strip())
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)
