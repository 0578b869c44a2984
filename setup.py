"""Builds the fused step C extension (ddengine.kernels._step, driven by engine/kernels/host.py) from kernels/."""

from setuptools import Extension, setup

kernels = Extension(
    "ddengine.kernels._step",
    sources=["kernels/step_host.c"],
    include_dirs=["kernels"],
    depends=["kernels/step.h", "kernels/philox.h"],
    extra_compile_args=["-O3", "-std=c11", "-fno-wrapv", "-ffp-contract=off", "-fno-math-errno", "-pthread"],
    extra_link_args=["-pthread"],
)

setup(ext_modules=[kernels])
