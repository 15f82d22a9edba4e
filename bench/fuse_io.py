"""Memory of the zest processes with ten images mounted, and read speed through FUSE vs disk.

    .venv/bin/python -m bench.fuse_io [--images 10] [--size-mib 256]

1. Memory. A local registry holds the bench images (bench/workloads.py), each pushed as built
   (gzip) and converted by `zest convert`. One zest daemon (default config, background prefetch
   on) and one containerd; `zest pull` of every converted image, then each image's workload run
   once with `ctr run --snapshotter zest` so that its layers are really read. VmRSS (and VmHWM,
   the peak) from /proc/PID/status and Pss from /proc/PID/smaps_rollup of the daemon and of
   every process it started (the FUSE process), after the pulls, after the runs, and once
   background prefetch has fetched every layer, each SETTLE_S seconds after the work (the FUSE
   process hands freed heap back once its reads go quiet; VmHWM keeps the peak). The target:
   all zest processes together under 150 MB with ten images mounted (reported, not asserted).
2. Throughput. A file of --size-mib (half random, half zeros) in a one-layer converted image,
   read through FUSE (background prefetch off) and from local disk: sequentially in 1 MiB reads,
   and at random offsets (fixed seed, no offset twice) in 4 KiB and in 128 KiB reads. Cold: the
   first read through FUSE, every chunk fetched from the loopback registry; each cold pattern on
   a fresh daemon (empty chunk cache), so no other pattern warmed it. Warm: every chunk in the
   chunk cache on disk, page cache dropped. Disk: the same file on local disk, page cache dropped.
Writes bench/results/fuse_io.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import ZEST, drop_caches, zest_node
from bench.workloads import all_recipes
from snapshotter.fuse import protocol
from tests.support import images
from tests.support.containerd import Containerd
from tests.support.images import Recipe
from tests.support.registry import LocalRegistry
from tests.support.snapshotterd import Snapshotterd

RESULTS = Path(__file__).parent / "results"
TARGET_MB = 150
SETTLE_S = 5.0  # the FUSE process trims its heap 2-4 s after its reads go quiet
MIB = 1 << 20
SEED = 20240601
# (label, read size, number of reads; 0: the whole file sequentially)
PATTERNS: tuple[tuple[str, int, int], ...] = (
    ("seq_1m", MIB, 0),
    ("rand_4k", 4096, 4096),
    ("rand_128k", 128 << 10, 1024),
)


def _zest_pull(ctrd: Containerd, ref: str) -> None:
    subprocess.run([ZEST, "pull", "--address", str(ctrd.address), "--namespace",
                    ctrd.namespace, ref], check=True, capture_output=True, timeout=600)


def _fuse_call(zsd: Snapshotterd, op: str) -> dict[str, Any]:
    return protocol.call(str(zsd.root / "fuse" / "control.sock"), {"op": op})


def _convert(src: str, dst: str) -> None:
    subprocess.run([ZEST, "convert", "--no-progress", src, dst], check=True,
                   capture_output=True, timeout=1800)


# --- 1. memory ----------------------------------------------------------------------------------


def _proc_kb(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM and the Rss split from status; Pss from smaps_rollup (all kB)."""
    out: dict[str, int] = {}
    keys = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in keys:
            out[key] = int(rest.split()[0])
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key == "Pss":
            out["Pss"] = int(rest.split()[0])
    return out


