"""Variant builds of kernels/step_host.c (setup.py's flags plus defines), loaded beside the installed module, for the
tests that compare builds bit for bit (test_kernels_isa.py, test_kernels_shapes.py)."""

import importlib.util
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

# step_host.c is not package data: build from the checkout these tests live in (the installed module was too)
KERNELS = Path(__file__).resolve().parents[2] / "kernels"
FLAGS = ["-shared", "-fPIC", "-O3", "-std=c11", "-fno-wrapv", "-ffp-contract=off", "-fno-math-errno", "-pthread"]


def build(folder, defines):
    """Starts compiling kernels/step_host.c with setup.py's flags plus `defines` into folder; returns (path, Popen)."""
    out = Path(folder) / ("_step" + sysconfig.get_config_var("EXT_SUFFIX"))
    cmd = [
        "gcc",
        *FLAGS,
        *defines,
        f"-I{sysconfig.get_paths()['include']}",
        f"-I{KERNELS}",
        str(KERNELS / "step_host.c"),
    ]
    return out, subprocess.Popen([*cmd, "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def load(path):
    """The extension at `path` as a module of its own (not in sys.modules), beside the installed one."""
    spec = importlib.util.spec_from_file_location("ddengine.kernels._step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_and_load(folder, defines):
    """build, wait, load (pytest.skip without gcc; a failed build fails with its log)."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not on PATH")
    path, proc = build(folder, defines)
    log = proc.communicate(timeout=300)[0].decode(errors="replace")
    assert proc.returncode == 0, log
    return load(path)
