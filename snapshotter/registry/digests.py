"""Streams that check a blob's size and digest as its bytes pass.

Used by the registry client and by every image store, so that "the store checks
the digest" means the same everywhere: the last bytes of a blob are released
only after its size and SHA-256 have been found right. Digest values themselves
are chunkstore.digest.Digest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import BinaryIO

from chunkstore.digest import Digest
from snapshotter.registry.errors import DigestMismatchError

CHUNK_SIZE = 1 << 20  # bytes per read when streaming a blob


def verified_chunks(
    fileobj: BinaryIO, digest: str, size: int, what: str, chunk_size: int = CHUNK_SIZE
) -> Iterator[bytes]:
    """Yield exactly `size` bytes from `fileobj`, checking size and digest before the last chunk.

    Raises DigestMismatchError instead of yielding the last chunk when the stream is
    short, long or different, so an upload fed from this iterator is cut off before
    the receiver can accept wrong bytes. `what` names the blob in the message.
    """
    expected = Digest.parse(digest)
    hasher = hashlib.sha256()
    remaining = size
    chunk = b""
    while remaining > 0:
        if chunk:
            yield chunk
        chunk = fileobj.read(min(chunk_size, remaining))
        if not chunk:
            raise DigestMismatchError(
                f"{what}: the stream ended after {size - remaining} of {size} bytes; "
                "the source is truncated or the descriptor's size is wrong"
            )
        hasher.update(chunk)
        remaining -= len(chunk)
    if fileobj.read(1):
        raise DigestMismatchError(
            f"{what}: the stream holds more than the claimed {size} bytes; "
            "the descriptor's size is wrong or the source changed"
        )
    if hasher.digest() != expected.raw:
        raise DigestMismatchError(
            f"{what}: content has digest sha256:{hasher.hexdigest()}, not {digest}; "
            "the data is corrupt or the descriptor is wrong, so it was refused"
        )
    if chunk:
        yield chunk
