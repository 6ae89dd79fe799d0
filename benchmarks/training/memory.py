"""CPU memory of one step: glibc set to return freed memory, and the peak RSS a call adds.

Why: torch's CPU allocator is glibc's malloc, whose default mmap threshold moves with the
allocation history, so how much RSS a step adds depends on what ran before it. With every block
≥ 128 KiB served by mmap and the heap trimmed (``return_freed_memory``), RSS tracks live memory and
the peak a step adds (``RssPeak``: ``VmHWM`` reset through ``/proc/self/clear_refs``) is the step's
own. CUDA peaks come from ``torch.cuda`` instead (``measure.py``).
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path
from typing import Any

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4


def _glibc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim  # noqa: B018  (not glibc: AttributeError)
    except (OSError, AttributeError):
        return None
    return libc


def return_freed_memory() -> bool:
    """glibc: serve every allocation ≥ 128 KiB by mmap and trim the heap, so RSS tracks live memory.

    The opposite of ``common.keep_freed_memory``, and deterministic where glibc's default is not
    (its mmap threshold moves with the allocation history): every step pays the same page zeroing
    for what it allocates. Returns False where it does not apply (not Linux glibc).
    """
    libc = _glibc()
    if libc is None:
        return False
    settings = ((_M_MMAP_THRESHOLD, 128 * 1024), (_M_MMAP_MAX, 65536), (_M_TRIM_THRESHOLD, 128 * 1024))
    ok = all(libc.mallopt(k, v) for k, v in settings)
    libc.malloc_trim(0)
    return ok


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class RssPeak:
    """Peak resident memory a call adds (Linux: ``VmHWM`` reset through ``/proc/self/clear_refs``)."""

    def __init__(self) -> None:
        self.libc = _glibc()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            _status_kib("VmHWM")
            self.ok = self.libc is not None
        except (OSError, KeyError):
            self.ok = False
        self._before = 0

    def start(self) -> None:
        if self.ok:
            self.libc.malloc_trim(0)
            self._before = _status_kib("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS (Linux ≥ 4.0)

    def stop(self) -> int | None:
        return (_status_kib("VmHWM") - self._before) * 1024 if self.ok else None
