"""Layer `runtime`: sampling — SamplingParams (the one request schema), conditioning and decoding parts, the image
batch and its host and device loops, the Sampler, memory and thread capacity, output folders and encoders.

May import `text`, `backends`, `nets`, `model`, `kernels`, `gpu`, `core` and `files`; never `ddengine.export`."""
