"""The OpenVINO backend (engine/backends/openvino.py) against ONNX Runtime fp32 on the shipped model: precision chosen
explicitly, batch and thread-count invariance, the reduced-precision quality gate over whole runs, clear errors."""

import sys

import numpy as np
import pytest

pytest.importorskip("openvino")

from ddengine.backends import BackendError, auto_choice, create_backend  # noqa: E402
from ddengine.backends import openvino as ovb  # noqa: E402
from ddengine.backends.base import probe_batch_invariance  # noqa: E402
from ddengine.model.load import load_model  # noqa: E402
from ddengine.quality.metrics import psnr  # noqa: E402
from ddengine.runtime.sampler import Sampler  # noqa: E402

NATIVE_BF16 = ovb.native_bf16()


@pytest.fixture(scope="module")
def shipped():
    return load_model()


@pytest.fixture(scope="module")
def fp32(shipped):
    return Sampler(shipped, backend="ort-cpu")


@pytest.fixture(scope="module")
def reduced(shipped):
    return Sampler(shipped, backend="openvino")  # auto: bf16 where native


def test_precision_is_chosen_explicitly_and_recorded(reduced, monkeypatch):
    assert reduced.backend.precision == ("bf16" if NATIVE_BF16 else "fp32")
    assert {k[0] for k in reduced.backend.graph.compiled_shapes()} >= {reduced.backend.precision}
    _, records = reduced.sample(2, steps=2, classes=1)
    assert {(r["backend"], r["precision"]) for r in records} == {("openvino", reduced.backend.precision)}
    monkeypatch.setattr(ovb, "native_bf16", lambda core=None: False)
    assert ovb.resolve_precision("auto") == "fp32" and ovb.resolve_precision("bf16") == "bf16"
    with pytest.raises(BackendError, match="precision must be one of auto, bf16, fp32, got 'fp16'"):
        ovb.resolve_precision("fp16")


def test_auto_picks_openvino_bf16_exactly_where_the_cpu_runs_bf16(monkeypatch):
    choice = auto_choice()
    assert (choice.name, choice.precision) == (("openvino", "bf16") if NATIVE_BF16 else ("ort-cpu", "fp32"))
    monkeypatch.setattr(ovb, "native_bf16", lambda core=None: False)
    assert auto_choice().name == "ort-cpu" and "no native bf16" in auto_choice().reason


@pytest.mark.parametrize("threads", [1, 2])
def test_each_row_is_bit_identical_alone_and_in_a_batch(shipped, threads):
    backend = create_backend("openvino", shipped, threads=threads)
    assert probe_batch_invariance(backend, shipped.spec, rows=7)
    assert probe_batch_invariance(backend, shipped.spec, rows=16, seed=1)


def test_images_do_not_depend_on_batch_size_or_thread_count(shipped, reduced):
    a, _ = reduced.sample(7, steps=10, seed=5, classes="all", guidance=1.5, batch_size=7)
    b, _ = reduced.sample(7, steps=10, seed=5, classes="all", guidance=1.5, batch_size=1)
    c, _ = Sampler(shipped, backend="openvino", threads=1).sample(
        7, steps=10, seed=5, classes="all", guidance=1.5, batch_size=3
    )
    assert np.array_equal(a, b) and np.array_equal(a, c)


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, steps, guidance", [("ddim", 50, None), ("ddim", 50, 1.5), ("ddpm", 100, None), ("ddpm", 100, 1.5)]
)
def test_quality_gate_every_image_within_35_db_of_fp32(fp32, reduced, method, steps, guidance):
    kwargs = dict(steps=steps, method=method, seed=100, classes="all", guidance=guidance, batch_size=10)
    want, _ = fp32.sample(10, **kwargs)
    got, records = reduced.sample(10, **kwargs)
    assert all(r["status"] == "ok" for r in records)
    assert psnr(got, want, per_image=True).min() >= 35.0


def test_fp32_precision_is_close_to_onnx_runtime(shipped):
    backend = create_backend("openvino", shipped, precision="fp32")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 1, 32, 32)).astype(np.float32)
    feeds = {"sample": x, "timestep": np.array([999, 500, 20, 0]), "class_labels": np.array([0, 10, 3, 7])}
    want = create_backend("ort-cpu", shipped).run(feeds, np.empty_like(x))
    assert np.abs(backend.run(feeds, np.empty_like(x)) - want).max() < 1e-3


def test_compiled_models_are_cached_per_row_count_and_bounded(shipped, monkeypatch):
    monkeypatch.setattr(ovb, "CACHED_SHAPES", 2)
    backend = create_backend("openvino", shipped)
    for rows in (1, 2, 3, 2):
        x = np.zeros((rows, 1, 32, 32), np.float32)
        backend.run(
            {"sample": x, "timestep": np.ones(rows, np.int64), "class_labels": np.zeros(rows, np.int64)},
            np.empty_like(x),
        )
    assert [dict(k[1])["sample"][0] for k in backend.graph.compiled_shapes()] == [3, 2]


def test_missing_openvino_names_the_package(shipped, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(BackendError, match="backend 'openvino' needs OpenVINO .*pip install openvino"):
        ovb.OpenVinoBackend(shipped)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "openvino" else object())
    with pytest.raises(
        BackendError, match=r"backend 'openvino' is not available here \(it needs openvino: pip install openvino\)"
    ):
        create_backend("openvino", shipped)
    assert auto_choice().name == "ort-cpu"


def test_a_model_openvino_cannot_compile_is_a_clear_error(tmp_path, monkeypatch):
    from tests.support.tiny_models import build_tiny_model

    build_tiny_model(tmp_path / "m.onnx")
    model = load_model(tmp_path / "m.onnx")

    def refuse(*args, **kwargs):
        raise RuntimeError("Exception from src/inference/src/cpp/core.cpp:112:\nunsupported operation")

    backend = create_backend("openvino", model)
    monkeypatch.setattr(backend.graph.core, "compile_model", refuse)
    x = np.zeros((3, 1, 8, 8), np.float32)
    with pytest.raises(BackendError, match=r"could not compile .*m.onnx for inputs .*\(3, 1, 8, 8\).*core.cpp:112"):
        backend.run({"sample": x, "timestep": np.ones(3, np.int64)}, np.empty_like(x))


def test_closed_backend_refuses_to_run(shipped):
    backend = create_backend("openvino", shipped)
    backend.close()
    x = np.zeros((1, 1, 32, 32), np.float32)
    with pytest.raises(BackendError, match="closed"):
        backend.run(
            {"sample": x, "timestep": np.ones(1, np.int64), "class_labels": np.zeros(1, np.int64)}, np.empty_like(x)
        )


def test_row_counts_share_compiled_buckets_and_padding_changes_no_row(shipped):
    backend = create_backend("openvino", shipped)
    assert [ovb.bucket(r) for r in (1, 8, 9, 16, 17, 64)] == [1, 8, 16, 16, 24, 64]
    assert probe_batch_invariance(backend, shipped.spec, rows=11)  # 11 rows run as 16, each row as alone (1 row)
    for rows in (9, 12, 15):
        x = np.zeros((rows, 1, 32, 32), np.float32)
        backend.run(
            {"sample": x, "timestep": np.ones(rows, np.int64), "class_labels": np.zeros(rows, np.int64)},
            np.empty_like(x),
        )
    compiled_rows = sorted({dict(k[1])["sample"][0] for k in backend.graph.compiled_shapes()})
    assert 16 in compiled_rows and not set(compiled_rows) & {9, 11, 12, 15}
