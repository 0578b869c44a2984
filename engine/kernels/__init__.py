"""Layer `kernels`: the fused sampler step, one idea with one name per side. Its sources are kernels/ (step.h and
philox.h shared by C and CUDA, step_host.c, step.cu; here as `source`); host.py drives the CPU extension
ddengine.kernels._step (built from step_host.c), device.py the CUDA kernel (step.cu through NVRTC).

May import `gpu`, `core` and `files`."""
