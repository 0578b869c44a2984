"""cuda.bindings (driver, runtime, NVRTC) imported on demand, with one error check and the device queries."""


class CudaError(RuntimeError):
    """A CUDA driver/runtime/NVRTC call failed; the message names the call's error code."""


class CudaUnavailableError(CudaError):
    """cuda-python or an NVIDIA driver/GPU is missing."""


def import_cuda():
    """The cuda.bindings modules (driver, runtime, nvrtc), or a clear error naming the package to install."""
    try:
        from cuda.bindings import driver, nvrtc, runtime
    except ImportError:
        raise CudaUnavailableError(
            "the GPU path needs cuda-python (cuda.bindings): pip install ddengine[gpu]"
        ) from None
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
    """Make `device`'s primary context current on this thread (TensorRT, torch and our launches share it)."""
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
