"""Giving the memory of large posts back to the system once they are sent.

Python frees a 10 MB message when its last reference goes, but glibc's malloc
keeps freed memory for reuse: after serving a large block with mmap it raises its
mmap threshold to that size (up to 32 MB), so the next large blocks come from
the heap arenas (one per thread that allocated), which rarely shrink. Eight
concurrent 9.9 MB posts left the daemon above 800 MB for good (issue 15). Here:
blocks of a megabyte and more are always mmap'ed (unmapped at free), and
`trim` hands free arena pages back after a large post leaves the cache.
Elsewhere than glibc both are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
from functools import cache

log = logging.getLogger("listserv.memory")

#: mallopt(3) parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: blocks this large or larger are mmap'ed, so freeing them unmaps them
MMAP_THRESHOLD = 1 << 20


@cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt  # noqa: B018 (glibc only)
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def configure() -> bool:
    """Fix the mmap threshold at 1 MB (a fixed value also stops glibc from raising
    it); True when this is glibc and it took."""
    libc = _libc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    libc.mallopt(_M_TRIM_THRESHOLD, 4 * MMAP_THRESHOLD)
    return ok


def trim() -> None:
    """Hand the free pages of every malloc arena back to the system (a few ms on a
    daemon's heap): called after large prepared posts were let go."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process (Linux /proc), 0 when unknown."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


def settle() -> None:
    """Once a daemon process has started: what it made so far lives as long as it,
    so the cyclic garbage collector stops scanning it.

    A full collection walks every container object of the process: measured with
    100 clients posting (issue 15), 60-135 ms in an SMTP listener, during which its
    sessions all stood still (most of the posts over 100 ms to their 250). What is
    frozen here (modules, mappers, the Public Suffix List, the SMTP server) is never
    garbage; objects made later are still collected as usual.
    """
    gc.collect()
    gc.freeze()
    log.info(
        "%d objects made at startup kept out of full garbage collections", gc.get_freeze_count()
    )
