"""Layer `nets`: torch twins of the engine's models (the U-Net the shipped ONNX was exported from), for the torch
backends and the bench baselines. torch is imported by these modules, so only code that needs torch imports them.

May import `model`, `core` and `files`."""
