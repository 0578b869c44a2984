"""The CUDA twin of the fused step (kernels/step.cu), compiled at run time with NVRTC and launched via cuda.bindings.

Compiled images are cached per GPU architecture in memory and on disk (user cache dir), keyed by the
kernel sources' sha256, the architecture, the NVRTC version and the options. Noise is the same Philox
function as the C kernel (kernels/philox.h), since both compile the same header without FMA contraction.
cuda-python is imported lazily: importing this module costs nothing on a machine without a GPU.
"""
import ctypes
import hashlib
import importlib.resources
import os
import threading
from pathlib import Path

import numpy as np

KERNEL_FILES = ("step.cu", "ddstep.h", "philox.h")
ENTRY_POINTS = ("ddstep_step", "ddstep_fill_noise", "ddstep_set_timesteps_i64", "ddstep_set_timesteps_f32",
                "ddstep_advance")
BASE_OPTIONS = ("--fmad=false", "--std=c++17")
BLOCK = 256
QUAD = 4  # one thread per quad of 4 elements (one Philox block)

_images = {}  # cache_key(...) -> compiled image, in this process
_kernels = {}  # device ordinal -> StepKernels
_lock = threading.Lock()


class CudaError(RuntimeError):
    """A CUDA driver/runtime/NVRTC call failed; the message names the call's error code."""


class CudaUnavailableError(CudaError):
    """cuda-python or an NVIDIA driver/GPU is missing."""


def import_cuda():
    """The cuda.bindings modules (driver, runtime, nvrtc), or a clear error naming the package to install."""
    try:
        from cuda.bindings import driver, nvrtc, runtime
    except ImportError:
        raise CudaUnavailableError("the GPU path needs cuda-python (cuda.bindings): pip install ddengine[gpu]") from None
    return driver, runtime, nvrtc


def check(result):
    """Unpack a cuda.bindings result tuple (status, *values), raising CudaError unless status is success."""
    status, *values = result if isinstance(result, tuple) else (result,)
    if int(status) != 0:
        raise CudaError(f"{getattr(status, 'name', status)}: {_describe(status)}")
    return values[0] if len(values) == 1 else (tuple(values) or None)


def _describe(status):
    driver, runtime, nvrtc = import_cuda()
    try:
        if isinstance(status, driver.CUresult):
            text = driver.cuGetErrorString(status)[1]
        elif isinstance(status, runtime.cudaError_t):
            text = runtime.cudaGetErrorString(status)[1]
        else:
            text = nvrtc.nvrtcGetErrorString(status)[1]
    except Exception:  # describing an error must never hide it
        return "(no description)"
    return text.decode() if isinstance(text, bytes) else str(text)


def device_count():
    """Number of CUDA devices; 0 when cuda-python, the driver or a GPU is missing."""
    try:
        _, runtime, _ = import_cuda()
        status, count = runtime.cudaGetDeviceCount()
    except Exception:  # cuda.pathfinder raises its own error type when libcuda.so is absent
        return 0
    return count if int(status) == 0 else 0


def use_device(device=0):
    """Make `device`'s primary context current on this thread (TensorRT and our launches share it)."""
    _, runtime, _ = import_cuda()
    count = device_count()
    if not 0 <= device < count:
        raise CudaUnavailableError(f"CUDA device {device} is not available: this machine has {count} CUDA device(s)")
    check(runtime.cudaSetDevice(device))
    check(runtime.cudaFree(0))


def gpu_properties(device=0):
    """(name, 'major.minor') of a device, e.g. ('NVIDIA H100 80GB HBM3', '9.0')."""
    _, runtime, _ = import_cuda()
    props = check(runtime.cudaGetDeviceProperties(device))
    name = props.name.split(b"\0", 1)[0].decode() if isinstance(props.name, bytes) else str(props.name)
    return name, f"{props.major}.{props.minor}"


