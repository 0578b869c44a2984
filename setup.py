"""Builds the fused step C extension (ddengine._kernels) from kernels/."""
from setuptools import Extension, setup

kernels = Extension(
    "ddengine._kernels",
    sources=["kernels/step_ext.c"],
    include_dirs=["kernels"],
    depends=["kernels/ddstep.h", "kernels/philox.h"],
    extra_compile_args=["-O3", "-std=c11", "-fno-wrapv", "-ffp-contract=off", "-fno-math-errno", "-pthread"],
    extra_link_args=["-pthread"],
)

setup(ext_modules=[kernels])
