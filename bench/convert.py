"""Conversion throughput next to the stock zstd CLI, and chunker throughput next to SHA-256.

    .venv/bin/python -m bench.convert [--image debian-python] [--repeat 3] [--level 18]

Builds (or reuses) the cached test image, unpacks its gzip layers to plain tar
files, then in the same run and on the same bytes measures:
  * chunkstore.convert_tar (tar -> zest blob) in MB/s of uncompressed tar,
  * `zstd -T0 -LEVEL` compressing the same tar files (the baseline; ratio reported),
  * the native FastCDC scan and hashlib SHA-256 over the same bytes,
  * `zest convert` end to end between two OCI layouts (gzip decode included).
Both at --level (zest convert's default unless given). Writes bench/results/convert.json and
convert.md. Timings are best of --repeat.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from chunkstore import chunker
from chunkstore.convert import DEFAULT_LEVEL, convert_tar

RESULTS = Path(__file__).parent / "results"


def _layers(layout: Path) -> list[Path]:
    index = json.loads((layout / "index.json").read_text())
    mdesc = index["manifests"][0]
    manifest = json.loads((layout / "blobs" / "sha256" / mdesc["digest"][7:]).read_text())
    return [layout / "blobs" / "sha256" / d["digest"][7:] for d in manifest["layers"]]


def _best(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--image", default="debian-python")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--level", type=int, default=DEFAULT_LEVEL)
    args = ap.parse_args()
    from tests.support.images import image_layout

    layout = image_layout(args.image)
    work = Path(tempfile.mkdtemp(prefix="zest-bench-convert-"))
    try:
        tars = []
        for i, blob in enumerate(_layers(layout)):
            tar = work / f"layer{i}.tar"
            with gzip.open(blob, "rb") as src, open(tar, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            tars.append(tar)
        total = sum(t.stat().st_size for t in tars)
        out = work / "out.blob"

        def run_convert() -> None:
            for t in tars:
                with open(t, "rb") as src, open(out, "wb") as dst:
                    convert_tar(src, dst, level=args.level)

        def run_zstd() -> None:
            for t in tars:
                subprocess.run(["zstd", "-q", "-f", "-T0", f"-{args.level}", str(t), "-o",
                                str(out)], check=True)

        conv_s = _best(run_convert, args.repeat)
        zstd_s = _best(run_zstd, args.repeat)
        data = b"".join(t.read_bytes() for t in tars)
        p = chunker.DEFAULT_PARAMS
        cdc_s = _best(lambda: chunker.cut_points(data, p, True), args.repeat)
        sha_s = _best(lambda: hashlib.sha256(data).digest(), args.repeat)
        sample = data[: 4 << 20]
        py_s = _best(lambda: chunker.cut_points_py(sample, p, True), 1)
        zest = Path(sys.executable).with_name("zest")
        dst_layout = work / "converted"

        def run_cli() -> None:
            shutil.rmtree(dst_layout, ignore_errors=True)
            subprocess.run([str(zest), "convert", "--no-progress", "--level", str(args.level),
                            f"oci:{layout}:latest",
                            f"oci:{dst_layout}:latest"], check=True, capture_output=True)

        cli_s = _best(run_cli, args.repeat)
        mb = total / 1e6
        res = {
            "image": args.image, "layers": len(tars), "tar_mb": round(mb, 1),
            "cpus": os.cpu_count(), "level": args.level,
            "convert_tar_mb_s": round(mb / conv_s, 1),
            "zstd_cli_T0_mb_s": round(mb / zstd_s, 1),
            "convert_vs_zstd_ratio": round(zstd_s / conv_s, 2),
            "zest_convert_cli_mb_s": round(mb / cli_s, 1),
            "fastcdc_native_mb_s": round(mb / cdc_s, 1),
            "sha256_mb_s": round(mb / sha_s, 1),
            "fastcdc_python_reference_mb_s": round(len(sample) / 1e6 / py_s, 2),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "convert.json").write_text(json.dumps(res, indent=2) + "\n")
    md = ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in res.items()]
    cmd = f"`.venv/bin/python -m bench.convert --level {args.level}`"
    (RESULTS / "convert.md").write_text(f"Produced by {cmd}\n\n" + "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
