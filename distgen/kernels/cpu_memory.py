"""Large CPU buffers backed by transparent huge pages where the kernel allows it.

The paged KV cache is read a block (a few KiB) at a time in an order set by the block tables, so
nearly every block read by attention lands on a page the TLB has not seen; with 2 MiB pages a whole
layer's cache needs a handful of TLB entries instead of thousands. Linux backs anonymous memory with
huge pages on first touch when asked (``madvise(MADV_HUGEPAGE)``) in its default ``madvise`` THP mode.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys

import torch

logger = logging.getLogger("distgen")

_MADV_HUGEPAGE = 14
_HUGE_PAGE = 2 << 20


@functools.cache
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Ask for huge pages behind the whole 2 MiB pages of ``t``'s storage; call it before the memory is
    first written (pages already touched keep their size). Returns whether the kernel took the advice;
    refusing it (THP off, another OS) only costs speed."""
    fn = _madvise()
    if fn is None or t.device.type != "cpu":
        return False
    start = t.data_ptr()
    end = start + t.untyped_storage().nbytes()
    lo = (start + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
    hi = end & ~(_HUGE_PAGE - 1)
    if hi <= lo:
        return False
    if fn(lo, hi - lo, _MADV_HUGEPAGE) != 0:
        logger.debug("madvise(MADV_HUGEPAGE) refused: errno %d", ctypes.get_errno())
        return False
    return True
