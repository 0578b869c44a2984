"""Tiny ONNX U-Net stand-ins built with onnx.helper (no torch): m = a*conv(x) + s*t/T + emb[label]."""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ddengine.spec import METADATA_KEY, ModelSpec

SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
             "prediction_type": "epsilon", "clip_sample": True, "clip_sample_range": 1.0,
             "timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False}
GAIN, T_SCALE = 0.5, 0.3


def class_table(num_classes, channels, nan_class=None, huge_class=None):
    """Per-class channel offsets, rows 0..num_classes (the last row is the null class); NaN or 3e38 rows on request."""
    table = np.linspace(-0.4, 0.4, (num_classes + 1) * channels).reshape(num_classes + 1, channels).astype(np.float32)
    if nan_class is not None:
        table[nan_class] = np.nan
    if huge_class is not None:
        table[huge_class] = 3e38  # finite, but guidance overflows float32 in the update
    return table


def conv_weight(channels):
    rng = np.random.default_rng(1234)
    return (rng.standard_normal((channels, channels, 3, 3)) * 0.15).astype(np.float32)


def tiny_spec(channels=1, height=8, width=8, num_classes=0, scheduler=None, **extra):
    """The ModelSpec the tiny model carries; conditional models get null class = num_classes."""
    null = num_classes if num_classes else None
    return ModelSpec(scheduler=dict(scheduler or SCHEDULER), channels=channels, height=height, width=width,
                     num_classes=num_classes, null_class=null, **extra)


def build_tiny_model(path, *, channels=1, height=8, width=8, num_classes=0, conv=True, nan_class=None, huge_class=None,
                     scheduler=None, metadata=True, spec=None):
    """Write a tiny ONNX model to `path` and return its ModelSpec."""
    spec = spec or tiny_spec(channels, height, width, num_classes, scheduler)
    T = spec.scheduler.get("num_train_timesteps", 1000)
    inits = [numpy_helper.from_array(np.array(GAIN, np.float32), "gain"),
             numpy_helper.from_array(np.array(T_SCALE / T, np.float32), "tscale"),
             numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), "col")]
    nodes = []
    if conv:
        inits.append(numpy_helper.from_array(conv_weight(channels), "w"))
        nodes.append(helper.make_node("Conv", ["sample", "w"], ["h"], pads=[1, 1, 1, 1]))
    else:
        nodes.append(helper.make_node("Identity", ["sample"], ["h"]))
    nodes += [helper.make_node("Mul", ["h", "gain"], ["hg"]),
              helper.make_node("Cast", ["timestep"], ["tf"], to=TensorProto.FLOAT),
              helper.make_node("Mul", ["tf", "tscale"], ["ts"]),
              helper.make_node("Reshape", ["ts", "col"], ["t4"])]
    inputs = [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["N", channels, height, width]),
              helper.make_tensor_value_info("timestep", TensorProto.INT64, ["N"])]
    if num_classes:
        inputs.append(helper.make_tensor_value_info("class_labels", TensorProto.INT64, ["N"]))
        inits.append(numpy_helper.from_array(class_table(num_classes, channels, nan_class, huge_class), "emb"))
        inits.append(numpy_helper.from_array(np.array([-1, channels, 1, 1], np.int64), "cshape"))
        nodes += [helper.make_node("Gather", ["emb", "class_labels"], ["e"], axis=0),
                  helper.make_node("Reshape", ["e", "cshape"], ["e4"]),
                  helper.make_node("Add", ["hg", "t4"], ["ht"]),
                  helper.make_node("Add", ["ht", "e4"], ["out"])]
    else:
        nodes.append(helper.make_node("Add", ["hg", "t4"], ["out"]))
    output = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", channels, height, width])
    graph = helper.make_graph(nodes, "tiny_unet", inputs, [output], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    if metadata:
        helper.set_model_props(model, {METADATA_KEY: spec.to_json()})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return spec


def tiny_forward64(x, t, labels, spec, nan_class=None):
    """The conv-free tiny model in float64 numpy: the independent oracle for its ONNX twin."""
    T = spec.scheduler.get("num_train_timesteps", 1000)
    m = GAIN * np.asarray(x, np.float64) + (T_SCALE / T) * t
    if spec.num_classes:
        m = m + class_table(spec.num_classes, spec.channels, nan_class).astype(np.float64)[labels][:, :, None, None]
    return m
