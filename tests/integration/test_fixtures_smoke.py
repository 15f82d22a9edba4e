"""The shared fixtures work end to end: image built, pushed, pulled and run by a real containerd.

Plain containerd with its default overlayfs snapshotter, no zest involved: if these fail, the
problem is the machine or the fixtures, not zest. Also checks the conftest's log check.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ImageCache
from tests.support import images
from tests.support.containerd import Containerd

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["busybox", "debian-python"])
def test_pull_and_run_with_overlayfs(
    name: str, containerd: Containerd, image_cache: ImageCache
) -> None:
    ref = image_cache.push(name)
    containerd.ctr("images", "pull", "--plain-http", ref, timeout=600)
    assert ref in containerd.ctr("images", "ls", "-q").stdout.split()

    out = containerd.ctr("run", "--rm", ref, f"smoke-{name}", timeout=120)

    assert out.stdout.strip() == image_cache.recipe(name).expected_output
    assert containerd.ctr("containers", "ls", "-q").stdout.split() == []
    containerd.ctr("images", "rm", "--sync", ref)


def test_debian_python_has_two_gzip_diff_layers(image_cache: ImageCache) -> None:
    image_cache.layout("debian-python")
    layers = images.manifest("debian-python")["layers"]
    assert isinstance(layers, list) and len(layers) == 2
    assert {layer["mediaType"] for layer in layers} == {
        "application/vnd.oci.image.layer.v1.tar+gzip"
    }
    # The python layer is a diff: much smaller than the base system below it.
    assert layers[1]["size"] < layers[0]["size"] / 2


def test_log_check_fails_tests_that_log_zest_warnings(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(
        "from tests.conftest import (pytest_configure, pytest_runtest_call,\n"
        "    pytest_runtest_setup, pytest_runtest_teardown)\n"
    )
    (tmp_path / "test_logs.py").write_text(
        textwrap.dedent(
            """
            import logging
            import pytest

            def test_warns():
                logging.getLogger("chunkstore.cache").warning("disk full")

            def test_teardown_error(request):
                request.addfinalizer(lambda: logging.getLogger("zest").error("late"))

            @pytest.mark.allow_log_errors
            def test_allowed():
                logging.getLogger("snapshotter.daemon").error("expected")

            @pytest.mark.allow_log_errors("^expected")
            def test_pattern_mismatch():
                logging.getLogger("zest.cli").error("not expected")

            def test_other_logger():
                logging.getLogger("httpx").error("not ours")
                logging.getLogger("zest").info("only info")

            def test_root_handlers_reset():
                logging.getLogger().handlers[:] = []  # as snapshotter.logs.setup_logging() does
                logging.getLogger("snapshotter.x").warning("after reset")
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = proc.stdout
    assert proc.returncode == 1, out
    assert "3 failed, 3 passed, 1 error" in out, out
    for message in ("disk full", "late", "not expected", "after reset"):
        assert f": {message}" in out, out