def _descendants(root: int) -> list[int]:
    """root and every process below it (the daemon starts the FUSE process itself)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _mb(kb: int) -> float:
    return round(kb * 1024 / 1e6, 1)


def _measure(zsd: Snapshotterd) -> dict[str, Any]:
    """Memory of every zest process once settled, in MB (10^6 bytes), and the FUSE layers'
    state."""
    time.sleep(SETTLE_S)
    fuse_pid = int(_fuse_call(zsd, "ping")["pid"])
    pids = _descendants(zsd.pid)
    if fuse_pid not in pids:  # its own session; found by its control socket all the same
        pids.append(fuse_pid)
    procs: dict[str, dict[str, Any]] = {}
    for pid in pids:
        name = ("daemon" if pid == zsd.pid else "fuse" if pid == fuse_pid
                else Path(f"/proc/{pid}/comm").read_text().strip())
        kb = _proc_kb(pid)
        procs[name] = {"pid": pid, "rss_mb": _mb(kb["VmRSS"]), "pss_mb": _mb(kb["Pss"]),
                       "peak_rss_mb": _mb(kb["VmHWM"]), "anon_mb": _mb(kb["RssAnon"]),
                       "file_mb": _mb(kb["RssFile"])}
    layers = _fuse_call(zsd, "list")["layers"]
    stats = _fuse_call(zsd, "stats")
    return {
        "processes": procs,
        "total_rss_mb": round(sum(p["rss_mb"] for p in procs.values()), 1),
        "total_pss_mb": round(sum(p["pss_mb"] for p in procs.values()), 1),
        "layers_mounted": len(layers),
        "prefetch_done": sum(x["prefetch_done"] for x in layers),
        "prefetch_total": sum(x["prefetch_total"] for x in layers),
        "chunk_cache_mb": round(stats["cache"]["bytes"] / 1e6, 1),
        "fetched_mb": round(stats["fetch"]["bytes_fetched"] / 1e6, 1),
    }


def _wait_prefetched(zsd: Snapshotterd, timeout: float) -> bool:
    """Whether background prefetch finished every layer within timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        layers = _fuse_call(zsd, "list")["layers"]
        if layers and all(x["prefetch_planned"] and x["prefetch_done"] >= x["prefetch_total"]
                          for x in layers):
            return True
        time.sleep(1)
    return False


def memory(base: Path, registry: LocalRegistry, recipes: list[Recipe]) -> dict[str, Any]:
    """Pull every image lazily into one daemon, run each workload once, measure memory."""
    refs = []
    for r in recipes:
        src = images.push_image(r.name, registry.host, f"bench/{r.name}", "1")
        dst = f"{registry.host}/bench/{r.name}:zest"
        _convert(src, dst)
        refs.append(dst)
    out: dict[str, Any] = {"images": [r.name for r in recipes]}
    with zest_node(base, "[remote]\nmetrics_address = \"\"\n") as (zsd, ctrd):
        t0 = time.monotonic()
        for ref in refs:
            _zest_pull(ctrd, ref)
        out["pull_all_s"] = round(time.monotonic() - t0, 2)
        out["after_pull"] = _measure(zsd)
        runs = {}
        for r, ref in zip(recipes, refs, strict=True):
            t = time.monotonic()
            res = ctrd.ctr("run", "--snapshotter", "zest", "--rm", ref,
                           f"m-{uuid.uuid4().hex[:6]}", *r.cmd, timeout=600)
            if r.expected_output not in res.stdout:
                raise RuntimeError(f"{r.name}: expected {r.expected_output!r}, "
                                   f"got {res.stdout!r}")
            runs[r.name] = round(time.monotonic() - t, 2)
        out["run_s"] = runs
        out["after_runs"] = _measure(zsd)
        out["prefetch_finished"] = _wait_prefetched(zsd, timeout=300)
        out["after_prefetch"] = _measure(zsd)
    final = out["after_prefetch"]
    out["target_mb"] = TARGET_MB
    out["pass_rss"] = max(out[k]["total_rss_mb"] for k in _STAGES) < TARGET_MB
    out["pass_pss"] = max(out[k]["total_pss_mb"] for k in _STAGES) < TARGET_MB
    out["layers_mounted"] = final["layers_mounted"]
    return out


_STAGES = ("after_pull", "after_runs", "after_prefetch")


# --- 2. throughput ------------------------------------------------------------------------------


def _offsets(size: int, block: int, count: int) -> list[int]:
    """count distinct block-aligned offsets, the same on every run (fixed seed)."""
    slots = size // block
    return [s * block for s in random.Random(SEED + block).sample(range(slots),
                                                                    min(count, slots))]


