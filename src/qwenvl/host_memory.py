"""Giving freed host memory back to the system, where the C library keeps it."""

from __future__ import annotations

import ctypes
from collections.abc import Callable


def _glibc_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to ask
        return None


_malloc_trim = _glibc_malloc_trim()


def return_free_memory() -> None:
    """Return the memory freed since the last call to the system. glibc keeps freed blocks of a
    few megabytes (Pillow's picture blocks, a prefill's activations) in the arena of the thread
    that freed them until that thread allocates again: after a request of huge pictures, hundreds
    of MB that a server going idle would hold for good."""
    if _malloc_trim is not None:
        _malloc_trim(0)
