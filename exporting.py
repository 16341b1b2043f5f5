"""A trained model as self-contained inference graphs, for use without this code: ONNX (ONNX Runtime,
TensorRT, onnxruntime-web, game engines) and torch.export (`.pt2`: torch.export.load runs it with no
model code). Used by export.py and benchmarks.py.

Each mode is its own graph, taking only the inputs it uses (latents raw, as on disk):

    latent_guided(content [B, C, H, W], domain [B] int64, z [B, latent_dim], psi [B]) -> [B, C, H, W]
    reference_guided(content [B, C, H, W], domain [B] int64, reference [B, C, H', W']) -> [B, C, H, W]
    decoder(latent [B, C, h, w]) -> RGB [B, 3, h*f, w*f] in [0, 1]   (the VAE's, optional)

The latent scale and every domain's mean style (for psi) are inside, and a JSON record under
METADATA_KEY (domains, latent shape, dimensions, scale, source step) makes each file self-describing.
"""

import contextlib
import io
import json
import logging
import warnings

import torch
import torch.nn as nn

from config import latent_space, model_kwargs
from inference import MEAN_STYLE_SAMPLES, mean_style
from latents import LATENT_CHANNELS
from model import build_models
from runtime import InputError

ONNX_OPSET = 20  # torch 2.13's exporter default; ONNX Runtime >= 1.17 runs it
METADATA_KEY = "latent_stargan_v2"  # ONNX metadata_props key; the .pt2 extra file is METADATA_KEY + ".json"
MIN_CONTENT_SIZE = 8  # latent H, W: the dataset's minimum
# E halves H', W' three times, and torch.export specialises a size that could be 1 (its 0/1 rule):
# the graph is traced for a pooled map of at least 2x2
MIN_REFERENCE_SIZE = 16
MAX_DECODER_BATCH = 63  # diffusers' Upsample2D branches on batch >= 64 (a CUDA kernel workaround)
GRAPHS = ("latent_guided", "reference_guided")


class LatentGuided(nn.Module):
    """G(content, F(z, domain)) with StarGAN v2's truncation: s = s_mean + psi * (s - s_mean), the
    domain's mean style s_mean = F averaged over MEAN_STYLE_SAMPLES fixed z (baked in)."""

    def __init__(self, generator, mapping_network, mean_styles, space):
        super().__init__()
        self.generator, self.mapping_network, self.space = generator, mapping_network, space
        self.register_buffer("mean_styles", mean_styles)  # [N, S]

    def forward(self, content, domain, z, psi):
        s = self.mapping_network(z, domain)  # [B, S]
        s = torch.lerp(self.mean_styles[domain], s, psi[:, None])  # [B, S]
        fake = self.generator(self.space.normalize(content), s)  # [B, C, H, W] normalised
        return self.space.denormalize(fake)  # [B, C, H, W] raw


class ReferenceGuided(nn.Module):
    """G(content, E(reference, domain)): the style of a reference latent of the target domain."""

    def __init__(self, generator, style_encoder, space):
        super().__init__()
        self.generator, self.style_encoder, self.space = generator, style_encoder, space

    def forward(self, content, domain, reference):
        s = self.style_encoder(self.space.normalize(reference), domain)  # [B, S]
        fake = self.generator(self.space.normalize(content), s)  # [B, C, H, W] normalised
        return self.space.denormalize(fake)  # [B, C, H, W] raw


class Decoder(nn.Module):
    """The VAE's decode on raw latents, [B, C, h, w] -> RGB [B, 3, h*f, w*f] in [0, 1], as vae.decode:
    AutoencoderKL's post_quant_conv and decoder alone, AutoencoderDC's decoder (an exported program
    keeps every parameter of its module, and the encoder would double the file)."""

    def __init__(self, vae):
        super().__init__()
        self.post_quant_conv = getattr(vae, "post_quant_conv", None)  # None: DC-AE, or a KL without one
        self.decoder = vae.decoder

    def forward(self, latent):
        h = self.post_quant_conv(latent) if self.post_quant_conv is not None else latent  # [B, C, h, w]
        return (self.decoder(h) / 2 + 0.5).clamp(0, 1)  # [B, 3, H, W]: [-1, 1] -> [0, 1]


