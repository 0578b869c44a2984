"""pipeline.json bound to its graphs before any inference runs: each ONNX part is recognised by its declared inputs
and outputs (read without its weights, engine/model/load.py), a part that is another one is refused by name, and
every shape pipeline.json states, or one part hands the next, must be what the graphs declare.

Each refusal is a PipelineSpecError naming the pipeline.json field, what it says and what the graph says.
"""

from dataclasses import dataclass

from ddengine.core.quoting import shown
from ddengine.model.load import graph_tensors, read_weightless
from ddengine.model.pipeline_spec import PIPELINE_FILE, PipelineSpecError
from ddengine.model.spec import DYNAMIC, METADATA_KEY
from ddengine.model.spec import show_shape as dims

TOKENS, EMBEDDINGS, LATENTS, IMAGES = "input_ids", "encoder_hidden_states", "latent", "image"  # the parts' inputs
TOKEN_DTYPE, LATENT_DTYPE, STATE_DTYPES = "int64", "float32", ("float32", "float16")
GRAPH_PARTS = {
    "text_encoder": "a text encoder",
    "unet": "a U-Net",
    "vae_decoder": "a VAE decoder",
    "vae_encoder": "a VAE encoder",  # optional (pipeline_spec.OPTIONAL_FILES)
}


def file_field(spec, role):
    """The pipeline.json field naming a part and its value, for messages: `files.unet = 'unet.onnx'`."""
    return f"files.{role} = {shown(spec.files[role])}"


@dataclass(frozen=True)
class Signature:
    """A graph's declared interface: its inputs (initializers excluded) and outputs as TensorSpecs, in order."""

    inputs: tuple
    outputs: tuple
    metadata: frozenset  # the keys of its metadata_props

    @classmethod
    def of(cls, proto):
        """The Signature of a (weightless) ModelProto."""
        inputs, outputs = graph_tensors(proto)
        return cls(
            inputs=tuple(inputs.values()),
            outputs=tuple(outputs.values()),
            metadata=frozenset(p.key for p in proto.metadata_props),
        )


def recognise(signature):
    """(the part a graph looks like, why) by its inputs and metadata; (None, "") when it looks like none."""
    names = {t.name for t in signature.inputs}
    if TOKENS in names:
        return "text_encoder", f"it takes {TOKENS}"
    if METADATA_KEY in signature.metadata:
        return "unet", f"it carries the {METADATA_KEY!r} U-Net metadata"
    if names & {"timestep", EMBEDDINGS}:
        return "unet", f"it takes {' and '.join(sorted(names & {'timestep', EMBEDDINGS}))}"
    if len(signature.inputs) == 1 and len(signature.inputs[0].shape) == 4:
        role = "vae_encoder" if signature.inputs[0].name == IMAGES else "vae_decoder"
        return role, f"it takes one 4-d input {shown(signature.inputs[0].name)}"
    return None, ""


def read_signatures(folder, spec):
    """part -> Signature of each ONNX part the folder has, each one checked not to be another part (a swapped folder)."""
    signatures = {}
    for role, name in GRAPH_PARTS.items():
        if not spec.has(role):
            continue
        signatures[role] = Signature.of(read_weightless(spec.path(folder, role)))
        looks, why = recognise(signatures[role])
        if looks not in (None, role):
            raise PipelineSpecError(
                f"{PIPELINE_FILE}: {file_field(spec, role)} is {GRAPH_PARTS[looks]} ({why}), not {name}"
            )
    return signatures


def bind_graphs(spec, signatures, unet_spec):
    """pipeline.json against the parts' declared I/O, and each part's output against the next part's input."""
    hidden = bind_text_encoder(spec, signatures["text_encoder"])
    bind_unet(spec, unet_spec, hidden)
    bind_vae_decoder(spec, signatures["vae_decoder"], unet_spec)
    if "vae_encoder" in signatures:
        bind_vae_encoder(spec, signatures["vae_encoder"], unet_spec)


