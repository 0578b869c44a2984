"""Classifier-free guidance as forward rows (Ho & Salimans 2022; docs/math.md, "Guidance rows"), written once.

An image's output is m = u + g (c - u). Its own row carries the conditional input c (its class or prompt), or
the unconditional one when g = 0; only a guided image (g not None, 0 or 1) adds an unconditional row u. The rows
of one forward are [own rows of all n images; unconditional rows of the guided images, in image order].
"""

from dataclasses import dataclass

import numpy as np

NO_UNCOND = -1  # an image's unconditional row when it has none (kernels/step.h dd_image.uncond)


def needs_uncond_rows(guidance):
    """Whether guidance g runs the doubled forward u + g (c - u): g = 0 is the unconditional model alone and
    g = 1 (or no g) the conditional model alone, one row each."""
    return guidance is not None and guidance != 0 and guidance != 1


def own_row_is_conditional(guidance):
    """Whether an image's own row takes its conditional input: every g but 0 (then the unconditional model alone)."""
    return guidance is None or guidance != 0


def forward_rows(images, guided):
    """Rows of one forward for `images` images, all guided or none."""
    return images * (2 if guided else 1)


def uncond_rows(guided):
    """Each image's unconditional row (int32; NO_UNCOND where not guided): n + k for the k-th guided image."""
    guided = np.asarray(guided, dtype=bool)
    rows = np.full(len(guided), NO_UNCOND, dtype=np.int32)
    rows[guided] = len(guided) + np.arange(np.count_nonzero(guided), dtype=np.int32)
    return rows


def layout_rows(own, uncond, guided_images, out):
    """One input's forward rows into `out`: own[0..n-1], then uncond[j] for each guided image j, in order."""
    n, g = len(own), len(guided_images)
    out[:n] = own
    out[n : n + g] = uncond[guided_images]
    return out[: n + g]


@dataclass(frozen=True)
class Conditioning:
    """A request's per-image U-Net inputs besides x_t and t, {role: (own rows, unconditional rows)}, and the guidance
    scale its images apply (None: they are not guided and have no unconditional row)."""

    inputs: dict
    guidance: float | None

    @classmethod
    def of(cls, role, conditional, unconditional, guidance):
        """One input's Conditioning by the rule above: own rows conditional (unconditional when g = 0), and an
        unconditional row only for a guided image."""
        own = conditional if own_row_is_conditional(guidance) else unconditional
        return cls({role: (own, unconditional)}, guidance if needs_uncond_rows(guidance) else None)

    @property
    def guided(self):
        return self.guidance is not None

    def part(self, images):
        """The Conditioning of images `images` (a slice or indices) of the request."""
        return Conditioning(
            {role: (own[images], uncond[images]) for role, (own, uncond) in self.inputs.items()}, self.guidance
        )