def device_arch(device=0):
    """Compute capability as an integer, e.g. 90 for sm_90."""
    major, minor = gpu_properties(device)[1].split(".")
    return int(major) * 10 + int(minor)


class Stream:
    """A non-blocking CUDA stream (the backend's; the step kernels launch on it)."""

    def __init__(self):
        _, runtime, _ = import_cuda()
        self.handle = check(runtime.cudaStreamCreateWithFlags(runtime.cudaStreamNonBlocking))

    def synchronize(self):
        _, runtime, _ = import_cuda()
        check(runtime.cudaStreamSynchronize(self.handle))

    def close(self):
        if self.handle is not None:
            _, runtime, _ = import_cuda()
            check(runtime.cudaStreamDestroy(self.handle))
            self.handle = None

    def __int__(self):
        return int(self.handle)


class DeviceArray:
    """A C-contiguous device buffer with a numpy shape and dtype; `ptr` is its device address."""

    def __init__(self, shape, dtype):
        _, runtime, _ = import_cuda()
        self.shape = tuple(int(d) for d in shape) if isinstance(shape, (tuple, list)) else (int(shape),)
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self._mem = check(runtime.cudaMalloc(max(self.nbytes, 1)))
        self.ptr = int(self._mem)

    @classmethod
    def from_host(cls, array, stream=None):
        array = np.ascontiguousarray(array)
        out = cls(array.shape, array.dtype)
        out.upload(array, stream)
        return out

    def upload(self, array, stream=None):
        """Copy a host array of this shape and dtype in (ordered on `stream`, complete on return)."""
        array = np.ascontiguousarray(array, dtype=self.dtype)
        if array.nbytes > self.nbytes:
            raise ValueError(f"host array of {array.nbytes} bytes does not fit a device buffer of {self.nbytes} bytes")
        self._copy(self.ptr, array.ctypes.data, array.nbytes, "cudaMemcpyHostToDevice", stream)

    def download(self, stream=None, shape=None):
        """A host copy of the first prod(shape) elements (default: all), after the work queued on `stream`."""
        out = np.empty(self.shape if shape is None else shape, dtype=self.dtype)
        self._copy(out.ctypes.data, self.ptr, out.nbytes, "cudaMemcpyDeviceToHost", stream)
        return out

    @staticmethod
    def _copy(dst, src, nbytes, kind, stream):
        _, runtime, _ = import_cuda()
        handle = 0 if stream is None else int(stream)
        check(runtime.cudaMemcpyAsync(dst, src, nbytes, getattr(runtime.cudaMemcpyKind, kind), handle))
        check(runtime.cudaStreamSynchronize(handle))

    def __int__(self):
        return self.ptr

    def free(self):
        if self._mem is not None:
            _, runtime, _ = import_cuda()
            check(runtime.cudaFree(self._mem))
            self._mem, self.ptr = None, 0


def copy_device(dst_ptr, src_ptr, nbytes, stream):
    """Queue a device-to-device copy on `stream` (capturable into a CUDA graph)."""
    _, runtime, _ = import_cuda()
    check(runtime.cudaMemcpyAsync(dst_ptr, src_ptr, nbytes, runtime.cudaMemcpyKind.cudaMemcpyDeviceToDevice, int(stream)))


# --- NVRTC -----------------------------------------------------------------------------------------------


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
    _, _, nvrtc = import_cuda()
    return check(nvrtc.nvrtcVersion())


def nvrtc_options(arch, target, folder):
    """NVRTC options: no FMA contraction (bitwise agreement with the C twin), PTX or SASS for one arch."""
    if target not in ("ptx", "cubin"):
        raise ValueError(f"target must be 'ptx' or 'cubin', got {target!r}")
    arch_flag = f"-arch=compute_{arch}" if target == "ptx" else f"-arch=sm_{arch}"
    return [*BASE_OPTIONS, arch_flag, f"--include-path={folder}"]


