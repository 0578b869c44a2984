"""Mixed-precision fp16 ONNX: fp32 I/O, normalisations, Softmax and the timestep embedding kept fp32.

Uses onnxconverter-common's convert_float_to_float16 (keep_io_types + op/node block lists): it already inserts
the Casts around blocked nodes and keeps Resize/Range/... fp32, which a hand-written pass would have to redo.
"""

import copy
import warnings

# Ops whose statistics overflow or lose too much in fp16 (variance, exp); they run in fp32 between Casts.
FP32_OPS = (
    "GroupNormalization",
    "InstanceNormalization",
    "LayerNormalization",
    "BatchNormalization",
    "Softmax",
    "Sin",
    "Cos",
)


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
    nodes = (
        timestep_nodes(model.graph, timestep_input) if any(i.name == timestep_input for i in model.graph.input) else []
    )
    with warnings.catch_warnings():  # one warning per tiny weight flushed to +-1e-7
        warnings.simplefilter("ignore", UserWarning)
        return float16.convert_float_to_float16(
            model,
            keep_io_types=True,
            op_block_list=block,
            node_block_list=nodes,
            min_positive_val=1e-7,
            max_finite_val=65504.0,
        )
