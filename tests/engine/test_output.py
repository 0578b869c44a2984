"""Output files: atomic writes, PNG/npy round trips, grids, trajectory strips, the writability probe."""
import os

import numpy as np
import pytest
from PIL import Image

from ddengine.output import Manifest, OutputError, atomic_write, check_writable_dir, grid, save_image, trajectory_strip


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    atomic_write(path, b"new contents")
    assert path.read_bytes() == b"new contents"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_atomic_write_gives_the_usual_file_mode(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    atomic_write(tmp_path / "a.bin", b"x")
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0o600


def test_failed_write_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")

    def fail(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space"):
        atomic_write(path, b"new")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.bin"]


@pytest.mark.parametrize("channels", [1, 3])
def test_png_and_npy_round_trip(tmp_path, channels):
    image = np.random.default_rng(0).integers(0, 256, (5, 7, channels), dtype=np.uint8)
    save_image(tmp_path / "i.png", image)
    back = np.asarray(Image.open(tmp_path / "i.png"))
    assert np.array_equal(back.reshape(image.shape), image)
    save_image(tmp_path / "i.npy", image, "npy")
    assert np.array_equal(np.load(tmp_path / "i.npy"), image)


def test_grid_places_images_row_major():
    images = np.arange(5, dtype=np.uint8)[:, None, None, None] * np.ones((5, 2, 3, 1), np.uint8) + 1
    out = grid(images, cols=3, pad=1)
    assert out.shape == (2 * 3 + 1, 3 * 4 + 1, 1)
    assert out[1, 1, 0] == 1 and out[1, 5, 0] == 2 and out[1, 9, 0] == 3 and out[4, 1, 0] == 4 and out[4, 5, 0] == 5
    assert out[4, 9, 0] == 0 and out[0].max() == 0  # empty cell and padding stay black


def test_trajectory_strip_has_x_t_above_x0():
    x_t, x0 = np.full((4, 2, 2, 1), 10, np.uint8), np.full((4, 2, 2, 1), 200, np.uint8)
    strip = trajectory_strip(x_t, x0, pad=0)
    assert strip.shape == (4, 8, 1) and (strip[:2] == 10).all() and (strip[2:] == 200).all()


def test_writable_probe(tmp_path):
    check_writable_dir(tmp_path / "new" / "deep")
    assert (tmp_path / "new" / "deep").is_dir() and not list((tmp_path / "new" / "deep").iterdir())
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="file/sub is not writable"):
        check_writable_dir(tmp_path / "file" / "sub")


def test_manifest_is_json_lines(tmp_path):
    import json

    manifest = Manifest(tmp_path / "manifest.jsonl")
    manifest.add({"file": "00000.png", "seed": 1})
    manifest.flush()
    manifest.add({"file": None, "seed": 2})
    manifest.flush()
    lines = (tmp_path / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(line)["seed"] for line in lines] == [1, 2]
