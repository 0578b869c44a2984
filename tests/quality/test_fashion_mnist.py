"""ddengine.quality.fashion_mnist, the Fashion-MNIST IDX loader on tiny files written here: values, padding, and clear errors."""

import gzip

import numpy as np
import pytest

from ddengine.quality import fashion_mnist as data
from ddengine.runtime.sampler import to_uint8
from tests.support.export_helpers import write_idx


@pytest.fixture
def tiny_set(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([0, 9, 3, 3, 1], dtype=np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, 0x803)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels, 0x801)
    return tmp_path, images, labels


def test_loads_scaled_and_padded(tiny_set):
    folder, images, labels = tiny_set
    x, y = data.load("test", folder)
    assert x.shape == (5, 1, 32, 32) and x.dtype == np.float32
    np.testing.assert_array_equal(y, labels.astype(np.int64))
    np.testing.assert_allclose(x[:, 0, 2:30, 2:30], images / 127.5 - 1.0, atol=1e-6)
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert np.all(x[:, 0][:, border] == -1.0)


def test_uint8_round_trip(tiny_set):
    """The engine's own uint8 mapping (to_uint8) gives the raw IDX bytes back: one mapping for real and generated images."""
    folder, images, _ = tiny_set
    x, _ = data.load("test", folder)
    back = to_uint8(x)
    np.testing.assert_array_equal(back[:, 2:30, 2:30, 0], images)
    assert back.shape == (5, 32, 32, 1) and (back[:, :2] == 0).all()  # the -1 padding is black


def test_missing_folder_names_the_package(tmp_path):
    with pytest.raises(data.DataError, match="apt-get install dataset-fashion-mnist"):
        data.load("train", tmp_path / "nowhere")


def test_missing_file_names_the_package(tiny_set):
    with pytest.raises(data.DataError, match="train-images-idx3-ubyte.gz.*apt-get install dataset-fashion-mnist"):
        data.load("train", tiny_set[0])


def test_bad_magic(tiny_set):
    folder, images, _ = tiny_set
    write_idx(folder / "t10k-images-idx3-ubyte.gz", images, 0x801)
    with pytest.raises(data.DataError, match="magic number 0x00000801, expected 0x00000803"):
        data.load("test", folder)


def test_truncated_file(tiny_set):
    folder, images, _ = tiny_set
    raw = gzip.decompress((folder / "t10k-images-idx3-ubyte.gz").read_bytes())
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(data.DataError, match=r"expected 3936 for shape \(5, 28, 28\)"):
        data.load("test", folder)


def test_count_mismatch_and_bad_label(tiny_set):
    folder, _, labels = tiny_set
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", labels[:4], 0x801)
    with pytest.raises(data.DataError, match="5 test images but 4 labels"):
        data.load("test", folder)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 12]), 0x801)
    with pytest.raises(data.DataError, match="label 12 outside 0..9"):
        data.load("test", folder)


def test_not_gzip(tiny_set):
    folder = tiny_set[0]
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(data.DataError, match="not a readable gzip file"):
        data.load("test", folder)
