"""The TensorRT engine manifest: what an engine was built from and for (its cache key), written next to it, and the
engine index that leads from a model to the engines built from it.

An engine is an executable tied to one TensorRT version, GPU architecture and OS (TensorRT docs, "Engine
Compatibility"), so the key holds all of them plus the ONNX file's content hash; the manifest adds the
engine's own sha256, checked before the engine is ever deserialized, and the ONNX path and command it was built
with. `ddengine build` records each engine in MODEL.engines.json next to the ONNX (newest first), which is where
the tensorrt backend looks, wherever `-o` put the engine. Imports no torch and no tensorrt.
"""

import hashlib
import json
import os
import platform
from pathlib import Path

from ddengine.backends.base import BackendError
from ddengine.files.atomic import atomic_write

MANIFEST_VERSION = 1
MANIFEST_SUFFIX = ".json"
INDEX_VERSION = 1
INDEX_SUFFIX = ".engines.json"  # m.onnx -> m.engines.json
INDEX_SIZE = 16  # engines an index remembers, newest first

# The cache key, in the order mismatches are reported.
KEY_FIELDS = (
    "onnx_sha256",
    "precision",
    "profile",
    "hardware_compat",
    "tensorrt_version",
    "gpu_name",
    "compute_capability",
    "os",
    "ddengine_version",
)
PRECISIONS = ("fp16", "fp32")
HARDWARE_COMPAT = ("none", "ampere+")


class ManifestError(BackendError, ValueError):
    """An engine manifest is missing, unreadable, or does not describe the engine next to it (a BackendError: the
    tensorrt backend cannot be created, which the CLI reports as a usage error)."""


class EngineMismatchError(ManifestError):
    """An engine was built for something else (another model, TensorRT version, GPU, ...) than asked for."""

    def __init__(self, engine_path, field, built, wanted, command=None):
        self.field, self.built, self.wanted = field, built, wanted
        super().__init__(
            f"engine {engine_path} was built with {field}={built!r} but {wanted!r} is required here; "
            f"rebuild it with `{command or 'ddengine build --force'}`"
        )


def manifest_path(engine_path):
    """The manifest of `engine_path`: the same name with `.json` appended (model.plan -> model.plan.json)."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + MANIFEST_SUFFIX)


def sha256_bytes(data):
    return hashlib.sha256(data).hexdigest()


def current_os():
    """The platform an engine is tied to, e.g. 'Linux-x86_64' (engines do not move across platforms)."""
    return f"{platform.system()}-{platform.machine()}"


def make_key(
    *,
    onnx_sha256,
    precision,
    profile,
    hardware_compat,
    tensorrt_version,
    gpu_name,
    compute_capability,
    ddengine_version,
    os_name=None,
):
    """The engine cache key as a plain dict (JSON types only, so a key read back compares equal)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if hardware_compat not in HARDWARE_COMPAT:
        raise ValueError(f"hardware_compat must be one of {HARDWARE_COMPAT}, got {hardware_compat!r}")
    key = {
        "onnx_sha256": onnx_sha256,
        "precision": precision,
        "profile": profile,
        "hardware_compat": hardware_compat,
        "tensorrt_version": str(tensorrt_version),
        "gpu_name": gpu_name,
        "compute_capability": str(compute_capability),
        "os": os_name or current_os(),
        "ddengine_version": ddengine_version,
    }
    return json.loads(json.dumps(key))  # tuples -> lists, as they come back from disk


def first_mismatch(built, wanted):
    """The first KEY_FIELDS entry (name, built, wanted) where `wanted` differs (fields absent from it are not checked)."""
    for name in KEY_FIELDS:
        if name in wanted and built.get(name) != wanted[name]:
            return name, built.get(name), wanted[name]
    return None


