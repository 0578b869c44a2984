"""Kernel sources shipped as package data: philox.h, ddstep.h (shared C/CUDA), step.cu (NVRTC); CPU build: ddengine._kernels."""
