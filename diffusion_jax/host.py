"""Host-process settings for the command-line tools (``train.py``, ``sample.py``), which own
their process; the library itself never changes process-wide state.

:func:`keep_freed_memory` stops glibc from handing freed heap memory back to the kernel after
every compiled step. XLA:CPU allocates each step's temporary buffers afresh; with glibc's
default trimming those come back as new pages that the kernel must fault in and zero on every
call. Measured on the 2-core CPU (``benchmarks/README.md``, "Tried in this session"): the digits
train step 70-82 -> 58-62 ms (min), the 1.5M issue-shape step unchanged within noise.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from diffusion_jax import compiler

__all__ = ["TOP_PAD_BYTES", "TRIM_THRESHOLD_BYTES", "keep_freed_memory"]

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
TRIM_THRESHOLD_BYTES = 2**31 - 1  # free memory kept at the top of the heap (mallopt's max)
TOP_PAD_BYTES = 256 << 20  # extra memory asked of the kernel each time the heap grows
_USER_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Raises glibc's heap trim threshold and top pad for this process (``mallopt``).

    Returns:
      True if applied; False on a C library without ``mallopt`` (macOS, musl), or when the
      environment already sets glibc's ``MALLOC_*_`` tunables (the user's choice wins), or when
      ``DIFFUSION_JAX_XLA_DEFAULTS`` asks for every default.
    """
    if any(name in os.environ for name in _USER_ENV):
        return False
    if compiler.keep_defaults():
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) and mallopt(_M_TOP_PAD, TOP_PAD_BYTES)
    )
