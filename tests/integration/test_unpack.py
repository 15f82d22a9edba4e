"""Daemon-side unpack of ordinary layers: overlayfs layout, attributes, DiffID, refusals."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from snapshotter.unpack import UnpackError, apply_tar

pytestmark = pytest.mark.integration

CAP = (0x02000001).to_bytes(4, "little") + (1 << 13).to_bytes(4, "little") + bytes(12)


def _tar(members: list[tuple[str, bytes, dict[str, object]]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data, kw in members:
            ti = tarfile.TarInfo(name)
            ti.mtime, ti.mode = 1_600_000_000, 0o644
            for k, v in kw.items():
                setattr(ti, k, v)
            ti.size = len(data) if ti.isreg() else 0
            tf.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return buf.getvalue()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        pytest.skip("unpacking device nodes and ownership needs root")
    r = tmp_path / "fs"
    r.mkdir()
    return r


def test_layer_unpacked_in_overlay_layout(root: Path) -> None:
    tar = _tar([
        ("etc", b"", {"type": tarfile.DIRTYPE, "mode": 0o755}),
        ("etc/conf", b"x=1\n", {"uid": 7, "gid": 8}),
        ("usr/bin/ping", b"ELF", {"mode": 0o4755, "pax_headers": {
            "SCHILY.xattr.security.capability": CAP.decode("utf-8", "surrogateescape")}}),
        ("usr/bin/link", b"", {"type": tarfile.LNKTYPE, "linkname": "usr/bin/ping"}),
        ("sh", b"", {"type": tarfile.SYMTYPE, "linkname": "usr/bin/ping"}),
        ("dev/zero", b"", {"type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 5}),
        ("etc/.wh.removed", b"", {}),
        ("var/.wh..wh..opq", b"", {}),
    ])  # fmt: skip
    diff = apply_tar(io.BytesIO(tar), root)  # type: ignore[arg-type]
    assert str(diff) == "sha256:" + hashlib.sha256(tar).hexdigest()
    st = os.stat(root / "etc/conf")
    assert (st.st_uid, st.st_gid, st.st_mtime) == (7, 8, 1_600_000_000)
    ping = os.stat(root / "usr/bin/ping")
    assert stat.S_IMODE(ping.st_mode) == 0o4755
    assert os.getxattr(root / "usr/bin/ping", "security.capability") == CAP
    assert os.stat(root / "usr/bin/link").st_ino == ping.st_ino
    assert os.readlink(root / "sh") == "usr/bin/ping"
    assert os.major(os.stat(root / "dev/zero").st_rdev) == 1
    wh = os.lstat(root / "etc/removed")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    assert os.getxattr(root / "var", "trusted.overlay.opaque") == b"y"
    assert not (root / "etc/.wh.removed").exists()
    assert os.stat(root / "etc").st_mtime == 1_600_000_000


def test_write_through_symlink_is_refused(root: Path) -> None:
    tar = _tar([("evil", b"", {"type": tarfile.SYMTYPE, "linkname": "/etc"}),
                ("evil/passwd", b"pwned", {})])
    with pytest.raises(UnpackError, match="symlink"):
        apply_tar(io.BytesIO(tar), root)  # type: ignore[arg-type]
    assert not Path("/etc/passwd").read_bytes().startswith(b"pwned")
