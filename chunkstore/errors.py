"""Exceptions of the chunk store; each message names the object and what is wrong."""


class ChunkstoreError(Exception):
    """Base of every error raised by chunkstore."""


class FormatError(ChunkstoreError):
    """A blob, footer, TOC or tar stream is malformed or of an unknown version."""


class UnsupportedError(FormatError):
    """Valid input that zest refuses to convert (e.g. GNU sparse files)."""


class DigestMismatch(ChunkstoreError):
    """Bytes do not have the digest they were named by."""


class ChunkUnavailable(ChunkstoreError):
    """A chunk could not be fetched or verified."""
