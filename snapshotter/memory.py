"""glibc malloc settings for zest's long-running processes.

Both processes run many short-lived worker threads (gRPC, trio's thread pool, fetches) that
pass chunk buffers of up to a few MiB around. With glibc's defaults each of them may get an
arena of its own (eight per core), where freed memory stays resident. Two arenas kept the
daemon and the FUSE process together at 137-142 MB PSS with ten images mounted, from 157 MB
(bench/fuse_io.py). A fixed 256 KiB mmap threshold saved 11 MB more but halved warm sequential
reads (every chunk buffer mapped and faulted in anew), so the threshold stays glibc's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # from glibc's <malloc.h>
_M_ARENA_MAX = -8


def tune_malloc(arenas: int = 2, mmap_threshold: int = 0) -> bool:
    """Call before starting threads; mmap_threshold 0 keeps glibc's dynamic one. False where
    the C library is not glibc (nothing done)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_ARENA_MAX, arenas))
    if mmap_threshold:
        ok = ok and bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold))
    if not ok:
        log.info("malloc settings not applied")
    return ok