def keep_domains(cfg, nets, ids):
    """F and E rebuilt to serve only the domains `ids` (checkpoint ids), in that order: branch k of
    the new F (head k of the new E) is branch ids[k] of the checkpoint's. [F, E]"""
    kept = build_models(**model_kwargs(cfg, num_domains=len(ids)))
    mapping, encoder = kept["mapping_network"], kept["style_encoder"]
    state = {k: v for k, v in nets["mapping_network"].state_dict().items() if not k.startswith("branches.")}
    for k, i in enumerate(ids):
        state.update({f"branches.{k}.{key}": v for key, v in nets["mapping_network"].branches[i].state_dict().items()})
    mapping.load_state_dict(state)
    state, index, style_dim = nets["style_encoder"].state_dict(), torch.as_tensor(ids), cfg["model"]["style_dim"]
    weight = state["heads.weight"]  # [N * S, 2C], domain-major: N heads Linear(2C, S) stacked
    state["heads.weight"] = weight.view(-1, style_dim, weight.shape[1])[index].flatten(0, 1)  # [n * S, 2C]
    state["heads.bias"] = state["heads.bias"].view(-1, style_dim)[index].flatten()  # [n * S]
    encoder.load_state_dict(state)
    return mapping.eval(), encoder.eval()


def build_graphs(cfg, nets, ids):
    """{graph name: eval module} for the domains `ids` (checkpoint ids; exported id k = ids[k]), from
    the EMA networks `nets`."""
    mapping, encoder = keep_domains(cfg, nets, ids)
    latent_dim, space = cfg["model"]["latent_dim"], latent_space(cfg)
    mean_styles = torch.cat([mean_style(nets["mapping_network"], i, latent_dim) for i in ids])  # [n, S]
    return {"latent_guided": LatentGuided(nets["generator"], mapping, mean_styles, space).eval(),
            "reference_guided": ReferenceGuided(nets["generator"], encoder, space).eval()}


# ---------------------------------------------------------------------- inputs

def input_names(graph):
    return {"latent_guided": ["content", "domain", "z", "psi"],
            "reference_guided": ["content", "domain", "reference"], "decoder": ["latent"]}[graph]


def output_name(graph):
    return "image" if graph == "decoder" else "translated"


def random_inputs(graph, batch, size, num_domains, latent_dim, generator, reference_size=None,
                  channels=LATENT_CHANNELS):
    """Inputs of `graph` with a raw latent's spread (std ~5), psi cycling through 1, 0.5, 0."""
    def latent(s):
        return torch.randn(batch, channels, *s, generator=generator) * 5  # [B, C, h, w] raw

    size = (size, size) if isinstance(size, int) else tuple(size)
    if graph == "decoder":
        return (latent(size),)
    domain = torch.randint(0, num_domains, (batch,), generator=generator)  # [B]
    if graph == "latent_guided":
        psi = torch.tensor([1.0, 0.5, 0.0]).repeat(batch)[:batch]  # [B]
        return latent(size), domain, torch.randn(batch, latent_dim, generator=generator), psi
    reference_size = reference_size or size
    reference_size = (reference_size, reference_size) if isinstance(reference_size, int) else tuple(reference_size)
    return latent(size), domain, latent(reference_size)


def dynamic_shapes(graph):
    """Batch, H and W free (G never resamples, E pools globally); references have their own H', W'."""
    batch = torch.export.Dim("batch", min=1, **({"max": MAX_DECODER_BATCH} if graph == "decoder" else {}))
    height, width = (torch.export.Dim(n, min=MIN_CONTENT_SIZE) for n in ("height", "width"))
    content = {0: batch, 2: height, 3: width}
    if graph == "decoder":
        return {"latent": content}
    shapes = {"content": content, "domain": {0: batch}}
    if graph == "latent_guided":
        return {**shapes, "z": {0: batch}, "psi": {0: batch}}
    ref_height, ref_width = (torch.export.Dim(n, min=MIN_REFERENCE_SIZE) for n in ("ref_height", "ref_width"))
    return {**shapes, "reference": {0: batch, 2: ref_height, 3: ref_width}}


