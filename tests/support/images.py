"""Realistic test images as OCI layouts (gzip layers), built once and cached across runs.

Each image has a recipe with a version string; the cache holds `images/<name>/v<version>/`, an
OCI image layout whose tag `latest` is the image. Change a recipe, bump its version, and the next
run builds anew (older versions of the same image are then deleted). Builds run under an exclusive
flock per image, in a temp dir inside the cache, renamed into place when complete: concurrent test
runs wait for one another and never see half an image.

    image_layout("busybox")                     -> Path of the OCI layout (builds if not cached)
    push_image("busybox", registry.host, "library/busybox", "1")   -> "HOST/library/busybox:1"
    python -m tests.support.images build [NAME...]                  prebuild (all by default)

The cache dir is $ZEST_TEST_CACHE or /var/cache/zest-test. Building needs root (umoci keeps
ownership, debootstrap and chroot need it) and, for debian-python, the Debian mirror that apt uses.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.mounts import remove_tree, unmount_under

log = logging.getLogger(__name__)

CACHE_ENV = "ZEST_TEST_CACHE"
DEFAULT_CACHE = Path("/var/cache/zest-test")
LAYOUT_TAG = "latest"
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ImageBuildError(Exception):
    """A recipe step failed; the message carries the command and the tail of its output."""


LayerStep = Callable[[Path, Path], None]  # (rootfs, scratch dir) -> None; mutates rootfs


@dataclass(frozen=True)
class Recipe:
    name: str
    version: str  # bump on any change to the steps below: the cache is keyed by it
    layers: tuple[LayerStep, ...]  # one step per layer, each applied to the previous rootfs
    cmd: tuple[str, ...]
    expected_output: str  # what `ctr run` of the image prints
    base: str | None = None  # recipe whose image these layers go on top of (its layers shared)


# --- running commands ---------------------------------------------------------------------------


def _run(cmd: Sequence[str | os.PathLike[str]], *, timeout: float = 600, **kw: object) -> str:
    """Runs a build command, returns its stdout; on failure raises with the output's tail."""
    argv = [str(a) for a in cmd]
    try:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kw,  # type: ignore[call-overload]
        )
    except subprocess.TimeoutExpired as exc:
        raise ImageBuildError(f"{argv[0]} timed out after {timeout}s: {argv}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise ImageBuildError(f"exit {proc.returncode}: {' '.join(argv)}\n{tail}")
    return str(proc.stdout)


def _umoci(*args: str | os.PathLike[str]) -> str:
    return _run(["umoci", *args])


# --- busybox ------------------------------------------------------------------------------------


def _busybox_layer(rootfs: Path, scratch: Path) -> None:
    """busybox-static with its applets as symlinks, a root user, the usual empty dirs."""
    busybox = Path(shutil.which("busybox") or "/bin/busybox")
    (rootfs / "bin").mkdir(mode=0o755, exist_ok=True)
    shutil.copy2(busybox, rootfs / "bin" / "busybox")
    for rel in _run([busybox, "--list-full"]).split():
        link = rootfs / rel
        if rel == "bin/busybox" or link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")
    for d, mode in [
        ("dev", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
        ("etc", 0o755),
        ("root", 0o700),
        ("tmp", 0o1777),
        ("var", 0o755),
        ("home", 0o755),
    ]:
        (rootfs / d).mkdir(exist_ok=True)
        os.chmod(rootfs / d, mode)
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (rootfs / "etc" / "group").write_text("root:x:0:\n")


# --- debian-python ------------------------------------------------------------------------------


def debian_mirror() -> str:
    """The Debian mirror the host's apt uses ($ZEST_DEBIAN_MIRROR overrides)."""
    override = os.environ.get("ZEST_DEBIAN_MIRROR")
    if override:
        return override
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        if path.suffix not in ("", ".list", ".sources") or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":  # deb822: stanzas of `Key: value`
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = dict(re.findall(r"(?m)^(\w[\w-]*):\s*(.*)$", stanza))
                enabled = fields.get("Enabled", "yes").lower() != "no"
                is_deb = "deb" in fields.get("Types", "").split()
                if enabled and is_deb and SUITE in fields.get("Suites", "").split():
                    return fields["URIs"].split()[0].rstrip("/")
        else:
            for m in re.finditer(r"(?m)^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", text):
                if m.group(2) == SUITE:
                    return m.group(1).rstrip("/")
    return DEFAULT_MIRROR


def _strip_runtime_files(rootfs: Path) -> None:
    """What an image must not carry: device nodes, apt lists and caches, logs, host identity."""
    for d in ("dev", "proc", "sys", "run", "tmp"):
        target = rootfs / d
        if target.is_dir():
            for child in target.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
    for pattern in (
        "var/lib/apt/lists/*",
        "var/cache/apt/*.bin",
        "var/cache/apt/archives/*.deb",
        "var/cache/debconf/*-old",
        "var/log/apt/*",
        "var/log/*.log",
        "var/lib/dpkg/*-old",
        "etc/resolv.conf",
        "etc/hostname",
    ):
        for path in rootfs.glob(pattern):
            if path.is_file() or path.is_symlink():
                path.unlink()


def _debootstrap_layer(rootfs: Path, scratch: Path) -> None:
    """`debootstrap --variant=minbase bookworm` from the host's mirror."""
    try:
        _run(["debootstrap", "--variant=minbase", SUITE, rootfs, debian_mirror()], timeout=1200)
    finally:
        unmount_under(rootfs)  # debootstrap mounts proc and sys inside; a failure may leave them
    _strip_runtime_files(rootfs)


@contextlib.contextmanager
def _chroot_env(rootfs: Path) -> Iterator[None]:
    """/proc, /dev and the host's resolv.conf inside `rootfs`, all undone on exit."""
    resolv = rootfs / "etc" / "resolv.conf"
    try:
        _run(["mount", "-t", "proc", "proc", rootfs / "proc"])
        _run(["mount", "--bind", "/dev", rootfs / "dev"])
        if Path("/etc/resolv.conf").exists():
            resolv.unlink(missing_ok=True)
            shutil.copyfile("/etc/resolv.conf", resolv)
        yield
    finally:
        unmount_under(rootfs)
        resolv.unlink(missing_ok=True)


def _apt_install(rootfs: Path, packages: Sequence[str]) -> None:
    """apt-get install inside the image, services kept from starting; lists and caches removed."""
    env = {
        "DEBIAN_FRONTEND": "noninteractive",
        "PATH": PATH_ENV.removeprefix("PATH="),
        "LANG": "C.UTF-8",
    }
    apt: list[str | os.PathLike[str]] = ["chroot", rootfs, "apt-get", "-q", "-o", "Dpkg::Use-Pty=0"]
    policy = rootfs / "usr" / "sbin" / "policy-rc.d"
    with _chroot_env(rootfs):
        policy.write_text("#!/bin/sh\nexit 101\n")  # invoke-rc.d: start no daemon in the chroot
        policy.chmod(0o755)
        try:
            _run([*apt, "update"], env=env, timeout=900)
            _run([*apt, "install", "-y", "--no-install-recommends", *packages], env=env,
                 timeout=1800)
            _run([*apt, "clean"], env=env)
        finally:
            policy.unlink(missing_ok=True)
    _strip_runtime_files(rootfs)


def _python_layer(rootfs: Path, scratch: Path) -> None:
    """python3 from Debian, installed with apt inside the image; lists and caches removed.

    Also deletes /etc/motd from the layer below, so that the layer carries a whiteout.
    """
    _apt_install(rootfs, ["python3"])
    (rootfs / "etc" / "motd").unlink(missing_ok=True)


def apt_layer(*packages: str, remove: Sequence[str] = ()) -> LayerStep:
    """A layer step installing Debian `packages`, then deleting the `remove` paths (globs)."""

    def step(rootfs: Path, scratch: Path) -> None:
        _apt_install(rootfs, packages)
        for pattern in remove:
            for path in rootfs.glob(pattern):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()

    step.__doc__ = f"apt-get install {' '.join(packages)}"
    return step


# --- recipes ------------------------------------------------------------------------------------

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            name="busybox",
            version="1",
            layers=(_busybox_layer,),
            cmd=("/bin/sh", "-c", "echo hello from busybox"),
            expected_output="hello from busybox",
        ),
        Recipe(
            name="debian-python",
            version="1",
            layers=(_debootstrap_layer, _python_layer),
            cmd=("python3", "-c", "print('hello')"),
            expected_output="hello",
        ),
        Recipe(
            name="debian-base",
            version="1",
            layers=(_debootstrap_layer,),
            cmd=("perl", "-e", "print qq(hello from perl\\n)"),
            expected_output="hello from perl",
        ),
    )
}


