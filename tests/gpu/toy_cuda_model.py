"""A GPU stand-in for an engine: the conv-free tiny model of tests/engine/tiny_models.py as one NVRTC kernel,
behind the runner interface of the GPU backends (bind device buffers, enqueue on the stream, capturable)."""
import ctypes

import numpy as np
from tiny_models import GAIN, T_SCALE, class_table, tiny_spec

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


def forward32(x, t, labels, spec):
    """The same model in numpy float32, rounding as the kernel does (no FMA)."""
    T = spec.scheduler["num_train_timesteps"]
    m = np.float32(GAIN) * x + np.float32(T_SCALE / T) * np.float32(t)
    if spec.num_classes:
        m = m + class_table(spec.num_classes, spec.channels)[labels][:, :, None, None]
    return m.astype(np.float32)


def cpu_loop(spec, plan, seeds, labels, guidance):
    """The Sampler's CPU loop (engine/sampler.py _denoise) with the toy model in numpy float32."""
    from ddengine import _kernels

    b = len(seeds)
    x = np.empty((b, spec.channels, spec.height, spec.width), np.float32)
    _kernels.fill_noise(x, seeds)
    rows = plan.rows_float32()
    for i, t in enumerate(plan.timesteps):
        x_in = np.concatenate([x, x]) if guidance is not None else x
        _kernels.step(x, forward32(x_in, t, labels, spec), rows[i], seeds, i, guidance=guidance, clip=plan.clip)
    return x


class ToyBackend:
    def __init__(self, num_classes=0, channels=1):
        from ddengine.cuda_step import DeviceArray, check, device_arch, import_cuda

        driver, _, nvrtc = import_cuda()
        self.spec = tiny_spec(channels=channels, num_classes=num_classes)
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


class ToyRunner:
    supports_capture = True

    def __init__(self, backend, stream):
        self.backend, self.stream = backend, stream

    def dtype(self, role):
        return np.dtype(np.float32 if role in ("sample", "out") else np.int64)

    def shape(self, role, batch):
        s = self.backend.spec
        return (batch, s.channels, s.height, s.width) if role in ("sample", "out") else (batch,)

    def bind(self, batch, *, sample, timestep, class_labels, out):
        self.batch, self.ptrs = batch, (int(sample), int(timestep), int(class_labels) if class_labels is not None else 0, int(out))

    def enqueue(self):
        from ddengine.cuda_step import check, import_cuda

        driver, _, _ = import_cuda()
        s = self.backend.spec
        hw = s.height * s.width
        x, t, labels, out = self.ptrs
        T = s.scheduler["num_train_timesteps"]
        args = [ctypes.c_void_p(x), ctypes.c_void_p(t), ctypes.c_void_p(labels), ctypes.c_void_p(self.backend.emb.ptr),
                ctypes.c_void_p(out), ctypes.c_int(self.batch), ctypes.c_int(s.channels), ctypes.c_longlong(hw),
                ctypes.c_float(GAIN), ctypes.c_float(T_SCALE / T)]
        pointers = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
        total = self.batch * s.channels * hw
        check(driver.cuLaunchKernel(self.backend.function, (total + 127) // 128, 1, 1, 128, 1, 1, 0,
                                    driver.CUstream(int(self.stream)), ctypes.addressof(pointers), 0))
        self.backend.forwards += 1

    def close(self):
        pass
