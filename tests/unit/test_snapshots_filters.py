"""snapshotter.filters: containerd's filter syntax and matching rules."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from snapshotter.errors import InvalidArgument
from snapshotter.filters import parse, parse_all

OBJ = {
    ("name",): "sha256:abc",
    ("kind",): "committed",
    ("labels", "a"): "1",
    ("labels", "containerd.io/gc.root"): "2024-01-01T00:00:00Z",
    ("labels", "with space"): "x y",
    ("labels", "b.c"): "dotted",
}


def field(path: Sequence[str]) -> tuple[str, bool]:
    key = tuple(path)
    if key[:1] == ("labels",) and len(key) > 1:
        key = ("labels", ".".join(key[1:]))
    return (OBJ[key], True) if key in OBJ else ("", False)


@pytest.mark.parametrize(
    ("expr", "matches"),
    [
        ("", True),
        ("name", True),
        ("parent", False),
        ("name==sha256:abc", True),
        ("name==sha256:abd", False),
        ("name!=sha256:abd", True),
        ("parent!=x", True),  # != matches an absent field, as in containerd
        ("kind==committed,labels.a==1", True),
        ("kind==committed,labels.a==2", False),
        ("labels.a", True),
        ("labels.b.c==dotted", True),
        ('labels."containerd.io/gc.root"', True),
        ('labels."with space"=="x y"', True),
        ("name~=^sha256:", True),
        ("name~=abc$", True),
        ("name~=/b[c]/", True),
        ("name~=|^sha|", True),
        ("name@=256", True),
        ("name@=257", False),
        ("  kind == committed , labels.a==1 ", True),
        ('name=="sha\\x32\\u00356:abc"', True),
        ('name=="sha\\062\\0656:abc"', True),
    ],
)
def test_match(expr: str, matches: bool) -> None:
    assert parse(expr).match(field) is matches


def test_parse_all_is_or() -> None:
    assert parse_all(["name==x", "kind==committed"]).match(field)
    assert not parse_all(["name==x", "kind==view"]).match(field)
    assert parse_all([]).match(field)


@pytest.mark.parametrize(
    "expr",
    [
        "name==",
        "name=",
        "name=>x",
        ",name",
        "name,",
        "labels.",
        ".name",
        "name==x y",
        'labels."unterminated',
        'name=="bad\\q"',
        "name~=(",
        "name==x,,kind",
    ],
)
def test_syntax_errors_are_invalid_argument(expr: str) -> None:
    with pytest.raises(InvalidArgument, match="parse error"):
        parse(expr)
