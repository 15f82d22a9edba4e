"""The daemon's configuration: frozen dataclasses, one per section, read from TOML once.

Every key is optional; a missing file (at the default path) means all defaults. Unknown
keys and values of the wrong type are refused with a `ConfigError` naming the key, so a
typo never silently falls back to a default. docs/config.md documents each option.

    root = "/var/lib/zest"
    log_level = "info"
    [grpc]       address, socket_mode, max_workers, shutdown_timeout
    [snapshots]  async_remove, overlay_index_off
    [metadata]   synchronous
    [remote]     enabled, cache_size_mb, background_prefetch, prefetch_parallel, unpack, ...

Constructors elsewhere take the values they need, never a whole `Config`.
"""

from __future__ import annotations

import dataclasses
import platform
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

DEFAULT_CONFIG_PATH = Path("/etc/zest/config.toml")
DEFAULT_ROOT = Path("/var/lib/zest")
DEFAULT_ADDRESS = Path("/run/zest/zest.sock")

LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """The configuration file or a command-line override is unusable; the message says why."""


@dataclass(frozen=True)
class GrpcConfig:
    """The Snapshots API server containerd connects to."""

    address: Path = DEFAULT_ADDRESS  # unix socket path
    socket_mode: int = 0o660  # permission bits of the socket (owner root)
    max_workers: int = 16  # threads serving RPCs
    shutdown_timeout: float = 30.0  # seconds in-flight RPCs get to finish on SIGTERM

    def validate(self) -> None:
        if not self.address.is_absolute():
            raise ConfigError(f"grpc.address must be an absolute path, not {str(self.address)!r}")
        if len(str(self.address).encode()) > 107:
            raise ConfigError(f"grpc.address is too long for a unix socket: {self.address}")
        if not 0 <= self.socket_mode <= 0o777:
            raise ConfigError(f"grpc.socket_mode must be within 0o777, not 0o{self.socket_mode:o}")
        if self.max_workers < 1:
            raise ConfigError("grpc.max_workers must be at least 1")
        if self.shutdown_timeout < 0:
            raise ConfigError("grpc.shutdown_timeout must not be negative")


@dataclass(frozen=True)
class SnapshotsConfig:
    """Snapshot semantics: the knobs containerd's overlayfs snapshotter has too."""

    # Remove leaves a snapshot's directory for the next Cleanup (containerd's async_remove).
    async_remove: bool = False
    # Add "index=off" to overlay mounts: "auto" does it when the kernel knows the option.
    overlay_index_off: str = "auto"

    def validate(self) -> None:
        if self.overlay_index_off not in ("auto", "on", "off"):
            raise ConfigError('snapshots.overlay_index_off must be "auto", "on" or "off"')


@dataclass(frozen=True)
class MetadataConfig:
    """The SQLite database in the root."""

    # "full": every transaction is on disk when the RPC returns (like containerd's bolt store);
    # "normal": survives a daemon crash but may lose the last transactions on power loss.
    synchronous: str = "full"

    def validate(self) -> None:
        if self.synchronous not in ("full", "normal"):
            raise ConfigError('metadata.synchronous must be "full" or "normal"')


