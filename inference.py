"""Using a trained model: rebuild the EMA networks from a checkpoint alone (its saved config, as
nanoGPT's `model_args`) and translate latents with them, latent-guided (a style from z through the
mapping network F) or reference-guided (a style from a reference latent through the style encoder E).
Shared by translate.py, the evaluation protocol and the app, so all three translate alike.

Latents outside are raw; the networks see `space.normalize(raw)` (latents.LatentSpace), and outputs
go back through `space.denormalize`.
"""

import math
import os
import weakref

import torch

from checkpoint import load_checkpoint
from config import latent_space, model_kwargs, resolve_config
from latents import file_stem, short_repr
from model import EMA_NETS, build_models
from runtime import InputError
from vae import load_preview_vae, load_vae_or_preview

MEAN_STYLE_SAMPLES = 10000  # z draws averaged into a domain's mean style for psi (StarGAN v2's count)
MEAN_STYLE_SEED = 0  # fixed: the mean style is a property of the model, not of the caller's seed
DEFAULT_LATENT_SIZE = 32  # SD1.5 latents of 256 px images: when a checkpoint records no latent shape
_mean_styles = weakref.WeakKeyDictionary()  # mapping network -> {domain id: mean style [1, S]}


def load_networks(path, device):
    """Checkpoint file -> (resolved config, {generator, mapping_network, style_encoder} with the EMA
    weights, in eval mode). `cfg["latent_shape"]` is the [C, h, w] trained on (None in a
    checkpoint saved before any data was seen). InputError naming the file and key for anything else."""
    return networks_from_checkpoint(load_checkpoint(path), path, device)


def networks_from_checkpoint(ckpt, path, device):
    """`load_networks` for a checkpoint dict that `checkpoint.load_checkpoint` loaded (and so checked
    completely: its config, shapes and finiteness) from `path`."""
    cfg = resolve_config(ckpt["config"], source=f"the config saved in {path}")
    models = build_models(**model_kwargs(cfg))
    nets = {}
    for name in EMA_NETS:
        models[name].load_state_dict(ckpt["ema"][name])
        nets[name] = models[name].to(device).eval().requires_grad_(False)
    cfg["latent_shape"] = ckpt["latent_shape"]
    return cfg, nets


def training_latent_size(cfg, default=DEFAULT_LATENT_SIZE):
    """Spatial size of the training latents: the checkpoint's `latent_shape`; `default` when it is
    None (a checkpoint saved before any data was seen)."""
    return int(cfg["latent_shape"][-1]) if cfg.get("latent_shape") else default


def vae_source(cfg, path=None, subfolder=None):
    """(path, subfolder) of the VAE for a checkpoint's model: `path` (a --vae flag), else the
    checkpoint's visualization.vae_path; a subfolder belongs to the path it came with."""
    v = cfg["visualization"]
    return path or v["vae_path"], subfolder if (path or subfolder) else v["vae_subfolder"]


def open_vae_for(cfg, path=None, subfolder=None, device="cpu"):
    """The VAE for pictures and image inputs of a checkpoint's model (`vae_source`), or None (linear
    latent preview) when none loads; and the lines saying why (or of a download). A VAE of another
    latent space than the checkpoint's is an InputError naming both."""
    lines = []
    vae = load_vae_or_preview(*vae_source(cfg, path, subfolder), device, lines.append, space=latent_space(cfg),
                              origin="--vae" if path else "the checkpoint's visualization.vae_path")
    return vae, lines


def open_preview_for(cfg, path=None, device="cpu"):
    """The tiny autoencoder that draws a checkpoint's pictures (`path`, else the checkpoint's
    visualization.preview_vae), or None when none is set or loads; and the lines saying why."""
    lines = []
    origin = "--preview-vae" if path else "the checkpoint's visualization.preview_vae"
    path = path or cfg["visualization"].get("preview_vae")
    tiny = load_preview_vae(path, latent_space(cfg), device, lines.append, origin=origin)
    return tiny, lines


def beside_checkpoint(checkpoint, prefix):
    """`<prefix>_<checkpoint's stem>/` in the checkpoint's folder: a script's default output folder."""
    return os.path.join(os.path.dirname(os.path.abspath(checkpoint)), f"{prefix}_{file_stem(checkpoint)}")


def output_name(stem, domain, tag):
    """`<stem>_to_<domain>_<tag>`: the name of a translation of `stem` into `domain`, `tag` saying which
    style (its number, or what it is)."""
    return f"{stem}_to_{domain}_{tag}"


def domain_index(cfg, domain, flag="--target-domain"):
    """The id of `domain` among the checkpoint's domains; InputError listing them otherwise."""
    domains = list(cfg["data"]["domains"])
    if domain not in domains:
        raise InputError(f"unknown {flag} {domain!r}; the checkpoint's domains are: {', '.join(domains)}")
    return domains.index(domain)


def check_psi(psi, flag="--psi"):
    """StarGAN v2's truncation psi: a finite number in [0, 1] (0: the domain's mean style, 1: none)."""
    try:
        value = float(psi)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int beyond any float
        raise InputError(f"{flag} {short_repr(psi)}: expected a number from 0 to 1") from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise InputError(f"{flag} {short_repr(psi)}: expected a number from 0 (the domain's mean style) to 1 "
                         "(no truncation)")
    return value


