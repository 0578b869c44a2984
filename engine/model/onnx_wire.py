"""The ONNX protobuf read field by field off the wire, large initializers without their bytes (their size checked
against their shape), so a model's file bytes and its parsed weights are never in memory together.

Wire format: https://protobuf.dev/programming-guides/encoding/ (tags, base-128 varints, length-delimited fields).
"""

import math
import os

import onnx
from onnx import helper

WEIGHTLESS_BYTES = 1 << 16  # initializers with more raw bytes than this are parsed without them
MERGE_BYTES = 1 << 26  # the graph's other fields are parsed this many bytes at a time
GRAPH_FIELD, INITIALIZER_FIELD, RAW_DATA_FIELD = (
    7,
    5,
    9,
)  # ModelProto.graph, GraphProto.initializer, TensorProto.raw_data


class WireFormatError(ValueError):
    """The file is not a well-formed ONNX protobuf, or a tensor's raw data does not match its shape."""


def read_weightless(path):
    """The ModelProto of `path`, read field by field: initializers over WEIGHTLESS_BYTES come without their raw
    data, so the file's bytes and its parsed weights are never in memory together."""
    proto = onnx.ModelProto()
    try:
        with open(path, "rb") as f:
            for number, kind, start, body, end in _fields(f, 0, os.fstat(f.fileno()).st_size):
                if number == GRAPH_FIELD and kind == 2:
                    _read_graph(f, body, end, proto.graph)
                else:
                    proto.MergeFromString(_read(f, start, end))
    except WireFormatError:
        raise
    except Exception as err:  # protobuf's DecodeError, a malformed wire format
        raise WireFormatError(f"not a valid ONNX protobuf: {str(err).splitlines()[0] if str(err) else err!r}") from None
    return proto


def _read_graph(f, start, end, graph):
    """Merge the GraphProto in bytes [start, end) into `graph`, MERGE_BYTES of fields at a time, large initializers weightless."""
    run = start
    for number, _, field, body, stop in _fields(f, start, end):
        if number == INITIALIZER_FIELD and stop - body > WEIGHTLESS_BYTES:
            graph.MergeFromString(_read(f, run, field))
            graph.initializer.add().CopyFrom(_weightless_tensor(f, body, stop))
            run = stop
        elif stop - run > MERGE_BYTES:
            graph.MergeFromString(_read(f, run, stop))
            run = stop
    graph.MergeFromString(_read(f, run, end))


def _weightless_tensor(f, start, end):
    """The TensorProto in bytes [start, end) without its raw_data, whose length must be what its shape declares."""
    parts, raw = [], None
    for number, _, field, body, stop in _fields(f, start, end):
        if number == RAW_DATA_FIELD:
            raw = stop - body
        else:
            parts.append(_read(f, field, stop))
    tensor = onnx.TensorProto()
    tensor.ParseFromString(b"".join(parts))
    if raw is not None and raw != _declared_bytes(tensor):
        raise WireFormatError(
            f"tensor {tensor.name!r} has {raw} bytes of raw data; its shape {list(tensor.dims)} and type "
            f"{onnx.TensorProto.DataType.Name(tensor.data_type)} need {_declared_bytes(tensor)}"
        )
    return tensor


def weightless(tensor):
    """A tensor parsed without its raw data: a shape that needs bytes, and no value field at all."""
    values = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")
    return (
        not tensor.HasField("raw_data")
        and not any(len(getattr(tensor, v)) for v in values)
        and _declared_bytes(tensor) > 0
    )


def _declared_bytes(tensor):
    """Bytes of raw data a tensor's dims and data type call for (0 for types without a fixed size)."""
    try:
        size = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return 0
    return math.prod(tensor.dims) * size


def _read(f, start, end):
    f.seek(start)
    return f.read(end - start)


def _fields(f, start, end):
    """(number, wire type, field start, value start, field end) of each protobuf field in bytes [start, end) of `f`."""
    pos = start
    while pos < end:
        f.seek(pos)
        head = f.read(20)
        tag, n = _varint(head, 0)
        kind, number = tag & 7, tag >> 3
        if kind == 2:
            size, n = _varint(head, n)
        elif kind == 0:
            _, n = _varint(head, n)
            size = 0
        elif kind in (1, 5):
            size = 8 if kind == 1 else 4
        else:
            raise ValueError(f"wire type {kind} at byte {pos}")
        stop = pos + n + size
        if number == 0 or stop > end:
            raise ValueError(
                f"field {number} at byte {pos} " + ("is not a field" if number == 0 else "runs past the end: truncated")
            )
        yield number, kind, pos, pos + n, stop
        pos = stop


def _varint(data, pos):
    """Protobuf's base-128 varint at data[pos] -> (value, position after it)."""
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("malformed varint")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos
