"""Small Fashion-MNIST CNN for quality metrics: outputs `logits` and its penultimate `features` (FID space)."""

import json
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ddengine.quality.fashion_mnist import CLASS_NAMES
from ddengine.quality.fashion_mnist import load as load_data

METADATA_KEY = "ddengine.classifier"
FEATURES = 128


class Classifier(nn.Module):
    """conv-BN-ReLU stages at 32, 16, 8 px, then a 128-d feature layer and a linear head."""

    def __init__(self, num_classes=10, features=FEATURES):
        super().__init__()
        widths = [(1, 32), (32, 64), (64, 64), (64, 128)]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1, bias=False) for a, b in widths)
        self.norms = nn.ModuleList(nn.BatchNorm2d(b) for _, b in widths)
        self.pool_after = (0, 2, 3)
        self.fc = nn.Linear(128 * 4 * 4, features)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(features, num_classes)

    def forward(self, x):
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = F.relu(norm(conv(x)))
            if i in self.pool_after:
                x = F.max_pool2d(x, 2)
        features = F.relu(self.fc(x.flatten(1)))
        return self.head(self.dropout(features)), features


def accuracy(model, x, y, batch=1000):
    """Share of correct argmax predictions."""
    model.eval()
    with torch.no_grad():
        hits = sum(
            int((model(x[i : i + batch])[0].argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(x), batch)
        )
    return hits / len(x)


def train(data_path=None, epochs=4, batch_size=128, lr=2e-3, seed=0, log=print):
    """Adam with a one-cycle LR; returns (model, test accuracy)."""
    torch.manual_seed(seed)
    x, y = (torch.as_tensor(a) for a in load_data("train", data_path))
    xt, yt = (torch.as_tensor(a) for a in load_data("test", data_path))
    model = Classifier()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * (len(x) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    start = time.monotonic()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(len(x) // batch_size):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            loss = F.cross_entropy(model(x[idx])[0], y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        log(
            f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, test accuracy {accuracy(model, xt, yt):.4f} "
            f"({time.monotonic() - start:.0f} s)"
        )
    return model.eval(), accuracy(model, xt, yt)


def export(model, out_path, test_accuracy=None):
    """ONNX with input `image` float32 [N,1,32,32] in [-1, 1], outputs `logits` [N,10] and `features` [N,128]."""
    import onnx

    from .onnx_export import _quiet, check, write_model

    batch = torch.export.Dim("batch", min=1, max=65536)
    with _quiet():
        program = torch.onnx.export(
            model.eval(),
            (torch.zeros(2, 1, 32, 32),),
            None,
            input_names=["image"],
            output_names=["logits", "features"],
            dynamic_shapes={"x": {0: batch}},
            opset_version=17,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    proto = program.model_proto
    meta = {
        "input": "image",
        "layout": "NCHW",
        "size": 32,
        "value_range": [-1.0, 1.0],
        "pad_value": -1.0,
        "classes": list(CLASS_NAMES),
        "features": FEATURES,
        "test_accuracy": test_accuracy,
    }
    onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(meta, sort_keys=True)})
    check(proto)
    verify(proto, model)
    write_model(proto, out_path)


def verify(proto, model, atol=1e-4):
    """ORT vs torch on random images; RuntimeError above atol."""
    import onnxruntime as ort

    x = np.random.default_rng(0).uniform(-1, 1, (5, 1, 32, 32)).astype(np.float32)
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    with torch.no_grad():
        want = [t.numpy() for t in model(torch.from_numpy(x))]
    err = max(float(np.abs(g - w).max()) for g, w in zip(got, want))
    if err > atol:
        raise RuntimeError(f"classifier ONNX differs from torch by {err:.3g} (> {atol:g})")
    return err
