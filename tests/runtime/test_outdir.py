"""OutputFolder: every image fully written or absent, the manifest lists exactly the images present, no temp files
ever, earlier runs refused (untouched) unless overwrite=True, which removes only what they wrote."""

import errno
import hashlib
import json
import os

import pytest

from ddengine.files.atomic import OutputError
from ddengine.runtime import outdir
from ddengine.runtime.outdir import MANIFEST, OutputFolder, earlier_run


def listing(folder):
    return sorted(os.listdir(folder))


def snapshot(folder):
    """name -> (bytes, mtime_ns) of every entry: proves a refusal touched nothing."""
    out = {}
    for name in os.listdir(folder):
        path = folder / name
        out[name] = (path.read_bytes() if path.is_file() else None, path.stat().st_mtime_ns)
    return out


def write_run(folder, n, **kwargs):
    run = OutputFolder(folder, **kwargs)
    for i in range(n):
        name = f"{i:05d}.png"
        run.write(name, f"image {i}".encode())
        run.add({"file": name, "index": i}, [name])
    run.close()
    return run


def manifest(folder):
    return [json.loads(line) for line in (folder / MANIFEST).read_text().splitlines()]


def test_images_land_whole_with_their_manifest_lines_and_the_usual_mode(tmp_path):
    out = tmp_path / "new" / "run"  # created, parents too
    run = write_run(out, 3)
    assert listing(out) == ["00000.png", "00001.png", "00002.png", MANIFEST]
    assert (out / "00001.png").read_bytes() == b"image 1"
    assert [r["file"] for r in manifest(out)] == ["00000.png", "00001.png", "00002.png"]
    assert run.files == 3
    umask = os.umask(0o022)
    os.umask(umask)
    assert (out / "00000.png").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_run_that_finishes_nothing_leaves_no_manifest(tmp_path):
    run = OutputFolder(tmp_path / "out")
    run.close()
    assert listing(tmp_path / "out") == []
    run = OutputFolder(tmp_path / "failed")
    run.add({"file": None, "status": "error"})  # a failed image is listed without a file
    run.close()
    assert listing(tmp_path / "failed") == [MANIFEST] and manifest(tmp_path / "failed")[0]["status"] == "error"


def test_without_o_tmpfile_a_named_temp_file_is_renamed_in(tmp_path, monkeypatch):
    real_open = os.open

    def no_tmpfile(path, flags, *args, **kwargs):
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_tmpfile)
    write_run(tmp_path, 2)
    assert listing(tmp_path) == ["00000.png", "00001.png", MANIFEST]
    assert (tmp_path / "00000.png").read_bytes() == b"image 0"


@pytest.mark.parametrize("fail", ["link", "fsync"])
def test_an_image_that_cannot_be_written_is_absent_and_leaves_no_temp_file(tmp_path, monkeypatch, fail):
    run = OutputFolder(tmp_path)
    real = getattr(os, fail)

    def broken(*args, **kwargs):
        if fail == "fsync" and not _is_file_fd(args[0]):
            return real(*args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, fail, broken)
    with pytest.raises(OutputError, match=r"cannot write .*00000.png: No space left on device"):
        run.write("00000.png", b"data")
    monkeypatch.undo()
    run.close()
    assert listing(tmp_path) == []


def _is_file_fd(fd):
    try:
        return not os.readlink(f"/proc/self/fd/{fd}").endswith(MANIFEST) and os.path.isfile(f"/proc/self/fd/{fd}")
    except OSError:
        return False


