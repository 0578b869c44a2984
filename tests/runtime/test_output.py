"""Output encoders (engine/runtime/output.py): PNG/npy round trips, grids (one row per class), trajectory strips."""

import numpy as np
import pytest
from PIL import Image

from ddengine.files.atomic import OutputError
from ddengine.runtime.output import class_grid, encode, grid, save_image, trajectory_strip


@pytest.mark.parametrize("channels", [1, 3])
def test_png_and_npy_round_trip(tmp_path, channels):
    image = np.random.default_rng(0).integers(0, 256, (5, 7, channels), dtype=np.uint8)
    save_image(tmp_path / "i.png", image)
    back = np.asarray(Image.open(tmp_path / "i.png"))
    assert np.array_equal(back.reshape(image.shape), image)
    (tmp_path / "i.npy").write_bytes(encode(image, "npy"))
    assert np.array_equal(np.load(tmp_path / "i.npy"), image)


@pytest.mark.parametrize("name, pillow", [("g.png", "PNG"), ("g.JPG", "JPEG"), ("g.jpeg", "JPEG"), ("g.webp", "WEBP")])
def test_an_images_extension_picks_its_format(tmp_path, name, pillow):
    image = np.random.default_rng(1).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    save_image(tmp_path / name, image)
    with Image.open(tmp_path / name) as back:
        assert back.format == pillow and back.size == (5, 6)
        if pillow != "JPEG":  # PNG and lossless WebP give the pixels back
            assert np.array_equal(np.asarray(back), image)


@pytest.mark.parametrize("name", ["g.txt", "g.npy", "grid"])
def test_an_extension_that_is_no_image_format_is_refused(tmp_path, name):
    with pytest.raises(OutputError, match=r"the extension picks the image format: \.png, \.jpg, \.jpeg, \.webp"):
        save_image(tmp_path / name, np.zeros((2, 2, 1), np.uint8))
    assert not list(tmp_path.iterdir())


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


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((4, 4, 2), np.uint8), r"expected a uint8 \(H, W, 1\|3\|4\) image, got uint8 \(4, 4, 2\)"),
        (np.zeros((4, 4, 3), np.float32), "got float32"),
        (np.zeros((4, 4), np.uint8), r"got uint8 \(4, 4\)"),
    ],
)
def test_png_needs_uint8_with_1_3_or_4_channels(image, message):
    with pytest.raises(ValueError, match=message):
        encode(image, "png")


def _tiles(classes, h=3, w=2):
    """uint8 (N, h, w, 1) images whose every pixel is their index + 1 (0 stays the padding and blank cells)."""
    return (np.arange(len(classes), dtype=np.uint8) + 1)[:, None, None, None] * np.ones(
        (len(classes), h, w, 1), np.uint8
    )


def test_class_grid_puts_one_row_per_class_in_order_of_first_appearance():
    classes = [2, 0, 2, 1, 0, 2, 2]
    out = class_grid(_tiles(classes), classes, pad=1)
    rows, cols = 3, 4  # classes 2, 0, 1; class 2 has the most images (4)
    assert out.shape == (rows * (3 + 1) + 1, cols * (2 + 1) + 1, 1)
    cell = [[int(out[1 + r * 4, 1 + c * 3, 0]) for c in range(cols)] for r in range(rows)]
    # each row: the indices (+1) of that class's images left to right; blank cells stay black
    assert cell == [[1, 3, 6, 7], [2, 5, 0, 0], [4, 0, 0, 0]]


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_named_classes_label_their_rows_in_a_left_margin_and_leave_the_tiles_as_they_were(channels):
    from PIL import Image, ImageDraw, ImageFont

    classes, names = [2, 0, 2, 1], ("T-shirt/top", "Trouser", "Pullover")
    images = np.repeat(_tiles(classes, h=16, w=16), channels, axis=3)
    plain = class_grid(images, classes)
    labelled = class_grid(images, classes, names=names)
    margin = labelled.shape[1] - plain.shape[1]
    font = ImageFont.load_default()
    assert margin == max(int(font.getlength(n)) for n in names) + 6 and labelled.shape[0] == plain.shape[0]
    assert np.array_equal(labelled[:, margin:], plain)  # the tiles are exactly the unlabelled grid
    for row, name in enumerate(["Pullover", "T-shirt/top", "Trouser"]):  # classes 2, 0, 1 in order of appearance
        strip = labelled[2 + row * 18 : 2 + (row + 1) * 18, :margin, 0]
        alone = Image.new("L", (margin, 18))
        ImageDraw.Draw(alone).text((3, 0), name, fill=255, font=font)
        inked = np.asarray(alone) > 0  # the name drawn on its own: the same number of inked columns
        assert (strip > 0).any(axis=0).sum() == inked.any(axis=0).sum(), name
    if channels == 4:
        assert (labelled[:, :margin, 3] == 255).all()


@pytest.mark.parametrize("classes", [None, [3, 3, 3, 3, 3]])
def test_class_grid_of_one_class_or_none_is_a_square_grid(classes):
    images = _tiles([0] * 5)
    assert np.array_equal(class_grid(images, classes), grid(images))
    assert grid(images).shape == (2 * 5 + 2, 3 * 4 + 2, 1)  # ceil(sqrt(5)) = 3 columns, 2 rows, 2 px padding
