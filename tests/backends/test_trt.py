"""TensorRTBackend against the fake `tensorrt`: manifest and sha256 checked before deserializing, every
None/False raises with the logger's text, one execution context per runner."""

import sys

import pytest

from ddengine.backends import trt_manifest as mf
from ddengine.backends.base import BackendError
from ddengine.backends.trt import TensorRTBackend, TensorRTError, create
from ddengine.export.trt_build import BuildConfig, build_engine
from ddengine.gpu import driver
from ddengine.model.load import load_model
from tests.support import fake_tensorrt
from tests.support.gpu import FAKE_GPU


@pytest.fixture
def engine(fake_trt, onnx16, tmp_path):
    return build_engine(BuildConfig(onnx_path=onnx16, engine_path=tmp_path / "m.plan", batch=(1, 4, 8))).engine_path


@pytest.fixture
def spec(onnx16):
    return load_model(onnx16).spec


def test_loads_a_matching_engine(fake_trt, engine, spec):
    backend = TensorRTBackend(engine, spec)
    assert (backend.min_rows, backend.max_rows) == (1, 8) and backend.precision == "fp16"
    assert fake_trt.state.deserialized == 2  # once when built (validation), once here


def test_tampered_engine_is_never_deserialized(fake_trt, engine, spec):
    engine.write_bytes(engine.read_bytes() + b"\x90")
    before = fake_trt.state.deserialized
    with pytest.raises(mf.ManifestError, match="sha256"):
        TensorRTBackend(engine, spec)
    assert fake_trt.state.deserialized == before


def test_engine_without_manifest_is_refused(fake_trt, engine, spec):
    mf.manifest_path(engine).unlink()
    with pytest.raises(mf.ManifestError, match="no manifest"):
        TensorRTBackend(engine, spec)


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda m, p: setattr(m, "__version__", "11.4.0"), "tensorrt_version"),
        (lambda m, p: p.setattr(driver, "gpu_properties", lambda d=0: ("NVIDIA A100-SXM4-80GB", "8.0")), "gpu_name"),
        (lambda m, p: p.setattr(driver, "gpu_properties", lambda d=0: (FAKE_GPU[0], "8.9")), "compute_capability"),
        (lambda m, p: p.setattr(mf, "current_os", lambda: "Windows-AMD64"), "os"),
        (lambda m, p: p.setattr("ddengine.__version__", "9.9.9"), "ddengine_version"),
    ],
)
def test_mismatch_names_the_field(fake_trt, engine, spec, monkeypatch, change, field):
    change(fake_trt, monkeypatch)
    before = fake_trt.state.deserialized
    with pytest.raises(mf.EngineMismatchError, match=f"{field}=") as info:
        TensorRTBackend(engine, spec)
    assert info.value.field == field and fake_trt.state.deserialized == before


def test_onnx_hash_is_checked_when_given(fake_trt, engine, spec):
    with pytest.raises(mf.EngineMismatchError, match="onnx_sha256="):
        TensorRTBackend(engine, spec, onnx_sha256="0" * 64)


def test_ampere_plus_engine_runs_on_another_ampere_gpu_only(fake_trt, onnx16, tmp_path, monkeypatch):
    path = build_engine(
        BuildConfig(onnx_path=onnx16, engine_path=tmp_path / "hc.plan", hardware_compat="ampere+")
    ).engine_path
    spec = load_model(onnx16).spec
    monkeypatch.setattr(driver, "gpu_properties", lambda d=0: ("NVIDIA A10", "8.6"))
    assert TensorRTBackend(path, spec).max_rows == 16
    monkeypatch.setattr(driver, "gpu_properties", lambda d=0: ("Tesla T4", "7.5"))
    with pytest.raises(BackendError, match="compute capability >= 8.0.*7.5"):
        TensorRTBackend(path, spec)


def test_deserialize_failure_carries_the_log(fake_trt, engine, spec):
    fake_trt.state.faults.add("deserialize")
    with pytest.raises(TensorRTError, match="(?s)deserialize_cuda_engine.*Serialization assertion"):
        TensorRTBackend(engine, spec)


def test_fp16_output_engine_is_refused(fake_trt, engine, spec, monkeypatch):
    io = {
        "sample": (fake_tensorrt.TensorIOMode.INPUT, fake_tensorrt.DataType.FLOAT, (-1, 1, 8, 8)),
        "timestep": (fake_tensorrt.TensorIOMode.INPUT, fake_tensorrt.DataType.INT64, (-1,)),
        "out": (fake_tensorrt.TensorIOMode.OUTPUT, fake_tensorrt.DataType.HALF, (-1, 1, 8, 8)),
    }
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt.make_module(io=io))
    with pytest.raises(BackendError, match="engine tensor 'out' \\(out\\) is float16, the ONNX model's is float32"):
        TensorRTBackend(engine, spec)