def _read(path: Path, block: int, count: int, size: int) -> dict[str, float]:
    """One pattern over path: seconds, bytes, reads; fadvise tells the kernel the pattern,
    as fio does, so that readahead does not inflate random reads."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if count == 0:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            t = time.monotonic()
            done = reads = 0
            half_s = 0.0
            while data := os.read(fd, block):
                done += len(data)
                reads += 1
                if not half_s and done >= size // 2:
                    half_s = time.monotonic() - t
            secs = time.monotonic() - t
            return {"s": secs, "bytes": done, "reads": reads, "first_half_s": half_s}
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        offsets = _offsets(size, block, count)
        t = time.monotonic()
        done = 0
        for off in offsets:
            done += len(os.pread(fd, block, off))
        secs = time.monotonic() - t
        return {"s": secs, "bytes": done, "reads": len(offsets)}
    finally:
        os.close(fd)


def _rates(r: dict[str, float]) -> dict[str, Any]:
    out = {"mb_s": round(r["bytes"] / 1e6 / r["s"], 1), "iops": round(r["reads"] / r["s"]),
           "s": round(r["s"], 3), "reads": int(r["reads"])}
    if "first_half_s" in r:  # the random half (fetched) and the zero half (one chunk, deduped)
        half = r["bytes"] / 2 / 1e6
        out["random_half_mb_s"] = round(half / r["first_half_s"], 1)
        out["zero_half_mb_s"] = round(half / (r["s"] - r["first_half_s"]), 1)
    return out


def _fetched(zsd: Snapshotterd) -> dict[str, int]:
    f = _fuse_call(zsd, "stats")["fetch"]
    return {"bytes_fetched": f["bytes_fetched"], "memory_hits": f["memory_hits"]}


def fuse_throughput(base: Path, registry: LocalRegistry, size_mib: int = 256) -> dict[str, Any]:
    """The --size-mib file read in each pattern: cold and warm through FUSE, and from disk."""
    from tests.support import ocibuild as ob

    size = size_mib * MIB
    data = os.urandom(size // 2) + bytes(size - size // 2)  # half random, half zeros
    work = base / "fusebench"
    work.mkdir()
    local = work / "local.bin"
    local.write_bytes(data)
    layout = ob.write_image(work / "img", ob.Image([ob.Layer(ob.make_tar({"big.bin": data}),
                                                             compression="tar")]))
    del data
    ref = f"{registry.host}/bench/big:1"
    _convert(f"oci:{layout}:latest", ref)
    shutil.rmtree(work / "img")
    cfg = "[remote]\nbackground_prefetch = false\nmetrics_address = \"\"\n"
    cold: dict[str, dict[str, Any]] = {}
    warm: dict[str, dict[str, Any]] = {}
    disk: dict[str, dict[str, Any]] = {}

    def mounted(zsd: Snapshotterd, ctrd: Containerd) -> Path:
        _zest_pull(ctrd, ref)
        return next((zsd.root / "fuse/mnt").glob("*/big.bin"))

    def timed(path: Path, zsd: Snapshotterd | None, block: int, count: int) -> dict[str, Any]:
        drop_caches()
        before = _fetched(zsd) if zsd else {}
        r = _rates(_read(path, block, count, size))
        if zsd:
            after = _fetched(zsd)
            r["fetched_mb"] = round((after["bytes_fetched"] - before["bytes_fetched"]) / 1e6, 1)
            r["memory_hits"] = after["memory_hits"] - before["memory_hits"]
        return r

    for i, (label, block, count) in enumerate(PATTERNS):
        with zest_node(base, cfg) as (zsd, ctrd):  # a fresh, empty chunk cache for each cold run
            fuse_file = mounted(zsd, ctrd)
            cold[label] = timed(fuse_file, zsd, block, count)
            if i == 0:  # the sequential read fetched every chunk: all patterns warm here
                for wlabel, wblock, wcount in PATTERNS:
                    warm[wlabel] = timed(fuse_file, zsd, wblock, wcount)
    for label, block, count in PATTERNS:
        disk[label] = timed(local, None, block, count)
    local.unlink()
    out: dict[str, Any] = {"size_mib": size_mib, "seed": SEED}
    for label, block, _ in PATTERNS:
        d = disk[label]["mb_s"]
        out[label] = {"read_kib": block >> 10, "reads": disk[label]["reads"],
                      "disk": disk[label], "fuse_cold": cold[label], "fuse_warm": warm[label],
                      "cold_vs_disk": round(cold[label]["mb_s"] / d, 2),
                      "warm_vs_disk": round(warm[label]["mb_s"] / d, 2)}
    return out


# --- report -------------------------------------------------------------------------------------


def _markdown(command: str, out: dict[str, Any]) -> list[str]:
    md = [f"Produced by `{command}`", ""]
    if "memory" in out:
        m = out["memory"]
        md += [f"Memory of the zest processes, {len(m['images'])} images pulled lazily into one "
               f"daemon ({m['layers_mounted']} layers mounted through FUSE), each image's "
               "workload run once. MB = 10^6 bytes; RSS from /proc/PID/status, PSS from "
               f"smaps_rollup, each {SETTLE_S:g} s after the work; peak = VmHWM.", "",
               "| process | " + " | ".join(f"{s.replace('_', ' ')} RSS / PSS" for s in _STAGES)
               + " | peak RSS |", "|---|---|---|---|---|"]
        for name in m["after_runs"]["processes"]:
            cells = []
            for s in _STAGES:
                p = m[s]["processes"].get(name)
                cells.append(f"{p['rss_mb']} / {p['pss_mb']}" if p else "-")
            peak = m["after_prefetch"]["processes"].get(name, {}).get("peak_rss_mb", "-")
            md.append(f"| {name} | " + " | ".join(cells) + f" | {peak} |")
        md.append("| **total** | " + " | ".join(
            f"**{m[s]['total_rss_mb']} / {m[s]['total_pss_mb']}**" for s in _STAGES) + " | |")
        pre = m["after_pull"]
        md += ["", f"Layers mounted: {m['layers_mounted']}. Prefetched chunks at the first "
               f"point: {pre['prefetch_done']}/{pre['prefetch_total']}; background prefetch "
               f"{'finished' if m['prefetch_finished'] else 'had NOT finished (300 s)'} before "
               "the last column. Chunk cache then: "
               f"{m['after_prefetch']['chunk_cache_mb']} MB.", ""]
        verdict = {True: "PASS", False: "FAIL"}
        md.append(f"Target, all zest processes under {TARGET_MB} MB with "
                  f"{len(m['images'])} images mounted (highest of the three points): "
                  f"**{verdict[m['pass_pss']]}** by PSS, **{verdict[m['pass_rss']]}** by the sum "
                  "of RSS.")
    if "throughput" in out:
        t = out["throughput"]
        md += ["", f"Reading a {t['size_mib']} MiB file (first half random, second half zeros) "
               "through FUSE and from local disk, page cache dropped before each. Cold: on a "
               "fresh daemon, chunks fetched from the loopback registry (background prefetch "
               "off); warm: chunks in the on-disk chunk cache. Random: distinct aligned "
               f"offsets, seed {t['seed']}.", "",
               "| read | reads | disk MB/s (IOPS) | FUSE cold MB/s (IOPS) | FUSE warm MB/s "
               "(IOPS) | cold / disk | warm / disk |", "|---|---|---|---|---|---|---|"]
        for label, _, _ in PATTERNS:
            r = t[label]

            def cell(x: dict[str, Any]) -> str:
                return f"{x['mb_s']} ({x['iops']:,})"

            md.append(f"| {label.replace('_', ' ')} | {r['reads']:,} | {cell(r['disk'])} | "
                      f"{cell(r['fuse_cold'])} | {cell(r['fuse_warm'])} | "
                      f"{r['cold_vs_disk']} | {r['warm_vs_disk']} |")
        s = t["seq_1m"]
        md += ["", "Sequential, by half: cold "
               f"{s['fuse_cold']['random_half_mb_s']} MB/s over the random half and "
               f"{s['fuse_cold']['zero_half_mb_s']} MB/s over the zero half (all one chunk); "
               f"disk {s['disk']['random_half_mb_s']} / {s['disk']['zero_half_mb_s']}. "
               "Registry bytes fetched by the cold runs: " + ", ".join(
                   f"{label} {t[label]['fuse_cold']['fetched_mb']} MB" for label, _, _ in PATTERNS)
               + "."]
    return md


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10, help="how many bench images to mount")
    ap.add_argument("--size-mib", type=int, default=256, help="size of the file read")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args()
    command = (f".venv/bin/python -m bench.fuse_io --images {args.images} "
               f"--size-mib {args.size_mib}" + " --skip-memory" * args.skip_memory
               + " --skip-throughput" * args.skip_throughput)
    recipes = all_recipes()[: args.images]
    base = Path(tempfile.mkdtemp(prefix="zbench-"))
    out: dict[str, Any] = {"command": command}
    steps: list[tuple[str, Callable[[LocalRegistry], dict[str, Any]]]] = []
    if not args.skip_memory:
        steps.append(("memory", lambda reg: memory(base, reg, recipes)))
    if not args.skip_throughput:
        steps.append(("throughput", lambda reg: fuse_throughput(base, reg, args.size_mib)))
    try:
        with LocalRegistry(base / "registry") as reg:
            for key, step in steps:
                out[key] = step(reg)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fuse_io.json").write_text(json.dumps(out, indent=2) + "\n")
    md = _markdown(command, out)
    (RESULTS / "fuse_io.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
