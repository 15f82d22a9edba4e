"""A loopback HTTP forwarder that emulates a network link and counts what crosses it.

    with LinkProxy(registry.host, mbit=100, rtt_ms=20) as link:
        pull from link.host ...; link.bytes_sent, link.requests

Every request waits one round-trip time before it is forwarded; response
bodies leave through one token bucket shared by all connections, so parallel
requests share the bandwidth as they would on a real link. `mbit=0` means
unlimited. Each request is recorded (method, path, Range, status, body bytes,
start time) so tests can assert what a client fetched, and in which order.
Standard library only.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
        "trailers", "transfer-encoding", "upgrade"}
_PIECE = 16 * 1024


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    status: int
    bytes: int
    started: float
    ended: float = 0.0


class _Bucket:
    def __init__(self, bytes_per_s: float):
        self.rate = bytes_per_s
        self.lock = threading.Lock()
        self.next_free = time.monotonic()

    def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_free)
            self.next_free = start + n / self.rate
            wait = self.next_free - now
        if wait > 0:
            time.sleep(wait)


class LinkProxy:
    def __init__(self, upstream: str, *, mbit: float = 0, rtt_ms: float = 0):
        self.upstream = upstream
        self.rtt = rtt_ms / 1000
        self.bucket = _Bucket(mbit * 1e6 / 8)
        self.requests: list[Request] = []  # finished ones
        # what crossed so far, responses still streaming included (a run can end before a
        # long streamed response does)
        self.started = 0
        self._sent = 0
        # fault injection: the next `corrupt_ranges` responses to Range requests get a byte
        # flipped in every 4 KiB of their body, the first one included (a broken middlebox,
        # a bad disk on the registry)
        self.corrupt_ranges = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    @property
    def bytes_sent(self) -> int:
        """Response bytes sent since the last reset, of finished and unfinished requests."""
        with self._lock:
            return self._sent

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.started = self._sent = 0

    def count(self, sent: int = 0, started: bool = False) -> None:
        with self._lock:
            self._sent += sent
            self.started += started

    def take_corruption(self) -> bool:
        with self._lock:
            if self.corrupt_ranges > 0:
                self.corrupt_ranges -= 1
                return True
            return False

    def record(self, req: Request) -> None:
        with self._lock:
            self.requests.append(req)

    def __enter__(self) -> LinkProxy:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(proxy: LinkProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def setup(self) -> None:
            super().setup()
            # like real registries (Go sets it by default): no Nagle delay on small writes
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def do_GET(self) -> None:
            self._forward()

        do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

        def _forward(self) -> None:
            started = time.monotonic()
            proxy.count(started=True)
            if proxy.rtt:
                time.sleep(proxy.rtt)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            conn = http.client.HTTPConnection(proxy.upstream, timeout=120)
            sent = 0
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                self.send_response(resp.status)
                clen = resp.getheader("Content-Length")
                data = b""
                if clen is None and self.command != "HEAD":
                    data = resp.read()
                for k, v in resp.getheaders():
                    if k.lower() in _HOP:
                        continue
                    if k.lower() == "location":
                        v = v.replace(f"http://{proxy.upstream}", f"http://{proxy.host}")
                    self.send_header(k, v)
                if clen is None:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if (self.command == "GET" and resp.status == 206
                        and proxy.take_corruption()):
                    data = bytearray(data or resp.read())
                    for i in range(0, len(data), 4096):
                        data[i] ^= 0xFF
                    data = bytes(data)
                if self.command != "HEAD":
                    while True:
                        piece = data[:_PIECE] if data else resp.read(_PIECE)
                        data = data[_PIECE:] if data else b""
                        if not piece:
                            break
                        proxy.bucket.take(len(piece))
                        self.wfile.write(piece)
                        sent += len(piece)
                        proxy.count(len(piece))
                proxy.record(Request(self.command, self.path, self.headers.get("Range"),
                                     resp.status, sent, started, time.monotonic()))
            finally:
                conn.close()

    return Handler
