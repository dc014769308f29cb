"""Large host buffers on transparent huge pages, for kernels that read them at
scattered places.

HiP's tree search scores candidate key blocks spread over the whole context
from its own ``(batch, kv heads, positions, head dim)`` copy of the keys
(256 MiB at 64k, float32, 8 kv heads). On 4 KiB pages nearly every block it
reads is on a page the TLB does not hold, and in a virtual machine each
miss is a nested page walk; on 2 MiB pages the copy of one head needs 16 TLB
entries. Linux gives an anonymous mapping huge pages where it is asked to
(``madvise(MADV_HUGEPAGE)``, when ``/sys/kernel/mm/transparent_hugepage/enabled``
is ``madvise`` or ``always``), for the pages touched after the advice: so
the buffer is advised as soon as it is allocated, before it is written.

Only buffers of at least :data:`MIN_BYTES` are advised: glibc gives those a
mapping of their own, untouched (its mmap threshold stops rising at 32 MiB),
while a smaller one may be carved from heap pages already in use, whose
size the advice no longer changes. Where the advice is not possible (not
Linux, not a CPU tensor, THP off, a smaller buffer) the buffer is an
ordinary one: results never depend on it, only the speed.
"""

from __future__ import annotations

import ctypes
import sys

import torch

HUGE_PAGE = 2 << 20
MIN_BYTES = 64 << 20
_MADV_HUGEPAGE = 14  # <sys/mman.h>, Linux
_madvise = None


def _libc_madvise():
    global _madvise
    if _madvise is None:
        fn = ctypes.CDLL(None, use_errno=True).madvise
        fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        fn.restype = ctypes.c_int
        _madvise = fn
    return _madvise


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Ask Linux for huge pages under the whole 2 MiB-aligned pages inside
    ``t``'s storage (of at least :data:`MIN_BYTES`); True when it agreed.
    Pages already touched keep their size (khugepaged may merge them later),
    so advise before writing."""
    if sys.platform != "linux" or t.device.type != "cpu" or t.untyped_storage().nbytes() < MIN_BYTES:
        return False
    start, nbytes = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
    lo = -(-start // HUGE_PAGE) * HUGE_PAGE
    hi = (start + nbytes) // HUGE_PAGE * HUGE_PAGE
    return _libc_madvise()(lo, hi - lo, _MADV_HUGEPAGE) == 0


def empty_on_huge_pages(*shape: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``torch.empty(*shape, dtype=dtype, device=device)``, advised onto huge
    pages where that is possible (:func:`advise_huge_pages`)."""
    t = torch.empty(*shape, dtype=dtype, device=device)
    advise_huge_pages(t)
    return t
