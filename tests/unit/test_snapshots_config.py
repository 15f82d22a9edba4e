"""snapshotter.config: TOML parsing, validation, overrides, the documented defaults, and
the containerd snippet."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from snapshotter import config
from snapshotter.config import Config, ConfigError

DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def _doc_blocks() -> list[str]:
    return re.findall(r"```toml\n(.*?)```", DOC.read_text(), re.S)


def test_documented_file_is_exactly_the_defaults() -> None:
    documented = tomllib.loads(_doc_blocks()[0])
    assert config.parse(documented) == Config()
    # and it names every option there is: a new option must be documented
    assert set(documented) == {f.name for f in dataclasses.fields(Config)}
    for f in dataclasses.fields(Config):
        value = getattr(Config(), f.name)
        if dataclasses.is_dataclass(value):
            assert set(documented[f.name]) == {g.name for g in dataclasses.fields(value)}, f.name


def test_missing_default_file_means_defaults(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    assert config.load(None) == Config()


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "absent.toml")


def test_load_and_override(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('root = "/srv/zest"\n[grpc]\nsocket_mode = 0o600\nshutdown_timeout = 5\n')
    cfg = config.load(path)
    assert cfg.root == Path("/srv/zest")
    assert cfg.grpc.socket_mode == 0o600 and cfg.grpc.shutdown_timeout == 5.0
    cfg = cfg.with_overrides(root="/other", address="/run/x.sock", log_level="DEBUG")
    assert (cfg.root, cfg.grpc.address, cfg.log_level) == (
        Path("/other"),
        Path("/run/x.sock"),
        "debug",
    )
    assert cfg.grpc.socket_mode == 0o600


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bogus = 1", "unknown key bogus"),
        ("[grpc]\nadress = '/x'", "unknown key grpc.adress"),
        ("[grpc]\nmax_workers = true", "grpc.max_workers must be of type int"),
        ("[grpc]\nmax_workers = 0", "at least 1"),
        ("[snapshots]\nasync_remove = 1", "must be of type bool"),
        ("[snapshots]\noverlay_index_off = 'maybe'", "overlay_index_off"),
        ("[metadata]\nsynchronous = 'off'", "synchronous"),
        ("grpc = 3", r"\[grpc\] must be a table"),
        ("root = 'relative'", "absolute"),
        ("log_level = 'loud'", "log_level"),
        ("[grpc]\naddress = '/" + "x" * 120 + "'", "too long"),
        ("[grpc\n", "c.toml"),
    ],
)
def test_bad_files_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        config.load(path)


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3", (1, 6)),
        ("containerd containerd.io v2.1.3 abcdef", (2, 1)),
        ("1.7", (1, 7)),
        ("nothing", None),
    ],
)
def test_parse_containerd_version(text: str, version: tuple[int, int] | None) -> None:
    assert config.parse_containerd_version(text) == version


def test_containerd_snippet_is_valid_toml_for_each_version() -> None:
    sock = Path("/run/zest/zest.sock")
    v1 = tomllib.loads(config.containerd_snippet(sock, (1, 6)))
    assert v1["proxy_plugins"]["zest"] == {"type": "snapshot", "address": str(sock)}
    cri = v1["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    assert cri == {"snapshotter": "zest", "disable_snapshot_annotations": False}

    v21 = tomllib.loads(config.containerd_snippet(sock, (2, 1)))
    assert v21["proxy_plugins"]["zest"]["exports"] == {"enable_remote_snapshot_annotations": "true"}
    assert v21["plugins"]["io.containerd.cri.v1.images"]["snapshotter"] == "zest"
    (unpack,) = v21["plugins"]["io.containerd.transfer.v1.local"]["unpack_config"]
    assert unpack["snapshotter"] == "zest"

    v20 = tomllib.loads(config.containerd_snippet(sock, (2, 0)))
    assert "exports" not in v20["proxy_plugins"]["zest"]


def test_documented_containerd_lines_match_the_command() -> None:
    printed = tomllib.loads(config.containerd_snippet(Path("/run/zest/zest.sock"), (1, 6)))
    assert tomllib.loads(_doc_blocks()[1]) == printed
