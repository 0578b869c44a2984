"""Helpers shared by the export, nets, evaluation and CLI tests: a tiny U-Net, random weights, tiny Fashion-MNIST files.

torch is imported inside the helpers that need it, so numpy-only tests can use write_idx.
"""

import gzip
import struct

import numpy as np

IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def tiny_config(**overrides):
    """A 16x16, two-level U-Net with 3 classes (null class 3): exports in seconds."""
    from ddengine.nets.unet import UNetConfig

    cfg = dict(image_size=16, base_channels=8, channel_mult=(1, 2), groups=4, head_channels=16, num_classes=3)
    return UNetConfig(**(cfg | overrides))


def randomized(module, seed=0, scale=0.2):
    """Perturb every parameter so zero-initialised output layers do not hide errors."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return module.eval()


def write_idx(path, array, magic):
    """A gzip'd IDX file (big-endian magic and dimensions, then the uint8 values)."""
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(gzip.compress(header + np.asarray(array).astype(np.uint8).tobytes()))


def tiny_fashion_mnist(folder, train=40, test=30, seed=0):
    """Random 28x28 images with labels i % 10 as both Fashion-MNIST splits; returns {split: (images, labels)}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    sets = {}
    for split, n in (("train", train), ("test", test)):
        images, labels = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8), np.arange(n) % 10
        write_idx(folder / IDX_FILES[split][0], images, 0x803)
        write_idx(folder / IDX_FILES[split][1], labels, 0x801)
        sets[split] = (images, labels.astype(np.int64))
    return sets


def tiny_classifier(path, seed=0):
    """An untrained (random) Fashion-MNIST classifier exported to `path`; returns the torch module (the oracle)."""
    import torch

    from ddengine.export import classifier

    torch.manual_seed(seed)
    net = classifier.Classifier().eval()
    classifier.export(net, path)
    return net


def export_with_twin(folder, name="m", seed=0, **config):
    """A tiny ddengine U-Net (random weights) as folder/name.onnx with its torch twin folder/name.safetensors.

    Uses torch's quick TorchScript exporter (about a second) and the spec `ddengine export` would write;
    returns (onnx path, the torch module).
    """
    import warnings

    import onnx
    import torch

    from ddengine.export.onnx_export import spec_for
    from ddengine.export.train import scheduler_dict
    from ddengine.model.spec import METADATA_KEY
    from ddengine.nets.twin import save_twin, twin_path
    from ddengine.nets.unet import UNet

    cfg = tiny_config(**({"image_size": 8} | config))
    torch.manual_seed(seed)
    module = randomized(UNet(cfg), seed=seed)
    size, classes = cfg.image_size, cfg.num_classes
    names = ["sample", "timestep", "class_labels"][: 3 if classes else 2]
    args = (torch.zeros(2, cfg.in_channels, size, size), torch.tensor([1, 2]), torch.tensor([0, 1]))[: len(names)]
    path = folder / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=names,
            output_names=["out"],
            opset_version=17,
            dynamic_axes={n: {0: "N"} for n in names + ["out"]},
            dynamo=False,
        )
    proto = onnx.load(str(path))
    spec = spec_for(scheduler_dict(), cfg.in_channels, size, size, classes)
    onnx.helper.set_model_props(proto, {METADATA_KEY: spec.to_json()})
    onnx.save(proto, str(path))
    save_twin(twin_path(path), module)
    return path, module
