"""Shared fixtures (real components, no mocks) and the log check.

Session fixtures, each started on first use and stopped at the end of the session:
    registry        tests.support.registry.LocalRegistry, anonymous, on 127.0.0.1:<free port>
    containerd      tests.support.containerd.Containerd, private dirs and namespace, CRI off,
                    default snapshotter overlayfs; `containerd.ctr(...)` runs ctr against it
    image_cache     ImageCache: cached test images (tests/support/images.py), pushed to `registry`
Function fixtures:
    containerd_factory   start extra containerds (e.g. with a proxy snapshotter); stopped after
                         the test: `containerd_factory(extra_toml=proxy_plugin_toml("zest", sock))`

Log check: a WARNING or ERROR record from the loggers `zest`, `chunkstore*` or `snapshotter*`
emitted while a test sets up, runs or tears down fails that test. A test that expects such records
says `@pytest.mark.allow_log_errors` (all allowed) or `@pytest.mark.allow_log_errors("regex", ...)`
(allowed when the message matches one of the patterns).

Components that need root (containerd, building images) skip their tests when not run as root.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import images
from tests.support.containerd import Containerd
from tests.support.registry import LocalRegistry

# The collector hangs on these loggers, not on the root logger: code under test that resets the
# root logger's handlers (snapshotter.logs.setup_logging does) must not blind the check.
CHECKED_LOGGERS = ("zest", "chunkstore", "snapshotter")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "allow_log_errors(*patterns): WARNING/ERROR records from zest loggers do not fail the "
        "test (only those whose message matches a pattern, if patterns are given)",
    )


# --- root ----------------------------------------------------------------------------------------


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root (run the tests as root, as CI does: bash .ci/run)")


# --- registry ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    """A docker-registry on a loopback port for the whole session (anonymous push and pull)."""
    with LocalRegistry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


# --- containerd ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    """One private containerd for the session; tests should use unique container ids."""
    _require_root("containerd")
    with Containerd(tmp_path_factory.getbasetemp()) as ctrd:
        yield ctrd


@pytest.fixture
def containerd_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., Containerd]]:
    """Starts more containerds (keyword arguments go to Containerd); all stopped after the test."""
    _require_root("containerd")
    started: list[Containerd] = []

    def start(**kwargs: Any) -> Containerd:
        ctrd = Containerd(tmp_path_factory.getbasetemp(), **kwargs)
        started.append(ctrd)
        return ctrd.start()

    yield start
    for ctrd in reversed(started):
        ctrd.stop()


# --- images --------------------------------------------------------------------------------------


class ImageCache:
    """Test images from tests/support/images.py: OCI layouts, and copies in the session registry."""

    def __init__(self, registry: LocalRegistry) -> None:
        self.registry = registry
        self._pushed: dict[tuple[str, str, str], str] = {}
        self._lock = threading.Lock()

    def layout(self, name: str) -> Path:
        """The cached OCI layout of `name` (tag `latest`; built on first use)."""
        return images.image_layout(name)

    def recipe(self, name: str) -> images.Recipe:
        """The recipe of `name`: `.cmd`, `.expected_output`."""
        return images.RECIPES[name]

    def push(self, name: str, repo: str | None = None, tag: str = "latest") -> str:
        """Pushes `name` to the session registry once; returns `HOST/repo:tag` (plain http)."""
        repo = repo or f"test/{name}"
        key = (name, repo, tag)
        with self._lock:
            if key not in self._pushed:
                self._pushed[key] = images.push_image(name, self.registry.host, repo, tag)
            return self._pushed[key]


@pytest.fixture(scope="session")
def image_cache(registry: LocalRegistry) -> ImageCache:
    """Builds (once, cached across runs) and pushes test images: `image_cache.push("busybox")`."""
    _require_root("building test images")
    return ImageCache(registry)


# --- log check -----------------------------------------------------------------------------------


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def attach(self) -> None:
        for name in CHECKED_LOGGERS:
            logging.getLogger(name).addHandler(self)

    def detach(self) -> None:
        for name in CHECKED_LOGGERS:
            logging.getLogger(name).removeHandler(self)


_COLLECTOR_KEY = pytest.StashKey[_Collector]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    collector = _Collector()
    item.stash[_COLLECTOR_KEY] = collector
    collector.attach()
    try:
        result = yield
    except BaseException:
        _discard_logs(item)
        raise
    _check_logs(item, "setup")
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    try:
        result = yield
    except BaseException:
        _discard_logs(item)  # the test's own failure says it all; don't report again in teardown
        raise
    _check_logs(item, "call")
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    try:
        result = yield
    finally:
        collector = item.stash.get(_COLLECTOR_KEY, None)
        if collector is not None:
            collector.detach()
    _check_logs(item, "teardown")
    return result


def _discard_logs(item: pytest.Item) -> None:
    collector = item.stash.get(_COLLECTOR_KEY, None)
    if collector is not None:
        collector.records = []


def _check_logs(item: pytest.Item, phase: str) -> None:
    collector = item.stash.get(_COLLECTOR_KEY, None)
    if collector is None or not collector.records:
        return
    records, collector.records = collector.records, []
    marker = item.get_closest_marker("allow_log_errors")
    if marker is not None:
        if not marker.args:
            return
        patterns = [re.compile(p) for p in marker.args]
        records = [r for r in records if not any(p.search(r.getMessage()) for p in patterns)]
        if not records:
            return
    lines = [f"  {r.levelname} {r.name}: {r.getMessage()}" for r in records[:20]]
    more = f"\n  ... and {len(records) - 20} more" if len(records) > 20 else ""
    pytest.fail(
        f"unexpected log records during {phase} (mark the test "
        f"@pytest.mark.allow_log_errors if they are expected):\n" + "\n".join(lines) + more,
        pytrace=False,
    )
