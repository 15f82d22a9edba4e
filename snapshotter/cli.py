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

log = logging.getLogger("zest")


class CommandError(Exception):
    """An error whose message alone tells the operator what went wrong."""


Command = Callable[[argparse.Namespace], int]


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
    p.add_argument("--level", type=int, default=3, help="zstd level (default 3)")
    p.add_argument("--threads", type=int, default=0, help="compression threads (0: all cores)")
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


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    _add_convert,
    _add_inspect,
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
            print("(unexpected error; rerun with --log-level debug for a traceback)", file=sys.stderr)
        return 1
