"""A real distribution registry (`/usr/bin/docker-registry`) on a loopback port, for tests.

    with LocalRegistry(tmp_path) as reg:                      # anonymous push and pull
        client = RegistryClient(reg.host)                      # "127.0.0.1:PORT", plain http
    with LocalRegistry(tmp_path, htpasswd={"alice": "pw"}) as reg:   # basic auth (bcrypt)
        ...

`tmpdir` receives config.yml, the storage root (`storage/`), `htpasswd` and the
registry's log (`registry.log`, quoted in the error when it fails to start).
`start()`/`stop()` are there for session fixtures that outlive one `with`.
Deletion is enabled, so tests may DELETE manifests and blobs. Self-contained:
imports nothing from zest. Needs the Debian packages docker-registry and, for
htpasswd, apache2-utils (`htpasswd -Bbn`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

REGISTRY_BINARY = "/usr/bin/docker-registry"
HTPASSWD_BINARY = "htpasswd"


def registry_available() -> bool:
    """Whether the registry binary is installed (for `pytest.mark.skipif`)."""
    return os.access(REGISTRY_BINARY, os.X_OK)


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_htpasswd(path: Path, users: Mapping[str, str]) -> None:
    """A bcrypt htpasswd file, the only kind distribution accepts."""
    if shutil.which(HTPASSWD_BINARY) is None:
        raise RuntimeError("htpasswd not found: apt-get install apache2-utils")
    lines = []
    for user, password in users.items():
        out = subprocess.run(
            [HTPASSWD_BINARY, "-Bbn", user, password], check=True, capture_output=True, text=True
        ).stdout
        lines.append(out.strip())
    path.write_text("\n".join(lines) + "\n")


class LocalRegistry:
    """One docker-registry process; see the module docstring."""

    def __init__(
        self,
        tmpdir: Path | str,
        htpasswd: Mapping[str, str] | Path | None = None,
        *,
        start_timeout: float = 15.0,
    ) -> None:
        """`htpasswd`: users and passwords to require, or an existing bcrypt htpasswd file."""
        self.dir = Path(tmpdir)
        self.storage = self.dir / "storage"
        self.config = self.dir / "config.yml"
        self.log = self.dir / "registry.log"
        self.htpasswd = htpasswd
        self.start_timeout = start_timeout
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def __enter__(self) -> LocalRegistry:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start on a free port; tries a few ports in case another process takes one first."""
        if self._proc is not None:
            raise RuntimeError("registry already running")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(exist_ok=True)
        auth = self._auth_section()
        error = ""
        for _ in range(3):
            self.port = free_port()
            self.config.write_text(self._config_yaml(auth))
            with self.log.open("ab") as log:
                self._proc = subprocess.Popen(
                    [REGISTRY_BINARY, "serve", str(self.config)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            error = self._wait_ready()
            if not error:
                return
            self.stop()
        tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
        raise RuntimeError(f"docker-registry did not start: {error}\n{tail}")

    def stop(self) -> None:
        """Terminate the process and wait for it; safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    # -- helpers

    def _auth_section(self) -> str:
        if self.htpasswd is None:
            return ""
        if isinstance(self.htpasswd, Path):
            path = self.htpasswd
        else:
            path = self.dir / "htpasswd"
            write_htpasswd(path, self.htpasswd)
        return f"auth:\n  htpasswd:\n    realm: zest-test\n    path: {path}\n"

    def _config_yaml(self, auth: str) -> str:
        return (
            "version: 0.1\n"
            "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
            "storage:\n"
            f"  filesystem:\n    rootdirectory: {self.storage}\n"
            "  delete:\n    enabled: true\n"
            "  maintenance:\n    uploadpurging:\n      enabled: false\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n  secret: zest-test-secret\n" + auth
        )

    def _wait_ready(self) -> str:
        """'' once /v2/ answers (200, or 401 with auth); else why not."""
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return f"exited with status {self._proc.returncode}"
            try:
                with urllib.request.urlopen(f"{self.url}/v2/", timeout=1):
                    return ""
            except urllib.error.HTTPError as exc:
                if exc.code == 401:
                    return ""
                return f"/v2/ answered HTTP {exc.code}"
            except OSError:
                time.sleep(0.05)
        return f"/v2/ did not answer within {self.start_timeout}s"