def bind_tokenizer(spec, vocabulary):
    """pad_token_id must be a token of the tokenizer's vocabulary (`vocabulary` tokens)."""
    if spec.pad_token_id >= vocabulary:
        raise PipelineSpecError(
            f"{PIPELINE_FILE}: pad_token_id = {spec.pad_token_id}, but {file_field(spec, 'tokenizer')} has {vocabulary} "
            "tokens in its vocabulary"
        )


def bind_text_encoder(spec, signature):
    """input_ids int64 (N, text_length) -> hidden states (N, text_length, D): the first output, D returned."""
    part = file_field(spec, "text_encoder")
    ids = _only_input(spec, "text_encoder", signature, TOKENS, TOKEN_DTYPE, rank=2, shape="(N, text_length)")
    if ids.shape[1] not in (DYNAMIC, spec.text_length):
        raise PipelineSpecError(
            f"{PIPELINE_FILE}: text_length = {spec.text_length}, but {part} takes {TOKENS} of shape {dims(ids.shape)}"
        )
    states = _first_output(part, signature, rank=3, shape="(N, text_length, D) hidden states")
    if states.shape[1] not in (DYNAMIC, spec.text_length):
        raise PipelineSpecError(
            f"{PIPELINE_FILE}: text_length = {spec.text_length}, but {part} outputs {shown(states.name)} of shape "
            f"{dims(states.shape)}"
        )
    return states


def bind_unet(spec, unet_spec, hidden):
    """The U-Net takes (N, text_length, D) encoder_hidden_states, D the text encoder's hidden size."""
    part = file_field(spec, "unet")
    if not unet_spec.text_conditional:
        inputs = sorted(unet_spec.input_names[r] for r in unet_spec.roles())
        raise PipelineSpecError(
            f"{PIPELINE_FILE}: {part} has no {EMBEDDINGS} input (its inputs are {shown(inputs)}): not a "
            "text-conditioned U-Net"
        )
    states = unet_spec.io[EMBEDDINGS]
    if len(states.shape) != 3:
        raise PipelineSpecError(
            f"{PIPELINE_FILE}: {part} takes {EMBEDDINGS} of shape {dims(states.shape)}; expected (N, text_length, D)"
        )
    if states.shape[1] not in (DYNAMIC, spec.text_length):
        raise PipelineSpecError(
            f"{PIPELINE_FILE}: text_length = {spec.text_length}, but {part} takes {EMBEDDINGS} of shape "
            f"{dims(states.shape)}"
        )
    if DYNAMIC not in (states.shape[2], hidden.shape[2]) and states.shape[2] != hidden.shape[2]:
        raise PipelineSpecError(
            f"{PIPELINE_FILE}: {part} takes {EMBEDDINGS} of shape {dims(states.shape)} (hidden size "
            f"{states.shape[2]}), but {file_field(spec, 'text_encoder')} outputs {shown(hidden.name)} of shape "
            f"{dims(hidden.shape)} (hidden size {hidden.shape[2]})"
        )


def bind_vae_decoder(spec, signature, unet_spec):
    """latent float32 (N, C, h, w), the U-Net's latents -> image (N, image_channels, h * vae_scale, w * vae_scale)."""
    part = file_field(spec, "vae_decoder")
    latent = _only_input(spec, "vae_decoder", signature, LATENTS, LATENT_DTYPE, rank=4, shape="(N, C, h, w) latents")
    if any(d not in (DYNAMIC, e) for d, e in zip(latent.shape[1:], unet_spec.image_shape)):
        raise PipelineSpecError(
            f"{PIPELINE_FILE}: {part} takes {LATENTS} of shape {dims(latent.shape)}, but {file_field(spec, 'unet')} makes "
            f"latents of shape {dims((DYNAMIC, *unet_spec.image_shape))}"
        )
    image = _first_output(part, signature, rank=4, shape="(N, image_channels, H, W) images")
    if image.shape[1] not in (DYNAMIC, spec.image_channels):
        raise PipelineSpecError(
            f"{PIPELINE_FILE}: image_channels = {spec.image_channels}, but {part} outputs {shown(image.name)} of "
            f"shape {dims(image.shape)}"
        )
    latents = (unet_spec.height, unet_spec.width)
    for size, latent_size in zip(image.shape[2:], latents):
        if size not in (DYNAMIC, latent_size * spec.vae_scale):
            raise PipelineSpecError(
                f"{PIPELINE_FILE}: vae_scale = {spec.vae_scale}, but {part} decodes {latents[0]}x{latents[1]} "
                f"latents to {shown(image.name)} of shape {dims(image.shape)} (scale {size / latent_size:g})"
            )


