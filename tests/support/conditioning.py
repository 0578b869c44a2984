"""A loop's denoise with classes and guidance, as the tests state them (the Conditioning they mean is the runtime's)."""

from ddengine.runtime.conditioning import class_conditioning


def denoise(loop, plan, seeds, classes, guidance, **options):
    """loop.denoise(plan, seeds, the Conditioning of these classes and guidance, **options)."""
    return loop.denoise(plan, seeds, class_conditioning(loop.spec, classes, guidance, len(seeds)), **options)
