"""glibc ``malloc`` settings that keep a streamed calibration's resident memory flat.

Sequential calibration allocates and frees the same large tensors again and again (one
batch's hidden states, attention and MLP temporaries: 1–30 MB each at P1). glibc serves a
request of at least its *mmap threshold* with its own mapping, returned to the kernel on
``free``; smaller ones come from the heap, where freed holes stay resident. The threshold
starts at 128 KiB but is dynamic: each freed mapping raises it to that mapping's size (up
to 32 MiB), so after the first free the 9–25 MB activations land on the heap and its
fragmentation grows the resident set block after block (measured on SmolLM2 at P1: the lean
stream's peak climbs from 954 to 1162 MiB over the first three blocks; with a fixed
threshold it stays flat, BENCHMARKS.md "Streaming: peak memory").

``fix_mmap_threshold()`` sets ``M_MMAP_THRESHOLD`` with ``mallopt`` (which also turns the
dynamic adjustment off) for the whole process, and ``trim()`` calls ``malloc_trim(0)`` to
hand freed heap pages back; both are no-ops (returning ``False``) where the C library is not
glibc. Calling them changes allocation placement only, never a value. The price of a fixed
128 KiB threshold is time: every large temporary is a fresh mapping, page-faulted and zeroed
on each use (measured: 1.2–1.35 × a streamed block's time). glibc cannot turn its dynamic
threshold back on, so ``settle_mmap_threshold()`` — called when a stream ends, so a
long-lived process (a notebook, a test session) does not keep paying — sets the values the
dynamic adjustment reaches after the first large frees: mmap threshold 32 MiB, trim
threshold twice that.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform

MODES = ("mmap", "trim", "off")  # what a stream does (streaming.BlockStream(allocator=))
DEFAULT = "mmap"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
MMAP_THRESHOLD = 128 * 1024  # glibc's initial (and smallest useful) threshold
SETTLED_MMAP_THRESHOLD = 32 * 1024 * 1024  # where the dynamic threshold ends (64-bit maximum)


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    """The C library, if it is glibc (``mallopt``/``malloc_trim`` exist); else ``None``."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve every allocation of ``threshold`` bytes or more from its own mapping, for the
    rest of the process (glibc; ``True`` if set)."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, int(threshold)) == 1)


def settle_mmap_threshold() -> bool:
    """After a stream: mmap threshold 32 MiB and trim threshold 64 MiB, where glibc's dynamic
    thresholds settle in a process that frees large blocks (glibc; ``True`` if set)."""
    libc = _libc()
    return bool(libc is not None
                and libc.mallopt(M_MMAP_THRESHOLD, SETTLED_MMAP_THRESHOLD) == 1
                and libc.mallopt(M_TRIM_THRESHOLD, 2 * SETTLED_MMAP_THRESHOLD) == 1)


def trim() -> bool:
    """Return the heap's free pages to the kernel (glibc ``malloc_trim(0)``; ``True`` if
    glibc released memory)."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0) == 1)
