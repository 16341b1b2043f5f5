"""Synthetic multi-domain latents for the embedded demo (`configs/demo.yaml`): no data, no network.

Each sample is composed as a small RGB picture, one pixel per latent position, and mapped into the
SD1.5 latent space through the least-squares pseudo-inverse of vae.py's preview factors, so
`vae.latent_preview` renders the latents as the pictures they were composed from:

- content, shared by every domain: a few discs, rectangles and triangles at random places and sizes
  on a background, drawn as a label map (0 background, 1 disc, 2 rectangle, 3 triangle);
- style, one per domain: a palette (background and one colour per shape kind), a background
  gradient and a texture (none, stripes, checker, dots, grain, diagonals) with its own period and
  strength, jittered per sample so each style is a distribution rather than one point.

Domain `i`'s style is a function of `(i, seed)` only; the domain names just label the folders.
Files hold raw latents (`space.denormalize` of the scaled ones), as real encoded data sets do.
"""

import json
import os
import re
import time

import numpy as np
import torch

from latents import SD15, manifest_path, parse_file, write_latent_folders, write_manifest
from runtime import InputError, atomic_write
from vae import preview_family

DEMO_DATA_VERSION = 1  # bump when the composition changes, so old demo folders are regenerated
MANIFEST_NAME = "demo_manifest.json"
SHAPE_KINDS = ("disc", "rectangle", "triangle")  # label k + 1 in the label map
MAX_SHAPES = 3

# Six base styles, colours in [0, 1] RGB: background, disc, rectangle, triangle. Chosen to differ in
# hue and brightness at a glance; beyond six domains they repeat with a hue rotation.
BASE_STYLES = (
    dict(name="day", colors=[(0.70, 0.82, 0.95), (0.90, 0.30, 0.20), (0.20, 0.55, 0.30), (0.95, 0.80, 0.20)],
         gradient=0.25, texture="none", period=0, amplitude=0.0, shape_texture=0.0),
    dict(name="night", colors=[(0.07, 0.09, 0.28), (0.98, 0.85, 0.35), (0.95, 0.45, 0.15), (0.55, 0.85, 0.95)],
         gradient=-0.10, texture="hstripes", period=4, amplitude=0.12, shape_texture=0.3),
    dict(name="pastel", colors=[(0.98, 0.78, 0.84), (0.30, 0.68, 0.72), (0.58, 0.48, 0.85), (0.35, 0.35, 0.52)],
         gradient=0.0, texture="checker", period=8, amplitude=0.10, shape_texture=0.5),
    dict(name="forest", colors=[(0.18, 0.42, 0.16), (0.88, 0.15, 0.42), (0.96, 0.94, 0.80), (0.38, 0.22, 0.10)],
         gradient=0.10, texture="dots", period=5, amplitude=0.30, shape_texture=0.0),
    dict(name="sepia", colors=[(0.62, 0.50, 0.34), (0.28, 0.19, 0.11), (0.85, 0.75, 0.55), (0.70, 0.36, 0.18)],
         gradient=0.0, texture="grain", period=1, amplitude=0.10, shape_texture=1.0),
    dict(name="neon", colors=[(0.28, 0.04, 0.38), (0.15, 0.95, 0.60), (1.00, 0.35, 0.75), (0.95, 0.95, 0.95)],
         gradient=0.0, texture="diagonal", period=6, amplitude=0.12, shape_texture=0.0),
)
HUE_STEP_DEG = 137.5  # golden-angle rotation per repeat of the base styles: far from earlier hues


def hue_rotation(degrees):
    """[3, 3] rotation of RGB about the grey axis (1, 1, 1): shifts hue, keeps brightness."""
    theta = np.deg2rad(degrees)
    axis = np.ones(3) / np.sqrt(3)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.cos(theta) * np.eye(3) + np.sin(theta) * cross + (1 - np.cos(theta)) * np.outer(axis, axis)  # Rodrigues


def domain_style(index, seed=0):
    """Style of domain `index`: palette [4, 3] in [0, 1] (background, disc, rectangle, triangle), the
    background gradient, the texture kind, period (pixels at 32x32), amplitude and how much of it
    lies on the shapes. A function of (index, seed) only."""
    base = BASE_STYLES[index % len(BASE_STYLES)]
    repeat = index // len(BASE_STYLES)
    rng = np.random.default_rng([seed, index, 2])
    colors = np.asarray(base["colors"], np.float64)
    if repeat:
        colors = np.clip(colors @ hue_rotation(HUE_STEP_DEG * repeat).T, 0, 1)
    colors = np.clip(colors + rng.uniform(-0.03, 0.03, colors.shape), 0, 1)  # a seed gives a variant
    period = base["period"] + (repeat % 2) * (2 if base["period"] > 1 else 0)  # repeats differ in texture too
    return dict(name=base["name"], colors=colors, gradient=base["gradient"], texture=base["texture"],
                period=period, amplitude=base["amplitude"], shape_texture=base["shape_texture"])


