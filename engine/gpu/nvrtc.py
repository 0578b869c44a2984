"""kernels/step.cu compiled at run time with NVRTC, cached per GPU architecture in memory and on disk.

The cache key holds the kernel sources' sha256, the architecture, the NVRTC version and the options. No FMA
contraction (--fmad=false), so the CUDA twin evaluates the same float32 expressions as the C kernel.
"""
import hashlib
import importlib.resources
import os
import threading
from pathlib import Path

from ddengine.gpu import driver
from ddengine.gpu.driver import CudaError, check

KERNEL_FILES = ("step.cu", "ddstep.h", "philox.h")
BASE_OPTIONS = ("--fmad=false", "--std=c++17")

_images = {}  # cache_key(...) -> compiled image, in this process
_lock = threading.Lock()


def kernel_dir():
    """The folder holding step.cu, ddstep.h and philox.h (package data of ddengine.kernels)."""
    return Path(str(importlib.resources.files("ddengine.kernels")))


def source_hash(folder=None):
    """sha256 over the kernel sources' names and bytes: a new header means a new cache entry."""
    folder = Path(folder) if folder is not None else kernel_dir()
    digest = hashlib.sha256()
    for name in KERNEL_FILES:
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


def compile_step(arch, target="cubin", folder=None):
    """Compile step.cu with NVRTC for one architecture (e.g. 80, 90) into PTX text or a cubin."""
    _, _, nvrtc = driver.import_cuda()
    folder = Path(folder) if folder is not None else kernel_dir()
    source = (folder / "step.cu").read_bytes()
    prog = check(nvrtc.nvrtcCreateProgram(source, b"step.cu", 0, [], []))
    try:
        options = [o.encode() for o in nvrtc_options(arch, target, folder)]
        status = nvrtc.nvrtcCompileProgram(prog, len(options), options)[0]
        if int(status) != 0:
            raise CudaError(f"NVRTC could not compile step.cu for {target} {arch} ({status.name}):\n{_nvrtc_log(prog)}")
        get_size, get = ((nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX) if target == "ptx"
                         else (nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN))
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


def cache_key(arch, target, folder=None):
    """File name of a compiled image: source hash, target+arch, NVRTC version and an options digest."""
    folder = Path(folder) if folder is not None else kernel_dir()
    major, minor = nvrtc_version()
    options = hashlib.sha256(" ".join(BASE_OPTIONS).encode()).hexdigest()[:8]
    return f"step-{source_hash(folder)[:20]}-{target}_{arch}-nvrtc{major}.{minor}-{options}.{target}"


def compiled_step(arch, target="cubin", folder=None):
    """The compiled image for `arch`, from memory, else the disk cache, else NVRTC (then stored in both)."""
    from ddengine.output import atomic_write

    key = cache_key(arch, target, folder)
    with _lock:
        if key in _images:
            return _images[key]
        path = cache_dir() / key
        image = path.read_bytes() if path.is_file() else None
        if not image:
            image = compile_step(arch, target, folder)
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
