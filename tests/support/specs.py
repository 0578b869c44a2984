"""The ModelSpec an exported file carries, read straight from its metadata (no graph binding: what export wrote)."""

import onnx

from ddengine.model.spec import METADATA_KEY, ModelSpec


def read_spec(path):
    """The ModelSpec stored in an ONNX file's metadata."""
    model = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise AssertionError(f"{path} has no '{METADATA_KEY}' metadata entry")
    return ModelSpec.from_json(props[METADATA_KEY])
