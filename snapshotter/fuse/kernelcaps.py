"""Kernel caching that pyfuse3 does not ask for: symlink targets (see _native/fuseinit.c).

`load()` must run before pyfuse3 is imported; the package's __init__ calls it, so every
way into the FUSE process does. Without the compiled module the mount still works, and
each readlink reaches the FUSE process, as before.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def load() -> bool:
    """Puts _native.fuseinit first in the dynamic linker's search order; False when it is
    not built or pyfuse3 was imported already (too late to take its fuse_session_new)."""
    if "pyfuse3" in sys.modules:
        return "_native.fuseinit" in sys.modules
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | os.RTLD_GLOBAL)
    try:
        import _native.fuseinit  # noqa: F401
    except ImportError:
        return False
    finally:
        sys.setdlopenflags(flags)
    return True


def status() -> dict[str, Any]:
    """Whether the kernel was asked to cache symlinks on this process's mount."""
    mod = sys.modules.get("_native.fuseinit")
    if mod is None:
        return {"loaded": False, "cache_symlinks": False}
    got = mod.status()
    return {"loaded": True, "cache_symlinks": bool(got["cache_symlinks"])}
