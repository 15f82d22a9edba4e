"""`zest` command line: parse arguments, call one function, turn errors into an exit code.

Each subcommand is registered by a `_add_<name>` function that sets `func` on its
parser; `main` runs it. Errors that an operator can act on are raised as
`CommandError` (or a domain error) and printed as one line, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger("zest")


class CommandError(Exception):
    """An error whose message alone tells the operator what went wrong."""


Command = Callable[[argparse.Namespace], int]


def _chunk_kb(text: str) -> int:
    kb = int(text)
    if kb < 16 or kb > 4096 or kb & (kb - 1):
        raise argparse.ArgumentTypeError("a power of two from 16 to 4096")
    return kb


def _add_convert(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "convert",
        help="convert an image into zest's chunked format and push it",
        description=(
            "SRC and DST: registry reference (host[:port]/repo:tag or @sha256:...), "
            "oci:PATH[:TAG] or oci-archive:FILE[:TAG]"
        ),
    )
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--plain-http", action="store_true", help="use http for registries")
    p.add_argument("--level", type=int, choices=range(1, 23), metavar="1-22",
                   help="zstd level of the chunks (default 18: 14-15%% fewer bytes to fetch "
                        "than 3, at about 10 MB/s of tar per core; 3 converts 20x faster)")
    p.add_argument("--threads", type=int, default=0, help="compression threads (0: all cores)")
    p.add_argument("--chunk-kb", type=_chunk_kb, default=256,
                   help="average chunk size in KiB, a power of two (default 256); chunks are "
                        "a quarter to four times that. Smaller: less read beyond what a "
                        "container touches, larger TOCs")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of bars")

    def run(args: argparse.Namespace) -> int:
        from snapshotter.image.convert import run_convert

        return run_convert(args)

    p.set_defaults(func=run)


def _add_inspect(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("inspect", help="show the layers of a converted image")
    p.add_argument("ref")
    p.add_argument("--plain-http", action="store_true")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    def run(args: argparse.Namespace) -> int:
        from snapshotter.image.inspect import run_inspect

        return run_inspect(args)

    p.set_defaults(func=run)


def _add_snapshotter(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "snapshotter",
        help="run the daemon containerd talks to (Snapshots API on a unix socket)",
        description="Flags override the configuration file; see docs/config.md.",
    )
    p.add_argument("--config", type=Path, help="TOML file (default: /etc/zest/config.toml if any)")
    p.add_argument("--root", help="state directory (default /var/lib/zest)")
    p.add_argument("--address", help="unix socket to listen on (default /run/zest/zest.sock)")
    p.add_argument(
        "--log-level", dest="daemon_log_level", metavar="LEVEL", help="debug, info, warning, error"
    )

    def run(args: argparse.Namespace) -> int:
        from snapshotter import config, daemon
        from snapshotter.logs import setup_logging

        level = args.daemon_log_level or (args.log_level if args.log_level != "info" else None)
        cfg = config.load(args.config).with_overrides(
            root=args.root, address=args.address, log_level=level
        )
        setup_logging(cfg.log_level)
        return daemon.run(cfg)

    p.set_defaults(func=run)


def _add_config(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("config", help="print configuration for other programs")
    csub = p.add_subparsers(dest="config_command", required=True)
    c = csub.add_parser("containerd", help="print the containerd config.toml lines that use zest")
    c.add_argument("--config", type=Path, help="zest's TOML file, for the socket address")
    c.add_argument("--address", help="socket address (overrides the configuration)")
    c.add_argument("--containerd-version", help="MAJOR.MINOR (default: `containerd --version`)")

    def run(args: argparse.Namespace) -> int:
        import subprocess

        from snapshotter import config

        cfg = config.load(args.config).with_overrides(address=args.address)
        text = args.containerd_version
        if text is None:
            try:
                done = subprocess.run(
                    ["containerd", "--version"], capture_output=True, text=True, timeout=10
                )
                text = done.stdout
            except (OSError, subprocess.TimeoutExpired):
                text = ""
        version = config.parse_containerd_version(text)
        if args.containerd_version is not None and version is None:
            raise CommandError(f"--containerd-version must be MAJOR.MINOR, not {text!r}")
        print(config.containerd_snippet(cfg.grpc.address, version), end="")
        return 0

    c.set_defaults(func=run)


def _add_pull(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    import os

    p = sub.add_parser(
        "pull",
        help="pull an image into containerd, letting the snapshotter serve layers lazily",
        description=(
            "Resolves REF in its registry (hosts.toml mirrors honoured), writes index, manifest "
            "and config into containerd's content store and prepares each layer on the "
            "snapshotter with the remote-snapshot labels, as containerd's unpacker does; layers "
            "the snapshotter cannot serve are downloaded and unpacked by containerd."
        ),
    )
    p.add_argument("ref", help="host[:port]/repo[:tag][@sha256:...], also the name in containerd")
    p.add_argument(
        "--address",
        default=os.environ.get("CONTAINERD_ADDRESS", "/run/containerd/containerd.sock"),
        help="containerd's socket (default $CONTAINERD_ADDRESS or /run/containerd/containerd.sock)",
    )
    p.add_argument(
        "--namespace",
        default=os.environ.get("CONTAINERD_NAMESPACE", "default"),
        help="containerd namespace (default $CONTAINERD_NAMESPACE or default)",
    )
    p.add_argument("--snapshotter", default="zest", help="snapshotter to unpack for (zest)")
    p.add_argument("--plain-http", action="store_true", help="use http for the registry")
    p.add_argument("--platform", help="os/arch[/variant] (default: this machine's)")
    p.add_argument(
        "--hosts-dir",
        type=Path,
        default=Path("/etc/containerd/certs.d"),
        help="containerd's registry config_path with <host>/hosts.toml (mirrors)",
    )

    def run(args: argparse.Namespace) -> int:
        from snapshotter.pull import pull

        result = pull(
            args.ref,
            address=args.address,
            namespace=args.namespace,
            snapshotter=args.snapshotter,
            platform=args.platform,
            plain_http=args.plain_http,
            hosts_dir=args.hosts_dir,
        )
        print(result.summary())
        return 0

    p.set_defaults(func=run)


def _add_cache(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("cache", help="show or shrink the local chunk cache")
    p.add_argument("--config", type=Path, help="zest's TOML file (default /etc/zest/config.toml)")
    p.add_argument("--root", help="daemon root (overrides the configuration)")
    csub = p.add_subparsers(dest="cache_command", required=True)
    st = csub.add_parser("stats", help="chunks, bytes, hits and misses")
    st.add_argument("--json", action="store_true")
    pr = csub.add_parser("prune", help="delete least recently used chunks")
    pr.add_argument("--keep-mb", type=int, default=0, help="MiB to keep (default 0: all go)")

    def run(args: argparse.Namespace) -> int:
        from snapshotter import cachecmd, config

        cfg = config.load(args.config).with_overrides(root=args.root)
        max_bytes = cfg.remote.cache_size_mb << 20
        if args.cache_command == "stats":
            stats = cachecmd.cache_stats(cfg.root, max_bytes)
            print(cachecmd.format_stats(stats, args.json))
        else:
            removed = cachecmd.cache_prune(cfg.root, args.keep_mb << 20, max_bytes)
            print(f"removed {removed} chunks")
        return 0

    p.set_defaults(func=run)


def _add_optimize(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    import os

    p = sub.add_parser(
        "optimize",
        help="record what a workload reads first and push the image with a prefetch list",
        description="Pulls SRC (a converted image) lazily through the zest daemon, runs CMD "
        "(default: the image's own) in a container, records the chunks it reads in "
        "first-touch order, writes them as each layer's prefetch list and pushes DST.",
    )
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS... (default: image's)")
    p.add_argument("--address", default=os.environ.get(
        "CONTAINERD_ADDRESS", "/run/containerd/containerd.sock"))
    p.add_argument("--namespace", default=os.environ.get("CONTAINERD_NAMESPACE", "default"))
    p.add_argument("--zest-root", default="/var/lib/zest", help="the zest daemon's root")
    p.add_argument("--timeout", type=float, default=60, help="seconds the workload may run")
    p.add_argument("--ready", help="stop recording when the output contains this text")
    p.add_argument("--plain-http", action="store_true")
    p.add_argument("--tmpdir", help="where rewritten layers are staged")

    def run(args: argparse.Namespace) -> int:
        from snapshotter.optimize import run_optimize

        return run_optimize(args)

    p.set_defaults(func=run)


def _add_profile(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("profile", help="publish the workload profile this node recorded")
    psub = p.add_subparsers(dest="profile_command", required=True)
    push = psub.add_parser("push", help="push REF's recorded profile as an OCI artifact")
    push.add_argument("ref")
    push.add_argument("--zest-root", default="/var/lib/zest", help="the zest daemon's root")
    push.add_argument("--plain-http", action="store_true")

    def run(args: argparse.Namespace) -> int:
        from snapshotter.profiles import push_profile

        tag = push_profile(args.ref, args.zest_root, args.plain_http)
        print(f"pushed profile of {args.ref} as tag {tag}")
        return 0

    p.set_defaults(func=run)


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    _add_convert,
    _add_inspect,
    _add_snapshotter,
    _add_config,
    _add_pull,
    _add_cache,
    _add_optimize,
    _add_profile,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zest", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="info", help="debug, info, warning, error")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from snapshotter.logs import setup_logging

    setup_logging(args.log_level)
    func: Command = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one line for the operator; the traceback only at debug level
        from chunkstore.errors import ChunkstoreError

        known = isinstance(exc, CommandError | ChunkstoreError) or type(exc).__module__.startswith(
            ("snapshotter", "chunkstore")
        )
        log.debug("command failed", exc_info=True)
        print(f"zest {args.command}: error: {exc}", file=sys.stderr)
        if not known:
            hint = "(unexpected error; rerun with --log-level debug for a traceback)"
            print(hint, file=sys.stderr)
        return 1
