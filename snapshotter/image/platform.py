"""Platforms ("linux/amd64", "linux/arm64/v8") and picking a manifest from an index by platform.

Names are normalised as containerd's `platforms` package does for the common cases: machine names
become GOARCH names (x86_64 -> amd64, aarch64 -> arm64), arm64's variant v8 is its default and
may be left out, 32-bit arm defaults to v7.
"""

from __future__ import annotations

import platform as _platform
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_ARCH_ALIASES = {
    "x86_64": ("amd64", ""),
    "x86-64": ("amd64", ""),
    "aarch64": ("arm64", ""),
    "armhf": ("arm", "v7"),
    "armel": ("arm", "v6"),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i386": ("386", ""),
    "i686": ("386", ""),
}


class PlatformError(ValueError):
    """A platform string that is not os/arch[/variant]."""


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.strip().lower().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise PlatformError(
                f"invalid platform {text!r}: expected os/arch[/variant], e.g. linux/amd64"
            )
        return cls(*parts).normalized()

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Platform:
        """From a descriptor's `platform` or an image config (os, architecture, variant)."""
        return cls(
            str(doc.get("os", "")), str(doc.get("architecture", "")), str(doc.get("variant", ""))
        ).normalized()

    def normalized(self) -> Platform:
        arch, variant = self.architecture, self.variant
        if arch in _ARCH_ALIASES:
            arch, default_variant = _ARCH_ALIASES[arch]
            variant = variant or default_variant
        if arch == "arm64" and variant == "v8":
            variant = ""
        if arch == "arm" and not variant:
            variant = "v7"
        return Platform(self.os, arch, variant)

    def matches(self, other: Platform) -> bool:
        """Same os and architecture; same variant when this platform names one."""
        a, b = self.normalized(), other.normalized()
        if (a.os, a.architecture) != (b.os, b.architecture):
            return False
        return not a.variant or a.variant == b.variant

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def host_platform() -> Platform:
    """The platform of this machine, as containerd's default platform matcher sees it."""
    return Platform(sys.platform, _platform.machine().lower()).normalized()


def pick_manifest(manifests: list[Mapping[str, Any]], want: Platform) -> Mapping[str, Any] | None:
    """The first descriptor of an index's `manifests` whose platform matches `want`.

    Entries without a platform (attestations, tooling leftovers) are never picked.
    """
    for desc in manifests:
        p = desc.get("platform")
        if isinstance(p, Mapping) and want.matches(Platform.from_json(p)):
            return desc
    return None


def platforms_of(manifests: list[Mapping[str, Any]]) -> list[str]:
    """The platforms an index offers, for an error message."""
    return [
        str(Platform.from_json(d["platform"]))
        for d in manifests
        if isinstance(d.get("platform"), Mapping)
    ]