def write_atomic(path, data):
    """Write bytes to `path` atomically (engine/runtime/output.py atomic_write), creating its folder first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)


def write_manifest(engine_path, key, engine_sha256, *, spec_json, io, source=None):
    """Write the manifest of an engine already on disk (written second, so it never names a partial engine);
    `source`: {"onnx_path", "rebuild"}, the ONNX it was built from and the command that builds it again."""
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "key": key,
        "engine_sha256": engine_sha256,
        "spec": json.loads(spec_json),
        "io": io,
    }
    if source is not None:
        manifest["source"] = source
    write_atomic(manifest_path(engine_path), (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return manifest


def read_manifest(engine_path):
    """The manifest dict of `engine_path`, or ManifestError naming what is wrong with it."""
    path = manifest_path(engine_path)
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(
            f"engine {engine_path} has no manifest {path.name}; only engines built by `ddengine build` are loaded"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"engine manifest {path} is unreadable: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("manifest_version") != MANIFEST_VERSION:
        version = manifest.get("manifest_version") if isinstance(manifest, dict) else None
        raise ManifestError(f"engine manifest {path} has manifest_version {version!r}, expected {MANIFEST_VERSION}")
    missing = [k for k in ("key", "engine_sha256", "spec", "io") if k not in manifest]
    missing += [f"key.{k}" for k in KEY_FIELDS if k not in manifest.get("key", {})]
    if missing:
        raise ManifestError(f"engine manifest {path} lacks {', '.join(missing)}")
    return manifest


def check_manifest(engine_path, manifest, wanted):
    """Raise EngineMismatchError naming the first key field where the manifest differs from `wanted`, and the
    command that rebuilds the engine (recorded by `ddengine build`)."""
    mismatch = first_mismatch(manifest["key"], wanted)
    if mismatch is not None:
        raise EngineMismatchError(engine_path, *mismatch, command=rebuild_command(manifest))


def rebuild_command(manifest):
    """The `ddengine build ...` command recorded in a manifest, or None (a manifest from before it was recorded)."""
    source = manifest.get("source")
    command = source.get("rebuild") if isinstance(source, dict) else None
    return command if isinstance(command, str) else None


def read_verified_engine(engine_path, manifest):
    """The engine's bytes, only if their sha256 is the one its manifest recorded (never load an engine we did not build)."""
    try:
        data = Path(engine_path).read_bytes()
    except OSError as err:
        raise ManifestError(f"cannot read engine {engine_path}: {err.strerror}") from None
    digest = sha256_bytes(data)
    if digest != manifest["engine_sha256"]:
        raise ManifestError(
            f"engine {engine_path} has sha256 {digest} but its manifest records "
            f"{manifest['engine_sha256']}; the file was changed or replaced since `ddengine build`"
        )
    return data


def cached_engine_ok(engine_path, wanted):
    """True when engine_path exists with a readable manifest whose key equals `wanted` and whose hash matches."""
    try:
        manifest = read_manifest(engine_path)
        check_manifest(engine_path, manifest, wanted)
        read_verified_engine(engine_path, manifest)
    except ManifestError:
        return False
    return set(manifest["key"]) == set(wanted)


def index_path(onnx_path):
    """The engine index of a model: MODEL.engines.json next to MODEL.onnx."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.stem + INDEX_SUFFIX)


def read_index(onnx_path):
    """The engine paths recorded for `onnx_path`, newest first ([] without an index); ManifestError if unreadable."""
    path = index_path(onnx_path)
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(
            f"engine index {path} is unreadable: {err}; delete it and run `ddengine build` again"
        ) from None
    if not isinstance(index, dict):
        index = {}
    engines = index.get("engines")
    if (
        index.get("index_version") != INDEX_VERSION
        or not isinstance(engines, list)
        or not all(isinstance(e, str) for e in engines)
    ):
        raise ManifestError(
            f"engine index {path} is not a version {INDEX_VERSION} index of engine paths; delete it and run "
            "`ddengine build` again"
        )
    return [path.parent / entry for entry in engines]


def record_engine(onnx_path, engine_path):
    """Put `engine_path` first in the index of `onnx_path` (atomically; an unreadable index is started afresh)."""
    path = index_path(onnx_path)
    try:
        known = read_index(onnx_path)
    except ManifestError:
        known = []
    entries = [os.path.relpath(Path(p).resolve(), path.parent.resolve()) for p in [engine_path, *known]]
    index = {
        "index_version": INDEX_VERSION,
        "onnx": Path(onnx_path).name,
        "engines": list(dict.fromkeys(entries))[:INDEX_SIZE],
    }
    write_atomic(path, (json.dumps(index, indent=2) + "\n").encode())
    return path
