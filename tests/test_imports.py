"""Imports run one way: each layer imports only the layers below it in docs/architecture.md's order, the runtime
never imports build-time code (ddengine.export) except in the CLI's build-time commands, and no runtime module
imports torch, TensorRT, OpenVINO, cuda-python or Ray at import time (the torch twins in ddengine.nets and the Ray
Serve adapter are imported only by code that needs them)."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "engine"
PACKAGE_DIRS = {"engine": "ddengine", "export": "ddengine.export"}  # pyproject package-dir
BUILD_TIME_COMMANDS = {"cli/model.py", "cli/build.py"}  # train, export, train-classifier, build
# Adapters that are the heavy package's own modules, imported only by code that needs them: the torch twins, Ray Serve.
TORCH_MODULES = {"nets/unet.py", "nets/diffusers_unet.py", "serving/ray_serve.py"}
HEAVY = ("torch", "tensorrt", "openvino", "cuda", "ray", "diffusers", "transformers")


def module_name(path):
    """The import name of a source file (engine/core/plan.py -> ddengine.core.plan)."""
    top, *rest = path.relative_to(ROOT).with_suffix("").parts
    return ".".join([PACKAGE_DIRS[top], *rest]).removesuffix(".__init__")


def imports(path):
    """(module name, line, at module level?) of every import in a file, relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(node) for node in tree.body}
    package = module_name(path).split(".")[: None if path.name == "__init__.py" else -1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found.append((base, node.lineno, id(node) in top))
    return found


def layer_order():
    """Layer name -> rank, read from the ```layers block of docs/architecture.md (bottom first)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md has no ```layers block"
    ranks = {}
    for rank, line in enumerate(text for text in block.group(1).splitlines() if text.strip()):
        for name in line.split("#")[0].replace(",", " ").split():
            ranks[name] = rank
    return ranks


def layer_of(name):
    """The layer of a ddengine module name: its first subpackage; the package root holds only __version__."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "root"


SOURCES = sorted(p for d in PACKAGE_DIRS for p in (ROOT / d).rglob("*.py"))
RUNTIME = sorted(p.relative_to(ENGINE).as_posix() for p in ENGINE.rglob("*.py"))


def test_every_subpackage_is_a_layer_of_the_documented_order():
    ranks = layer_order()
    packages = {layer_of(module_name(p)) for p in SOURCES if p.parent not in (ENGINE,)}
    assert packages <= set(ranks), f"packages missing from docs/architecture.md's layers: {packages - set(ranks)}"
    assert len(SOURCES) > 50 and len(RUNTIME) > 40  # the walk found the tree


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_imports_run_down_the_layer_order(path):
    ranks, own = layer_order(), layer_of(module_name(path))
    if path.parent == ENGINE:  # the package root: __version__ and the lazy `Sampler` re-export
        return
    against = []
    for name, line, _ in imports(path):
        if name.split(".")[0] != "ddengine":
            continue
        target = layer_of(name)
        if target == "root" or target == own:
            continue
        if target not in ranks or ranks[target] >= ranks[own]:
            against.append(f"line {line}: {own} -> {name}")
    assert not against, f"{path.relative_to(ROOT)} imports against the layer order of docs/architecture.md: {against}"


@pytest.mark.parametrize("module", RUNTIME)
def test_runtime_modules_import_no_build_time_code(module):
    if module in BUILD_TIME_COMMANDS:
        return
    bad = [
        (name, line)
        for name, line, _ in imports(ENGINE / module)
        if name == "ddengine.export" or name.startswith("ddengine.export.")
    ]
    assert not bad, f"engine/{module} imports build-time code: {bad}"


@pytest.mark.parametrize("module", [m for m in RUNTIME if m not in TORCH_MODULES])
def test_runtime_modules_import_heavy_packages_only_where_used(module):
    bad = [(name, line) for name, line, top in imports(ENGINE / module) if top and name.split(".")[0] in HEAVY]
    assert not bad, f"engine/{module} imports {bad} at module level; import them inside the code that needs them"


def test_importing_every_runtime_module_loads_none_of_the_heavy_packages():
    modules = [module_name(ENGINE / m) for m in RUNTIME if m not in TORCH_MODULES and not m.startswith("cli/model")]
    code = (
        f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
        f"print(sorted(k for k in sys.modules if k.split('.')[0] in {HEAVY!r}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout
