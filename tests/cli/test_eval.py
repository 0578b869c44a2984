"""`ddengine eval` end to end on tiny data, a tiny model and an untrained classifier; the real-vs-real row vs torch+scipy."""
import gzip
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from scipy import linalg

from ddengine.cli import main
from ddengine.export import classifier
from ddengine.data import to_model_range

sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))
from tiny_models import build_tiny_model  # noqa: E402


def write_idx(path, array, magic):
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    data = root / "data"
    data.mkdir()
    sets = {}
    for split, prefix, n in (("train", "train", 40), ("test", "t10k", 30)):
        images, labels = rng.integers(0, 256, (n, 28, 28)), np.arange(n) % 10
        write_idx(data / f"{prefix}-images-idx3-ubyte.gz", images, 0x803)
        write_idx(data / f"{prefix}-labels-idx1-ubyte.gz", labels, 0x801)
        sets[split] = (images.astype(np.uint8), labels)
    torch.manual_seed(0)
    net = classifier.Classifier().eval()
    classifier.export(net, root / "clf.onnx")
    build_tiny_model(root / "model.onnx", channels=1, height=32, width=32, num_classes=10)
    return root, data, net, sets


def oracle_fid(a, b):
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real))


def test_eval_reports_fid_accuracy_grid_and_json(setup):
    root, data, net, sets = setup
    args = ["eval", "--model", str(root / "model.onnx"), "--classifier", str(root / "clf.onnx"), "--data", str(data),
            "--n", "20", "--steps", "2", "--guidance", "0", "--guidance", "2", "--grid", str(root / "grid.png"), "--json", str(root / "r.json")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = json.loads((root / "r.json").read_text())["rows"]
    assert [r["guidance"] for r in rows] == ["real (train vs test)", 0.0, 2.0]
    assert all(np.isfinite(r["fid"]) and 0 <= r["accuracy"] <= 1 for r in rows)
    assert Image.open(root / "grid.png").size == (2 * 32, 10 * 32)  # n = 20: two samples per class
    assert "| generated, guidance 2 | 20 |" in result.output

    # the real-vs-real floor recomputed with the torch classifier and scipy's sqrtm (train subset drawn as eval draws it)
    images, _ = sets["train"]
    idx = np.random.default_rng(0).choice(len(images), size=20, replace=False)
    with torch.no_grad():
        f_train = net(torch.from_numpy(to_model_range(images[idx])))[1].double().numpy()
        f_test = net(torch.from_numpy(to_model_range(sets["test"][0])))[1].double().numpy()
    assert rows[0]["fid"] == pytest.approx(oracle_fid(f_train, f_test), rel=1e-3, abs=1e-4)


def test_missing_classifier_and_data_exit_2(setup, tmp_path):
    root, data, _, _ = setup
    base = ["eval", "--model", str(root / "model.onnx"), "--n", "10", "--steps", "1"]
    result = CliRunner().invoke(main, base + ["--classifier", str(tmp_path / "none.onnx"), "--data", str(data)])
    assert result.exit_code == 2 and "train-classifier" in result.output
    result = CliRunner().invoke(main, base + ["--classifier", str(root / "clf.onnx"), "--data", str(tmp_path / "none")])
    assert result.exit_code == 2 and "apt-get install dataset-fashion-mnist" in result.output
