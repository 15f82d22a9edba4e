"""Tag resolution for labels that name only the image (once per image pull, not per layer),
and how a fetched TOC is checked before it is kept."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

from chunkstore import format as fmt
from chunkstore._pb import toc_pb2
from chunkstore.digest import Digest
from chunkstore.errors import DigestMismatch, FormatError
from snapshotter.fuse.protocol import ControlError
from snapshotter.image import store as st
from snapshotter.remote import RemoteLayers


class FakeClient:
    host = "registry.example"

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.layers = ["sha256:" + "a" * 64, "sha256:" + "b" * 64]

    def get_manifest(self, repo: str, reference: str) -> st.Manifest:
        self.calls.append(reference)
        data = json.dumps({"schemaVersion": 2, "layers": [
            {"digest": d, "size": 1} for d in self.layers]}).encode()
        return st.Manifest(st.OCI_MANIFEST, data, str(Digest.of(data)))


def test_a_tag_is_resolved_once_for_all_layers_of_an_image(tmp_path: Path) -> None:
    remote = RemoteLayers(tmp_path, cast(Any, None))
    client = FakeClient()
    first = remote._find_manifest(cast(Any, client), "app", "1", client.layers[0])
    again = remote._find_manifest(cast(Any, client), "app", "1", client.layers[1])
    assert first == again and client.calls == ["1"]
    # a layer the resolved manifest does not hold: the tag may have moved, ask again
    client.layers = ["sha256:" + "c" * 64]
    moved = remote._find_manifest(cast(Any, client), "app", "1", client.layers[0])
    assert moved != first and client.calls == ["1", "1"]
    assert remote._find_manifest(cast(Any, client), "app", "2", client.layers[0]) == moved
    assert client.calls == ["1", "1", "2"]  # another tag is another question


def _toc_payload(chunk_end: int) -> tuple[bytes, fmt.Footer]:
    toc = toc_pb2.TOC(version=fmt.TOC_VERSION, entries=[toc_pb2.Entry(
        name=b"f", size=10, chunks=[toc_pb2.Chunk(file_offset=0, blob_offset=chunk_end - 5,
                                                  compressed_size=5, size=10,
                                                  digest=bytes(32))])])
    payload = fmt.encode_toc(toc)
    return payload, fmt.Footer(0, len(payload), Digest.of(payload))


class TocClient:
    def __init__(self, payload: bytes):
        self.payload = payload

    def read_range(self, repo: str, digest: str, offset: int, size: int) -> bytes:
        return self.payload[offset:offset + size]


def test_a_toc_is_warmed_while_checked_and_kept_only_if_it_passes(tmp_path: Path) -> None:
    remote = RemoteLayers(tmp_path, cast(Any, None))
    seen: list[tuple[Path, bytes]] = []

    def warm(path: Path) -> None:
        seen.append((path, path.read_bytes()))  # the FUSE process reads it by this name

    good, footer = _toc_payload(chunk_end=100)
    remote._fetch_toc(cast(Any, TocClient(good)), "reg", "app", {"digest": "x", "size": 100},
                      footer, warm)
    assert seen and seen[0][1] == good
    assert [p.name for p in remote.tocs.iterdir()] == [footer.toc_digest.hex]
    bad, bad_footer = _toc_payload(chunk_end=200)  # a chunk past the end of a 100-byte blob
    with pytest.raises(FormatError, match="past the end"):
        remote._fetch_toc(cast(Any, TocClient(bad)), "reg", "app", {"digest": "x", "size": 100},
                          bad_footer, warm)
    assert len(seen) == 2 and seen[1][1] == bad
    assert [p.name for p in remote.tocs.iterdir()] == [footer.toc_digest.hex]  # not kept


class CountingClient(TocClient):
    def __init__(self, payload: bytes):
        super().__init__(payload)
        self.reads: list[tuple[int, int]] = []

    def read_range(self, repo: str, digest: str, offset: int, size: int) -> bytes:
        self.reads.append((offset, size))
        return super().read_range(repo, digest, offset, size)


def _labelled(tmp_path: Path) -> tuple[RemoteLayers, CountingClient, dict[str, Any], bytes,
                                      fmt.Footer, Callable[[fmt.Footer], None]]:
    """A layer blob whose TOC is at offset 4, and a Prepare's head start with a label."""
    payload, footer = _toc_payload(chunk_end=5)
    blob = b"junk" + payload
    footer = fmt.Footer(4, len(payload), footer.toc_digest)
    remote = RemoteLayers(tmp_path, cast(Any, None))
    client = CountingClient(blob)
    desc: dict[str, Any] = {"digest": "sha256:" + "e" * 64, "size": len(blob)}

    def prepare(label: fmt.Footer) -> None:
        remote._toc_head_start(cast(Any, client), "reg", "app", desc["digest"],
                               {fmt.LABEL_TOC: fmt.toc_annotations(label)[fmt.LABEL_TOC]})

    return remote, client, desc, payload, footer, prepare


