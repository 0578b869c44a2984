"""Text-to-image MODEL_DIRs whose pipeline.json and graphs disagree: `BROKEN` maps a case to (damage, message), where
damage(folder) breaks a copy of the tiny export (tests/support/tiny_pipeline.py) and message is the exact one-line
error `Sampler`, `ddengine sample` and `ddengine info` must give, before any inference. The stand-in parts are real
ONNX graphs (a Gather text encoder, a Conv + Resize VAE decoder, a strided Conv VAE encoder) that run on ONNX
Runtime."""

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.support.tiny_pipeline import HIDDEN, LATENT, SCALE, TEXT_LENGTH

VOCABULARY = 66  # tokens of the tiny CLIP tokenizer: 3 special, 26 letters twice, the WORDS not already there
TE, UNET, VAE, ENCODER = (
    "files.text_encoder = 'text_encoder.onnx'",
    "files.unet = 'unet.onnx'",
    "files.vae_decoder = 'vae_decoder.onnx'",
    "files.vae_encoder = 'vae_encoder.onnx'",
)


def save(path, nodes, inputs, outputs, initializers):
    """An opset-17 graph of `nodes` saved to `path`, checked by onnx.checker."""
    model = helper.make_model(
        helper.make_graph(nodes, path.stem, inputs, outputs, initializers),
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=9,
    )
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def text_encoder(path, length=TEXT_LENGTH, hidden=HIDDEN, batch="batch", extra_input=None):
    """input_ids int64 (batch, length) -> hidden_states (batch, length, hidden): a random embedding table's rows."""
    table = np.random.default_rng(0).standard_normal((1000, hidden)).astype(np.float32)
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [batch, length])]
    if extra_input:
        inputs.append(helper.make_tensor_value_info(extra_input, TensorProto.INT64, [batch, length]))
    save(
        path,
        [helper.make_node("Gather", ["table", "input_ids"], ["hidden_states"])],
        inputs,
        [helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT, [batch, length, hidden])],
        [numpy_helper.from_array(table, "table")],
    )


def vae_decoder(path, channels=4, size=LATENT, scale=SCALE, name="latent", out=3):
    """latent (N, channels, size, size) -> image (N, out, size * scale, size * scale): a 1x1 Conv, then nearest Resize."""
    weight = np.full((out, channels, 1, 1), 0.1, np.float32)
    save(
        path,
        [
            helper.make_node("Conv", [name, "w"], ["c"]),
            helper.make_node("Resize", ["c", "", "scales"], ["image"], mode="nearest"),
        ],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", channels, size, size])],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", out, size * scale, size * scale])],
        [
            numpy_helper.from_array(weight, "w"),
            numpy_helper.from_array(np.array([1, 1, scale, scale], np.float32), "scales"),
        ],
    )