def sample_content(n, size, rng):
    """Label maps [n, size, size] int64: 0 background, k + 1 for SHAPE_KINDS[k]; later shapes on top.

    The same distribution for every domain: 1 to MAX_SHAPES shapes of uniform kind, centre and size.
    """
    coords = (np.arange(size) + 0.5) / size  # pixel centres in [0, 1]
    y, x = coords[None, :, None], coords[None, None, :]  # [1, H, 1], [1, 1, W]
    n_shapes = rng.integers(1, MAX_SHAPES + 1, n)  # [n]
    kinds = rng.integers(0, len(SHAPE_KINDS), (n, MAX_SHAPES))
    cx, cy = rng.uniform(0.2, 0.8, (2, n, MAX_SHAPES))
    half_w, half_h = rng.uniform(0.10, 0.24, (2, n, MAX_SHAPES))
    labels = np.zeros((n, size, size), np.int64)
    for s in range(MAX_SHAPES):
        dx = x - cx[:, s, None, None]  # [n, 1, W]
        dy = y - cy[:, s, None, None]  # [n, H, 1]
        hw, hh = half_w[:, s, None, None], half_h[:, s, None, None]
        disc = (dx / hw) ** 2 + (dy / hw) ** 2 <= 1  # radius half_w
        rect = (np.abs(dx) <= hw) & (np.abs(dy) <= hh)
        depth = (dy + hh) / (2 * hh)  # 0 at the apex row, 1 at the base
        triangle = (depth >= 0) & (depth <= 1) & (np.abs(dx) <= hw * depth)  # apex up
        masks = np.stack(np.broadcast_arrays(disc, rect, triangle))  # [3, n, H, W]
        mask = masks[kinds[:, s], np.arange(n)] & (s < n_shapes)[:, None, None]  # [n, H, W]
        labels[mask] = np.broadcast_to(kinds[:, s, None, None] + 1, mask.shape)[mask]
    return labels


