"""`ddengine build`: exit 2 naming `pip install ddengine[gpu]` without TensorRT, option errors, build then reuse."""

import subprocess
import sys

import pytest
from click.testing import CliRunner

from ddengine.cli import main


def test_without_tensorrt_exits_2_naming_the_extra(no_trt, onnx16):
    result = CliRunner().invoke(main, ["build", str(onnx16)])
    assert result.exit_code == 2, result.output
    assert "pip install ddengine[gpu]" in result.output and "TensorRT is not installed" in result.output


def test_without_tensorrt_in_a_fresh_process(onnx16, tmp_path):
    """The real command line; a stub `tensorrt` that fails to import stands in for a machine without it."""
    (tmp_path / "tensorrt.py").write_text("raise ImportError('No module named tensorrt')\n")
    code = f"import sys; sys.path.insert(0, {str(tmp_path)!r}); from ddengine.cli import main; main()"
    proc = subprocess.run(
        [sys.executable, "-c", code, "build", str(onnx16)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert "pip install ddengine[gpu]" in proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch", "8:4:16"], "1 <= MIN <= OPT <= MAX"),
        (["--precision", "int8"], "'int8' is not one of"),
        (["--hardware-compat", "turing"], "'turing' is not one of"),
        (["--workspace-gb", "0"], "0"),
    ],
)
def test_bad_options_exit_2_naming_the_value(fake_trt, onnx16, args, message):
    result = CliRunner().invoke(main, ["build", str(onnx16), *args])
    assert result.exit_code == 2 and message in result.output, result.output


def test_missing_model_file_exits_2(fake_trt, tmp_path):
    result = CliRunner().invoke(main, ["build", str(tmp_path / "nope.onnx")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_build_then_reuse(fake_trt, onnx16, tmp_path):
    engine = tmp_path / "e" / "model.plan"
    args = ["build", str(onnx16), "-o", str(engine), "--batch", "1:2:4"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert first.output.startswith("built ") and engine.exists() and engine.with_name("model.plan.json").exists()
    second = CliRunner().invoke(main, args)
    assert second.exit_code == 0 and second.output.startswith("reused ")
    assert fake_trt.state.builds == 1


def test_build_failure_exits_1_with_the_log(fake_trt, onnx16, tmp_path):
    fake_trt.state.faults.add("parse")
    result = CliRunner().invoke(main, ["build", str(onnx16), "-o", str(tmp_path / "m.plan")])
    assert result.exit_code == 1 and "INVALID_NODE" in result.output


def test_fp32_onnx_with_fp16_precision_exits_1(fake_trt, onnx32, tmp_path):
    result = CliRunner().invoke(main, ["build", str(onnx32), "-o", str(tmp_path / "m.plan")])
    assert result.exit_code == 1 and "ddengine export --fp16" in result.output


def test_tensorrt_without_a_gpu_exits_1_naming_the_device(monkeypatch, onnx16, tmp_path):
    from ddengine.gpu.driver import device_count
    from tests.support import fake_tensorrt

    if device_count() > 0:
        pytest.skip("a GPU is present: the missing-device error cannot be provoked")
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt.make_module())
    result = CliRunner().invoke(main, ["build", str(onnx16), "-o", str(tmp_path / "m.plan")])
    assert result.exit_code == 1, result.output
    assert (
        "CUDA device 0 is not available: this machine has 0 CUDA device(s)" in result.output
        or "needs cuda-python" in result.output
    )
    assert not (tmp_path / "m.plan").exists()