@dataclass(frozen=True)
class RemoteConfig:
    """Lazy pulling: zest layers served through FUSE, other layers unpacked by the daemon."""

    # Serve layers of pulled images (lazily when converted); false: behave like overlayfs.
    enabled: bool = True
    # Bound on the local chunk cache (<root>/cache), in MiB; least recently used chunks go first.
    cache_size_mb: int = 10240
    # After a layer is mounted, fetch the rest of it at low priority (after its prefetch list).
    background_prefetch: bool = True
    # Range requests prefetch may have in flight at once, over all layers.
    prefetch_parallel: int = 4
    # On a read that must go to the registry, also fetch this many KiB of the chunks that
    # follow in the blob (neighbouring files) in the same request. It saves round trips but
    # spends bandwidth the prefetcher would use; with prediction on, 0 measured best.
    readahead_kb: int = 0
    # A read that must go to the registry starts fetching the rest of its file, in the
    # background with parallel requests, when the file is at most this many MiB (0: off).
    # Programs touch most of the binaries and libraries they map, one page fault at a time;
    # this turns those round trips into a few large requests.
    whole_file_mb: int = 64
    # A read that must go to the registry in a small file (up to 1 MiB) also fetches the other
    # small files of its directory, up to this many KiB of compressed chunks, nearest in the
    # layer first (0: off). Compilers read headers, and daemons their configuration, a
    # directory at a time and one file after another: gcc's 25 header misses became 6.
    directory_kb: int = 512
    # How far the kernel reads ahead on lazy layers, in KiB (-1: the kernel's own, 128). Each
    # page fault of a mapped file reads this much around it, and on a cold layer that means
    # fetching the chunks it covers. Smaller values fetch less but cross FUSE more often: they
    # pay with images converted with small chunks, not with the default 256 KiB ones.
    page_readahead_kb: int = -1
    # With no recorded profile in an image, guess what its entrypoint reads first (the binary,
    # its ELF interpreter and libraries, a Python's start-up modules) and prefetch that; and as
    # each program starts in its containers, fetch what the loader reads of its libraries.
    predict: bool = True
    # Fetch and unpack layers that are not in zest's format (so containerd downloads nothing).
    unpack: bool = True
    # Blobs of such layers downloaded at once.
    unpack_parallel: int = 3
    # Comma-separated registry hosts spoken to over plain http (loopback hosts always are).
    plain_http_hosts: str = ""
    # containerd's registry config_path: <host>/hosts.toml mirrors are read first.
    hosts_dir: Path = Path("/etc/containerd/certs.d")
    # Stop the FUSE process (unmounting every lazy layer) when the daemon stops. Off: a
    # restart or upgrade of the daemon leaves running containers untouched.
    stop_fuse_on_exit: bool = False
    # Prometheus /metrics on this host:port ("" turns it off); loopback by default.
    metrics_address: str = "127.0.0.1:9911"

    def validate(self) -> None:
        if self.whole_file_mb < 0 or self.directory_kb < 0:
            raise ConfigError("remote.whole_file_mb and remote.directory_kb must be 0 (off) "
                              "or more")
        if self.page_readahead_kb < -1:
            raise ConfigError("remote.page_readahead_kb must be -1 (the kernel's) or more")
        if self.cache_size_mb < 1:
            raise ConfigError("remote.cache_size_mb must be at least 1")
        if self.prefetch_parallel < 1 or self.unpack_parallel < 1:
            raise ConfigError("remote.prefetch_parallel and remote.unpack_parallel must be >= 1")
        if self.metrics_address and ":" not in self.metrics_address:
            raise ConfigError("remote.metrics_address must be host:port or empty")

    @property
    def plain_http(self) -> frozenset[str]:
        return frozenset(h.strip() for h in self.plain_http_hosts.split(",") if h.strip())