def bind_vae_encoder(spec, signature, unet_spec):
    """image float32 (N, image_channels, h * vae_scale, w * vae_scale) -> latents (N, C, h, w), the U-Net's."""
    part = file_field(spec, "vae_encoder")
    image = _only_input(spec, "vae_encoder", signature, IMAGES, LATENT_DTYPE, rank=4, shape="(N, C, H, W) images")
    channels, height, width = spec.image_shape(unet_spec)
    if image.shape[1] not in (DYNAMIC, channels):
        raise PipelineSpecError(
            f"{PIPELINE_FILE}: image_channels = {channels}, but {part} takes {IMAGES} of shape {dims(image.shape)}"
        )
    latent = _first_output(part, signature, rank=4, shape="(N, C, h, w) latents")
    if latent.shape[1] not in (DYNAMIC, unet_spec.channels):
        raise PipelineSpecError(
            f"{PIPELINE_FILE}: {part} outputs {shown(latent.name)} of shape {dims(latent.shape)}, but "
            f"{file_field(spec, 'unet')} makes latents of shape {dims((DYNAMIC, *unet_spec.image_shape))}"
        )
    sizes = zip(image.shape[2:], latent.shape[2:], (height, width), (unet_spec.height, unet_spec.width))
    for size, latent_size, want, latent_want in sizes:
        if size not in (DYNAMIC, want) or latent_size not in (DYNAMIC, latent_want):
            raise PipelineSpecError(
                f"{PIPELINE_FILE}: vae_scale = {spec.vae_scale}, but {part} encodes {IMAGES} of shape "
                f"{dims(image.shape)} to {shown(latent.name)} of shape {dims(latent.shape)}; {file_field(spec, 'unet')} "
                f"takes {unet_spec.height}x{unet_spec.width} latents of {height}x{width} images"
            )


def _only_input(spec, role, signature, name, dtype, rank, shape):
    """The one input `name` of a part, of `dtype`, `rank` dims and a dynamic batch axis."""
    part = file_field(spec, role)
    if [t.name for t in signature.inputs] != [name]:
        raise PipelineSpecError(
            f"{PIPELINE_FILE}: {part} has inputs {shown([t.name for t in signature.inputs])}; "
            f"{GRAPH_PARTS[role]} takes one input, {shown(name)} {dtype} {shape}"
        )
    tensor = signature.inputs[0]
    if tensor.dtype != dtype or len(tensor.shape) != rank or tensor.shape[0] != DYNAMIC:
        raise PipelineSpecError(
            f"{PIPELINE_FILE}: {part} takes {shown(name)} {tensor.dtype} of shape {dims(tensor.shape)}; expected "
            f"{dtype} {shape} with a dynamic batch axis N"
        )
    return tensor


def _first_output(part, signature, rank, shape):
    """A part's first output (the one the runtime reads): floating point, `rank` dims."""
    tensor = signature.outputs[0]
    if tensor.dtype not in STATE_DTYPES or len(tensor.shape) != rank:
        raise PipelineSpecError(
            f"{PIPELINE_FILE}: {part} outputs {shown(tensor.name)} {tensor.dtype} of shape {dims(tensor.shape)}; "
            f"expected {' or '.join(STATE_DTYPES)} {shape}"
        )
    return tensor
