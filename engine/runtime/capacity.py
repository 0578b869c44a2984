"""What this machine lets the process use: CPUs (for thread counts) and memory, and what a request needs of it:
the forward's activations (estimated from the graph) and the images kept, refused up front when they do not fit.
"""

import os
from pathlib import Path

import onnx

from ddengine.core.guidance import forward_rows, needs_uncond_rows
from ddengine.runtime.params import InvalidParameterError, integer

ARENA_SLACK = 1.5  # ONNX Runtime's arena and fragmentation over the ideal peak (measured: 2.1 vs 1.7 MB/row)
RECORD_BYTES = 1024  # a Python dict record per image kept by Sampler.sample
_row_bytes_of: dict[str, int] = {}  # model sha256 -> activation_bytes(its graph)


def usable_cpus():
    """Logical CPUs this process may run on (its affinity mask)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def available_memory():
    """Bytes this process can still allocate: MemAvailable, capped by a cgroup v2 limit (None where unknown)."""
    candidates = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            candidates.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return min(candidates) if candidates else None


def human_bytes(n):
    """1536 -> '1.5 KiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024


def parse_threads(threads):
    """None (all physical cores) or a thread count in [1, the CPUs this process may use]."""
    return None if threads is None else integer("threads", threads, 1, usable_cpus())


def check_memory(model, request, backend_rows=None, keep_images=False, image_elements=None):
    """Refuse a request whose forward (or, kept in memory, whose images) would not fit; names the estimate.

    image_elements: uint8 values per returned image (default the model's sample size; larger once a VAE decodes it).
    """
    spec = model.spec
    rows = forward_rows(request.batch_size, needs_uncond_rows(request.guidance))
    if backend_rows is not None and rows > backend_rows:
        raise InvalidParameterError(
            f"batch_size {request.batch_size} needs {rows} forward rows; this backend takes at most "
            f"{backend_rows} (its engine profile)"
        )
    forward = rows * (ARENA_SLACK * activation_bytes_per_row(model) + 3 * 4 * spec.per_image)
    kept = request.n * ((image_elements or spec.per_image) + RECORD_BYTES) if keep_images else 0
    free = available_memory()
    if free is not None and forward + kept > free:
        parts = [f"batch_size {request.batch_size} needs about {human_bytes(forward)} for its forward"]
        if kept:
            parts.append(f"n = {request.n} images kept in memory need {human_bytes(kept)}")
        raise InvalidParameterError(
            f"{' and '.join(parts)}; this machine has {human_bytes(free)} available "
            f"(use a smaller batch_size{', or stream the images' if kept else ''})"
        )


def activation_bytes_per_row(model):
    """activation_bytes of a loaded Model's graph, computed once per model content."""
    if model.sha256 not in _row_bytes_of:
        _row_bytes_of[model.sha256] = activation_bytes(model.graph)
    return _row_bytes_of[model.sha256]


def activation_bytes(proto):
    """Peak bytes per batch row of the float intermediates alive at once, walking the graph in order (each value
    freed after its last use): what an ideal memory planner needs for one row of the forward."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=False)
    except Exception:  # inference is an estimate's input; a model it cannot follow is estimated by its I/O alone
        inferred = proto
    sizes = {v.name: _row_bytes(v) for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    initializers = {t.name for t in proto.graph.initializer}
    last_use = {}
    for i, node in enumerate(inferred.graph.node):
        for name in node.input:
            last_use[name] = i
    live = peak = sum(sizes.get(v.name, 0) for v in inferred.graph.input if v.name not in initializers)
    for i, node in enumerate(inferred.graph.node):
        live += sum(sizes.get(name, 0) for name in node.output)
        peak = max(peak, live)
        live -= sum(
            sizes.get(name, 0)
            for name in set(node.input) | set(node.output)
            if name not in initializers and last_use.get(name, -1) <= i and name in sizes
        )
    return peak


def _row_bytes(value):
    """Bytes per batch row of a float value whose shape inference knows (0 for others)."""
    t = value.type.tensor_type
    if t.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) or not t.shape.dim:
        return 0
    size = 1
    for d in t.shape.dim[1:]:
        size *= d.dim_value if d.HasField("dim_value") else 1
    return size * (4 if t.elem_type == onnx.TensorProto.FLOAT else 2)
