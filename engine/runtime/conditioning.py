"""The parts a model samples with besides its U-Net, chosen once at load time (engine/runtime/parts.py):
a conditioner (what each image's rows feed the U-Net besides x_t and t) and a decoder (x_0 -> images).

The text-to-image ones (PromptConditioner, VaeDecoder) are in engine/text/pipeline.py; these are the pixel
models' ones. The guidance rule (g = 0 / 1 / other) is engine/core/guidance.py's.
"""

import numpy as np

from ddengine.core.guidance import Conditioning

LABELS = "class_labels"


class NoConditioner:
    """An unconditional model: no input but x_t and t, never guided."""

    def condition(self, request, images=slice(None)):
        return Conditioning({}, None)

    def by_class(self, classes, guidance, n):
        return Conditioning({}, None)


class ClassConditioner:
    """A class-conditional model: each image's class label, the null class on its unconditional row."""

    def __init__(self, null_class):
        self.null_class = null_class

    def condition(self, request, images=slice(None)):
        """Conditioning of images `images` (a slice) of a bound Request (engine/runtime/params.py)."""
        classes = None if request.classes is None else request.classes[images]
        return self.by_class(classes, request.guidance, len(request.seeds[images]))

    def by_class(self, classes, guidance, n):
        """n images' labels: their classes, or the null class alone (no classes, or g = 0)."""
        null = np.full(n, self.null_class, dtype=np.int64)
        if classes is None:
            return Conditioning({LABELS: (null, null)}, None)
        return Conditioning.of(LABELS, np.asarray(classes, dtype=np.int64), null, guidance)


def class_conditioning(spec, classes, guidance, n):
    """The Conditioning of n images of a pixel model with these classes (or None) and guidance."""
    return class_conditioner(spec).by_class(classes, guidance, n)


def class_conditioner(spec):
    """The conditioner of a pixel model's spec: by class when it is class-conditional, else none."""
    if not spec.conditional:
        return NoConditioner()
    return ClassConditioner(spec.null_class if spec.null_class is not None else 0)


class PixelDecoder:
    """A pixel-space model's x_0 is its image: nothing to decode."""

    pixel_space = True  # x_t and predicted x_0 are images (trajectory snapshots make sense)
    latent_scale = 1  # image pixels per model pixel

    def __init__(self, spec):
        self.image_shape = (spec.height, spec.width, spec.channels)
        self.value_range = spec.value_range

    def decode(self, x, batch_size):
        return x
