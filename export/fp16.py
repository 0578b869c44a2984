"""Mixed-precision fp16 ONNX: fp32 I/O, normalisations, Softmax and the timestep embedding kept fp32.

Uses onnxconverter-common's convert_float_to_float16 (keep_io_types + op/node block lists): it already inserts
the Casts around blocked nodes and keeps Resize/Range/... fp32, which a hand-written pass would have to redo.
"""
import copy
import warnings

import numpy as np

from ddengine.quality.metrics import psnr  # noqa: F401  (also what the fp16 tests compare with)

# Ops whose statistics overflow or lose too much in fp16 (variance, exp); they run in fp32 between Casts.
FP32_OPS = ("GroupNormalization", "InstanceNormalization", "LayerNormalization", "BatchNormalization", "Softmax", "Sin", "Cos")


def timestep_nodes(graph, input_name="timestep", stop_ops=("Sin", "Cos")):
    """Names of nodes on paths from the integer timestep input up to its sinusoid (t*freq up to ~1e3 needs fp32)."""
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    blocked, frontier = set(), [input_name]
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.name in blocked:
                continue
            blocked.add(node.name)
            if node.op_type not in stop_ops:
                frontier.extend(node.output)
    return sorted(blocked)


def convert(model, timestep_input="timestep"):
    """fp32 ModelProto -> mixed fp16 ModelProto with fp32 inputs/outputs (Micikevicius et al. 2018 mixed precision)."""
    from onnxconverter_common import float16

    names = [n.name for n in model.graph.node]
    if len(set(names)) != len(names) or not all(names):  # node_block_list works by name: make names unique
        model = copy.deepcopy(model)
        for i, node in enumerate(model.graph.node):
            node.name = f"{node.op_type}_{i}_{node.name}"
    block = list(float16.DEFAULT_OP_BLOCK_LIST) + list(FP32_OPS)
    nodes = timestep_nodes(model.graph, timestep_input) if any(i.name == timestep_input for i in model.graph.input) else []
    with warnings.catch_warnings():  # one warning per tiny weight flushed to +-1e-7
        warnings.simplefilter("ignore", UserWarning)
        return float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=block, node_block_list=nodes,
                                                min_positive_val=1e-7, max_finite_val=65504.0)


def fp32_ops(model, op_types=FP32_OPS):
    """{node name: op type} of the listed ops whose float inputs and outputs are all float32 (1) in `model`."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    float_types = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    out = {}
    for node in inferred.graph.node:
        if node.op_type in op_types:
            seen = [types.get(name) for name in list(node.input) + list(node.output) if name and types.get(name) in float_types]
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
        sampler.sample(n, steps=steps, method="ddim", eta=0.0, seed=seed, classes=classes, guidance=guidance, batch_size=n, callback=keep)
    return np.concatenate([finals[k] for k in sorted(finals)])


def sampling_psnr(fp32_path, fp16_path, n=16, steps=50, seed=0, guidance=None, classes=None):
    """PSNR (dB, range [-1, 1]) of a full DDIM run of the fp16 model against the fp32 one from the same noise."""
    a = final_latents(fp32_path, n, steps, seed, guidance, classes)
    b = final_latents(fp16_path, n, steps, seed, guidance, classes)
    return psnr(np.clip(a, -1, 1), np.clip(b, -1, 1), peak=2.0)
