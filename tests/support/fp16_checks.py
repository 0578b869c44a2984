"""Checks of an fp16 conversion (export/fp16.py): which ops stayed float32, and how far a full DDIM run of the fp16
model lands from the fp32 one from the same noise."""

import numpy as np

from ddengine.export.fp16 import FP32_OPS
from ddengine.quality.metrics import psnr


def fp32_ops(model, op_types=FP32_OPS):
    """{node name: op type} of the listed ops whose float inputs and outputs are all float32 (1) in `model`."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    }
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    float_types = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    out = {}
    for node in inferred.graph.node:
        if node.op_type in op_types:
            seen = [
                types.get(name)
                for name in list(node.input) + list(node.output)
                if name and types.get(name) in float_types
            ]
            if seen and all(t == onnx.TensorProto.FLOAT for t in seen):
                out[node.name] = node.op_type
    return out


def final_latents(model_path, n, steps=50, seed=0, guidance=None, classes=None):
    """float32 x_0 of a DDIM (eta 0) run through the engine's Sampler, before the uint8 conversion."""
    from ddengine.runtime.sampler import Sampler

    finals = {}

    def keep(step, timestep, x, first):
        if step == steps - 1:
            finals[first] = x.copy()

    with Sampler(model=str(model_path), backend="ort-cpu") as sampler:  # the graph's own precision, no bf16
        sampler.sample(
            n,
            steps=steps,
            method="ddim",
            eta=0.0,
            seed=seed,
            classes=classes,
            guidance=guidance,
            batch_size=n,
            callback=keep,
        )
    return np.concatenate([finals[k] for k in sorted(finals)])


def sampling_psnr(fp32_path, fp16_path, n=16, steps=50, seed=0, guidance=None, classes=None):
    """PSNR (dB, range [-1, 1]) of a full DDIM run of the fp16 model against the fp32 one from the same noise."""
    a = final_latents(fp32_path, n, steps, seed, guidance, classes)
    b = final_latents(fp16_path, n, steps, seed, guidance, classes)
    return psnr(np.clip(a, -1, 1), np.clip(b, -1, 1), peak=2.0)
