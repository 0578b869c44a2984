"""Layer `export` (build time, package ddengine.export): training, the ONNX exporters, fp16 conversion and the
TensorRT builder. Needs the `export` extra (torch).

May import every runtime layer; no runtime layer imports it (only the build-time commands of `cli` do)."""
