"""Tag resolution for labels that name only the image: once per image pull, not per layer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

from chunkstore.digest import Digest
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
