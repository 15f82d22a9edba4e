"""What the benchmarks share: the zest command, dropping the page cache, and a zest node."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.containerd import Containerd, proxy_plugin_toml
from tests.support.snapshotterd import Snapshotterd

ZEST = str(Path(sys.executable).with_name("zest"))


def drop_caches() -> None:
    subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=False)


@contextmanager
def zest_node(base: Path, config: str) -> Iterator[tuple[Snapshotterd, Containerd]]:
    """A fresh zest daemon (own root, empty chunk cache) and a containerd that uses it; both
    stopped and removed on the way out, FUSE process and mounts included."""
    zsd = Snapshotterd(config_toml=config, log_level="warning")
    try:
        zsd.start()
        with Containerd(base, extra_toml=proxy_plugin_toml("zest", zsd.address)) as ctrd:
            yield zsd, ctrd
    finally:
        try:
            zsd.stop()
        finally:
            zsd.remove()
