"""Writing files so that a crash never leaves half of one, and the result looks like any other file.

Every file this project writes (adapters, cache entries, reports) goes to a temp name in the target
folder, is flushed to disk, and is renamed over the target, which is atomic on POSIX and Windows.
``tempfile.mkstemp`` creates its file readable by the owner only; the published file gets the mode
an ordinary ``open(path, "w")`` would have given it (0666 minus the umask), so a ComfyUI running as
another user can still read an adapter the trainer wrote.

A process killed mid-write (SIGKILL, OOM killer, power loss) cannot remove its temp file, and an
adapter's is hundreds of MB. So temp names say who wrote them,
``.<target>.<host>.<pid>.<random>.imole.tmp``, and every ``atomic_path`` first removes the temp
files of ours in its folder whose writer is provably gone: same host (and PID namespace) and a PID
that no longer exists, or, from another host, untouched for a day. Files of live writers (the
trainer's ranks write cache entries into one folder at once) and files not named so are never
touched. Windows has no harmless "is this PID alive" probe (``os.kill(pid, 0)`` would terminate
it), so there only the one-day rule applies.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["STALE_AFTER_S", "atomic_path", "remove_stale_temps"]

STALE_AFTER_S = 24 * 3600  # a temp file from another host untouched this long has no writer left
_SUFFIX = ".imole.tmp"
_TEMP = re.compile(r"\.(?P<target>.*)\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>[0-9]{1,10})\.[A-Za-z0-9_]+\.imole\.tmp")
_TARGET_CHARS = 64  # of the target's name kept in the temp name: recognisable, and within NAME_MAX


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _host_tag() -> str:
    """This host's name, plus its PID namespace where there is one (containers sharing a folder and a
    host name still see different PIDs), reduced to ``[A-Za-z0-9_-]``."""
    host = re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname())[:40].strip("-") or "host"
    try:
        namespace = re.sub(r"[^0-9]", "", os.readlink("/proc/self/ns/pid"))
    except OSError:
        namespace = ""
    return f"{host}_{namespace}" if namespace else host


def _writer_gone(pid: int) -> bool:
    """True only when no process ``pid`` exists here (POSIX: signal 0 checks without sending)."""
    if pid <= 0 or os.name != "posix":
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):  # EPERM: alive under another user; anything else: do not guess
        return False
    return False


def remove_stale_temps(folder: str | os.PathLike, now: float | None = None) -> list[Path]:
    """Remove our temp files in ``folder`` whose writer is gone (see the module doc); never raises.

    Returns the paths removed. ``now``: the clock for the one-day rule (tests)."""
    now = time.time() if now is None else now
    me, removed = _host_tag(), []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not name.endswith(_SUFFIX) or not name.startswith("."):
            continue
        m = _TEMP.fullmatch(name)
        if m is None:
            continue
        try:
            if m.group("host") == me and os.name == "posix":
                stale = _writer_gone(int(m.group("pid")))
            else:
                stale = now - entry.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S
            if stale and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:  # gone already (another cleaner), or not ours to remove: leave it
            continue
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; write it inside the block; it replaces ``path`` on success.

    On any exception (KeyboardInterrupt included) the temp file is removed and ``path`` is untouched.
    An empty ``path`` or one that is a folder raises ``FileNotFoundError`` / ``IsADirectoryError``
    naming it, before anything is created.
    """
    if not os.fspath(path):
        raise FileNotFoundError(errno.ENOENT, "the path is empty; name the file to write", "")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder; name a file inside it to write", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    prefix = f".{path.name[:_TARGET_CHARS]}.{_host_tag()}.{os.getpid()}."
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=_SUFFIX, dir=path.parent)
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