def compile_step(arch, target="cubin", folder=None):
    """Compile step.cu with NVRTC for one architecture (e.g. 80, 90) into PTX text or a cubin."""
    _, _, nvrtc = import_cuda()
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
    _, _, nvrtc = import_cuda()
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
    _, _, nvrtc = import_cuda()
    supported = check(nvrtc.nvrtcGetSupportedArchs())
    if arch in supported:
        return "cubin", arch
    older = [a for a in supported if a < arch]
    if not older:
        raise CudaError(f"NVRTC {nvrtc_version()} cannot compile for sm_{arch} (it supports {supported})")
    return "ptx", max(older)


# --- launches --------------------------------------------------------------------------------------------


class StepKernels:
    """step.cu's five entry points loaded into one device's primary context; every launch goes on a given stream."""

    def __init__(self, device=0, folder=None):
        driver, _, _ = import_cuda()
        use_device(device)
        self.device, self.arch = device, device_arch(device)
        target, arch = load_target(self.arch)
        image = compiled_step(arch, target, folder)
        try:
            self.module = check(driver.cuModuleLoadData(image))
        except CudaError as err:
            driver_version = check(driver.cuDriverGetVersion())
            raise CudaError(f"cannot load the step kernel compiled by NVRTC {nvrtc_version()} for sm_{self.arch} "
                            f"into driver {driver_version // 1000}.{driver_version % 1000 // 10}: {err}") from None
        self.functions = {name: check(driver.cuModuleGetFunction(self.module, name.encode())) for name in ENTRY_POINTS}

    def _launch(self, name, threads, stream, *args):
        driver, _, _ = import_cuda()
        grid = max(1, (threads + BLOCK - 1) // BLOCK)
        pointers = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
        check(driver.cuLaunchKernel(self.functions[name], grid, 1, 1, BLOCK, 1, 1, 0,
                                    driver.CUstream(int(stream)), ctypes.addressof(pointers), 0))

    def step(self, stream, x, model_out, coeff_table, step_index, seeds, batch, per_image, guidance=None, clip=None):
        """x <- step(x, model_out) in place with row coeff_table[*step_index] (pointers are device addresses)."""
        self._launch("ddstep_step", batch * quads(per_image), stream,
                     _ptr(x), _ptr(model_out), _ptr(coeff_table), _ptr(step_index), _ptr(seeds),
                     ctypes.c_int(batch), ctypes.c_longlong(per_image), ctypes.c_int(guidance is not None),
                     ctypes.c_float(0.0 if guidance is None else guidance), ctypes.c_float(clip or 0.0))

    def fill_noise(self, stream, out, seeds, batch, per_image):
        """out <- x_T: the initial normals of each image's seed (Philox domain 1)."""
        self._launch("ddstep_fill_noise", batch * quads(per_image), stream,
                     _ptr(out), _ptr(seeds), ctypes.c_int(batch), ctypes.c_longlong(per_image))

    def set_timesteps(self, stream, t_out, t_table, step_index, n, dtype):
        """t_out[0:n] <- t_table[*step_index] as int64 or float32 (the model's timestep input)."""
        name = {"int64": "ddstep_set_timesteps_i64", "float32": "ddstep_set_timesteps_f32"}[np.dtype(dtype).name]
        self._launch(name, n, stream, _ptr(t_out), _ptr(t_table), _ptr(step_index), ctypes.c_int(n))

    def advance(self, stream, step_index):
        """*step_index += 1 on the device (so a captured graph replays the next step)."""
        self._launch("ddstep_advance", 1, stream, _ptr(step_index))


def quads(per_image):
    return (per_image + QUAD - 1) // QUAD


def _ptr(address):
    return ctypes.c_void_p(int(address))


def step_kernels(device=0):
    """The StepKernels of `device`, loaded once per process."""
    with _lock:
        kernels = _kernels.get(device)
    if kernels is None:
        kernels = StepKernels(device)
        with _lock:
            kernels = _kernels.setdefault(device, kernels)
    return kernels