def test_runner_binds_shapes_and_addresses_and_enqueues_on_its_stream(fake_trt, engine, spec):
    runner = TensorRTBackend(engine, spec).open_runner(stream=0x1234)
    runner.bind(4, {"sample": 0x1000, "timestep": 0x2000, "out": 0x3000})
    assert runner.context.shapes == {"sample": (4, 1, 8, 8), "timestep": (4,)}
    assert runner.context.addresses == {"sample": 0x1000, "timestep": 0x2000, "out": 0x3000}
    runner.enqueue()
    assert ("execute_async_v3", 0x1234) in fake_trt.state.calls


def test_each_runner_has_its_own_context(fake_trt, engine, spec):
    backend = TensorRTBackend(engine, spec)
    assert backend.open_runner(1).context is not backend.open_runner(2).context


@pytest.mark.parametrize(
    "fault, message",
    [
        ("set_input_shape", "(?s)set_input_shape\\('sample', \\(4, 1, 8, 8\\)\\) failed.*exceeds the profile max"),
        ("set_tensor_address", "(?s)set_tensor_address\\('sample'\\) failed.*not aligned"),
    ],
)
def test_bind_failures_raise_with_the_log(fake_trt, engine, spec, fault, message):
    runner = TensorRTBackend(engine, spec).open_runner(1)
    fake_trt.state.faults.add(fault)
    with pytest.raises(TensorRTError, match=message):
        runner.bind(4, {"sample": 1, "timestep": 2, "out": 3})


def test_enqueue_false_raises_instead_of_returning_zeros(fake_trt, engine, spec):
    runner = TensorRTBackend(engine, spec).open_runner(1)
    runner.bind(2, {"sample": 1, "timestep": 2, "out": 3})
    fake_trt.state.faults.add("execute_async_v3")
    with pytest.raises(TensorRTError, match="(?s)execute_async_v3 failed.*incompatible device"):
        runner.enqueue()


def test_context_creation_failure_raises(fake_trt, engine, spec):
    backend = TensorRTBackend(engine, spec)
    fake_trt.state.faults.add("create_execution_context")
    with pytest.raises(TensorRTError, match="(?s)create_execution_context.*out of device memory"):
        backend.open_runner(1)


def test_batch_outside_the_profile_is_refused(fake_trt, engine, spec):
    runner = TensorRTBackend(engine, spec).open_runner(1)
    with pytest.raises(BackendError, match=r"9 forward rows are outside the engine's profile \[1, 8\]"):
        runner.bind(9, {"sample": 1, "timestep": 2, "out": 3})


def test_batch_below_the_profile_min_is_refused(fake_trt, onnx16, tmp_path):
    path = build_engine(BuildConfig(onnx_path=onnx16, engine_path=tmp_path / "b.plan", batch=(4, 4, 8))).engine_path
    runner = TensorRTBackend(path, load_model(onnx16).spec).open_runner(1)
    with pytest.raises(BackendError, match=r"2 forward rows are outside the engine's profile \[4, 8\]"):
        runner.bind(2, {"sample": 1, "timestep": 2, "out": 3})


def test_factory_checks_the_engine_was_built_from_this_onnx(fake_trt, onnx16, onnx32, tmp_path):
    build_engine(BuildConfig(onnx_path=onnx16))  # writes uncond_fp16.plan next to the ONNX
    assert create(load_model(onnx16)).engine_path == onnx16.with_suffix(".plan")
    with pytest.raises(mf.EngineMismatchError, match="onnx_sha256="):
        create(load_model(onnx32), engine=onnx16.with_suffix(".plan"))


def test_logger_reports_only_what_a_call_caused_and_stays_bounded(fake_trt):
    from ddengine.backends.trt import make_logger

    logger = make_logger(fake_trt, keep=3)
    Severity = fake_tensorrt.Severity
    logger.log(Severity.ERROR, "an old error")
    since = logger.mark()
    logger.log(Severity.INFO, "chatter")
    logger.log(Severity.WARNING, "a new warning")
    assert logger.text(since) == "[WARNING] a new warning"
    for i in range(5):
        logger.log(Severity.ERROR, f"e{i}")
    assert len(logger.records) == 3 and logger.text(0).splitlines() == ["[ERROR] e2", "[ERROR] e3", "[ERROR] e4"]
    assert make_logger(fake_trt).text() == "(TensorRT logged no warning or error)"
