"""Layer `model`: what a model file says — the `ddengine` ONNX metadata (ModelSpec), the file and graph checks,
the ONNX wire reader, text-to-image pipeline folders (PipelineSpec).

May import `core` and `files`."""
