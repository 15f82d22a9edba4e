"""Find and undo mounts under a directory, for cleanup after a test or a crashed build."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_under(root: str | os.PathLike[str]) -> list[str]:
    """Mount points at or below `root`, deepest first (the order to unmount them in)."""
    base = os.path.realpath(root)
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            point = _unescape(line.split()[4])
            if point == base or point.startswith(base.rstrip("/") + "/"):
                found.append(point)
    return sorted(set(found), key=lambda p: (p.count("/"), p), reverse=True)


def unmount_under(root: str | os.PathLike[str]) -> list[str]:
    """Lazily unmounts everything at or below `root`; returns what it tried to unmount."""
    points = mounts_under(root)
    for point in points:
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    return points


def remove_tree(root: str | os.PathLike[str]) -> None:
    """Unmounts whatever is left under `root`, then deletes it. Missing is fine."""
    path = Path(root)
    if not path.exists() and not path.is_symlink():
        return
    unmount_under(path)
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)
