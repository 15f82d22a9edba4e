"""A real, private containerd for tests: its own root, state, sockets, config and namespace.

    with Containerd(tmp_path) as ctrd:               # or ctrd = Containerd(...); ctrd.start()
        ctrd.ctr("images", "pull", "--plain-http", ref)
        out = ctrd.ctr("run", "--rm", ref, "c1").stdout

Everything lives under one fresh directory (`base_dir`), so parallel runs never share a path. The
default ctr namespace is unique too (`zt-<random>`): runc keeps its state in
/run/containerd/runc/<namespace> and cgroups are named /<namespace>/<id>, outside any private
directory, so a shared namespace name would let two runs collide there.

Config: version 2 (containerd 1.6/1.7). CRI is disabled unless `cri=True`. `extra_toml` is
appended verbatim, e.g. `proxy_plugin_toml("zest", sock)`; the tables this module writes itself
(don't repeat them in `extra_toml`) are [grpc], [ttrpc], [debug], [metrics],
[plugins."io.containerd.internal.v1.opt"] and, with CRI, [plugins."io.containerd.grpc.v1.cri"]
and its .containerd and .registry subtables.

Stop (also on `__exit__`): kills and removes every task and container in every namespace, SIGTERMs
containerd, kills shims it left (found by the unique base dir in their command line), force-deletes
leftover runc containers of its namespaces, unmounts anything under its dirs, deletes them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType

from tests.support.mounts import remove_tree, unmount_under

log = logging.getLogger(__name__)

CONTAINERD = "containerd"
CTR = "ctr"
RUNC_STATE_ROOT = Path("/run/containerd/runc")  # containerd-shim-runc-v2's default runc --root
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Plugins that cannot work here or are not needed by tests; disabling them makes start-up quick.
_DISABLED_PLUGINS = (
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
)
_CRI = "io.containerd.grpc.v1.cri"


class ContainerdError(RuntimeError):
    """containerd did not start, or died; the message carries the tail of its log."""


class CtrError(subprocess.CalledProcessError):
    """A `ctr` command failed; unlike CalledProcessError, str() includes its output."""

    def __str__(self) -> str:
        out = (self.stdout or "") + (self.stderr or "")
        return f"{' '.join(self.cmd)}: exit {self.returncode}\n{out.strip()}"


def proxy_plugin_toml(
    name: str,
    address: str | os.PathLike[str],
    *,
    plugin_type: str = "snapshot",
    exports: Mapping[str, str] | None = None,
) -> str:
    """The `[proxy_plugins.NAME]` table that makes containerd use an out-of-process plugin."""
    lines = [
        f"[proxy_plugins.{_toml_key(name)}]",
        f"  type = {_toml_str(plugin_type)}",
        f"  address = {_toml_str(os.fspath(address))}",
    ]
    if exports:
        lines.append(f"[proxy_plugins.{_toml_key(name)}.exports]")
        lines += [f"  {_toml_key(k)} = {_toml_str(v)}" for k, v in exports.items()]
    return "\n".join(lines) + "\n"


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _toml_key(key: str) -> str:
    return key if key.replace("-", "").replace("_", "").isalnum() else _toml_str(key)


def containerd_version() -> str:
    """`containerd --version`'s version field, e.g. '1.6.20~ds1'."""
    out = subprocess.run([CONTAINERD, "--version"], capture_output=True, text=True, check=True)
    return out.stdout.split()[2]


