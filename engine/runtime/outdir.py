"""The output folder of `ddengine sample`: one file per image plus manifest.jsonl, which lists exactly those files.

Each image is written into an anonymous file (O_TMPFILE: it vanishes if the process dies), synced, linked into
place, and only then gets its manifest line (one append). A failed append unlinks the image again, so the
folder never holds an image its manifest does not list, nor a temp file after a crash. Each line records its
files' sha256. A folder holding an earlier run is refused unless overwrite=True, which first removes what that run
wrote and nothing else: a listed file whose content changed, and a file named like an output that no manifest
lists, are refused by name. A --grid gets its own manifest line (its path relative to the folder and its sha256), so
the next --overwrite replaces it or removes it with the run, and a grid never lands on a file it did not write.
"""

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ddengine.files.atomic import FILE_MODE, OutputError, check_name
from ddengine.runtime.output import IMAGE_FORMATS

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


@dataclass
class EarlierRun:
    """What a folder holds of an earlier run: the files its manifest lists with their content unchanged (ours to
    replace), and the files that may not be replaced, each with why."""

    manifest: Path | None = None
    ours: list = field(default_factory=list)
    refused: list = field(default_factory=list)  # (path, why)
    grid: Path | None = None  # the grid its manifest records, when that file is still there

    def __bool__(self):
        return bool(self.manifest or self.ours or self.refused)


def earlier_run(folder):
    """The EarlierRun in `folder`: a manifest's files are ours when their sha256 is still the one it recorded; a
    listed file that changed or has no recorded sha256, and a file named like an output that no manifest lists,
    are not."""
    folder, run = Path(folder), EarlierRun()
    if not folder.is_dir():
        return run
    manifest = folder / MANIFEST
    listed, grids = _listed(manifest) if manifest.is_file() else ({}, {})
    run.manifest = manifest if manifest.is_file() else None
    for name, digest in [*listed.items(), *grids.items()]:
        path = folder / name
        if not path.is_file():
            continue
        if name in grids:
            run.grid = path
        if digest is None:
            run.refused.append((path, "its manifest line records no sha256"))
        elif _sha256(path) != digest:
            run.refused.append((path, "changed since this engine wrote it"))
        else:
            run.ours.append(path)
    for path in sorted(folder.iterdir()):
        if path.is_file() and OUTPUT_NAME.match(path.name) and path.name not in listed:
            run.refused.append((path, "named like an output, but no manifest lists it"))
    return run


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _listed(manifest):
    """({file name: its recorded sha256 or None}, {grid path relative to the folder: its sha256 or None}) of what a
    manifest lists (lines that do not parse are skipped; a grid must name an image file)."""
    names: dict[str, str | None] = {}
    grids: dict[str, str | None] = {}
    try:
        lines = manifest.read_text(errors="replace").splitlines()
    except OSError:
        return names, grids
    for line in lines:
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue
        if not isinstance(record, dict):
            continue
        given = record.get("sha256")
        digests: dict = given if isinstance(given, dict) else {}
        for key in ("file", "trajectory_file"):
            name = record.get(key)
            if isinstance(name, str) and "/" not in name and name not in ("", ".", ".."):
                digest = digests.get(name)
                names[name] = digest if isinstance(digest, str) else None
        grid = record.get("grid")
        if isinstance(grid, str) and Path(grid).suffix.lower() in IMAGE_FORMATS:
            digest = digests.get(grid)
            grids[grid] = digest if isinstance(digest, str) else None
    return names, grids


def check_grid_target(folder, grid, earlier, overwrite):
    """--grid may not be --out, one of the run's own files or any existing file, except the grid of the run that
    --overwrite replaces (its manifest recorded it, content unchanged)."""
    where = grid.resolve()
    if where == folder.resolve():
        raise OutputError(f"--grid {grid} is the --out folder itself; name an image file")
    if where.parent == folder.resolve() and (where.name == MANIFEST or OUTPUT_NAME.match(where.name)):
        raise OutputError(f"--grid {grid} is named like one of the run's own files in {folder}; choose another name")
    if not grid.exists():
        return
    if overwrite and earlier.grid is not None and earlier.grid.resolve() == where and earlier.grid in earlier.ours:
        return
    raise OutputError(
        f"--grid {grid} exists and is not a grid that {folder / MANIFEST} records (--overwrite replaces only "
        "such a grid); choose another name or move the file"
    )