def register(recipe: Recipe) -> Recipe:
    """Adds a recipe (the benchmarks keep theirs next to them); returns it."""
    known = RECIPES.setdefault(recipe.name, recipe)
    if known != recipe:
        raise ValueError(f"a different recipe named {recipe.name!r} is already registered")
    return recipe


# --- cache --------------------------------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def _recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"no test image {name!r}; known: {', '.join(RECIPES)}") from None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def image_layout(name: str) -> Path:
    """The OCI layout of test image `name` (tag `latest`), built first if not cached."""
    recipe = _recipe(name)
    final = _cached_path(recipe)
    if (final / "index.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _locked(final.parent / ".lock"):
        if (final / "index.json").is_file():  # another run built it while we waited
            return final
        _remove_leftovers(final)
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
        try:
            started = time.monotonic()
            _build(recipe, work / "layout", work)
            os.rename(work / "layout", final)
            log.info("built test image %s in %.1fs: %s", name, time.monotonic() - started, final)
        finally:
            remove_tree(work)
    return final


def _cached_path(recipe: Recipe) -> Path:
    return cache_dir() / "images" / recipe.name / f"v{recipe.version}"


def _remove_leftovers(keep: Path) -> None:
    """Older versions and builds a crashed run left (we hold the lock: no build is live)."""
    for path in keep.parent.iterdir():
        if path.is_dir() and path != keep:
            remove_tree(path)


def _build(recipe: Recipe, layout: Path, work: Path) -> None:
    image = f"{layout}:{LAYOUT_TAG}"
    bundle = work / "bundle"
    scratch = work / "scratch"
    scratch.mkdir()
    if recipe.base is not None:  # start from the base image: its layer blobs stay byte-identical
        shutil.copytree(image_layout(recipe.base), layout, symlinks=True)
    else:
        _umoci("init", "--layout", layout)
        _umoci("new", "--image", image)
    _umoci("unpack", "--image", image, bundle)
    for step in recipe.layers:
        step(bundle / "rootfs", scratch)
        summary = (step.__doc__ or step.__name__).splitlines()[0]
        _umoci(
            "repack",
            "--refresh-bundle",
            "--image",
            image,
            "--history.created_by",
            f"zest-test {recipe.name}: {summary}",
            bundle,
        )
    _umoci(
        "config",
        "--image",
        image,
        "--config.env",
        PATH_ENV,
        *[f"--config.cmd={arg}" for arg in recipe.cmd],
    )
    _umoci("gc", "--layout", layout)


def manifest(name: str) -> dict[str, object]:
    """The image manifest of test image `name` (built if needed), as parsed JSON."""
    layout = image_layout(name)
    index = json.loads((layout / "index.json").read_text())
    for desc in index["manifests"]:
        if desc.get("annotations", {}).get("org.opencontainers.image.ref.name") == LAYOUT_TAG:
            algo, hexdigest = desc["digest"].split(":", 1)
            return json.loads((layout / "blobs" / algo / hexdigest).read_text())  # type: ignore[no-any-return]
    raise ImageBuildError(f"{layout}: no manifest tagged {LAYOUT_TAG}")


def push_image(
    name: str,
    registry_host: str,
    repo: str,
    tag: str,
    *,
    creds: tuple[str, str] | None = None,
) -> str:
    """Copies test image `name` into a plain-http registry as-is; returns `HOST/repo:tag`."""
    layout = image_layout(name)
    ref = f"{registry_host}/{repo}:{tag}"
    cmd = [
        "skopeo",
        "--insecure-policy",
        "copy",
        "--quiet",
        "--preserve-digests",
        "--dest-tls-verify=false",
    ]
    if creds is not None:
        cmd.append(f"--dest-creds={creds[0]}:{creds[1]}")
    else:
        cmd.append("--dest-no-creds")
    _run([*cmd, f"oci:{layout}:{LAYOUT_TAG}", f"docker://{ref}"], timeout=300)
    return ref


# --- command line -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.images")
    sub = parser.add_subparsers(dest="cmd", required=True)
    build = sub.add_parser("build", help="build (or find cached) images; prints their layouts")
    build.add_argument("names", nargs="*", metavar="NAME", help=f"default: {' '.join(RECIPES)}")
    sub.add_parser("list", help="list recipes and their cache state")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.cmd == "list":
        for r in RECIPES.values():
            path = _cached_path(r)
            state = "cached" if (path / "index.json").is_file() else "not built"
            print(f"{r.name}\tv{r.version}\t{state}\t{path}")
        return 0
    try:
        for name in args.names or list(RECIPES):
            print(f"{name}\t{image_layout(name)}")
    except (ImageBuildError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
