"""Image-level conversion against an in-memory store: manifests, indexes, bad input."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import BinaryIO

import pytest
import zstandard

from chunkstore import format as fmt
from chunkstore.errors import ChunkstoreError
from snapshotter.image import store as st
from snapshotter.image.convert import ConvertError, ConvertOptions, convert_image
from tests.support import ocibuild as ob


class DictStore:
    """An ImageStore over an OCI layout written by ocibuild, plus dict outputs."""

    def __init__(self, layout: Path | None = None):
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, st.Manifest] = {}
        self.tags: dict[str, str] = {}
        self.puts = 0
        if layout is not None:
            for p in (layout / "blobs" / "sha256").iterdir():
                self.blobs["sha256:" + p.name] = p.read_bytes()
            for d in json.loads((layout / "index.json").read_text())["manifests"]:
                self.tags[d["annotations"]["org.opencontainers.image.ref.name"]] = d["digest"]

    def get_manifest(self, reference: str) -> st.Manifest:
        digest = self.tags.get(reference, reference)
        if digest in self.manifests:
            return self.manifests[digest]
        data = self.blobs[digest]
        return st.Manifest(json.loads(data)["mediaType"], data, digest)

    def open_blob(self, digest: str) -> BinaryIO:
        return io.BytesIO(self.blobs[digest])

    def has_blob(self, digest: str) -> bool:
        return digest in self.blobs

    def put_blob(self, fileobj: BinaryIO, digest: str, size: int) -> None:
        data = fileobj.read()
        assert ob.sha(data) == digest and len(data) == size
        self.blobs[digest] = data
        self.puts += 1

    def put_manifest(self, manifest: st.Manifest, tag: str | None) -> None:
        self.manifests[manifest.digest] = manifest
        if tag:
            self.tags[tag] = manifest.digest

    def close(self) -> None:
        pass


def _src(tmp_path: Path, img: ob.Image) -> DictStore:
    return DictStore(ob.write_image(tmp_path / "src", img))


FILES = {"bin/": None, "bin/sh": b"#!fake shell\n" * 100, "etc/hosts": b"127.0.0.1 x\n"}


def _convert(src: DictStore, dst: DictStore | None = None) -> DictStore:
    dst = dst or DictStore()
    convert_image(src, "latest", dst, "zest", ConvertOptions(progress=False, threads=2))
    return dst


@pytest.mark.parametrize(("flavor", "compression"), sorted(ob.LAYER_TYPES))
def test_manifest_converted(tmp_path: Path, compression: str, flavor: str) -> None:
    tar = ob.make_tar(FILES)
    src = _src(tmp_path, ob.Image([ob.Layer(tar, compression)], flavor=flavor))
    dst = _convert(src)
    m = dst.get_manifest("zest")
    obj = json.loads(m.data)
    assert m.media_type == st.OCI_MANIFEST and obj["mediaType"] == st.OCI_MANIFEST
    assert obj["config"]["mediaType"] == st.OCI_CONFIG
    src_m = json.loads(src.get_manifest("latest").data)
    assert obj["config"]["digest"] == src_m["config"]["digest"]  # config bytes unchanged
    (layer,) = obj["layers"]
    assert layer["mediaType"] == st.OCI_LAYER_ZSTD
    assert fmt.footer_from_annotations(layer["annotations"]) is not None
    blob = dst.blobs[layer["digest"]]
    with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob),
                                                    read_across_frames=True) as r:
        assert r.read() == tar


def test_index_every_platform_converted_and_shared_layer_once(tmp_path: Path) -> None:
    shared = ob.Layer(ob.make_tar(FILES))
    amd = ob.Image([shared, ob.Layer(ob.make_tar({"a": b"amd64"}))], arch="amd64")
    arm = ob.Image([shared, ob.Layer(ob.make_tar({"a": b"arm64"}))], arch="arm64")
    src = DictStore(ob.write_multiarch(tmp_path / "src", [amd, arm], docker=True))
    dst = _convert(src)
    idx = json.loads(dst.get_manifest("zest").data)
    assert idx["mediaType"] == st.OCI_INDEX
    assert [d["platform"]["architecture"] for d in idx["manifests"]] == ["amd64", "arm64"]
    layers = [json.loads(dst.get_manifest(d["digest"]).data)["layers"] for d in idx["manifests"]]
    assert layers[0][0]["digest"] == layers[1][0]["digest"]
    assert layers[0][1]["digest"] != layers[1][1]["digest"]
    # 2 configs + 3 distinct converted layers
    assert dst.puts == 5


def test_existing_blobs_not_uploaded_again(tmp_path: Path) -> None:
    src = _src(tmp_path, ob.Image([ob.Layer(ob.make_tar(FILES))]))
    dst = _convert(src)
    before = dst.puts
    _convert(src, dst)
    assert dst.puts == before


def test_reconverting_a_converted_image_keeps_its_layers(tmp_path: Path) -> None:
    src = _src(tmp_path, ob.Image([ob.Layer(ob.make_tar(FILES))]))
    once = _convert(src)
    twice = DictStore()
    convert_image(once, "zest", twice, "again", ConvertOptions(progress=False))
    a = json.loads(once.get_manifest("zest").data)
    b = json.loads(twice.get_manifest("again").data)
    assert a["layers"] == b["layers"]


def _fails(tmp_path: Path, layer: ob.Layer, match: str) -> str:
    good = ob.Layer(ob.make_tar(FILES))
    src = _src(tmp_path, ob.Image([good, layer]))
    dst = DictStore()
    with pytest.raises((ConvertError, ChunkstoreError), match=match) as exc:
        convert_image(src, "latest", dst, "zest", ConvertOptions(progress=False))
    assert "zest" not in dst.tags
    assert "layer 2/2" in str(exc.value)
    return str(exc.value)


def test_corrupt_gzip(tmp_path: Path) -> None:
    blob = bytearray(ob.compress(ob.make_tar({"f": bytes(range(256)) * 400}), "gzip"))
    blob[len(blob) // 2 : len(blob) // 2 + 16] = b"\xff" * 16
    _fails(tmp_path, ob.Layer(ob.make_tar({"f": b""}), blob=bytes(blob)), "corrupt gzip|CRC")


def test_truncated_gzip(tmp_path: Path) -> None:
    blob = ob.compress(ob.make_tar({"f": bytes(range(256)) * 400}), "gzip")
    _fails(tmp_path, ob.Layer(b"", blob=blob[: len(blob) // 2]), "corrupt gzip")


def test_truncated_zstd(tmp_path: Path) -> None:
    blob = ob.compress(ob.make_tar({"f": bytes(range(256)) * 400}), "zstd")
    _fails(tmp_path, ob.Layer(b"", compression="zstd", blob=blob[:-20]), "corrupt zstd")


def test_truncated_tar(tmp_path: Path) -> None:
    tar = ob.make_tar({"f": bytes(5000)})
    _fails(tmp_path, ob.Layer(tar, compression="tar", blob=tar[:2000]), "truncated")


def test_manifest_lies_about_size(tmp_path: Path) -> None:
    _fails(tmp_path, ob.Layer(ob.make_tar({"f": b"x"}), claimed_size=10), "descriptor says")


def test_manifest_lies_about_digest(tmp_path: Path) -> None:
    fake = "sha256:" + "ab" * 32
    _fails(tmp_path, ob.Layer(ob.make_tar({"f": b"x"}), claimed_digest=fake), "digest")


def test_diff_id_mismatch(tmp_path: Path) -> None:
    layer = ob.Layer(ob.make_tar({"f": b"x"}), blob=ob.compress(ob.make_tar({"g": b"y"}), "gzip"))
    _fails(tmp_path, layer, "diff_id")


@pytest.mark.parametrize("name", ["../escape", "/abs/path"])
def test_unsafe_entry(tmp_path: Path, name: str) -> None:
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ti = tarfile.TarInfo(name)
        ti.size = 1
        tf.addfile(ti, io.BytesIO(b"x"))
    _fails(tmp_path, ob.Layer(buf.getvalue()), r"absolute|\.\.")


def test_chunk_size_option(tmp_path: Path) -> None:
    import argparse
    import os

    from chunkstore.chunker import ChunkerParams
    from chunkstore.toc import load_toc, read_footer
    from snapshotter.cli import _chunk_kb

    assert _chunk_kb("64") == 64
    for bad in ("100", "8", "8192"):
        with pytest.raises(argparse.ArgumentTypeError):
            _chunk_kb(bad)
    tar = ob.make_tar({"big": os.urandom(2 << 20)})
    src = _src(tmp_path, ob.Image([ob.Layer(tar)]))
    counts = []
    for avg in (256 << 10, 32 << 10):
        dst = DictStore()
        convert_image(src, "latest", dst, "zest", ConvertOptions(
            progress=False, threads=2, chunking=ChunkerParams(avg // 4, avg, avg * 4)))
        (layer,) = json.loads(dst.get_manifest("zest").data)["layers"]
        blob = dst.blobs[layer["digest"]]

        def read(o: int, n: int, blob: bytes = blob) -> bytes:
            return blob[o:o + n]

        toc = load_toc(read, read_footer(read, len(blob)))
        (entry,) = [e for e in toc.entries if e.name == b"big"]
        assert all(c.size <= avg * 4 for c in entry.chunks)
        counts.append(len(entry.chunks))
    assert counts[1] > 3 * counts[0]  # smaller average, many more chunks
