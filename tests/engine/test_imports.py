"""Imports run one way: the runtime (engine/, import name ddengine) never imports build-time code (ddengine.export)
except in the CLI's build-time commands, and no runtime module imports torch, TensorRT, OpenVINO, cuda-python or Ray
at import time (the torch twins in ddengine.nets and the Ray Serve adapter are imported only by code that needs them)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parents[2] / "engine"
BUILD_TIME_COMMANDS = {"cli/model.py", "cli/build.py"}  # train, export, train-classifier, build
# Adapters that are the heavy package's own modules, imported only by code that needs them: the torch twins, Ray Serve.
TORCH_MODULES = {"nets/unet.py", "nets/diffusers_unet.py", "ray_serve.py"}
HEAVY = ("torch", "tensorrt", "openvino", "cuda", "ray", "diffusers", "transformers")


def imports(path):
    """(module name, line, at module level?) of every import in a file."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the package of this file
                package = ["ddengine", *path.relative_to(ENGINE).parent.parts]
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            found.append((base, node.lineno, id(node) in top))
    return found


RUNTIME = sorted(p.relative_to(ENGINE).as_posix() for p in ENGINE.rglob("*.py"))


@pytest.mark.parametrize("module", RUNTIME)
def test_runtime_modules_import_no_build_time_code(module):
    if module in BUILD_TIME_COMMANDS:
        return
    bad = [(name, line) for name, line, _ in imports(ENGINE / module) if name == "ddengine.export" or name.startswith("ddengine.export.")]
    assert not bad, f"engine/{module} imports build-time code: {bad}"


@pytest.mark.parametrize("module", [m for m in RUNTIME if m not in TORCH_MODULES])
def test_runtime_modules_import_heavy_packages_only_where_used(module):
    bad = [(name, line) for name, line, top in imports(ENGINE / module) if top and name.split(".")[0] in HEAVY]
    assert not bad, f"engine/{module} imports {bad} at module level; import them inside the code that needs them"


def test_importing_every_runtime_module_loads_none_of_the_heavy_packages():
    modules = [f"ddengine.{m[:-3].replace('/', '.')}".replace(".__init__", "") for m in RUNTIME
               if m not in TORCH_MODULES and not m.startswith("cli/model")]
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            f"print(sorted(k for k in sys.modules if k.split('.')[0] in {HEAVY!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout
