"""Writing files so that a crash never leaves half of one, and the result looks like any other file.

Every file this project writes (adapters, cache entries, reports) goes to a temp name in the target
folder, is flushed to disk, and is renamed over the target, which is atomic on POSIX and Windows.
``tempfile.mkstemp`` creates its file readable by the owner only; the published file gets the mode
an ordinary ``open(path, "w")`` would have given it (0666 minus the umask), so a ComfyUI running as
another user can still read an adapter the trainer wrote.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; write it inside the block; it replaces ``path`` on success.

    On any exception (KeyboardInterrupt included) the temp file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
