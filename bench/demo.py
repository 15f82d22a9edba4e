"""The demo: a realistic image converted, pushed, lazily pulled and run, next to overlayfs.

    bash scripts/demo.sh        (installs everything first; runs as root)

1. builds a Debian bookworm minbase image with python3 (debootstrap, cached: bench/workloads.py);
2. starts a registry on loopback and pushes the image (gzip layers);
3. `zest convert`s it into zest's chunked format and shows `zest inspect`;
4. over an emulated 100 Mbit/s, 20 ms link, pulls and runs `python3 -c "print(...)"`:
   first with containerd's overlayfs snapshotter (full pull of the original), then with
   zest (`zest pull` of the converted image), each on a fresh containerd;
5. prints the time to the first output line and the bytes the registry served.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from bench.common import ZEST
from bench.startup import _overlayfs_round, _zest_round
from bench.workloads import WORKLOADS
from tests.support import images
from tests.support.linkproxy import LinkProxy
from tests.support.registry import LocalRegistry


def _say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def main() -> int:
    python = next(w for w in WORKLOADS if w.name == "python3")
    _say(f"building the {python.image} image (cached after the first run)")
    layout = images.image_layout(python.image)
    base = Path(tempfile.mkdtemp(prefix="zest-demo-"))
    try:
        with LocalRegistry(base / "registry") as reg:
            _say(f"registry on {reg.host}; pushing the original image")
            src = images.push_image(python.image, reg.host, "demo/python", "1")
            dst = f"{reg.host}/demo/python:1-zest"
            _say(f"zest convert {src} {dst}")
            subprocess.run([ZEST, "convert", src, dst], check=True)
            _say(f"zest inspect {dst}")
            subprocess.run([ZEST, "inspect", dst], check=True)
            with LinkProxy(reg.host, mbit=100, rtt_ms=20) as link:
                _say("overlayfs: ctr image pull (original) + ctr run, over 100 Mbit/s, 20 ms")
                ovl = _overlayfs_round(base, link, python, f"{link.host}/demo/python:1")
                _say("zest: zest pull (converted) + ctr run --snapshotter zest, same link")
                zst = _zest_round(base, link, python, f"{link.host}/demo/python:1-zest",
                                  predict=True, client="zest")
        print()
        print(f"{'':10} {'first output':>13} {'registry bytes':>15} {'requests':>9}")
        for name, r in (("overlayfs", ovl), ("zest", zst)):
            print(f"{name:10} {r['first_output_s']:>12.2f}s {r['bytes']:>15,} "
                  f"{r['requests']:>9}")
        print(f"\nzest printed its line {ovl['first_output_s'] / zst['first_output_s']:.1f}x "
              f"sooner, after {zst['bytes'] / ovl['bytes']:.1%} of the bytes "
              f"(image layout used: {layout}).")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