def test_a_prepare_label_gives_the_toc_fetch_a_head_start(tmp_path: Path) -> None:
    remote, client, desc, payload, footer, prepare = _labelled(tmp_path)
    prepare(footer)
    remote._fetch_toc(cast(Any, client), "reg", "app", desc, footer)
    assert client.reads == [(4, len(payload))]  # the head start's, used: no second fetch
    assert (remote.tocs / footer.toc_digest.hex).read_bytes() == payload
    prepare(footer)  # the TOC is here now: a later Prepare with the label fetches nothing
    assert client.reads == [(4, len(payload))]


def test_a_lying_toc_label_costs_a_fetch_and_nothing_else(tmp_path: Path) -> None:
    remote, client, desc, payload, footer, prepare = _labelled(tmp_path)
    prepare(fmt.Footer(0, len(payload), footer.toc_digest))  # the label points elsewhere
    remote._fetch_toc(cast(Any, client), "reg", "app", desc, footer)
    # the head start fetched the wrong place, and the TOC came from where the manifest says
    assert client.reads == [(0, len(payload)), (4, len(payload))]
    assert (remote.tocs / footer.toc_digest.hex).read_bytes() == payload
    lied = fmt.Footer(4, len(payload), Digest.of(b"other"))  # the manifest's digest wins
    prepare(lied)
    with pytest.raises(DigestMismatch, match="TOC"):
        remote._fetch_toc(cast(Any, client), "reg", "app", desc, lied)


class FakeFuse:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def call(self, op: str, **kw: Any) -> dict[str, Any]:
        self.calls.append((op, kw))
        return {}


def test_warm_passes_the_hot_frames_place_from_the_descriptor(tmp_path: Path) -> None:
    fuse = FakeFuse()
    remote = RemoteLayers(tmp_path, cast(Any, fuse))
    _, footer = _toc_payload(chunk_end=5)
    digest = "sha256:" + "e" * 64
    for ann, want in (({fmt.ANN_HOT: "100,2000"}, [100, 2000]), ({fmt.ANN_HOT: "x"}, None),
                      ({}, None)):
        remote._warm("reg.example", "app", {"digest": digest, "annotations": ann}, footer,
                     None, "layer", tmp_path / "toc")
        op, kw = fuse.calls[-1]
        assert op == "warm" and kw["hot"] == want and kw["source"]["digest"] == digest


class TocFuse:
    """Answers `toc` as the FUSE process does (the bytes into `path`), or fails."""

    def __init__(self, blob: bytes, fail: bool = False):
        self.blob, self.fail = blob, fail
        self.calls: list[dict[str, Any]] = []

    def call(self, op: str, **kw: Any) -> dict[str, Any]:
        self.calls.append({"op": op, **kw})
        if self.fail:
            raise ControlError("FUSE process at x is not answering")
        offset, size = kw["toc"]
        Path(kw["path"]).write_bytes(self.blob[offset:offset + size])
        return {"hot": True}


def test_a_toc_with_hot_frames_behind_it_is_fetched_by_the_fuse_process(tmp_path: Path) -> None:
    payload, footer = _toc_payload(chunk_end=5)
    blob = b"junk" + payload + b"pad-and-frames"
    footer = fmt.Footer(4, len(payload), footer.toc_digest)
    behind = (4 + len(payload) + 8, 6)  # after a pad frame's header, say
    desc = {"digest": "sha256:" + "e" * 64, "size": len(blob),
            "annotations": {fmt.ANN_HOT: f"{behind[0]},{behind[1]}"}}
    for fail in (False, True):
        fuse = TocFuse(blob, fail)
        remote = RemoteLayers(tmp_path / str(fail), cast(Any, fuse))
        client = CountingClient(blob)
        remote._fetch_toc(cast(Any, client), "reg", "app", desc, footer)
        assert (remote.tocs / footer.toc_digest.hex).read_bytes() == payload
        (call,) = fuse.calls
        assert call["op"] == "toc" and call["hot"] == list(behind)
        assert call["toc"] == [4, len(payload)] and call["source"]["digest"] == desc["digest"]
        # failing, the daemon fetched it itself; no temporary file is left either way
        assert client.reads == ([(4, len(payload))] if fail else [])
        assert [p.name for p in remote.tocs.iterdir()] == [footer.toc_digest.hex]
    # frames before the TOC (optimized by an older zest), or none: the daemon's own request
    for ann in ({fmt.ANN_HOT: "1,3"}, {}):
        fuse = TocFuse(blob)
        remote = RemoteLayers(tmp_path / f"old{len(ann)}", cast(Any, fuse))
        client = CountingClient(blob)
        remote._fetch_toc(cast(Any, client), "reg", "app", {**desc, "annotations": ann}, footer)
        assert fuse.calls == [] and client.reads == [(4, len(payload))]
