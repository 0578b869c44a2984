"""Tiny ONNX U-Net stand-ins built with onnx.helper (no torch): m = a*conv(x) + s*t/T + emb[label].

Besides the good models, `build_tiny_model` writes the bad ones the loader must refuse: metadata fields edited
past the ModelSpec checks (`meta`, `metadata_text`), graphs whose tensors do not match their spec (`out_shape`,
`batch`, `sample_type`, `extra_input`), a class embedding with too few rows (`emb_rows`), and models that go
non-finite for one class below a timestep (`nan_below`).
"""

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ddengine.model.spec import METADATA_KEY, ModelSpec

SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "set_alpha_to_one": False,
}
GAIN, T_SCALE = 0.5, 0.3


def class_table(num_classes, channels, nan_class=None, huge_class=None, rows=None):
    """Per-class channel offsets, rows 0..num_classes (the last row is the null class); NaN or 3e38 rows on request."""
    table = np.linspace(-0.4, 0.4, (num_classes + 1) * channels).reshape(num_classes + 1, channels).astype(np.float32)
    if nan_class is not None:
        table[nan_class] = np.nan
    if huge_class is not None:
        table[huge_class] = 3e38  # finite, but guidance overflows float32 in the update
    return table if rows is None else table[:rows]


def conv_weight(channels):
    rng = np.random.default_rng(1234)
    return (rng.standard_normal((channels, channels, 3, 3)) * 0.15).astype(np.float32)


def tiny_spec(channels=1, height=8, width=8, num_classes=0, scheduler=None, **extra):
    """The ModelSpec the tiny model carries; conditional models get null class = num_classes."""
    null = num_classes if num_classes else None
    return ModelSpec(
        scheduler=dict(scheduler or SCHEDULER),
        channels=channels,
        height=height,
        width=width,
        num_classes=num_classes,
        null_class=null,
        **extra,
    )


def build_tiny_model(
    path,
    *,
    channels=1,
    height=8,
    width=8,
    num_classes=0,
    conv=True,
    nan_class=None,
    huge_class=None,
    scheduler=None,
    metadata=True,
    spec=None,
    meta=None,
    metadata_text=None,
    out_shape=None,
    batch="N",
    sample_type=TensorProto.FLOAT,
    emb_rows=None,
    scalar_timestep=False,
    extra_input=None,
    nan_below=None,
    recommended_guidance=None,
):
    """Write a tiny ONNX model to `path` and return its ModelSpec.

    meta: fields merged into the metadata JSON as written (no ModelSpec check: for refusals); metadata_text: the
    metadata entry verbatim. out_shape: the graph output's declared shape (default (batch, C, H, W)); batch: the
    batch dimension of sample and out ("N" = dynamic, an int = fixed). emb_rows: rows of the class embedding.
    scalar_timestep: the timestep input is a scalar. extra_input: the name of a graph input the spec does not name.
    nan_below=(t0, label): the output is NaN for that class label at timesteps t < t0 (finite otherwise).
    """
    extra = {} if recommended_guidance is None else {"recommended_guidance": recommended_guidance}
    spec = spec or tiny_spec(channels, height, width, num_classes, scheduler, **extra)
    T = spec.scheduler.get("num_train_timesteps", 1000)
    inits = [
        numpy_helper.from_array(np.array(GAIN, np.float32), "gain"),
        numpy_helper.from_array(np.array(T_SCALE / T, np.float32), "tscale"),
        numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), "col"),
    ]
    nodes = []
    if conv:
        inits.append(numpy_helper.from_array(conv_weight(channels), "w"))
        nodes.append(helper.make_node("Conv", ["sample", "w"], ["h"], pads=[1, 1, 1, 1]))
    else:
        nodes.append(helper.make_node("Identity", ["sample"], ["h"]))
    nodes += [
        helper.make_node("Mul", ["h", "gain"], ["hg"]),
        helper.make_node("Cast", ["timestep"], ["tf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["tf", "tscale"], ["ts"]),
        helper.make_node("Reshape", ["ts", "col"], ["t4"]),
    ]
    inputs = [
        helper.make_tensor_value_info("sample", sample_type, [batch, channels, height, width]),
        helper.make_tensor_value_info("timestep", TensorProto.INT64, [] if scalar_timestep else ["N"]),
    ]
    nodes.append(helper.make_node("Add", ["hg", "t4"], ["ht"]))
    if num_classes:
        inputs.append(helper.make_tensor_value_info("class_labels", TensorProto.INT64, ["N"]))
        inits.append(
            numpy_helper.from_array(class_table(num_classes, channels, nan_class, huge_class, emb_rows), "emb")
        )
        inits.append(numpy_helper.from_array(np.array([-1, channels, 1, 1], np.int64), "cshape"))
        nodes += [
            helper.make_node("Gather", ["emb", "class_labels"], ["e"], axis=0),
            helper.make_node("Reshape", ["e", "cshape"], ["e4"]),
            helper.make_node("Add", ["ht", "e4"], ["hte"]),
        ]
        if nan_below is not None:  # 0 * sqrt(t - t0 * [label == class]): NaN for that class below t0, else 0
            t0, label = nan_below
            gate = np.zeros(num_classes + 1, np.float32)
            gate[label] = t0
            inits += [numpy_helper.from_array(gate, "gate"), numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
            nodes += [
                helper.make_node("Gather", ["gate", "class_labels"], ["g"], axis=0),
                helper.make_node("Sub", ["tf", "g"], ["d"]),
                helper.make_node("Sqrt", ["d"], ["r"]),
                helper.make_node("Mul", ["r", "zero"], ["z"]),
                helper.make_node("Reshape", ["z", "col"], ["z4"]),
                helper.make_node("Add", ["hte", "z4"], ["htz"]),
            ]
    if extra_input is not None:
        inputs.append(helper.make_tensor_value_info(extra_input, TensorProto.FLOAT, ["N"]))
    nodes[-1].output[0] = "out"  # the last node computes the output
    output = helper.make_tensor_value_info("out", TensorProto.FLOAT, out_shape or [batch, channels, height, width])
    graph = helper.make_graph(nodes, "tiny_unet", inputs, [output], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    if metadata:
        text = metadata_text
        if text is None:
            text = spec.to_json() if meta is None else json.dumps({**json.loads(spec.to_json()), **meta})
        helper.set_model_props(model, {METADATA_KEY: text})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return spec


def tiny_forward64(x, t, labels, spec, nan_class=None):
    """The conv-free tiny model in float64 numpy: the independent oracle for its ONNX twin (t: scalar or per row)."""
    T = spec.scheduler.get("num_train_timesteps", 1000)
    t = np.asarray(t, np.float64)
    t = t.reshape(-1, 1, 1, 1) if t.ndim else t
    m = GAIN * np.asarray(x, np.float64) + (T_SCALE / T) * t
    if spec.num_classes:
        m = m + class_table(spec.num_classes, spec.channels, nan_class).astype(np.float64)[labels][:, :, None, None]
    return m
