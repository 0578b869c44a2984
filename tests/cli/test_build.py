"""`ddengine build`: exit 2 naming `pip install ddengine[gpu]` without TensorRT, option and name errors, build then
reuse, a MODEL_DIR's one U-Net engine and where the runtime finds it."""

import importlib.machinery
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from ddengine.backends import BackendError
from ddengine.backends import trt_manifest as mf
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


@pytest.mark.parametrize(
    "name, what",
    [
        ("x" * 300 + ".plan", "-o 'xxxxxxxxxxxxxxxxxxxx...xxxxxxx.plan': a file name of 305 bytes"),
        ("y" * 246 + ".plan", "-o: its manifest 'yyyyyyyyyyyyyyyyyyyy...yy.plan.json': a file name of 256 bytes"),
    ],
)
def test_a_name_too_long_for_the_file_system_exits_2_before_any_work(fake_trt, onnx16, tmp_path, name, what):
    result = CliRunner().invoke(main, ["build", str(onnx16), "-o", str(tmp_path / name)])
    assert result.exit_code == 2 and what in result.output and "this file system takes at most" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert fake_trt.state.builds == 0 and sorted(p.name for p in tmp_path.iterdir()) == [
        "uncond.onnx",
        "uncond_fp16.onnx",
    ]


def test_a_default_engine_whose_manifest_name_is_too_long_exits_2(fake_trt, onnx16, tmp_path):
    model = shutil.copyfile(onnx16, tmp_path / ("m" * 250 + ".onnx"))  # m...m.plan fits, m...m.plan.json does not
    result = CliRunner().invoke(main, ["build", str(model)])
    assert result.exit_code == 2 and "the engine (default name): its manifest" in result.output, result.output
    assert fake_trt.state.builds == 0


def test_a_long_name_is_refused_even_without_tensorrt(no_trt, onnx16, tmp_path):
    for args in (["-o", str(tmp_path / ("x" * 300))], ["--timing-cache", str(tmp_path / ("t" * 300))]):
        result = CliRunner().invoke(main, ["build", str(onnx16), *args])
        assert result.exit_code == 2 and "a file name of 300 bytes" in result.output, result.output


def model_dir(folder, unet):
    """A MODEL_DIR whose U-Net is `unet`; the text encoder, VAE decoder and tokenizer are placeholders (never read)."""
    from ddengine.model.pipeline_spec import PipelineSpec

    folder.mkdir()
    (folder / "pipeline.json").write_text(
        PipelineSpec(text_length=4, pad_token_id=0, vae_scaling_factor=0.18, vae_scale=8).to_json()
    )
    shutil.copyfile(unet, folder / "unet.onnx")
    for name in ("text_encoder.onnx", "vae_decoder.onnx", "tokenizer.json"):
        (folder / name).write_text("not read by the build")
    return folder


def test_a_model_dir_gets_one_engine_for_its_unet_that_the_runtime_finds(fake_trt, onnx16, tmp_path, monkeypatch):
    from ddengine.backends import create_backend
    from ddengine.model.load import load_model

    monkeypatch.setattr(fake_trt, "__spec__", importlib.machinery.ModuleSpec("tensorrt", None), raising=False)
    folder, engines = model_dir(tmp_path / "model", onnx16), tmp_path / "engines"
    result = CliRunner().invoke(main, ["build", str(folder), "-o", str(engines), "--batch", "1:2:4"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in engines.iterdir()) == ["unet.plan", "unet.plan.json"]
    assert result.output.splitlines()[0].startswith(f"unet: built {engines / 'unet.plan'} (fp16, batch 1:2:4)")
    assert (
        f"text_encoder, vae_decoder, vae_encoder: no engine (they run on the CPU; `ddengine info {folder}`"
        in result.output
    )
    assert fake_trt.state.builds == 1 and not list(folder.glob("*.plan"))
    backend = create_backend("tensorrt", load_model(folder / "unet.onnx"))  # what the Sampler does for the U-Net
    assert backend.engine_path == (engines / "unet.plan").resolve()
    rebuild = mf.read_manifest(engines / "unet.plan")["source"]["rebuild"]
    assert rebuild == f"ddengine build {folder.resolve()} -o {engines.resolve()} --precision fp16 --batch 1:2:4"


def test_a_model_dir_without_an_engine_says_to_build_the_folder(fake_trt, onnx16, tmp_path):
    from ddengine.backends.trt import create
    from ddengine.model.load import load_model

    folder = model_dir(tmp_path / "model", onnx16)
    with pytest.raises(BackendError, match=rf"build one with `ddengine build {folder}`$"):
        create(load_model(folder / "unet.onnx"))