def texture_pattern(style, n, size, rng):
    """Per-sample texture [n, size, size] in about [-1, 1], random phase per sample."""
    kind = style["texture"]
    if kind == "none":
        return np.zeros((n, size, size))
    if kind == "grain":
        return rng.standard_normal((n, size, size))
    period = max(2, round(style["period"] * size / 32))
    y = np.arange(size)[None, :, None] + rng.integers(0, period, (n, 1, 1))  # [n, H, 1]
    x = np.arange(size)[None, None, :] + rng.integers(0, period, (n, 1, 1))  # [n, 1, W]
    if kind == "hstripes":
        pattern = (y % period) < period / 2
    elif kind == "checker":
        pattern = ((y // (period // 2)) + (x // (period // 2))) % 2 == 0
    elif kind == "diagonal":
        pattern = ((x + y) % period) < period / 2
    elif kind == "dots":
        pattern = ((y % period) < 2) & ((x % period) < 2)  # 2x2 dots on a period grid
        return pattern.astype(np.float64) * 2 - 0.25  # sparse bright dots, slightly darker field
    else:
        raise ValueError(f"unknown texture {kind!r}")
    return np.broadcast_to(pattern, (n, size, size)).astype(np.float64) * 2 - 1


def compose_domain_rgb(index, n, size=32, seed=0):
    """RGB pictures [n, 3, size, size] in [-1, 1] (float32) and their label maps [n, size, size].

    Content comes from its own random stream per domain (same distribution, different samples), the
    palette jitter and texture phase from another.
    """
    style = domain_style(index, seed)
    labels = sample_content(n, size, np.random.default_rng([seed, index, 0]))
    rng = np.random.default_rng([seed, index, 1])
    palette = style["colors"][None] + rng.normal(0, 0.04, (n, 4, 3))  # [n, 4, 3] per-sample jitter
    palette += rng.normal(0, 0.04, (n, 1, 1))  # and exposure
    rgb = np.take_along_axis(palette, labels.reshape(n, -1, 1), axis=1).reshape(n, size, size, 3)
    ramp = 0.5 - (np.arange(size) + 0.5) / size  # +0.5 at the top, -0.5 at the bottom
    background = labels == 0  # [n, H, W]
    rgb += (style["gradient"] * ramp[None, :, None] * background)[..., None]
    weight = np.where(background, 1.0, style["shape_texture"])
    rgb += (style["amplitude"] * weight * texture_pattern(style, n, size, rng))[..., None]
    rgb = np.clip(rgb * 2 - 1, -1, 1)  # [0, 1] -> [-1, 1], the range the preview shows unclipped
    return torch.from_numpy(rgb.transpose(0, 3, 1, 2).astype(np.float32)), torch.from_numpy(labels)


def rgb_to_scaled_latent(rgb, space=SD15):
    """[B, 3, H, W] RGB in [-1, 1] -> [B, C, H, W] normalised latents of the LatentSpace `space` whose
    linear preview (vae.latent_preview) is that RGB.

    A width with published preview factors F [C, 3] and bias b (SD1.5, SDXL, SD3, FLUX.1): per pixel,
    latent = (rgb - b) @ pinv(F); F has full column rank, so pinv(F) @ F = I and latent @ F + b = rgb
    exactly (the minimum-norm latent for that colour). Any other width: the RGB in the first channels
    (up to 3), zeros in the rest (the generic preview stretches them).
    """
    family = preview_family(space)
    if family is None:
        latent = torch.zeros(rgb.shape[0], space.channels, *rgb.shape[2:])  # [B, C, H, W]
        latent[:, :min(3, space.channels)] = rgb[:, :min(3, space.channels)]
        return latent
    rgb = rgb.double()
    if family.bias is not None:
        rgb = rgb - family.bias.double()[None, :, None, None]
    inverse = torch.linalg.pinv(family.factors.double())  # [3, C]
    return torch.einsum("brhw,rc->bchw", rgb, inverse).float()  # [B, C, H, W]


def expected_files(root, domains, files_per_domain):
    return [os.path.join(root, d, f"{d}_{k:05d}.pt") for d in domains for k in range(files_per_domain)]


def generate_demo_data(root, domains, files_per_domain=64, size=32, seed=0, space=SD15, log=print):
    """Write `root/<domain>/<domain>_<k:05d>.pt` raw latents [C, size, size] of the LatentSpace `space`
    for every domain, and the root's latent-space manifest; return root.

    Deterministic (same arguments, same bytes) and idempotent: a manifest in `root` records the
    arguments, and when it matches and every file is there nothing is written.
    """
    domains = [str(d) for d in domains]
    if len(domains) < 2 or len(set(domains)) != len(domains):
        raise ValueError(f"demo data needs at least two distinct domain names, got {domains}")
    if files_per_domain < 1 or size < 4:
        raise ValueError(f"demo data needs files_per_domain >= 1 and size >= 4, got {files_per_domain}, {size}")
    root = str(root)
    manifest = dict(version=DEMO_DATA_VERSION, domains=domains, files_per_domain=int(files_per_domain),
                    size=int(size), seed=int(seed), latent_scale=space.scaling_factor,
                    **({} if space == SD15 else {"latent_space": space.to_dict()}))
    demo_manifest = os.path.join(root, MANIFEST_NAME)
    files = expected_files(root, domains, files_per_domain)
    if os.path.isfile(demo_manifest):
        try:
            previous = parse_file(demo_manifest, json.loads)
        except InputError:  # not ours as written (edited, not UTF-8, nested deep): made again
            previous = None
        if previous == manifest and all(os.path.isfile(p) for p in files) and os.path.isfile(manifest_path(root)):
            log(f"demo data: reusing {len(domains)} domains x {files_per_domain} latents in {root}")
            return root
        os.remove(demo_manifest)  # written again last, so an interrupted run regenerates

    start = time.perf_counter()
    for index, domain in enumerate(domains):
        folder = os.path.join(root, domain)
        os.makedirs(folder, exist_ok=True)
        # drop files of an earlier, larger demo so the dataset does not read stale latents
        keep = {f"{domain}_{k:05d}.pt" for k in range(files_per_domain)}
        pattern = re.compile(re.escape(domain) + r"_\d{5}\.pt")
        for name in os.listdir(folder):
            if pattern.fullmatch(name) and name not in keep:
                os.remove(os.path.join(folder, name))
        rgb, _ = compose_domain_rgb(index, files_per_domain, size, seed)  # [n, 3, H, W]
        raw = space.denormalize(rgb_to_scaled_latent(rgb, space))  # [n, C, H, W] raw, as on disk for real data
        write_latent_folders(root, {domain: raw}, stem="{domain}_{index:05d}")
    write_manifest(root, space, vae_source="demo_data.py (synthetic)", image_size=size * space.downsample)
    text = json.dumps(manifest, indent=2).encode()
    atomic_write(demo_manifest, lambda f: f.write(text))
    log(f"demo data: wrote {len(domains)} domains x {files_per_domain} latents [{space.channels}, {size}, {size}] "
        f"to {root} (seed {seed}) in {time.perf_counter() - start:.1f}s")
    return root
