# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""FastCDC cut-point scan (gear hash, normalized chunking) with the GIL released.

Only the byte loop lives here; buffering and parameters stay in chunkstore.chunker,
which also holds the pure-Python reference this must equal.
"""

from libc.stdint cimport uint64_t

API_VERSION = 1

cdef uint64_t _gear[256]
cdef bint _ready = False


def set_gear(table):
    """Install the 256-entry gear table (computed once in chunkstore.chunker)."""
    global _ready
    if len(table) != 256:
        raise ValueError("gear table must have 256 entries")
    for i in range(256):
        _gear[i] = table[i]
    _ready = True


cdef Py_ssize_t _cut(const unsigned char* p, Py_ssize_t n, Py_ssize_t min_size,
                     Py_ssize_t avg_size, Py_ssize_t max_size,
                     uint64_t mask_s, uint64_t mask_l) noexcept nogil:
    cdef Py_ssize_t i, normal, limit
    cdef uint64_t fp = 0
    if n <= min_size:
        return n
    limit = n if n < max_size else max_size
    normal = avg_size if avg_size < limit else limit
    i = min_size
    while i < normal:
        fp = (fp << 1) + _gear[p[i]]
        i += 1
        if (fp & mask_s) == 0:
            return i
    while i < limit:
        fp = (fp << 1) + _gear[p[i]]
        i += 1
        if (fp & mask_l) == 0:
            return i
    return limit


def cut_points(const unsigned char[::1] data, Py_ssize_t min_size, Py_ssize_t avg_size,
               Py_ssize_t max_size, uint64_t mask_s, uint64_t mask_l, bint eof):
    """End offsets of the chunks in data. Without eof, a tail shorter than max_size is
    left for the next call, so cut points never depend on how the input was split."""
    if not _ready:
        raise RuntimeError("set_gear() was not called")
    cdef Py_ssize_t n = data.shape[0]
    cdef Py_ssize_t pos = 0, c
    cdef const unsigned char* base
    out = []
    if n == 0:
        return out
    base = &data[0]
    while pos < n:
        if not eof and n - pos < max_size:
            break
        with nogil:
            c = _cut(base + pos, n - pos, min_size, avg_size, max_size, mask_s, mask_l)
        pos += c
        out.append(pos)
    return out
