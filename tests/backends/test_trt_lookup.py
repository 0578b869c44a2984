"""How `--backend tensorrt` finds what `ddengine build` wrote (engine/backends/trt.py find_engine), end to end against
the fake `tensorrt`: the build records each engine in MODEL.engines.json, the runtime loads the newest one whose
manifest matches, `tensorrt:ENGINE` names one, and a mismatch names the field, both values and the rebuild command."""

import importlib.machinery
import shlex
import shutil

import pytest
from click.testing import CliRunner

from ddengine.backends import BackendError, resolve_backend
from ddengine.backends import trt_manifest as mf
from ddengine.cli import main
from ddengine.cli.bench import parse_backend
from ddengine.runtime.sampler import Sampler


@pytest.fixture
def trt_installed(fake_trt, monkeypatch):
    """The fake tensorrt, seen as installed by `available_backends` (find_spec wants the module's spec)."""
    monkeypatch.setattr(fake_trt, "__spec__", importlib.machinery.ModuleSpec("tensorrt", None), raising=False)
    return fake_trt


def build(*args):
    result = CliRunner().invoke(main, ["build", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


def test_an_engine_built_with_o_is_what_the_sampler_loads(trt_installed, onnx16, tmp_path):
    engine = tmp_path / "engines" / "X.plan"
    output = build(onnx16, "-o", engine, "--batch", "1:2:4")
    assert f"recorded in {tmp_path / 'uncond_fp16.engines.json'}: `--backend tensorrt` loads it" in output
    backend = Sampler(onnx16, backend="tensorrt").backend
    assert backend.engine_path.resolve() == engine.resolve() and backend.max_rows == 4
    assert not onnx16.with_suffix(".plan").exists()


def test_the_newest_build_is_loaded_and_a_deleted_one_skipped(trt_installed, onnx16, tmp_path):
    build(onnx16, "-o", tmp_path / "a.plan", "--batch", "1:2:4")
    build(onnx16, "-o", tmp_path / "b.plan", "--batch", "1:4:8")
    assert Sampler(onnx16, backend="tensorrt").backend.max_rows == 8
    (tmp_path / "b.plan").unlink()
    assert Sampler(onnx16, backend="tensorrt").backend.max_rows == 4


def test_an_engine_at_the_default_place_is_found_without_an_index(trt_installed, onnx16):
    build(onnx16)
    mf.index_path(onnx16).unlink()  # an engine built before engines were recorded
    assert Sampler(onnx16, backend="tensorrt").backend.engine_path == onnx16.with_suffix(".plan").resolve()


def test_without_an_engine_the_error_says_where_it_looked_and_what_to_run(trt_installed, onnx16):
    with pytest.raises(BackendError) as info:
        Sampler(onnx16, backend="tensorrt")
    assert str(info.value) == (
        f"no TensorRT engine for {onnx16}: none recorded in {mf.index_path(onnx16)} and no "
        f"{onnx16.with_suffix('.plan')}; build one with `ddengine build {onnx16}`"
    )


def test_an_engine_for_another_tensorrt_names_both_versions_and_the_rebuild_command(trt_installed, onnx16, tmp_path):
    engine = tmp_path / "engines" / "X.plan"
    build(onnx16, "-o", engine, "--batch", "1:2:4")
    trt_installed.__version__ = "11.4.0"
    result = CliRunner().invoke(
        main, ["sample", "--model", str(onnx16), "--backend", "tensorrt", "--out", str(tmp_path / "out"), "--n", "1"]
    )
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())  # click wraps the usage error
    rebuild = f"ddengine build {onnx16.resolve()} -o {engine.resolve()} --precision fp16 --batch 1:2:4"
    assert f"engine {engine.resolve()} was built with tensorrt_version='10.99.0' but '11.4.0' is required" in message
    assert f"rebuild it with `{rebuild}`" in message
    assert not (tmp_path / "out").exists()


def test_a_changed_model_is_refused_by_its_hash(trt_installed, onnx16, onnx32, tmp_path):
    build(onnx16, "-o", tmp_path / "X.plan")
    built = mf.read_manifest(tmp_path / "X.plan")["key"]["onnx_sha256"]
    shutil.copyfile(onnx32, onnx16)  # the model re-exported in place after the build
    with pytest.raises(mf.EngineMismatchError) as info:
        Sampler(onnx16, backend="tensorrt")
    assert (info.value.field, info.value.built) == ("onnx_sha256", built) and info.value.wanted != built


def test_tensorrt_colon_engine_names_the_engine_to_load(trt_installed, onnx16, tmp_path):
    engine = tmp_path / "elsewhere.plan"
    mf.index_path(onnx16).mkdir()  # the build cannot record it: it says how to name it
    result = CliRunner().invoke(main, ["build", str(onnx16), "-o", str(engine), "--batch", "1:2:4"])
    assert result.exit_code == 0 and engine.is_file()
    assert "is not recorded for `--backend tensorrt`" in result.output
    assert f"load it with `--backend {shlex.quote(f'tensorrt:{engine}')}`" in result.output
    assert Sampler(onnx16, backend=f"tensorrt:{engine}").backend.engine_path == engine
    assert resolve_backend(f"tensorrt:{engine}") == ("tensorrt", "auto")
    assert parse_backend(f"tensorrt:{engine}") == (f"tensorrt:{engine}", "auto")
    assert parse_backend("tensorrt:fp32") == ("tensorrt", "fp32")  # bench's NAME:PRECISION still
    with pytest.raises(BackendError, match=r"engine .*missing\.plan does not exist; build it with `ddengine build "):
        Sampler(onnx16, backend=f"tensorrt:{tmp_path / 'missing.plan'}")