@dataclass(frozen=True)
class Config:
    root: Path = DEFAULT_ROOT  # holds metadata.db and snapshots/<id>/{fs,work}
    log_level: str = "info"
    grpc: GrpcConfig = field(default_factory=GrpcConfig)
    snapshots: SnapshotsConfig = field(default_factory=SnapshotsConfig)
    metadata: MetadataConfig = field(default_factory=MetadataConfig)
    remote: RemoteConfig = field(default_factory=RemoteConfig)

    def validate(self) -> None:
        if not self.root.is_absolute():
            raise ConfigError(f"root must be an absolute path, not {str(self.root)!r}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        self.grpc.validate()
        self.snapshots.validate()
        self.metadata.validate()
        self.remote.validate()

    def with_overrides(
        self,
        *,
        root: str | None = None,
        address: str | None = None,
        log_level: str | None = None,
    ) -> Config:
        """The same configuration with command-line flags applied; None leaves a value as is."""
        cfg = self
        if root is not None:
            cfg = dataclasses.replace(cfg, root=Path(root).absolute())
        if address is not None:
            grpc = dataclasses.replace(cfg.grpc, address=Path(address).absolute())
            cfg = dataclasses.replace(cfg, grpc=grpc)
        if log_level is not None:
            cfg = dataclasses.replace(cfg, log_level=log_level.lower())
        cfg.validate()
        return cfg


def load(path: Path | None) -> Config:
    """Read and validate the file; None reads the default path if it exists, else defaults."""
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            return Config()
        path = DEFAULT_CONFIG_PATH
    try:
        with path.open("rb") as f:
            table = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    try:
        return parse(table)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def parse(table: Mapping[str, Any]) -> Config:
    """A validated Config from a parsed TOML table."""
    cfg = _build(Config, table, "")
    cfg.validate()
    return cfg


_T = TypeVar("_T")


def _build(cls: type[_T], table: Mapping[str, Any], where: str) -> _T:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"unknown key {where}{unknown[0]}")
    values: dict[str, Any] = {}
    for name, raw in table.items():
        values[name] = _convert(hints[name], raw, f"{where}{name}")
    return cls(**values)


def _convert(hint: Any, raw: object, key: str) -> object:
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if not isinstance(raw, dict):
            raise ConfigError(f"[{key}] must be a table")
        return _build(hint, raw, f"{key}.")
    # bool is an int in Python; TOML keeps them apart, and so do we.
    if hint is Path and isinstance(raw, str):
        return Path(raw)
    if hint is float and isinstance(raw, int | float) and not isinstance(raw, bool):
        return float(raw)
    if isinstance(raw, hint) and (hint is bool or not isinstance(raw, bool)):
        return raw
    raise ConfigError(f"{key} must be of type {hint.__name__}, not {type(raw).__name__}")


def containerd_snippet(address: Path, containerd_version: tuple[int, int] | None) -> str:
    """The lines containerd's config.toml needs to use zest, for the given containerd version
    (None: unknown, assume 1.x, whose config format 2 is also read by 2.x)."""
    major, minor = containerd_version or (1, 7)
    lines = [
        f"# zest for containerd {major}.{minor}: add to /etc/containerd/config.toml,"
        " then restart containerd",
        "[proxy_plugins]",
        "  [proxy_plugins.zest]",
        '    type = "snapshot"',
        f'    address = "{address}"',
    ]
    if (major, minor) >= (2, 1):
        lines += [
            "    [proxy_plugins.zest.exports]",
            '      enable_remote_snapshot_annotations = "true"',
        ]
    lines.append("")
    lines.append("# Kubernetes (CRI): pull and run images with zest")
    if major >= 2:
        lines += [
            '[plugins."io.containerd.cri.v1.images"]',
            '  snapshotter = "zest"',
            "  disable_snapshot_annotations = false",
        ]
    else:
        lines += [
            '[plugins."io.containerd.grpc.v1.cri".containerd]',
            '  snapshotter = "zest"',
            "  disable_snapshot_annotations = false",
        ]
    if (major, minor) >= (2, 1):
        lines += [
            "",
            "# containerd 2.1+ pulls through the transfer service: unpack with zest",
            '[[plugins."io.containerd.transfer.v1.local".unpack_config]]',
            f'  platform = "linux/{_go_arch()}"',
            '  snapshotter = "zest"',
        ]
    return "\n".join(lines) + "\n"


def parse_containerd_version(text: str) -> tuple[int, int] | None:
    """(major, minor) from `containerd --version` output, e.g. "containerd ... 1.6.20~ds1 ..."."""
    m = re.search(r"(?<![\w.])v?(\d+)\.(\d+)(?![\d])", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _go_arch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)
