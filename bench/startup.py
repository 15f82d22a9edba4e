"""The startup benchmark: time to a workload's first output, zest lazy pull against containerd's
overlayfs full pull, per workload and per emulated link, all in one run and interleaved.

    .venv/bin/python -m bench.startup [--repeat 3] [--repeat-other 1]
        [--links 100/20,1000/2,20/50] [--workloads python3,gcc,nodejs,postgres-initdb]

Images: bench/workloads.py (Debian bookworm minbase plus one apt layer; built once, cached),
pushed as ordinary gzip images to a local registry, converted with `zest convert`, and profiled
with `zest optimize` (a private node, no link emulation) into a third tag.

Per link and round, for each workload in turn, each on a fresh containerd (and a fresh zest
daemon with an empty cache), page cache dropped before the node starts:
  overlayfs      `ctr image pull` of the original, then `ctr run`
  zest           `ctr-remote image rpull` of the converted image, prediction off, then
                 `ctr run --snapshotter zest`
  zest+predict   the same with prediction on (the default): no profile, zest guesses
  zest+profile   the image `zest optimize` made: its TOCs carry the recorded prefetch lists
The clock runs from the start of the pull to the container's first output line; bytes and
requests are what the registry served until that line. All registry traffic crosses LinkProxy
(tests/support/linkproxy.py): every request waits one round trip and all bodies share one token
bucket. `floor` is the run alone with the image local (a second `ctr run` after overlayfs).
`limit` is floor + bytes zest+profile read / bandwidth + 2 round trips: the physical limit.

The zest pull client is ctr-remote (stargz-snapshotter's, a Go binary like `ctr`), so that both
sides pay the same for their client; `--client zest` uses `zest pull` instead (Python: it adds
its start-up, about 0.2 s). Kubernetes pulls through CRI, with no client process at all.

Writes bench/results/startup.json, startup.md and startup.png.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import ZEST, drop_caches, zest_node
from bench.workloads import WORKLOADS, Workload
from chunkstore.convert import DEFAULT_LEVEL
from tests.support import images
from tests.support.containerd import Containerd
from tests.support.linkproxy import LinkProxy
from tests.support.registry import LocalRegistry

RESULTS = Path(__file__).parent / "results"
MODES = ("overlayfs", "zest", "zest+predict", "zest+profile")
LINKS = ((100.0, 20.0), (1000.0, 2.0), (20.0, 50.0))  # the first is the main one


@dataclass(frozen=True)
class Refs:
    original: str  # repository:tag paths, without the registry host
    converted: str
    profiled: str


def _first_line(argv: list[str], started: float, expected: str,
                at_first: Callable[[], None]) -> float:
    """Runs argv; seconds from `started` to its first output line, which must hold
    `expected`. `at_first` runs the moment that line arrives."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    t = time.monotonic() - started
    at_first()
    _, err = proc.communicate(timeout=900)
    if proc.returncode != 0 or expected not in line:
        raise RuntimeError(f"{argv[-1]!r}: exit {proc.returncode}, first line {line!r}, "
                           f"stderr {err[-500:]!r}")
    return t


class _Counter:
    def __init__(self, link: LinkProxy):
        self.link = link
        self.bytes = self.requests = 0

    def __call__(self) -> None:
        self.bytes, self.requests = self.link.bytes_sent, self.link.started


def _ctr(ctrd: Containerd) -> list[str]:
    return ["ctr", "--address", str(ctrd.address), "--namespace", ctrd.namespace]


def _overlayfs_round(base: Path, link: LinkProxy, w: Workload, ref: str) -> dict[str, Any]:
    drop_caches()
    with Containerd(base) as ctrd:
        link.reset()
        t0 = time.monotonic()
        ctrd.ctr("image", "pull", "--plain-http", ref, timeout=1800)
        pulled = time.monotonic() - t0
        run = [*_ctr(ctrd), "run", "--rm", ref]
        seen = _Counter(link)
        first = _first_line([*run, f"b-{uuid.uuid4().hex[:6]}", *w.cmd], t0, w.expected, seen)
        t1 = time.monotonic()  # the floor: the same run again, the image local
        floor = _first_line([*run, f"f-{uuid.uuid4().hex[:6]}", *w.cmd], t1, w.expected,
                            lambda: None)
    return {"first_output_s": first, "pull_s": pulled, "bytes": seen.bytes,
            "requests": seen.requests, "floor_s": floor}


