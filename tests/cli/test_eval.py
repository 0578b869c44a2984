"""`ddengine eval` end to end on tiny data, a tiny model and an untrained classifier (tests/conftest.py eval_setup);
the numbers themselves are checked against torch + scipy in tests/quality/test_evaluate.py."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ddengine.cli import main
from ddengine.quality.evaluate import FeatureNet, evaluate, real_images
from ddengine.runtime.sampler import Sampler


def eval_args(setup, *extra):
    return [
        "eval",
        "--model",
        str(setup.model),
        "--backend",
        "ort-cpu",
        "--classifier",
        str(setup.classifier),
        "--data",
        str(setup.data),
        *[str(e) for e in extra],
    ]


def test_eval_reports_fid_accuracy_grid_and_json(eval_setup, tmp_path):
    result = CliRunner().invoke(
        main,
        eval_args(
            eval_setup,
            "--n",
            20,
            "--steps",
            2,
            "--guidance",
            0,
            "--guidance",
            2,
            "--grid",
            tmp_path / "grid.png",
            "--json",
            tmp_path / "r.json",
        ),
    )
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "r.json").read_text())
    rows = data["rows"]
    assert [r["guidance"] for r in rows] == ["real (train vs test)", 0.0, 2.0]
    assert data["backend"] == "ort-cpu" and data["steps"] == 2
    assert data["model_sha256"] == Sampler(eval_setup.model, backend="ort-cpu").model.sha256 and data["machine"]["cpu"]
    assert data["best_guidance"] in (0.0, 2.0) and f"--recommended-guidance {data['best_guidance']:g}" in result.output
    # the CLI's rows are the library's numbers for the same request
    net = FeatureNet(eval_setup.classifier)
    _, test_features = net(real_images("test", eval_setup.data)[0])
    for row in rows[1:]:
        want, images = evaluate(
            Sampler(eval_setup.model, backend="ort-cpu"), net, test_features, 20, 2, row["guidance"], 0, 100
        )
        assert (row["fid"], row["accuracy"], row["failed"]) == pytest.approx((want["fid"], want["accuracy"], 0))
    # n = 20 from the last guidance: 10 classes (rows) of 2 images (columns), 32 px with 2 px padding
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (10 * 34 + 2, 2 * 34 + 2)
    for i in (0, 7, 13):  # image i has class i % 10: row i % 10, column i // 10
        r, c = i % 10, i // 10
        assert np.array_equal(grid[2 + r * 34 : 2 + r * 34 + 32, 2 + c * 34 : 2 + c * 34 + 32], images[i, :, :, 0])
    assert "| generated, guidance 2 | 20 |" in result.output and "| real (train vs test) | 20 |" in result.output


def test_eval_runs_ddpm_and_a_scheduler_override_as_the_sampler_would(eval_setup, tmp_path):
    config = tmp_path / "scheduler_config.json"
    config.write_text(
        json.dumps(
            {
                **Sampler(eval_setup.model, backend="ort-cpu").spec.scheduler,
                "clip_sample": True,
                "clip_sample_range": 0.5,
            }
        )
    )
    result = CliRunner().invoke(
        main,
        eval_args(
            eval_setup,
            "--n",
            20,
            "--steps",
            3,
            "--method",
            "ddpm",
            "--guidance",
            2,
            "--scheduler-config",
            config,
            "--json",
            tmp_path / "r.json",
        ),
    )
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["method"] == "ddpm" and data["scheduler"]["clip_sample_range"] == 0.5
    net = FeatureNet(eval_setup.classifier)
    _, test_features = net(real_images("test", eval_setup.data)[0])
    overridden = Sampler(eval_setup.model, backend="ort-cpu", scheduler_config=config)
    want, _ = evaluate(overridden, net, test_features, 20, 3, 2.0, 0, 100, method="ddpm")
    plain, _ = evaluate(Sampler(eval_setup.model, backend="ort-cpu"), net, test_features, 20, 3, 2.0, 0, 100)
    assert data["rows"][1]["fid"] == pytest.approx(want["fid"]) and want["fid"] != pytest.approx(plain["fid"])


def test_missing_classifier_and_data_exit_2(eval_setup, tmp_path):
    base = ["eval", "--model", str(eval_setup.model), "--n", "10", "--steps", "1"]
    result = CliRunner().invoke(
        main, base + ["--classifier", str(tmp_path / "none.onnx"), "--data", str(eval_setup.data)]
    )
    assert result.exit_code == 2 and "train-classifier" in result.output
    result = CliRunner().invoke(
        main, base + ["--classifier", str(eval_setup.classifier), "--data", str(tmp_path / "none")]
    )
    assert result.exit_code == 2 and "apt-get install dataset-fashion-mnist" in result.output


def test_eval_outputs_into_a_missing_folder_exit_2_before_sampling(eval_setup, tmp_path, monkeypatch):
    monkeypatch.setattr(Sampler, "sample", lambda *a, **k: pytest.fail("sampled before checking the output folder"))
    for option in ("--json", "--grid"):
        result = CliRunner().invoke(main, eval_args(eval_setup, "--n", 10, "--steps", 1, option, tmp_path / "no" / "x"))
        assert result.exit_code == 2 and "does not exist" in result.output


@pytest.mark.parametrize(
    "kwargs, made",
    [
        (dict(num_classes=10), "1x8x8 images with 10 classes"),
        (dict(height=32, width=32, num_classes=4), "1x32x32 images with 4 classes"),
    ],
)
def test_eval_of_a_model_that_is_not_fashion_mnist_shaped_exits_2_before_sampling(
    eval_setup, tmp_path, monkeypatch, kwargs, made
):
    from tests.support.tiny_models import build_tiny_model

    build_tiny_model(tmp_path / "m.onnx", **kwargs)
    monkeypatch.setattr(Sampler, "sample", lambda *a, **k: pytest.fail("sampled a model eval cannot score"))
    result = CliRunner().invoke(
        main,
        [
            "eval",
            "--model",
            str(tmp_path / "m.onnx"),
            "--classifier",
            str(eval_setup.classifier),
            "--data",
            str(eval_setup.data),
            "--n",
            "10",
            "--steps",
            "1",
        ],
    )
    assert result.exit_code == 2, result.output
    assert f"eval scores Fashion-MNIST models (1x32x32 images, 10 classes); m.onnx makes {made}" in result.output
