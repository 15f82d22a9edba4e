"""Parsing image locations: registry names as docker reads them, oci: and oci-archive:."""

from __future__ import annotations

import pytest

from snapshotter.image.reference import (
    DOCKER_HUB_API,
    ImageReference,
    Kind,
    ReferenceError,
    parse_reference,
)

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "host", "repo", "tag", "digest"),
    [
        ("alpine", "docker.io", "library/alpine", "latest", None),
        ("alpine:3.20", "docker.io", "library/alpine", "3.20", None),
        ("user/app", "docker.io", "user/app", "latest", None),
        ("docker.io/nginx", "docker.io", "library/nginx", "latest", None),
        ("localhost/app", "localhost", "app", "latest", None),
        ("localhost:5000/a/b:v1", "localhost:5000", "a/b", "v1", None),
        ("127.0.0.1:5000/x/y", "127.0.0.1:5000", "x/y", "latest", None),
        ("[::1]:5000/app:t", "[::1]:5000", "app", "t", None),
        ("ghcr.io/o/r", "ghcr.io", "o/r", "latest", None),
        (f"ghcr.io/o/r@{DIGEST}", "ghcr.io", "o/r", None, DIGEST),
        (f"ghcr.io/o/r:t@{DIGEST}", "ghcr.io", "o/r", "t", DIGEST),
        (
            "registry.example/a.b_c__d-e--f/g:V_1.0-x",
            "registry.example",
            "a.b_c__d-e--f/g",
            "V_1.0-x",
            None,
        ),
        ("foo/bar:baz", "docker.io", "foo/bar", "baz", None),
    ],
)
def test_registry_references(
    text: str, host: str, repo: str, tag: str | None, digest: str | None
) -> None:
    ref = parse_reference(text)
    assert ref.kind is Kind.REGISTRY
    assert (ref.host, ref.repository, ref.tag, ref.digest) == (host, repo, tag, digest)
    assert ref.reference == (digest or tag)
    assert parse_reference(str(ref)) == ref  # str() round-trips


def test_a_first_component_without_dot_or_colon_is_a_repository_path() -> None:
    ref = parse_reference("myhost/app")
    assert (ref.host, ref.repository) == ("docker.io", "myhost/app")


def test_docker_hub_api_host() -> None:
    assert parse_reference("alpine").api_host == DOCKER_HUB_API
    assert parse_reference("localhost:5000/a").api_host == "localhost:5000"


@pytest.mark.parametrize(
    ("text", "kind", "path", "tag", "digest"),
    [
        ("oci:/tmp/layout", Kind.OCI, "/tmp/layout", None, None),
        ("oci:/tmp/layout:v1", Kind.OCI, "/tmp/layout", "v1", None),
        ("oci:rel/dir:v1", Kind.OCI, "rel/dir", "v1", None),
        ("oci:./a:b/c", Kind.OCI, "./a:b/c", None, None),  # a ':' inside the path
        (f"oci:/l@{DIGEST}", Kind.OCI, "/l", None, DIGEST),
        ("oci-archive:img.tar", Kind.OCI_ARCHIVE, "img.tar", None, None),
        ("oci-archive:/x/img.tar:1.0", Kind.OCI_ARCHIVE, "/x/img.tar", "1.0", None),
    ],
)
def test_local_references(
    text: str, kind: Kind, path: str, tag: str | None, digest: str | None
) -> None:
    ref = parse_reference(text)
    assert (ref.kind, ref.path, ref.tag, ref.digest) == (kind, path, tag, digest)
    assert str(ref) == text


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "empty"),
        (" alpine", "padded"),
        ("Alpine", "lowercase"),
        ("alpine:", "tag ''"),
        ("alpine:-x", "tag '-x'"),
        ("a@sha256:abc", "64 lowercase hex"),
        ("a@md5:" + "0" * 32, "sha256"),
        ("host.io/", "repository ''"),
        ("host.io/a//b", "repository"),
        ("a b", "repository"),
        ("bad_host.io/x", "registry host"),
        ("oci:", "needs a path"),
        ("oci:dir:", "empty tag"),
        ("oci-archive:", "needs a path"),
        ("x/" * 200 + "y", "longer than"),
    ],
)
def test_malformed_references(text: str, complaint: str) -> None:
    with pytest.raises(ReferenceError, match="expected host") as info:
        parse_reference(text)
    assert complaint in str(info.value)
    assert isinstance(info.value, ValueError)


def test_str_of_constructed_reference() -> None:
    ref = ImageReference(Kind.REGISTRY, host="h:1", repository="r", tag="t", digest=DIGEST)
    assert str(ref) == f"h:1/r:t@{DIGEST}"
