"""ddengine.quality.evaluate on tiny data, a tiny model and an untrained classifier: every number against torch + scipy."""

import numpy as np
import onnx
import pytest
from scipy import linalg

from ddengine.quality.evaluate import EvaluationError, FeatureNet, evaluate, real_floor, real_images
from ddengine.quality.fashion_mnist import to_model_range
from ddengine.runtime.sampler import Sampler

torch = pytest.importorskip("torch")


def oracle_fid(a, b):
    """Heusel et al. (2017) with scipy's matrix square root, as pytorch-fid computes it."""
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real))


def torch_features(net, uint8_nhwc):
    """The torch classifier on uint8 images scaled as in training ([-1, 1])."""
    x = torch.from_numpy(uint8_nhwc.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)
    with torch.no_grad():
        logits, features = net(x)
    return logits.double().numpy(), features.double().numpy()


@pytest.fixture(scope="module")
def net(eval_setup):
    return FeatureNet(eval_setup.classifier)


def test_feature_net_equals_the_torch_classifier(eval_setup, net):
    images, _ = real_images("test", eval_setup.data)
    logits, features = net(images, batch=7)  # several ONNX batches
    want_logits, want_features = torch_features(eval_setup.net, images)
    assert features.shape == (30, want_features.shape[1])
    np.testing.assert_allclose(logits, want_logits, atol=1e-4)
    np.testing.assert_allclose(features, want_features, atol=1e-4)


def test_real_images_are_the_raw_bytes_padded_black(eval_setup):
    raw, labels = eval_setup.sets["test"]
    images, got_labels = real_images("test", eval_setup.data)
    assert images.shape == (30, 32, 32, 1) and images.dtype == np.uint8
    assert np.array_equal(images[:, 2:30, 2:30, 0], raw) and np.array_equal(got_labels, labels)
    assert images[:, :2].max() == 0 and images[:, :, 30:].max() == 0
    subset, sub_labels = real_images("train", eval_setup.data, n=12, seed=3)
    idx = np.random.default_rng(3).choice(40, size=12, replace=False)
    assert np.array_equal(subset[:, 2:30, 2:30, 0], eval_setup.sets["train"][0][idx])
    assert np.array_equal(sub_labels, eval_setup.sets["train"][1][idx])


def test_real_floor_against_torch_and_scipy(eval_setup, net):
    test, _ = real_images("test", eval_setup.data)
    _, test_features = net(test)
    row = real_floor(net, test_features, 0.25, eval_setup.data, n=20, seed=0)
    raw, _ = eval_setup.sets["train"]
    idx = np.random.default_rng(0).choice(len(raw), size=20, replace=False)
    with torch.no_grad():
        f_train = eval_setup.net(torch.from_numpy(to_model_range(raw[idx])))[1].double().numpy()
        f_test = eval_setup.net(torch.from_numpy(to_model_range(eval_setup.sets["test"][0])))[1].double().numpy()
    assert row["guidance"] == "real (train vs test)" and row["n"] == 20 and row["accuracy"] == 0.25
    assert row["fid"] == pytest.approx(oracle_fid(f_train, f_test), rel=1e-3, abs=1e-4)


@pytest.mark.parametrize("guidance", [0.0, 1.0, 2.0])
def test_evaluate_scores_class_balanced_samples(eval_setup, net, guidance):
    test, _ = real_images("test", eval_setup.data)
    _, test_features = net(test)
    sampler = Sampler(eval_setup.model, backend="ort-cpu")
    row, images = evaluate(sampler, net, test_features, n=20, steps=2, guidance=guidance, seed=4, batch_size=8)
    want, _ = Sampler(eval_setup.model, backend="ort-cpu").sample(
        20, steps=2, seed=4, classes=list(range(10)), guidance=guidance
    )
    assert np.array_equal(images, want)  # image i has class i % 10
    logits, features = torch_features(eval_setup.net, images)
    _, real = torch_features(eval_setup.net, test)
    assert row["fid"] == pytest.approx(oracle_fid(features, real), rel=1e-3, abs=1e-4)
    assert row["accuracy"] == pytest.approx(np.mean(logits.argmax(1) == np.arange(20) % 10))
    assert (row["guidance"], row["n"], row["steps"], row["failed"]) == (guidance, 20, 2, 0) and row["seconds"] > 0


def test_feature_net_refusals(tmp_path, eval_setup, net, uncond_model):
    with pytest.raises(
        EvaluationError, match=r"classifier .*none.onnx not found \(train one with `ddengine train-classifier`\)"
    ):
        FeatureNet(tmp_path / "none.onnx")
    with pytest.raises(EvaluationError, match=r"outputs \['out'\], expected \['logits', 'features'\]"):
        FeatureNet(uncond_model)
    for bad in (
        np.zeros((2, 28, 28, 1), np.uint8),
        np.zeros((2, 32, 32, 1), np.float32),
        np.zeros((32, 32, 1), np.uint8),
    ):
        with pytest.raises(EvaluationError, match=r"takes uint8 images of shape \(N, 32, 32, 1\)"):
            net(bad)


def test_the_shipped_classifier_is_the_default(net):
    from ddengine.quality.evaluate import default_classifier_path

    path = default_classifier_path()
    assert path.is_file() and path.parts[-2:] == ("models", "classifier.onnx")
    assert [o.name for o in onnx.load(str(path)).graph.output] == ["logits", "features"]


def test_best_guidance_is_the_lowest_fid_among_the_accurate_enough_else_the_most_accurate():
    from ddengine.quality.evaluate import best_guidance

    rows = [
        {"guidance": 1.0, "fid": 5.0, "accuracy": 0.80},
        {"guidance": 2.0, "fid": 7.0, "accuracy": 0.90},
        {"guidance": 3.0, "fid": 6.0, "accuracy": 0.92},
        {"guidance": 4.0, "fid": 9.0, "accuracy": 0.93},
    ]
    assert best_guidance(rows, classifier_accuracy=0.93) == 3.0  # 0.95 x 0.93 = 0.8835: guidance 2, 3, 4 qualify
    assert best_guidance(rows, classifier_accuracy=0.99) == 4.0  # none reaches 0.9405: the most accurate
