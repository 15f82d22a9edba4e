"""Snapshot operation latency and image pull time: zest next to containerd's overlayfs.

    .venv/bin/python -m bench.snapshot_ops [--chain 50] [--rounds 5] [--pulls 3]
                                           [--image debian-python]

Needs root (containerd, mounts). In one run it starts a private containerd with zest as its
proxy snapshotter, a `zest snapshotter` daemon and a loopback registry, then measures:

  * Prepare+Commit (one layer: Prepare on the previous layer, then Commit) along a chain of
    --chain snapshots, and Stat of every snapshot of the chain, over gRPC, --rounds times:
      - overlayfs via containerd: containerd's Snapshots API, snapshotter "overlayfs"
      - zest via containerd:      containerd's Snapshots API, snapshotter "zest" (proxy)
      - zest direct:              zest's own socket
    p50 and p99 in milliseconds; the ratio is zest via containerd / overlayfs via containerd
    (the same path containerd's clients take; both pay containerd's metadata layer).
  * `ctr image pull` + unpack of --image with --snapshotter zest and with overlayfs, --pulls
    timed pulls each (each after an untimed warm-up pull with the same snapshotter),
    alternating; content and snapshots are garbage-collected between pulls so every pull
    downloads and unpacks everything. Median seconds and ratio (target: within 10%).

Writes bench/results/snapshot_ops.json and snapshot_ops.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from tests.support import images
from tests.support.containerd import Containerd, proxy_plugin_toml
from tests.support.mounts import remove_tree
from tests.support.registry import LocalRegistry
from tests.support.snapshotterd import SnapshotsClient, Snapshotterd

RESULTS = Path(__file__).parent / "results"
GC_ROOT = {"containerd.io/gc.root": "bench"}


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _summary(samples: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in samples]
    return {
        "n": len(ms),
        "p50_ms": round(_percentile(ms, 0.50), 3),
        "p99_ms": round(_percentile(ms, 0.99), 3),
        "mean_ms": round(statistics.fmean(ms), 3),
    }


def measure_chain(client: SnapshotsClient, chain: int, rounds: int) -> dict[str, list[float]]:
    """Prepare+Commit along a chain, then Stat of each layer; the chain is removed after."""
    prep_commit: list[float] = []
    stat: list[float] = []
    for r in range(rounds + 1):  # round 0 warms up (connections, caches) and is not counted
        prefix = f"bench-{uuid.uuid4().hex[:8]}"
        names: list[str] = []
        parent = ""
        for i in range(chain):
            key, name = f"{prefix}-a{i}", f"{prefix}-c{i}"
            t0 = time.perf_counter()
            client.prepare(key, parent, GC_ROOT)
            client.commit(name, key, GC_ROOT)
            dt = time.perf_counter() - t0
            if r:
                prep_commit.append(dt)
            names.append(name)
            parent = name
        for name in names:
            t0 = time.perf_counter()
            client.stat(name)
            dt = time.perf_counter() - t0
            if r:
                stat.append(dt)
        for name in reversed(names):
            client.remove(name)
    return {"prepare_commit": prep_commit, "stat": stat}


def measure_pulls(ctrd: Containerd, ref: str, pulls: int) -> dict[str, list[float]]:
    """Timed pulls, alternating snapshotters (ABBA). Each timed pull follows an untimed one with
    the same snapshotter, so that what the other snapshotter's previous round left behind (page
    cache, freed blocks) weighs on the warm-up, not on the measurement."""
    times: dict[str, list[float]] = {"zest": [], "overlayfs": []}
    order = ["overlayfs", "zest"]
    for i in range(pulls):
        for sn in order if i % 2 == 0 else list(reversed(order)):
            for timed in (False, True):
                os.sync()  # the previous pull's writes and deletions do not land in this one
                t0 = time.perf_counter()
                ctrd.ctr("images", "pull", "--plain-http", "--snapshotter", sn, ref, timeout=1200)
                if timed:
                    times[sn].append(time.perf_counter() - t0)
                ctrd.ctr("images", "rm", "--sync", ref)  # GC: content and snapshots go
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chain", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pulls", type=int, default=3)
    ap.add_argument("--image", default="debian-python")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.snapshot_ops needs root (containerd, mounts)", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="zbench-"))
    results: dict[str, object] = {
        "chain": args.chain,
        "rounds": args.rounds,
        "image": args.image,
        "cpus": os.cpu_count(),
    }
    zsd = Snapshotterd(log_level="warning")
    registry = LocalRegistry(work / "registry")
    ctrd: Containerd | None = None
    try:
        zsd.start()
        registry.start()
        ctrd = Containerd(work, extra_toml=proxy_plugin_toml("zest", zsd.address))
        ctrd.start()
        ref = images.push_image(args.image, registry.host, f"bench/{args.image}", "1")

        ops: dict[str, dict[str, dict[str, float]]] = {}
        targets = {
            "overlayfs via containerd": SnapshotsClient(
                ctrd.address, snapshotter="overlayfs", namespace="bench"
            ),
            "zest via containerd": SnapshotsClient(
                ctrd.address, snapshotter="zest", namespace="bench"
            ),
            "zest direct": zsd.client(),
        }
        for label, client in targets.items():
            print(f"ops: {label}", file=sys.stderr)
            samples = measure_chain(client, args.chain, args.rounds)
            ops[label] = {op: _summary(s) for op, s in samples.items()}
        results["ops"] = ops
        base, zest = ops["overlayfs via containerd"], ops["zest via containerd"]
        results["ops_ratio_p50"] = {
            op: round(zest[op]["p50_ms"] / base[op]["p50_ms"], 2) for op in base
        }

        print(f"pulls: {args.image}", file=sys.stderr)
        pulls = measure_pulls(ctrd, ref, args.pulls)
        results["pull_s"] = {sn: [round(t, 2) for t in ts] for sn, ts in pulls.items()}
        med = {sn: statistics.median(ts) for sn, ts in pulls.items()}
        results["pull_median_s"] = {sn: round(t, 2) for sn, t in med.items()}
        results["pull_ratio"] = round(med["zest"] / med["overlayfs"], 3)
        # each round's two pulls ran back to back: their ratio is less exposed to load drift
        paired = [z / o for z, o in zip(pulls["zest"], pulls["overlayfs"], strict=True)]
        results["pull_ratio_paired_median"] = round(statistics.median(paired), 3)
    finally:
        if ctrd is not None:
            ctrd.stop()
        registry.stop()
        zsd.remove()
        remove_tree(work)

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "snapshot_ops.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "snapshot_ops.md").write_text(_markdown(results))
    print(_markdown(results))
    return 0


def _markdown(r: dict) -> str:  # type: ignore[type-arg]
    lines = [
        f"# Snapshot operations (chain of {r['chain']}, {r['rounds']} rounds, {r['cpus']} CPUs)",
        "",
        "| target | Prepare+Commit p50 | p99 | Stat p50 | p99 |",
        "|---|---|---|---|---|",
    ]
    for label, ops in r["ops"].items():
        pc, st = ops["prepare_commit"], ops["stat"]
        lines.append(
            f"| {label} | {pc['p50_ms']} ms | {pc['p99_ms']} ms "
            f"| {st['p50_ms']} ms | {st['p99_ms']} ms |"
        )
    ratio = r["ops_ratio_p50"]
    lines += [
        "",
        f"p50 ratio zest/overlayfs (both via containerd): Prepare+Commit "
        f"{ratio['prepare_commit']}, Stat {ratio['stat']}",
        "",
        f"# `ctr image pull` + unpack of {r['image']}",
        "",
        "| snapshotter | runs (s) | median (s) |",
        "|---|---|---|",
    ]
    for sn, runs in r["pull_s"].items():
        lines.append(f"| {sn} | {', '.join(map(str, runs))} | {r['pull_median_s'][sn]} |")
    lines += [
        "",
        f"pull ratio zest/overlayfs: {r['pull_ratio']} of medians, "
        f"{r['pull_ratio_paired_median']} median of per-round ratios (target <= 1.10)",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
