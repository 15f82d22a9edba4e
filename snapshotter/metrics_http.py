"""The daemon's Prometheus endpoint: its own metrics plus the FUSE process's, on one /metrics."""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from snapshotter.fuse.protocol import ControlError
from snapshotter.fuseproc import FuseProcess

log = logging.getLogger(__name__)


def serve_metrics(address: str, fuse: FuseProcess | None) -> ThreadingHTTPServer | None:
    host, _, port = address.rpartition(":")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            text = ""
            if fuse is not None:
                try:
                    text = str(fuse.call("metrics")["text"])
                except ControlError:
                    text = "# FUSE process not running\n"
            body = text.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    try:
        server = ThreadingHTTPServer((host.strip("[]") or "127.0.0.1", int(port)), Handler)
    except OSError as exc:
        log.warning("metrics endpoint not started; set remote.metrics_address to a free port",
                    extra={"kv": {"address": address, "error": exc}})
        return None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("metrics endpoint", extra={"kv": {"url": f"http://{address}/metrics"}})
    return server
