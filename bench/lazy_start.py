"""Time to first output: zest lazy pull against containerd's overlayfs full pull, same run.

    .venv/bin/python -m bench.lazy_start [--repeat 3] [--mbit 100] [--rtt-ms 20]

A local registry holds the debian-python test image twice: as built (gzip)
and converted by `zest convert`. All registry traffic goes through LinkProxy,
which emulates a link (bandwidth and round-trip time) and counts bytes. Per
round, interleaved, each on a fresh containerd (and a fresh zest daemon with an
empty cache):
  * overlayfs: `ctr image pull` of the original, then `ctr run`;
  * zest:      `zest pull` of the converted image, then `ctr run --snapshotter zest`;
measuring the time from the start of the pull to the first line the container
prints, and the bytes the registry served until then. (Read throughput through
FUSE is measured by bench/fuse_io.py.)
Writes bench/results/lazy_start.json and .md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from tests.support import images
from tests.support.containerd import Containerd, proxy_plugin_toml
from tests.support.linkproxy import LinkProxy
from tests.support.registry import LocalRegistry
from tests.support.snapshotterd import Snapshotterd

RESULTS = Path(__file__).parent / "results"
ZEST = str(Path(sys.executable).with_name("zest"))
CMD = ["python3", "-c", "print('hello')"]


def _drop_caches() -> None:
    subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=False)


def _first_line(argv: list[str], started: float) -> tuple[float, str]:
    """Run argv; seconds from `started` until its first output line, and that line."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    t = time.monotonic() - started
    proc.communicate(timeout=600)
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"{argv} failed: {proc.returncode}")
    return t, line.strip()


def _overlayfs_round(base: Path, link: LinkProxy, ref: str) -> dict[str, Any]:
    with Containerd(base) as ctrd:
        _drop_caches()
        link.reset()
        t0 = time.monotonic()
        ctrd.ctr("image", "pull", "--plain-http", ref, timeout=900)
        pulled = time.monotonic() - t0
        ctr = ["ctr", "--address", str(ctrd.address), "--namespace", ctrd.namespace, "run",
               "--rm", ref, f"b-{uuid.uuid4().hex[:6]}", *CMD]
        first, line = _first_line(ctr, t0)
        assert line == "hello", line
        sent, requests = link.bytes_sent, len(link.requests)
        # the floor: the same run with the image local (and in the page cache)
        t1 = time.monotonic()
        floor, _ = _first_line([*ctr[:-4], f"f-{uuid.uuid4().hex[:6]}", *CMD], t1)
        return {"first_output_s": first, "pull_s": pulled, "bytes": sent,
                "requests": requests, "run_local_s": floor}


def _zest_round(base: Path, link: LinkProxy, ref: str, config: str) -> dict[str, Any]:
    zsd = Snapshotterd(config_toml=config, log_level="warning").start()
    try:
        with Containerd(base, extra_toml=proxy_plugin_toml("zest", zsd.address)) as ctrd:
            _drop_caches()
            link.reset()
            t0 = time.monotonic()
            subprocess.run([ZEST, "pull", "--address", str(ctrd.address), "--namespace",
                            ctrd.namespace, ref], check=True, capture_output=True)
            pulled = time.monotonic() - t0
            ctr = ["ctr", "--address", str(ctrd.address), "--namespace", ctrd.namespace, "run",
                   "--snapshotter", "zest", "--rm", ref, f"z-{uuid.uuid4().hex[:6]}", *CMD]
            first, line = _first_line(ctr, t0)
            assert line == "hello", line
            at_first = link.bytes_sent
            return {"first_output_s": first, "pull_s": pulled, "bytes": at_first,
                    "requests": len(link.requests)}
    finally:
        zsd.stop()
        zsd.remove()




def _optimize(base: Path, src: str, dst: str) -> None:
    """Record the workload's profile on a private node and push `dst` with it."""
    zsd = Snapshotterd(config_toml="[remote]\nmetrics_address = \"\"\n",
                       log_level="warning").start()
    try:
        with Containerd(base, extra_toml=proxy_plugin_toml("zest", zsd.address)) as ctrd:
            subprocess.run([ZEST, "optimize", "--address", str(ctrd.address), "--namespace",
                            ctrd.namespace, "--zest-root", str(zsd.root), src, dst, "--",
                            *CMD], check=True, capture_output=True)
    finally:
        zsd.stop()
        zsd.remove()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--mbit", type=float, default=100)
    ap.add_argument("--rtt-ms", type=float, default=20)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="zbench-"))
    out: dict[str, Any] = {"link": {"mbit": args.mbit, "rtt_ms": args.rtt_ms},
                           "image": "debian-python", "command": " ".join(CMD)}
    try:
        with LocalRegistry(base / "registry") as reg:
            src = images.push_image("debian-python", reg.host, "bench/python", "1")
            subprocess.run([ZEST, "convert", "--no-progress", src,
                            f"{reg.host}/bench/python:zest"], check=True, capture_output=True)
            _optimize(base, f"{reg.host}/bench/python:zest", f"{reg.host}/bench/python:profile")
            with LinkProxy(reg.host, mbit=args.mbit, rtt_ms=args.rtt_ms) as link:
                cfg = "[remote]\nbackground_prefetch = true\nmetrics_address = \"\"\n"
                rounds: dict[str, list[dict[str, Any]]] = {
                    "overlayfs": [], "zest": [], "zest+profile": []}
                for _ in range(args.repeat):
                    rounds["overlayfs"].append(
                        _overlayfs_round(base, link, f"{link.host}/bench/python:1"))
                    rounds["zest"].append(
                        _zest_round(base, link, f"{link.host}/bench/python:zest", cfg))
                    rounds["zest+profile"].append(
                        _zest_round(base, link, f"{link.host}/bench/python:profile", cfg))
            for name, rs in rounds.items():
                out[name] = {k: round(statistics.median(r[k] for r in rs), 3) for k in rs[0]}
                out[name]["runs"] = [round(r["first_output_s"], 3) for r in rs]
            base_s = out["overlayfs"]["first_output_s"]
            for name in ("zest", "zest+profile"):
                out[f"speedup_{name}"] = round(base_s / out[name]["first_output_s"], 2)
                out[f"bytes_ratio_{name}"] = round(out[name]["bytes"]
                                                   / out["overlayfs"]["bytes"], 3)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lazy_start.json").write_text(json.dumps(out, indent=2) + "\n")
    md = [f"Produced by `.venv/bin/python -m bench.lazy_start --repeat {args.repeat} --mbit "
          f"{args.mbit:g} --rtt-ms {args.rtt_ms:g}` (medians)", "",
          "| | first output (s) | pull (s) | registry bytes | requests |", "|---|---|---|---|---|"]
    for name in ("overlayfs", "zest", "zest+profile"):
        r = out[name]
        md.append(f"| {name} | {r['first_output_s']} | {r['pull_s']} | {r['bytes']:,} | "
                  f"{r['requests']} |")
    md.append(f"\nRun-only time with the image local (the floor): "
              f"{out['overlayfs']['run_local_s']} s.")
    for name in ("zest", "zest+profile"):
        md.append(f"\n{name} is **{out[f'speedup_{name}']}x** faster to first output than "
                  f"overlayfs and moved {out[f'bytes_ratio_{name}']:.1%} of the bytes before it.")
    (RESULTS / "lazy_start.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