def _zest_round(base: Path, link: LinkProxy, w: Workload, ref: str, predict: bool,
                client: str) -> dict[str, Any]:
    drop_caches()
    cfg = f'[remote]\nmetrics_address = ""\npredict = {str(predict).lower()}\n'
    with zest_node(base, cfg) as (_, ctrd):
        link.reset()
        t0 = time.monotonic()
        if client == "ctr-remote":
            pull = ["ctr-remote", "--address", str(ctrd.address), "--namespace",
                    ctrd.namespace, "image", "rpull", "--plain-http", "--snapshotter", "zest",
                    ref]
        else:
            pull = [ZEST, "pull", "--address", str(ctrd.address), "--namespace",
                    ctrd.namespace, ref]
        subprocess.run(pull, check=True, capture_output=True, timeout=900)
        pulled = time.monotonic() - t0
        seen = _Counter(link)
        first = _first_line([*_ctr(ctrd), "run", "--snapshotter", "zest", "--rm", ref,
                             f"z-{uuid.uuid4().hex[:6]}", *w.cmd], t0, w.expected, seen)
        return {"first_output_s": first, "pull_s": pulled, "bytes": seen.bytes,
                "requests": seen.requests}


def _prepare(base: Path, reg: LocalRegistry, w: Workload, chunk_kb: int) -> Refs:
    """Push the original, convert it, and record its profile with `zest optimize`."""
    repo = f"bench/{w.name}"
    refs = Refs(f"{repo}:original", f"{repo}:zest{chunk_kb}", f"{repo}:profile{chunk_kb}")
    src = images.push_image(w.image, reg.host, repo, "original")
    subprocess.run([ZEST, "convert", "--no-progress", "--chunk-kb", str(chunk_kb), src,
                    f"{reg.host}/{refs.converted}"], check=True, capture_output=True)
    with zest_node(base, '[remote]\nmetrics_address = ""\n') as (zsd, ctrd):
        # no CMD: the image's own, as a user would run it; stop at its output line
        subprocess.run([ZEST, "optimize", "--address", str(ctrd.address), "--namespace",
                        ctrd.namespace, "--zest-root", str(zsd.root), "--ready", w.expected,
                        "--timeout", "300", f"{reg.host}/{refs.converted}",
                        f"{reg.host}/{refs.profiled}"], check=True, capture_output=True)
    return refs


