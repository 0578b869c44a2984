"""Files written whole or not at all: a temp file (or an anonymous one) in the same folder, synced, then renamed in."""

import os
import tempfile
from pathlib import Path


class OutputError(OSError):
    """An output path cannot be written."""


def _umask():
    """The process umask, read without changing it where /proc allows."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)
        os.umask(umask)
        return umask


FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file (mkstemp's own is 0o600)
DIR_MODE = 0o777 & ~_umask()  # what mkdir() would give a new folder (mkdtemp's own is 0o700)


def check_name(path, what="output path"):
    """OutputError when a component of `path` is longer than its file system takes (checked before any work)."""
    path = Path(path)
    existing = next((p for p in [path, *path.parents] if _exists(p)), Path("."))
    try:
        name_max = os.pathconf(existing if existing.is_dir() else existing.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > name_max:
            shown = part if len(part) <= 40 else f"{part[:20]}...{part[-12:]}"
            raise OutputError(
                f"{what} {shown!r}: a file name of {size} bytes; this file system takes at most {name_max}"
            )


def _exists(path):
    try:
        return path.exists()
    except OSError:  # a name too long to even look up
        return False


def atomic_write_via(path, write):
    """Call write(tmp_path) on a temp file next to `path`, fsync it, then os.replace it in (never a partial file)."""
    path = Path(path)
    check_name(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise OutputError(f"cannot write {path}: {err.strerror or err}") from None
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path, data):
    """Write bytes to `path` atomically (see atomic_write_via)."""
    atomic_write_via(path, lambda tmp: Path(tmp).write_bytes(data))
