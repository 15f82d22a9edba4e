"""Daemon <-> FUSE process messages: one JSON object per line on a unix socket.

A request is {"op": NAME, ...}; the answer is {"ok": true, ...} or
{"ok": false, "error": MESSAGE}. Ops: ping, add, remove, list, stats, metrics,
prune. The `add` request carries everything the FUSE process needs (the TOC
file and its digest, where the blob is), so it never reads the daemon's
metadata.
"""

from __future__ import annotations

import json
import socket
from typing import Any

MAX_LINE = 16 * 1024 * 1024


def encode(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    obj = json.loads(line)
    if not isinstance(obj, dict):
        raise ValueError("message is not a JSON object")
    return obj


class ControlError(Exception):
    """The FUSE process refused a request or could not be reached."""


def call(path: str, msg: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    """One request on a fresh connection (blocking)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(encode(msg))
            buf = b""
            while not buf.endswith(b"\n"):
                part = s.recv(1 << 20)
                if not part:
                    break
                buf += part
                if len(buf) > MAX_LINE:
                    raise ControlError("answer from the FUSE process is too long")
    except OSError as exc:
        raise ControlError(f"FUSE process at {path} is not answering: {exc}") from exc
    if not buf:
        raise ControlError(f"FUSE process at {path} closed the connection")
    reply = decode(buf)
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "unknown error")))
    return reply