def _median(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {k: round(statistics.median(r[k] for r in rounds), 3)
                           for k in rounds[0]}
    out["runs"] = [round(r["first_output_s"], 3) for r in rounds]
    return out


def _measure_link(base: Path, reg: LocalRegistry, refs: dict[str, Refs], workloads: list[Workload],
                  mbit: float, rtt_ms: float, repeat: int, client: str) -> dict[str, Any]:
    rounds: dict[str, dict[str, list[dict[str, Any]]]] = {
        w.name: {m: [] for m in MODES} for w in workloads}
    with LinkProxy(reg.host, mbit=mbit, rtt_ms=rtt_ms) as link:
        for n in range(repeat):
            for w in workloads:  # interleaved: every mode of every workload in each round
                r, host = refs[w.name], link.host
                print(f"[{mbit:g} Mbit/s {rtt_ms:g} ms] round {n + 1}/{repeat} {w.name}",
                      file=sys.stderr, flush=True)
                got = rounds[w.name]
                got["overlayfs"].append(_overlayfs_round(base, link, w, f"{host}/{r.original}"))
                got["zest"].append(_zest_round(base, link, w, f"{host}/{r.converted}", False,
                                               client))
                got["zest+predict"].append(_zest_round(base, link, w, f"{host}/{r.converted}",
                                                       True, client))
                got["zest+profile"].append(_zest_round(base, link, w, f"{host}/{r.profiled}",
                                                       True, client))
    out: dict[str, Any] = {}
    for w in workloads:
        res = {m: _median(rs) for m, rs in rounds[w.name].items()}
        base_s = res["overlayfs"]["first_output_s"]
        floor = res["overlayfs"]["floor_s"]
        limit = floor + res["zest+profile"]["bytes"] * 8 / (mbit * 1e6) + 2 * rtt_ms / 1000
        for m in MODES[1:]:
            res[m]["speedup"] = round(base_s / res[m]["first_output_s"], 2)
        res["floor_s"] = floor
        res["limit_s"] = round(limit, 3)
        res["profile_vs_limit"] = round(res["zest+profile"]["first_output_s"] / limit, 2)
        out[w.name] = res
    return out


def _targets(main: dict[str, Any]) -> list[str]:
    """The issue's targets at the main link, each checked on every workload."""
    lines = []
    checks: list[tuple[str, Callable[[dict[str, Any]], float], Callable[[float], bool], str]] = [
        ("zest+profile at least 10x faster than overlayfs",
         lambda r: r["zest+profile"]["speedup"], lambda v: v >= 10, "x"),
        ("zest+profile within 1.5x of the physical limit",
         lambda r: r["profile_vs_limit"], lambda v: v <= 1.5, "x"),
        ("no profile (zest+predict) at least 5x faster than overlayfs",
         lambda r: r["zest+predict"]["speedup"], lambda v: v >= 5, "x"),
        ("under 30 registry requests before first output with a profile",
         lambda r: r["zest+profile"]["requests"], lambda v: v < 30, ""),
    ]
    for text, get, ok, unit in checks:
        met = all(ok(get(r)) for r in main.values())
        got = ", ".join(f"{name} {get(r):g}{unit}" for name, r in main.items())
        lines.append(f"- {'met' if met else '**not met**'}: {text} ({got})")
    best = ", ".join(f"{name} {r['overlayfs']['first_output_s'] / r['limit_s']:.1f}x"
                     for name, r in main.items())
    lines.append(f"- Overlayfs over the physical limit, the most zest could gain while it moves "
                 f"these bytes (chunks of 256 KiB, zstd -{DEFAULT_LEVEL}): {best}")
    return lines


def _markdown(out: dict[str, Any], command: str) -> str:
    md = [f"Produced by `{command}` on {out['machine']}; medians of {out['repeat']} interleaved "
          f"rounds at the first link, {out['repeat_other']} at the others. Time is from the "
          "start of the pull to the workload's first output line.", ""]
    for link in out["links"]:
        md += [f"### {link['mbit']:g} Mbit/s, {link['rtt_ms']:g} ms round trip", "",
               "| workload | mode | first output (s) | speedup | pull (s) | registry MB | "
               "requests |", "|---|---|---|---|---|---|---|"]
        for name, res in link["workloads"].items():
            for m in MODES:
                r = res[m]
                speed = "1x" if m == "overlayfs" else f"{r['speedup']}x"
                md.append(f"| {name} | {m} | {r['first_output_s']:.2f} | {speed} | "
                          f"{r['pull_s']:.2f} | {r['bytes'] / 1e6:.1f} | {r['requests']} |")
            md.append(f"| {name} | floor (image local) | {res['floor_s']:.2f} | | | | |")
            md.append(f"| {name} | limit (floor + bytes/bw + 2 RTT) | {res['limit_s']:.2f} | "
                      f"| | | |")
        md.append("")
    md += ["### Targets (first link)", "", *out["targets"], "", "![startup chart](startup.png)"]
    return "\n".join(md) + "\n"


def _chart(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    links = out["links"]
    fig, axes = plt.subplots(1, len(links), figsize=(5.5 * len(links), 4.5), squeeze=False)
    colors = {"overlayfs": "#888888", "zest": "#9ecae1", "zest+predict": "#4292c6",
              "zest+profile": "#08519c"}
    for ax, link in zip(axes[0], links, strict=True):
        names = list(link["workloads"])
        width = 0.8 / len(MODES)
        for i, m in enumerate(MODES):
            xs = [j + (i - (len(MODES) - 1) / 2) * width for j in range(len(names))]
            ys = [link["workloads"][n][m]["first_output_s"] for n in names]
            ax.bar(xs, ys, width, label=m, color=colors[m])
        for j, n in enumerate(names):
            ax.hlines(link["workloads"][n]["limit_s"], j - 0.4, j + 0.4, colors="#d62728",
                      linestyles="dashed", label="physical limit" if j == 0 else None)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%g"))
        ax.set_xticks(range(len(names)), names, rotation=15)
        ax.set_title(f"{link['mbit']:g} Mbit/s, {link['rtt_ms']:g} ms RTT")
        ax.set_ylabel("seconds to first output (log)")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("zest: time to first output from an image not on the node")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="rounds at the first link")
    ap.add_argument("--repeat-other", type=int, default=1, help="rounds at the other links")
    ap.add_argument("--links", default=",".join(f"{m:g}/{r:g}" for m, r in LINKS),
                    help="MBIT/RTT_MS pairs, the first is the main one")
    ap.add_argument("--workloads", default=",".join(w.name for w in WORKLOADS))
    ap.add_argument("--client", choices=("ctr-remote", "zest"), default="ctr-remote")
    ap.add_argument("--chunk-kb", type=int, default=256, help="`zest convert --chunk-kb`")
    ap.add_argument("--render", action="store_true",
                    help="only judge and write the results again from startup.json")
    args = ap.parse_args()
    if args.render:
        _report(json.loads((RESULTS / "startup.json").read_text()))
        return 0
    chosen = args.workloads.split(",")
    workloads = [w for w in WORKLOADS if w.name in chosen]
    if len(workloads) != len(chosen):
        ap.error(f"workloads are: {', '.join(w.name for w in WORKLOADS)}")
    links = [tuple(float(x) for x in pair.split("/")) for pair in args.links.split(",")]
    command = " ".join(["python -m bench.startup", *sys.argv[1:]])
    out: dict[str, Any] = {
        "machine": f"{subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()}"
                   " cores", "repeat": args.repeat, "repeat_other": args.repeat_other,
        "client": args.client, "chunk_kb": args.chunk_kb, "links": [],
        "workloads": {w.name: {"image": w.image, "cmd": list(w.cmd)} for w in workloads}}
    for w in workloads:
        images.image_layout(w.image)  # build what is not cached yet, before any clock runs
    base = Path(tempfile.mkdtemp(prefix="zbench-"))
    try:
        with LocalRegistry(base / "registry") as reg:
            refs = {w.name: _prepare(base, reg, w, args.chunk_kb) for w in workloads}
            for i, (mbit, rtt) in enumerate(links):
                res = _measure_link(base, reg, refs, workloads, mbit, rtt,
                                    args.repeat if i == 0 else args.repeat_other, args.client)
                out["links"].append({"mbit": mbit, "rtt_ms": rtt, "workloads": res})
    finally:
        shutil.rmtree(base, ignore_errors=True)
    out["command"] = f".venv/bin/{command}"
    print(_report(out))
    return 0


def _report(out: dict[str, Any]) -> str:
    """Judge the targets, then write startup.json, .md and .png; returns the markdown."""
    out["targets"] = _targets(out["links"][0]["workloads"])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "startup.json").write_text(json.dumps(out, indent=2) + "\n")
    md = _markdown(out, out["command"])
    (RESULTS / "startup.md").write_text(md)
    _chart(out, RESULTS / "startup.png")
    return md


if __name__ == "__main__":
    raise SystemExit(main())