def _failing_manifest_writes(monkeypatch, after_bytes=None):
    """os.write fails (ENOSPC) on the manifest; with after_bytes, a first short write lands that many bytes."""
    real = os.write
    state = {"partial": after_bytes}

    def write(fd, data):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if target.endswith(MANIFEST):
            if state["partial"] is not None:
                n, state["partial"] = state["partial"], None
                return real(fd, bytes(data[:n]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)


def test_a_failed_first_manifest_append_removes_the_image_and_the_empty_manifest(tmp_path, monkeypatch):
    run = OutputFolder(tmp_path)
    run.write("00000.png", b"image")
    _failing_manifest_writes(monkeypatch)
    with pytest.raises(OutputError, match=r"cannot append to .*manifest.jsonl: No space left on device"):
        run.add({"file": "00000.png"}, ["00000.png"])
    monkeypatch.undo()
    run.close()
    assert listing(tmp_path) == [] and run.files == 0


def test_a_half_written_manifest_line_is_cut_and_its_image_removed(tmp_path, monkeypatch):
    run = OutputFolder(tmp_path)
    for i in range(2):
        run.write(f"{i:05d}.png", b"ok")
        run.add({"file": f"{i:05d}.png", "index": i}, [f"{i:05d}.png"])
    run.write("00002.png", b"ok")
    run.write("00002_trajectory.png", b"strip")
    _failing_manifest_writes(monkeypatch, after_bytes=7)
    with pytest.raises(OutputError, match="No space left on device"):
        run.add(
            {"file": "00002.png", "trajectory_file": "00002_trajectory.png", "index": 2},
            ["00002.png", "00002_trajectory.png"],
        )
    monkeypatch.undo()
    run.close()
    assert [r["index"] for r in manifest(tmp_path)] == [0, 1]  # every line still parses: the partial one is gone
    assert listing(tmp_path) == ["00000.png", "00001.png", MANIFEST]
    assert run.files == 2


def test_an_earlier_run_is_refused_and_left_untouched(tmp_path):
    write_run(tmp_path, 2)
    (tmp_path / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(OutputError) as err:
        OutputFolder(tmp_path)
    message = str(err.value)
    assert "holds an earlier run (2 image file(s) and manifest.jsonl)" in message and "--overwrite" in message
    assert snapshot(tmp_path) == before


def test_files_named_like_outputs_that_no_manifest_lists_are_never_replaced(tmp_path):
    (tmp_path / "00007.png").write_bytes(b"a user's own picture")
    (tmp_path / "12345_trajectory.npy").write_bytes(b"and theirs")
    with pytest.raises(OutputError, match=r"holds an earlier run \(2 image file\(s\)\)"):
        OutputFolder(tmp_path)
    with pytest.raises(OutputError) as err:
        OutputFolder(tmp_path, overwrite=True)
    assert "00007.png (named like an output, but no manifest lists it)" in str(err.value)
    assert (tmp_path / "00007.png").read_bytes() == b"a user's own picture" and len(listing(tmp_path)) == 2


def test_a_folder_of_other_files_is_used_and_they_are_kept(tmp_path):
    for name in ("notes.txt", "cat.png", "0001.png", "123456.jpg"):
        (tmp_path / name).write_text(name)
    write_run(tmp_path, 1)
    assert listing(tmp_path) == ["00000.png", "0001.png", "123456.jpg", "cat.png", MANIFEST, "notes.txt"]


def test_each_manifest_line_records_its_files_sha256(tmp_path):
    write_run(tmp_path, 2)
    assert [r["sha256"] for r in manifest(tmp_path)] == [
        {f"{i:05d}.png": hashlib.sha256(f"image {i}".encode()).hexdigest()} for i in range(2)
    ]


def test_overwrite_removes_only_what_the_earlier_run_wrote(tmp_path):
    out = tmp_path / "out"
    write_run(out, 3)
    with open(out / MANIFEST, "a") as f:  # a line naming a file outside the folder, and junk: both ignored
        f.write(json.dumps({"file": "../outside.png"}) + "\n")
        f.write("not json\n")
    (tmp_path / "outside.png").write_bytes(b"keep")
    for name in ("notes.txt", "grid.png", "cat.png"):
        (out / name).write_text("keep")
    (out / "00005.png").mkdir()  # a folder named like an output is not a file of ours
    assert {p.name for p in earlier_run(out).ours} == {"00000.png", "00001.png", "00002.png"}
    write_run(out, 1, overwrite=True)
    assert listing(out) == ["00000.png", "00005.png", "cat.png", "grid.png", MANIFEST, "notes.txt"]
    assert [r["index"] for r in manifest(out)] == [0]  # the new run's manifest only
    assert (tmp_path / "outside.png").read_bytes() == b"keep"


@pytest.mark.parametrize(
    "damage, why",
    [
        (
            lambda out: (out / "00001.png").write_bytes(b"edited by the user"),
            "00001.png (changed since this engine wrote it)",
        ),
        (
            lambda out: (
                open(out / MANIFEST, "a").write(json.dumps({"file": "00009.npy"}) + "\n")
                and (out / "00009.npy").write_bytes(b"old")
            ),
            "00009.npy (its manifest line records no sha256)",
        ),
    ],
)
def test_overwrite_refuses_a_listed_file_it_cannot_prove_it_wrote(tmp_path, damage, why):
    write_run(tmp_path, 3)
    damage(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(OutputError) as err:
        OutputFolder(tmp_path, overwrite=True)
    assert why in str(err.value) and "--overwrite replaces only the files manifest.jsonl lists" in str(err.value)
    assert snapshot(tmp_path) == before  # nothing removed


def test_out_pointing_at_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(OutputError) as err:
        OutputFolder(tmp_path / "taken")
    assert "is a file; expected a folder" in str(err.value) and "File exists" not in str(err.value)
    with pytest.raises(OutputError, match=r"output folder .*taken/sub is not writable: Not a directory"):
        OutputFolder(tmp_path / "taken" / "sub")
    assert (tmp_path / "taken").read_text() == "x"


def test_many_images_append_to_one_manifest(tmp_path):
    """The manifest is appended per image (never rewritten): its size grows by exactly each line."""
    run = OutputFolder(tmp_path)
    sizes = []
    for i in range(50):
        run.write(f"{i:05d}.png", b"x")
        run.add({"file": f"{i:05d}.png", "index": i}, [f"{i:05d}.png"])
        sizes.append((tmp_path / MANIFEST).stat().st_size)
    run.close()
    lines = (tmp_path / MANIFEST).read_bytes().splitlines(keepends=True)
    assert sizes == [sum(len(line) for line in lines[: i + 1]) for i in range(50)]
    assert outdir.OUTPUT_NAME.match("00049.png") and len(listing(tmp_path)) == 51


def test_a_run_that_would_not_fit_on_the_disk_is_refused_naming_both_sizes(tmp_path, monkeypatch):
    import shutil

    from ddengine.runtime.outdir import check_space

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 10**6, 10**6))
    check_space(tmp_path / "new" / "folder", 10, 1024)  # ~60 KB fits in 1 MB
    with pytest.raises(OutputError, match=r"1000 images need about 5.6 MiB on disk .* has 976.6 KiB free"):
        check_space(tmp_path / "new", 1000, 1024)
    assert not (tmp_path / "new").exists()
