"""CUDA sources compiled at run time with NVRTC, cached per GPU architecture in memory and on disk.

The cache key holds the sources' sha256, the architecture, the NVRTC version and the options. No FMA
contraction (--fmad=false), so a CUDA kernel evaluates the same float32 expressions as its C twin.
"""

import hashlib
import os
import threading
from pathlib import Path

from ddengine.gpu import driver
from ddengine.gpu.driver import CudaError, check

BASE_OPTIONS = ("--fmad=false", "--std=c++17")

_images = {}  # cache_key(...) -> compiled image, in this process
_lock = threading.Lock()


def source_hash(folder, files):
    """sha256 over the sources' names and bytes: a new header means a new cache entry."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for name in files:
        digest.update(name.encode() + b"\0" + (folder / name).read_bytes() + b"\0")
    return digest.hexdigest()


def nvrtc_version():
    """(major, minor) of the loaded NVRTC library."""
    _, _, nvrtc = driver.import_cuda()
    return check(nvrtc.nvrtcVersion())


def nvrtc_options(arch, target, folder):
    """NVRTC options: no FMA contraction (bitwise agreement with the C twin), PTX or SASS for one arch."""
    if target not in ("ptx", "cubin"):
        raise ValueError(f"target must be 'ptx' or 'cubin', got {target!r}")
    arch_flag = f"-arch=compute_{arch}" if target == "ptx" else f"-arch=sm_{arch}"
    return [*BASE_OPTIONS, arch_flag, f"--include-path={folder}"]


def compile_source(folder, main, arch, target="cubin"):
    """Compile folder/main with NVRTC for one architecture (e.g. 80, 90) into PTX text or a cubin."""
    _, _, nvrtc = driver.import_cuda()
    folder = Path(folder)
    source = (folder / main).read_bytes()
    prog = check(nvrtc.nvrtcCreateProgram(source, main.encode(), 0, [], []))
    try:
        options = [o.encode() for o in nvrtc_options(arch, target, folder)]
        status = nvrtc.nvrtcCompileProgram(prog, len(options), options)[0]
        if int(status) != 0:
            raise CudaError(f"NVRTC could not compile {main} for {target} {arch} ({status.name}):\n{_nvrtc_log(prog)}")
        get_size, get = (
            (nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX)
            if target == "ptx"
            else (nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN)
        )
        image = b" " * check(get_size(prog))
        check(get(prog, image))
        return image
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def _nvrtc_log(prog):
    _, _, nvrtc = driver.import_cuda()
    log = b" " * check(nvrtc.nvrtcGetProgramLogSize(prog))
    check(nvrtc.nvrtcGetProgramLog(prog, log))
    return log.rstrip(b"\0 ").decode(errors="replace")


def cache_dir():
    """Where compiled kernels are kept: $DDENGINE_CACHE_DIR, else $XDG_CACHE_HOME/ddengine, else ~/.cache/ddengine."""
    root = os.environ.get("DDENGINE_CACHE_DIR")
    if root:
        return Path(root) / "cuda"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ddengine" / "cuda"


def cache_key(folder, files, arch, target):
    """File name of a compiled image: main source's stem, source hash, target+arch, NVRTC version, options digest."""
    major, minor = nvrtc_version()
    options = hashlib.sha256(" ".join(BASE_OPTIONS).encode()).hexdigest()[:8]
    stem = Path(files[0]).stem
    return f"{stem}-{source_hash(folder, files)[:20]}-{target}_{arch}-nvrtc{major}.{minor}-{options}.{target}"


def compiled(folder, files, arch, target="cubin"):
    """The image of files[0] (which includes the rest) for `arch`: from memory, else the disk cache, else NVRTC
    (then stored in both)."""
    from ddengine.files.atomic import atomic_write

    key = cache_key(folder, files, arch, target)
    with _lock:
        if key in _images:
            return _images[key]
        path = cache_dir() / key
        image = path.read_bytes() if path.is_file() else None
        if not image:
            image = compile_source(folder, files[0], arch, target)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(path, image)
            except OSError:  # a read-only home must not stop sampling; the image stays in memory
                pass
        _images[key] = image
        return image


def load_target(arch):
    """('cubin', arch) when NVRTC knows this GPU, else ('ptx', newest older arch it knows) for the driver to JIT."""
    _, _, nvrtc = driver.import_cuda()
    supported = check(nvrtc.nvrtcGetSupportedArchs())
    if arch in supported:
        return "cubin", arch
    older = [a for a in supported if a < arch]
    if not older:
        raise CudaError(f"NVRTC {nvrtc_version()} cannot compile for sm_{arch} (it supports {supported})")
    return "ptx", max(older)