class OutputFolder:
    """A folder being written: `write(name, data)` per file, `add(record)` per manifest line, `close()` at the end."""

    def __init__(self, folder, overwrite=False, grid=None):
        self.folder = Path(folder)
        check_name(self.folder, "--out")
        if self.folder.exists() and not self.folder.is_dir():
            raise OutputError(f"--out {self.folder} is a file; expected a folder (it is created if missing)")
        earlier = earlier_run(self.folder)
        if grid is not None:
            check_grid_target(self.folder, Path(grid), earlier, overwrite)
        if earlier and not overwrite:
            images = len(earlier.ours) + len(earlier.refused)
            raise OutputError(
                f"output folder {self.folder} holds an earlier run ({images} image file(s)"
                f"{' and ' + MANIFEST if earlier.manifest else ''}); "
                "pass --overwrite to replace it, or choose another --out"
            )
        if earlier.refused:
            named = "; ".join(f"{path.name} ({why})" for path, why in earlier.refused[:5])
            more = f" and {len(earlier.refused) - 5} more" if len(earlier.refused) > 5 else ""
            raise OutputError(
                f"--overwrite replaces only the files {MANIFEST} lists with their sha256 unchanged; {self.folder} "
                f"also holds {named}{more}: move them away or choose another --out"
            )
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe, tmp = tempfile.mkstemp(dir=self.folder, prefix=".ddengine-probe.", suffix=".tmp")
            os.close(probe)
            os.unlink(tmp)
            for path in [*earlier.ours, *([earlier.manifest] if earlier.manifest else [])]:
                path.unlink()
            self._dir: int | None = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as err:
            raise OutputError(f"output folder {self.folder} is not writable: {err.strerror or err}") from None
        self.manifest_path = self.folder / MANIFEST
        self._manifest: int | None = (
            None  # opened with the first record, so a run that writes nothing leaves no manifest
        )
        self.files = 0
        self._digests: dict[str, str] = {}  # file name -> sha256 of what write() put there, recorded by add()

    def write(self, name, data):
        """Write `data` to folder/name: fully on disk or not there at all."""
        self._digests[name] = hashlib.sha256(data).hexdigest()
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

    def write_together(self, files):
        """write() each of {name: data}; if one fails, the ones already written are removed before the error."""
        done = []
        try:
            for name, data in files.items():
                self.write(name, data)
                done.append(name)
        except OutputError:
            for name in done:
                (self.folder / name).unlink(missing_ok=True)
                self._digests.pop(name, None)
            raise

    def add(self, record, files=()):
        """Append one manifest line after its `files` are written (with their sha256, so --overwrite can tell them
        from a user's); if the line cannot be written, they are removed."""
        if files:
            record = {**record, "sha256": {name: self._digests.pop(name) for name in files}}
        self._append(record, [self.folder / name for name in files])
        self.files += len(files)

    def write_grid(self, path, data):
        """Write the grid atomically, then its manifest line (path relative to the folder, sha256)."""
        from ddengine.files.atomic import atomic_write

        name = os.path.relpath(Path(path).resolve(), self.folder.resolve())
        try:
            atomic_write(path, data)
        except OSError as err:
            raise OutputError(f"cannot write --grid {path}: {err.strerror or err}") from None
        self._append({"grid": name, "sha256": {name: hashlib.sha256(data).hexdigest()}}, [Path(path)])

    def _append(self, record, paths):
        """Append one manifest line; if it cannot be written, the files at `paths` it would list are removed."""
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
            for path in paths:
                path.unlink(missing_ok=True)
            if self._manifest is not None and os.fstat(self._manifest).st_size == 0:
                os.close(self._manifest)
                self._manifest = None
                self.manifest_path.unlink(missing_ok=True)
            raise OutputError(f"cannot append to {self.manifest_path}: {err.strerror or err}") from None

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
