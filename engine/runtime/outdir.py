"""The output folder of `ddengine sample`: one file per image plus manifest.jsonl, which lists exactly those files.

Each image is written into an anonymous file (O_TMPFILE: it vanishes if the process dies), synced, linked into
place, and only then gets its manifest line (one append). A failed append unlinks the image again, so the
folder never holds an image its manifest does not list, nor a temp file after a crash. A folder holding an
earlier run is refused unless overwrite=True, which first removes what that run wrote.
"""

import json
import os
import re
import tempfile
from pathlib import Path

from ddengine.files.atomic import FILE_MODE, OutputError

MANIFEST = "manifest.jsonl"
OUTPUT_NAME = re.compile(r"^\d{5,}(_trajectory)?\.(png|npy)$")


MANIFEST_LINE_BYTES = 700  # one JSON record of about 20 fields
FILE_OVERHEAD_BYTES = 4096  # a file's share of the file system (one block)


def check_space(folder, n, image_bytes):
    """Refuse a run whose files would not fit on the disk of `folder`, naming the estimate and the free space."""
    import shutil

    from ddengine.runtime.capacity import human_bytes

    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    need = n * (image_bytes + FILE_OVERHEAD_BYTES + MANIFEST_LINE_BYTES)
    if need > free:
        raise OutputError(
            f"{n} images need about {human_bytes(need)} on disk (files and manifest); {probe} has "
            f"{human_bytes(free)} free: sample fewer images or choose another --out"
        )


def earlier_outputs(folder):
    """The files of an earlier run in `folder`: its manifest, what it lists, and files named like our outputs."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = {p for p in folder.iterdir() if p.is_file() and OUTPUT_NAME.match(p.name)}
    manifest = folder / MANIFEST
    if manifest.exists():
        found.add(manifest)
        for name in _listed(manifest):
            if (folder / name).is_file():
                found.add(folder / name)
    return sorted(found)


def _listed(manifest):
    """File names a manifest lists (lines that do not parse are skipped: the file is removed anyway)."""
    names: list[str] = []
    try:
        lines = manifest.read_text(errors="replace").splitlines()
    except OSError:
        return names
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        for key in ("file", "trajectory_file"):
            name = record.get(key) if isinstance(record, dict) else None
            if isinstance(name, str) and "/" not in name and name not in ("", ".", ".."):
                names.append(name)
    return names


class OutputFolder:
    """A folder being written: `write(name, data)` per file, `add(record)` per manifest line, `close()` at the end."""

    def __init__(self, folder, overwrite=False):
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise OutputError(f"--out {self.folder} is a file; expected a folder (it is created if missing)")
        earlier = earlier_outputs(self.folder)
        if earlier and not overwrite:
            images = sum(1 for p in earlier if p.name != MANIFEST)
            raise OutputError(
                f"output folder {self.folder} holds an earlier run ({images} image file(s)"
                f"{' and ' + MANIFEST if any(p.name == MANIFEST for p in earlier) else ''}); "
                "pass --overwrite to replace it, or choose another --out"
            )
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe, tmp = tempfile.mkstemp(dir=self.folder, prefix=".ddengine-probe.", suffix=".tmp")
            os.close(probe)
            os.unlink(tmp)
            for path in earlier:
                path.unlink()
            self._dir: int | None = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as err:
            raise OutputError(f"output folder {self.folder} is not writable: {err.strerror or err}") from None
        self.manifest_path = self.folder / MANIFEST
        self._manifest: int | None = (
            None  # opened with the first record, so a run that writes nothing leaves no manifest
        )
        self.files = 0

    def write(self, name, data):
        """Write `data` to folder/name: fully on disk or not there at all."""
        fd = None
        try:
            fd = os.open(self.folder, os.O_TMPFILE | os.O_WRONLY, FILE_MODE)
        except OSError:  # no O_TMPFILE here (non-Linux, some file systems): a named temp file, then a rename
            _write_named(self.folder / name, data)
            return
        try:
            _write_all(fd, data)
            os.fsync(fd)
            os.link(f"/proc/self/fd/{fd}", name, src_dir_fd=self._dir, dst_dir_fd=self._dir, follow_symlinks=True)
        except OSError as err:
            raise OutputError(f"cannot write {self.folder / name}: {err.strerror or err}") from None
        finally:
            os.close(fd)

    def add(self, record, files=()):
        """Append one manifest line after its `files` are written; if the line cannot be written, they are removed."""
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        try:
            if self._manifest is None:
                self._manifest = os.open(self.manifest_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
            size = os.lseek(self._manifest, 0, os.SEEK_END)
            try:
                _write_all(self._manifest, line)
            except OSError:
                os.ftruncate(self._manifest, size)
                raise
        except OSError as err:
            for name in files:
                (self.folder / name).unlink(missing_ok=True)
            if self._manifest is not None and os.fstat(self._manifest).st_size == 0:
                os.close(self._manifest)
                self._manifest = None
                self.manifest_path.unlink(missing_ok=True)
            raise OutputError(f"cannot append to {self.manifest_path}: {err.strerror or err}") from None
        self.files += len(files)

    @property
    def has_manifest(self):
        return self._manifest is not None

    def close(self):
        """Sync the manifest and the folder entry of every file linked into it."""
        for fd in (self._manifest, self._dir):
            if fd is not None:
                try:
                    os.fsync(fd)
                except OSError:
                    pass
                os.close(fd)
        self._manifest = self._dir = None


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_named(path, data):
    from ddengine.files.atomic import atomic_write

    try:
        atomic_write(path, data)
    except OSError as err:
        raise OutputError(f"cannot write {path}: {err.strerror or err}") from None
