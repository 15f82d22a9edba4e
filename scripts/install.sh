#!/usr/bin/env bash
# Installs what zest's build and tests need: Debian packages, kernel modules (best effort) and the
# project's virtualenv (.venv, with `pip install -e '.[dev]'`, which compiles _native/).
#
# Idempotent: apt runs only when a package is missing, pip only when the build inputs changed since
# the last successful install (a stamp file in .venv). Runs as root, needs no stdin.
#   PYTHON=...            interpreter for a new .venv (default: python3 from PATH, >= 3.11)
#   ZEST_FORCE_INSTALL=1  run pip even if the stamp says nothing changed
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

say() { printf 'install: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

APT_PACKAGES=(
  containerd runc fuse3 libfuse3-dev libfuse2 pkg-config docker-registry skopeo umoci
  debootstrap busybox-static stargz-snapshotter zstd apache2-utils iproute2 ca-certificates
  gcc libc6-dev util-linux mount procps kmod git
)

PYTHON=${PYTHON:-python3}
command -v "$PYTHON" >/dev/null || die "$PYTHON not found on PATH"
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
  || die "$PYTHON is older than 3.11"
# The build needs Python.h of the interpreter that builds; a pyenv Python ships its own headers,
# Debian's python3 needs python3-dev.
PY_INCLUDE=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
[ -f "$PY_INCLUDE/Python.h" ] || APT_PACKAGES+=(python3-dev python3-venv)

missing_packages() {
  local p
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' \
      || printf '%s\n' "$p"
  done
}

install_apt() {
  local missing
  mapfile -t missing < <(missing_packages)
  if [ "${#missing[@]}" -eq 0 ]; then
    say "apt: all ${#APT_PACKAGES[@]} packages present"
    return
  fi
  [ "$(id -u)" -eq 0 ] || die "not root; missing Debian packages: ${missing[*]}"
  say "apt: installing ${missing[*]}"
  # Packages must not start system services (a system containerd or registry would squat on the
  # default sockets and ports); keep an existing policy-rc.d, else add one for this run only.
  local own_policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    own_policy=1
  fi
  # Other apt users on the machine: wait for the dpkg lock instead of failing.
  local apt_opts=(-q -o DPkg::Lock::Timeout=600 -o Dpkg::Use-Pty=0)
  local rc=0
  { apt-get "${apt_opts[@]}" update -qq >/dev/null \
      && apt-get "${apt_opts[@]}" install -y -qq --no-install-recommends "${missing[@]}" \
        </dev/null >/dev/null; } || rc=$?
  [ -z "$own_policy" ] || rm -f /usr/sbin/policy-rc.d
  [ "$rc" -eq 0 ] || die "apt-get failed (exit $rc)"
  mapfile -t missing < <(missing_packages)
  [ "${#missing[@]}" -eq 0 ] || die "still missing after apt-get: ${missing[*]}"
}

setup_kernel() {
  # Best effort: in a VM or container the modules may be built in (or not loadable at all).
  if command -v modprobe >/dev/null; then
    modprobe fuse 2>/dev/null || true
    modprobe overlay 2>/dev/null || true
  fi
  if [ ! -e /dev/fuse ] && [ "$(id -u)" -eq 0 ]; then
    mknod -m 0666 /dev/fuse c 10 229 || true
  fi
  [ -e /dev/fuse ] || say "warning: /dev/fuse is missing; FUSE tests will fail"
  grep -qw overlay /proc/filesystems || say "warning: the kernel has no overlayfs"
  grep -qw fuse /proc/filesystems || say "warning: the kernel has no fuse file system"
}

# Everything that decides what `pip install -e` produces.
build_inputs_hash() {
  {
    "$PYTHON" -c 'import sys; print(sys.version)'
    cat pyproject.toml setup.py
    find _native -maxdepth 1 -type f \( -name '*.pyx' -o -name '*.pxd' -o -name '*.pyi' \) \
      -print0 | sort -z | xargs -0r cat
  } | sha256sum | cut -d' ' -f1
}

install_venv() {
  if [ ! -x .venv/bin/python ]; then
    say "venv: creating .venv with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv .venv
  fi
  local stamp=.venv/.zest-install-stamp want
  want=$(build_inputs_hash)
  if [ -z "${ZEST_FORCE_INSTALL:-}" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
    && .venv/bin/python -c 'import _native.fastcdc' 2>/dev/null; then
    say "venv: up to date"
    return
  fi
  say "venv: pip install -e '.[dev]'"
  local log
  log=$(mktemp)
  if ! .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]' \
    </dev/null >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    die "pip install -e '.[dev]' failed"
  fi
  rm -f "$log"
  printf '%s\n' "$want" >"$stamp"
}

install_apt
setup_kernel
install_venv
say "done"
