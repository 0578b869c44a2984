"""A GPU stand-in for an engine: the conv-free tiny model (tests/support/toy_model.py) as one NVRTC kernel,
behind the runner interface of the GPU backends (bind device buffers, enqueue on the stream, capturable)."""

import ctypes

import numpy as np

from ddengine.backends.base import Backend, DeviceRunner
from tests.support.tiny_models import GAIN, T_SCALE, class_table
from tests.support.toy_model import bound_spec

SOURCE = rb"""
extern "C" __global__ void toy(const float *x, const long long *t, const long long *labels, const float *emb,
                               float *out, int batch, int channels, long long hw, float gain, float tscale)
{
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long per = channels * hw;
    if (i >= batch * per)
        return;
    long long img = i / per;
    int c = (int)((i - img * per) / hw);
    float v = gain * x[i] + tscale * (float)t[img];
    if (labels)
        v = v + emb[labels[img] * channels + c];
    out[i] = v;
}
"""


class ToyBackend(Backend):
    name, opens_device_runners = "toy-cuda", True

    def __init__(self, num_classes=0, channels=1):
        from ddengine.gpu.driver import check, device_arch, import_cuda
        from ddengine.gpu.memory import DeviceArray

        driver, _, nvrtc = import_cuda()
        self.spec = bound_spec(num_classes=num_classes, channels=channels)
        prog = check(nvrtc.nvrtcCreateProgram(SOURCE, b"toy.cu", 0, [], []))
        opts = [b"--fmad=false", f"-arch=sm_{device_arch()}".encode()]
        check(nvrtc.nvrtcCompileProgram(prog, len(opts), opts))
        image = b" " * check(nvrtc.nvrtcGetCUBINSize(prog))
        check(nvrtc.nvrtcGetCUBIN(prog, image))
        self.module = check(driver.cuModuleLoadData(image))
        self.function = check(driver.cuModuleGetFunction(self.module, b"toy"))
        table = class_table(num_classes, channels) if num_classes else np.zeros((1, channels), np.float32)
        self.emb = DeviceArray.from_host(table)
        self.forwards = 0

    def open_runner(self, stream):
        return ToyRunner(self, stream)


class ToyRunner(DeviceRunner):
    supports_capture = True

    def _bind_tensor(self, role, name, rows, address):
        self.rows, self.__dict__.setdefault("addresses", {})[role] = rows, address

    def enqueue(self):
        from ddengine.gpu.driver import check, import_cuda

        driver, _, _ = import_cuda()
        s, a = self.spec, self.addresses
        hw = s.height * s.width
        T = s.scheduler["num_train_timesteps"]
        args = [
            ctypes.c_void_p(a["sample"]),
            ctypes.c_void_p(a["timestep"]),
            ctypes.c_void_p(a.get("class_labels", 0)),
            ctypes.c_void_p(self.backend.emb.ptr),
            ctypes.c_void_p(a["out"]),
            ctypes.c_int(self.rows),
            ctypes.c_int(s.channels),
            ctypes.c_longlong(hw),
            ctypes.c_float(GAIN),
            ctypes.c_float(T_SCALE / T),
        ]
        pointers = (ctypes.c_void_p * len(args))(*[ctypes.addressof(v) for v in args])
        total = self.rows * s.channels * hw
        check(
            driver.cuLaunchKernel(
                self.backend.function,
                (total + 127) // 128,
                1,
                1,
                128,
                1,
                1,
                0,
                driver.CUstream(int(self.stream)),
                ctypes.addressof(pointers),
                0,
            )
        )
        self.backend.forwards += 1
