"""glibc malloc settings for zest's long-running processes.

Both processes run many short-lived worker threads (gRPC, trio's thread pool, fetches) and pass
chunk buffers of up to a few MiB through them. With glibc's defaults each thread may get an
arena of its own (eight per core) and buffers under the dynamic mmap threshold (up to 32 MiB)
come from those arenas, where the memory stays resident after it is freed. Two arenas and a
fixed 256 KiB threshold, so that chunk buffers are mapped and unmapped, kept the daemon and the
FUSE process together at about two thirds of their resident memory with ten images mounted
(bench/fuse_io.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # from glibc's <malloc.h>
_M_ARENA_MAX = -8


def tune_malloc(arenas: int = 2, mmap_threshold: int = 256 * 1024) -> bool:
    """Call before starting threads. False where the C library is not glibc (nothing done)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_ARENA_MAX, arenas)) and bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold))
    if not ok:
        log.info("malloc settings not applied")
    return ok