@torch.no_grad()
def latent_styles(mapping_network, domain_id, num_styles, latent_dim, seed=0, psi=1.0, device="cpu"):
    """K styles of one domain from F (latent-guided synthesis), optionally truncated toward the
    domain's mean style (StarGAN v2's psi: s = s_avg + psi * (s - s_avg), s_avg = F over
    MEAN_STYLE_SAMPLES z). Style k is the same for any caller: z = randn(K, L, seed)[k]. [K, S]"""
    z = torch.randn(num_styles, latent_dim, generator=torch.Generator().manual_seed(seed))  # [K, L]
    s = mapped_styles(mapping_network, z, domain_id, device)  # [K, S]
    if psi != 1.0:
        s = torch.lerp(mean_style(mapping_network, domain_id, latent_dim, device), s, psi)  # s_mean + psi * (s - s_mean)
    return s


@torch.no_grad()
def mapped_styles(mapping_network, z, domain_id, device="cpu"):
    """F(z, y) with y the target domain for every row: styles [n, S] of z [n, L]."""
    y = torch.full((z.shape[0],), domain_id, dtype=torch.long, device=device)
    return mapping_network(z.to(device), y)  # [n, S]


@torch.no_grad()
def mean_style(mapping_network, domain_id, latent_dim, device="cpu"):
    """A domain's mean style, F averaged over MEAN_STYLE_SAMPLES fixed z; computed once per network
    and domain (a trained network is fixed here: translation, the app). [1, S]"""
    cache = _mean_styles.setdefault(mapping_network, {})
    if domain_id not in cache:
        z = torch.randn(MEAN_STYLE_SAMPLES, latent_dim, generator=torch.Generator().manual_seed(MEAN_STYLE_SEED))
        cache[domain_id] = mapped_styles(mapping_network, z, domain_id, device).mean(0, keepdim=True)  # [1, S]
    return cache[domain_id].to(device)


@torch.no_grad()
def reference_styles(style_encoder, refs_raw, domain_id, space, batch_size=16, device="cpu"):
    """E of each raw reference latent for the target domain (reference-guided synthesis), in
    chunks. [M, S]"""
    styles = []
    for chunk in refs_raw.split(batch_size):
        chunk = space.normalize(chunk.to(device).float())  # [b, C, h, w] normalised
        y = torch.full((chunk.shape[0],), domain_id, dtype=torch.long, device=device)
        styles.append(style_encoder(chunk, y))  # [b, S]
    return torch.cat(styles)


@torch.no_grad()
def translate_raw(generator, content_raw, styles, space, device="cpu"):
    """G(content, s) on raw latents: content [b, C, h, w] raw and styles [b, S] -> raw outputs
    [b, C, h, w] float32 on `device`. The generator sees `space.normalize(raw)`."""
    x = space.normalize(content_raw.to(device).float())  # [b, C, h, w] normalised
    return space.denormalize(generator(x, styles).float())  # [b, C, h, w] raw


@torch.no_grad()
def translate_pairs(generator, sources_raw, styles, space, batch_size=16, device="cpu"):
    """Every (source i, style k) pair, flattened as i * K + k and run in chunks of `batch_size`.
    Yields (pair indices [b], raw outputs [b, C, h, w] on the CPU): one host transfer per chunk, so a
    caller can write outputs as they come."""
    num_styles = styles.shape[0]
    pairs = torch.arange(sources_raw.shape[0] * num_styles)
    for chunk in pairs.split(batch_size):
        raw = translate_raw(generator, sources_raw[chunk // num_styles], styles[(chunk % num_styles).to(styles.device)],
                            space, device)  # [b, C, h, w]
        yield chunk, check_finite_outputs(raw.cpu())


def check_finite_outputs(raw):
    """`raw` translations, or InputError when any is NaN or infinite: finite weights can still
    overflow (a diverged or tampered model), and a NaN latent must never be written as a result."""
    bad = int((~torch.isfinite(raw.flatten(1)).all(dim=1)).sum())
    if bad:
        raise InputError(f"the checkpoint's networks give non-finite outputs (NaN or inf) for {bad} of {len(raw)} "
                         "translations: its weights are finite but the model has diverged; use an earlier checkpoint")
    return raw


@torch.no_grad()
def grid_cells(generator, mapping_network, style_encoder, sources_raw, refs_raw, domains, space, latent_dim,
               seed=0, device="cpu"):
    """The training grid's cells: one source and one reference per domain (raw [N, C, h, w] each),
    every source translated to every domain. Rows: sources x latent-guided (one fixed z per domain),
    the references, sources x reference-guided; columns: the source, then each domain. Returns
    (raw latents [(2N+1)*(N+1), C, h, w] on the CPU with NaN in the blank corner, row labels)."""
    n = len(domains)
    src = space.normalize(sources_raw.to(device).float())  # [N, C, h, w]
    refs = space.normalize(refs_raw.to(device).float())
    z = torch.randn(n, latent_dim, generator=torch.Generator().manual_seed(int(seed))).to(device)  # fixed z
    y = torch.arange(n, device=device)
    s_lat, s_ref = mapping_network(z, y), style_encoder(refs, y)  # [N, S]: style of domain j
    x_rep = src.repeat_interleave(n, dim=0)  # [N*N, C, h, w]: source i for each target j
    lat = generator(x_rep, s_lat.repeat(n, 1)).view(n, n, *src.shape[1:])  # [N, N, C, h, w]
    ref = generator(x_rep, s_ref.repeat(n, 1)).view(n, n, *src.shape[1:])
    rows = [torch.cat([src[i:i + 1], lat[i]]) for i in range(n)]
    rows.append(torch.cat([torch.full_like(src[:1], float("nan")), refs]))
    rows += [torch.cat([src[i:i + 1], ref[i]]) for i in range(n)]
    labels = [f"{d} (latent)" for d in domains] + ["references"] + [f"{d} (ref)" for d in domains]
    return space.denormalize(torch.cat(rows)).float().cpu(), labels
