"""Host buffers advised onto transparent huge pages (longattn/kernels/support/huge_pages.py).

The advice changes only the speed: the buffer is an ordinary tensor of the
shape and dtype asked for. Where Linux has THP in ``madvise`` or ``always``
mode, a buffer of MIN_BYTES is advised and, once written, is held on huge
pages (read back from /proc/self/smaps for its own address range).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from longattn.kernels.support.huge_pages import HUGE_PAGE, MIN_BYTES, advise_huge_pages, empty_on_huge_pages

THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_mode() -> str | None:
    """The bracketed mode of the THP setting (always / madvise / never), or None without one."""
    if sys.platform != "linux" or not THP_SETTING.exists():
        return None
    found = re.search(r"\[(\w+)\]", THP_SETTING.read_text())
    return found.group(1) if found else None


def _huge_kib_at(address: int) -> int:
    """AnonHugePages (KiB) of the mapping of this process that holds ``address``."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    inside = False
    for line in lines:
        head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if head:
            inside = int(head.group(1), 16) <= address < int(head.group(2), 16)
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def test_the_buffer_is_the_tensor_asked_for():
    t = empty_on_huge_pages(2, 3, 4, dtype=torch.bfloat16, device="cpu")
    assert t.shape == (2, 3, 4) and t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.is_contiguous()


def test_small_buffers_and_other_devices_are_left_alone():
    assert advise_huge_pages(torch.empty(MIN_BYTES // 8)) is False  # small: may sit on pages already touched
    assert advise_huge_pages(torch.empty(MIN_BYTES // 4, device="meta")) is False  # no host memory


@pytest.mark.skipif(_thp_mode() not in ("madvise", "always"),
                    reason=f"transparent huge pages are not on for madvise here (mode: {_thp_mode()})")
def test_a_large_buffer_ends_up_on_huge_pages():
    t = empty_on_huge_pages(MIN_BYTES // 4, dtype=torch.float32, device="cpu")
    assert advise_huge_pages(t) is True
    t.fill_(1.0)  # the pages are made as they are first written
    huge_kib = _huge_kib_at(t.data_ptr() + MIN_BYTES // 2)
    # at least one huge page (a fragmented machine may not find a free one for each)
    assert huge_kib >= HUGE_PAGE // 1024, f"only {huge_kib} KiB on huge pages"
    assert bool((t == 1.0).all())
