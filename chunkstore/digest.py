"""SHA-256 digests in the OCI "sha256:<hex>" form."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from chunkstore.errors import DigestMismatch, FormatError

_HEX = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class Digest:
    """A SHA-256 digest; `str()` gives the OCI form."""

    raw: bytes  # 32 bytes

    def __post_init__(self) -> None:
        if len(self.raw) != 32:
            raise FormatError(f"sha256 digest must be 32 bytes, got {len(self.raw)}")

    @classmethod
    def parse(cls, text: str) -> Digest:
        algo, _, hexpart = text.partition(":")
        if algo != "sha256" or not _HEX.match(hexpart):
            raise FormatError(f"not a sha256 digest: {text!r}")
        return cls(bytes.fromhex(hexpart))

    @classmethod
    def of(cls, data: bytes | bytearray | memoryview) -> Digest:
        return cls(hashlib.sha256(data).digest())

    @property
    def hex(self) -> str:
        return self.raw.hex()

    def __str__(self) -> str:
        return "sha256:" + self.raw.hex()

    def verify(self, data: bytes | bytearray | memoryview, what: str = "data") -> None:
        actual = hashlib.sha256(data).digest()
        if actual != self.raw:
            raise DigestMismatch(f"{what}: expected {self}, got sha256:{actual.hex()}")