# ---------------------------------------------------------------------- export

@contextlib.contextmanager
def quiet_exporter():
    """The exporter's notices (optional torchvision ops, pytree deprecations) are not the user's."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


@torch.no_grad()
def export_program(module, graph, example_inputs):
    """torch.export of `module` with dynamic batch and spatial sizes."""
    with quiet_exporter():
        return torch.export.export(module, tuple(example_inputs), dynamic_shapes=dynamic_shapes(graph))


def onnx_bytes(program, graph, metadata):
    """The ExportedProgram through torch.onnx's dynamo exporter at ONNX_OPSET, weights inside the
    file (no external data), the metadata as one JSON string under METADATA_KEY."""
    with quiet_exporter():
        onnx_program = torch.onnx.export(program, input_names=input_names(graph), output_names=[output_name(graph)],
                                         opset_version=ONNX_OPSET, external_data=False, verbose=False)
    shapes = dynamic_shapes(graph)  # name the symbolic axes as the Dims are named (batch, height, ...)
    onnx_program.rename_axes({value.shape[axis]: dim.__name__ for value in onnx_program.model.graph.inputs
                              for axis, dim in shapes[value.name].items()})
    model = onnx_program.model_proto
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    return model.SerializeToString()


def pt2_bytes(program, metadata):
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={METADATA_KEY + ".json": json.dumps(metadata)})
    return buffer.getvalue()


# ---------------------------------------------------------------------- loading (verification, benchmarks)

def require_onnx_packages(runtime):
    """ONNX export needs onnx and onnxscript, running it onnxruntime: say so before any work."""
    for name in ("onnx", "onnxscript") + (("onnxruntime",) if runtime else ()):
        try:
            __import__(name)
        except ImportError:
            raise InputError(f"ONNX {'runtime' if name == 'onnxruntime' else 'export'} needs the {name} package: "
                             "pip install -r requirements-export.txt") from None


def eager_runner(module):
    """The module itself, called as the exported graphs are: run(*tensors) -> tensor, no autograd."""
    @torch.no_grad()
    def run(*tensors):
        return module(*tensors)

    return run


def onnx_runner(data, threads=None):
    """ONNX Runtime (CPU) session over a model's bytes or path -> (run(*tensors) -> tensor, metadata)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = options.inter_op_num_threads = threads
    session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(*tensors):
        feeds = {name: t.numpy() for name, t in zip(names, tensors)}
        return torch.from_numpy(session.run(None, feeds)[0])

    return run, json.loads(session.get_modelmeta().custom_metadata_map[METADATA_KEY])


def pt2_runner(data):
    """torch.export.load over a `.pt2`'s bytes or path -> (run(*tensors) -> tensor, metadata)."""
    extra = {METADATA_KEY + ".json": ""}
    program = torch.export.load(io.BytesIO(data) if isinstance(data, bytes) else data, extra_files=extra)
    return eager_runner(program.module()), json.loads(extra[METADATA_KEY + ".json"])


FORMATS = {"onnx": onnx_runner, "pt2": pt2_runner}


def max_abs_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


def metadata_for(cfg, graph, domains, ckpt, latent_size, **extra):
    """The record every file carries: what a consumer needs to feed and read the graph."""
    record = {"graph": graph, "inputs": input_names(graph), "output": output_name(graph), "domains": list(domains),
              "latent_shape": [latent_space(cfg).channels, latent_size, latent_size],
              "latent_scale": cfg["training"]["latent_scale"],
              "latent_space": latent_space(cfg).to_dict(),  # the graphs take and return raw latents of this VAE
              "style_dim": cfg["model"]["style_dim"], "latent_dim": cfg["model"]["latent_dim"],
              "psi_range": [0.0, 1.0], "mean_style_samples": MEAN_STYLE_SAMPLES,
              "min_content_size": MIN_CONTENT_SIZE, "min_reference_size": MIN_REFERENCE_SIZE,
              "step": int(ckpt["step"]), "epoch": int(ckpt["epoch"]), "onnx_opset": ONNX_OPSET,
              "torch": torch.__version__}
    return {**record, **extra}