class Containerd:
    """One containerd process with private dirs; see the module docstring."""

    def __init__(
        self,
        parent_dir: str | os.PathLike[str] | None = None,
        *,
        namespace: str | None = None,
        extra_toml: str = "",
        cri: bool = False,
        cri_snapshotter: str = "overlayfs",
        cri_sandbox_image: str | None = None,
        cri_registry_config_path: str | os.PathLike[str] | None = None,
        log_level: str = "info",
        start_timeout: float = 30.0,
    ) -> None:
        # Unix socket paths are limited to 107 bytes: keep the base dir short.
        self.base_dir = Path(tempfile.mkdtemp(prefix="ctrd-", dir=parent_dir))
        if len(str(self.base_dir)) > 60:
            os.rmdir(self.base_dir)
            self.base_dir = Path(tempfile.mkdtemp(prefix="zest-ctrd-"))
        self.root = self.base_dir / "root"
        self.state = self.base_dir / "state"
        self.address = self.base_dir / "containerd.sock"
        self.config_path = self.base_dir / "config.toml"
        self.log_path = self.base_dir / "containerd.log"
        self.namespace = namespace or f"zt-{secrets.token_hex(4)}"
        self.extra_toml = extra_toml
        self.cri = cri
        self.cri_snapshotter = cri_snapshotter
        self.cri_sandbox_image = cri_sandbox_image
        self.cri_registry_config_path = cri_registry_config_path
        self.log_level = log_level
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._namespaces_used = {self.namespace}

    # --- config ---------------------------------------------------------------------------------

    def config_toml(self) -> str:
        disabled = list(_DISABLED_PLUGINS) + ([] if self.cri else [_CRI])
        lines = [
            "version = 2",
            f"root = {_toml_str(str(self.root))}",
            f"state = {_toml_str(str(self.state))}",
            "disabled_plugins = [" + ", ".join(_toml_str(p) for p in disabled) + "]",
            "",
            "[grpc]",
            f"  address = {_toml_str(str(self.address))}",
            "[ttrpc]",
            f"  address = {_toml_str(str(self.address) + '.ttrpc')}",
            "[debug]",
            '  address = ""',
            f"  level = {_toml_str(self.log_level)}",
            "[metrics]",
            '  address = ""',
            '[plugins."io.containerd.internal.v1.opt"]',
            f"  path = {_toml_str(str(self.root / 'opt'))}",
        ]
        if self.cri:
            lines += self._cri_toml()
        return "\n".join(lines) + "\n\n" + self.extra_toml

    def _cri_toml(self) -> list[str]:
        lines = [
            f'[plugins."{_CRI}"]',
            '  stream_server_address = "127.0.0.1"',
            '  stream_server_port = "0"',
            "  enable_selinux = false",
        ]
        if self.cri_sandbox_image:
            lines.append(f"  sandbox_image = {_toml_str(self.cri_sandbox_image)}")
        lines += [
            f'[plugins."{_CRI}".containerd]',
            f"  snapshotter = {_toml_str(self.cri_snapshotter)}",
            "  disable_snapshot_annotations = false",
        ]
        if self.cri_registry_config_path:
            lines += [
                f'[plugins."{_CRI}".registry]',
                f"  config_path = {_toml_str(os.fspath(self.cri_registry_config_path))}",
            ]
        return lines

    # --- life cycle -----------------------------------------------------------------------------

    def start(self) -> Containerd:
        if self.proc is not None:
            raise ContainerdError("already started")
        for d in (self.root, self.state):
            d.mkdir(mode=0o711, parents=True, exist_ok=True)
        self.config_path.write_text(self.config_toml())
        env = {**os.environ, "PATH": _PATH + ":" + os.environ.get("PATH", "")}
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                [CONTAINERD, "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        log.info("containerd pid %d at %s", self.proc.pid, self.address)
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise ContainerdError(
                    f"containerd exited with {self.proc.returncode}\n{self.log_tail()}"
                )
            if self.address.exists():
                probe = self.ctr("version", check=False, timeout=10)
                if probe.returncode == 0:
                    return
            if time.monotonic() > deadline:
                raise ContainerdError(
                    f"containerd did not answer within {self.start_timeout}s\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def __enter__(self) -> Containerd:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self, *, keep_dirs: bool = False) -> None:
        """Stops everything this instance started and removes its dirs; safe to call twice."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self._remove_all_containers()
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._kill_shims()
        self._delete_runc_leftovers()
        unmount_under(self.base_dir)
        if not keep_dirs:
            remove_tree(self.base_dir)

    def restart(self) -> None:
        """Stops containerd alone (tasks, shims and dirs stay) and starts it again."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=15)
        self.proc = None
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # --- ctr ------------------------------------------------------------------------------------

    def ctr(
        self,
        *args: str | os.PathLike[str],
        check: bool = True,
        timeout: float = 300,
        namespace: str | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Runs `ctr --address SOCK --namespace NS ARGS...`; text output, CtrError if check."""
        ns = namespace or self.namespace
        self._namespaces_used.add(ns)
        cmd = [
            CTR,
            "--address",
            str(self.address),
            "--namespace",
            ns,
            *(os.fspath(a) for a in args),
        ]
        stdin = None if input is not None else subprocess.DEVNULL
        try:
            proc = subprocess.run(
                cmd, input=input, stdin=stdin, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as exc:
            raise CtrError(-1, cmd, exc.stdout, exc.stderr) from exc
        if check and proc.returncode != 0:
            raise CtrError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc

    def namespaces(self) -> list[str]:
        out = self.ctr("namespaces", "ls", "-q", check=False, timeout=30)
        return out.stdout.split() if out.returncode == 0 else sorted(self._namespaces_used)

    def _remove_all_containers(self) -> None:
        for ns in self.namespaces():
            self._namespaces_used.add(ns)
            tasks = self.ctr("tasks", "ls", "-q", namespace=ns, check=False, timeout=30).stdout
            for task in tasks.split():
                self.ctr(
                    "tasks",
                    "kill",
                    "--signal",
                    "SIGKILL",
                    task,
                    namespace=ns,
                    check=False,
                    timeout=30,
                )
                self.ctr("tasks", "rm", "-f", task, namespace=ns, check=False, timeout=30)
            conts = self.ctr("containers", "ls", "-q", namespace=ns, check=False, timeout=30)
            for cont in conts.stdout.split():
                self.ctr("containers", "rm", cont, namespace=ns, check=False, timeout=30)

    # --- leftovers ------------------------------------------------------------------------------

    def shim_pids(self) -> list[int]:
        """Processes (shims) whose command line names our socket or dirs."""
        return list(_pids_mentioning(str(self.base_dir)))

    def _kill_shims(self) -> None:
        pids = self.shim_pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists() and not _is_zombie(p)]
            time.sleep(0.05)
        if pids:
            log.error("containerd shims still alive after SIGKILL: %s", pids)

    def _delete_runc_leftovers(self) -> None:
        """Containers runc still knows in our namespaces (a killed shim leaves them running)."""
        for ns in self._namespaces_used:
            runc_root = RUNC_STATE_ROOT / ns
            if not runc_root.is_dir():
                continue
            delete_runc_containers(runc_root)
            with contextlib.suppress(OSError):
                for entry in runc_root.iterdir():
                    remove_tree(entry)
                runc_root.rmdir()


def delete_runc_containers(runc_root: Path) -> None:
    """`runc delete --force` every container runc keeps state for under runc_root (a killed
    shim leaves its container running)."""
    if not runc_root.is_dir():
        return
    for entry in runc_root.iterdir():
        subprocess.run(
            ["runc", "--root", str(runc_root), "delete", "--force", entry.name],
            capture_output=True,
            check=False,
            timeout=30,
        )


def _pids_mentioning(needle: str) -> Iterable[int]:
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if needle in cmdline:
            yield int(entry.name)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"