def vae_encoder(path, channels=3, size=LATENT * SCALE, scale=SCALE, out=4):
    """image (N, channels, size, size) -> latent (N, out, size / scale, size / scale): a 1x1 Conv of stride `scale`."""
    weight = np.full((out, channels, 1, 1), 0.1, np.float32)
    save(
        path,
        [helper.make_node("Conv", ["image", "w"], ["latent"], strides=[scale, scale])],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", channels, size, size])],
        [helper.make_tensor_value_info("latent", TensorProto.FLOAT, ["N", out, size // scale, size // scale])],
        [numpy_helper.from_array(weight, "w")],
    )


def edit_pipeline(folder, files=None, **fields):
    """Change pipeline.json's `fields`, and its `files` entries."""
    path = folder / "pipeline.json"
    spec = json.loads(path.read_text()) | fields
    spec["files"] |= files or {}
    path.write_text(json.dumps(spec))


def unconditional_unet(folder):
    """unet.onnx replaced by a ddengine U-Net of the same latents without encoder_hidden_states."""
    from tests.support.tiny_models import build_tiny_model

    build_tiny_model(folder / "unet.onnx", channels=4, height=LATENT, width=LATENT)


BROKEN = {
    "text_length off by one": (
        lambda m: edit_pipeline(m, text_length=TEXT_LENGTH - 1),
        f"pipeline.json: text_length = {TEXT_LENGTH - 1}, but {TE} takes input_ids of shape (N, {TEXT_LENGTH})",
    ),
    "U-Net hidden size is not the text encoder's": (
        lambda m: text_encoder(m / "text_encoder.onnx", hidden=16),
        f"pipeline.json: {UNET} takes encoder_hidden_states of shape (N, {TEXT_LENGTH}, {HIDDEN}) (hidden size "
        f"{HIDDEN}), but {TE} outputs 'hidden_states' of shape (N, {TEXT_LENGTH}, 16) (hidden size 16)",
    ),
    "VAE latent channels are not the U-Net's": (
        lambda m: vae_decoder(m / "vae_decoder.onnx", channels=8),
        f"pipeline.json: {VAE} takes latent of shape (N, 8, {LATENT}, {LATENT}), but {UNET} makes latents of shape "
        f"(N, 4, {LATENT}, {LATENT})",
    ),
    "vae_scale is not the decoder's": (
        lambda m: edit_pipeline(m, vae_scale=4),
        f"pipeline.json: vae_scale = 4, but {VAE} decodes {LATENT}x{LATENT} latents to 'image' of shape "
        f"(N, 3, {LATENT * SCALE}, {LATENT * SCALE}) (scale {SCALE})",
    ),
    "image_channels are not the decoder's": (
        lambda m: edit_pipeline(m, image_channels=4),
        f"pipeline.json: image_channels = 4, but {VAE} outputs 'image' of shape (N, 3, {LATENT * SCALE}, "
        f"{LATENT * SCALE})",
    ),
    "text encoder and VAE decoder swapped": (
        lambda m: edit_pipeline(m, files={"text_encoder": "vae_decoder.onnx", "vae_decoder": "text_encoder.onnx"}),
        "pipeline.json: files.text_encoder = 'vae_decoder.onnx' is a VAE decoder (it takes one 4-d input 'latent'), "
        "not a text encoder",
    ),
    "the VAE decoder is a text encoder": (
        lambda m: edit_pipeline(m, files={"vae_decoder": "text_encoder.onnx"}),
        "pipeline.json: files.vae_decoder = 'text_encoder.onnx' is a text encoder (it takes input_ids), not a VAE "
        "decoder",
    ),
    "U-Net and VAE decoder swapped": (
        lambda m: edit_pipeline(m, files={"unet": "vae_decoder.onnx", "vae_decoder": "unet.onnx"}),
        "pipeline.json: files.unet = 'vae_decoder.onnx' is a VAE decoder (it takes one 4-d input 'latent'), not a "
        "U-Net",
    ),
    "the VAE decoder is the U-Net": (
        lambda m: edit_pipeline(m, files={"vae_decoder": "unet.onnx"}),
        "pipeline.json: files.vae_decoder = 'unet.onnx' is a U-Net (it carries the 'ddengine' U-Net metadata), not a "
        "VAE decoder",
    ),
    "an unconditional U-Net": (
        unconditional_unet,
        f"pipeline.json: {UNET} has no encoder_hidden_states input (its inputs are ['sample', 'timestep']): not a "
        "text-conditioned U-Net",
    ),
    "a text encoder that needs an attention mask": (
        lambda m: text_encoder(m / "text_encoder.onnx", extra_input="attention_mask"),
        f"pipeline.json: {TE} has inputs ['input_ids', 'attention_mask']; a text encoder takes one input, "
        "'input_ids' int64 (N, text_length)",
    ),
    "a text encoder of a fixed batch": (
        lambda m: text_encoder(m / "text_encoder.onnx", batch=1),
        f"pipeline.json: {TE} takes 'input_ids' int64 of shape (1, {TEXT_LENGTH}); expected int64 (N, text_length) "
        "with a dynamic batch axis N",
    ),
    "a VAE decoder whose input the runtime does not feed": (
        lambda m: vae_decoder(m / "vae_decoder.onnx", name="latent_sample"),
        f"pipeline.json: {VAE} has inputs ['latent_sample']; a VAE decoder takes one input, 'latent' float32 "
        "(N, C, h, w) latents",
    ),
    "the VAE decoder is the VAE encoder": (
        lambda m: edit_pipeline(m, files={"vae_decoder": "vae_encoder.onnx"}),
        "pipeline.json: files.vae_decoder = 'vae_encoder.onnx' is a VAE encoder (it takes one 4-d input 'image'), "
        "not a VAE decoder",
    ),
    "VAE encoder latent channels are not the U-Net's": (
        lambda m: vae_encoder(m / "vae_encoder.onnx", out=8),
        f"pipeline.json: {ENCODER} outputs 'latent' of shape (N, 8, {LATENT}, {LATENT}), but {UNET} makes latents of "
        f"shape (N, 4, {LATENT}, {LATENT})",
    ),
    "the VAE encoder's scale is not vae_scale": (
        lambda m: vae_encoder(m / "vae_encoder.onnx", scale=2 * SCALE),
        f"pipeline.json: vae_scale = {SCALE}, but {ENCODER} encodes image of shape (N, 3, {LATENT * SCALE}, "
        f"{LATENT * SCALE}) to 'latent' of shape (N, 4, {LATENT // 2}, {LATENT // 2}); {UNET} takes "
        f"{LATENT}x{LATENT} latents of {LATENT * SCALE}x{LATENT * SCALE} images",
    ),
    "a VAE encoder of grey images for an RGB pipeline": (
        lambda m: vae_encoder(m / "vae_encoder.onnx", channels=1),
        f"pipeline.json: image_channels = 3, but {ENCODER} takes image of shape (N, 1, {LATENT * SCALE}, "
        f"{LATENT * SCALE})",
    ),
    "pad_token_id outside the tokenizer's vocabulary": (
        lambda m: edit_pipeline(m, pad_token_id=5000),
        f"pipeline.json: pad_token_id = 5000, but files.tokenizer = 'tokenizer.json' has {VOCABULARY} tokens in its "
        "vocabulary",
    ),
}
