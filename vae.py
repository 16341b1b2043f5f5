"""Images <-> VAE latents, shared by the trainer, encode.py, translate.py, evaluation and the app:
loading a diffusers `AutoencoderKL` or `AutoencoderDC` (with the linear-preview fallback for pictures), image
files -> model input, encoding/decoding raw latents, the cheap linear latent preview, labelled grids.

Latents on disk are *raw* (unscaled). diffusers' `vae.decode` takes raw latents too; only the
networks see `LatentSpace.normalize(raw)`.
"""

import dataclasses
import logging
import math
import os
import sys
import warnings
from typing import NamedTuple

import numpy as np
import torch

from latents import SD15, VALUE_KEYS, LatentSpace, check_same_space
from runtime import InputError, atomic_write

# Linear latent -> RGB per latent family, for *normalised* latents (what the networks see); rows:
# latent channels, columns: R, G, B; the RGB is in about [-1, 1]. The published preview factors of
# ComfyUI's comfy/latent_formats.py (SD15, SDXL, SD3, Flux), with their per-colour biases.
PREVIEW_FACTORS = torch.tensor([  # SD1.5
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
])
SDXL_PREVIEW_FACTORS = torch.tensor([
    [0.3651, 0.4232, 0.4341],
    [-0.2533, -0.0042, 0.1068],
    [0.1076, 0.1111, -0.0362],
    [-0.3165, -0.2492, -0.2188],
])
SD3_PREVIEW_FACTORS = torch.tensor([
    [-0.0922, -0.0175, 0.0749], [0.0311, 0.0633, 0.0954], [0.1994, 0.0927, 0.0458], [0.0856, 0.0339, 0.0902],
    [0.0587, 0.0272, -0.0496], [-0.0006, 0.1104, 0.0309], [0.0978, 0.0306, 0.0427], [-0.0042, 0.1038, 0.1358],
    [-0.0194, 0.0020, 0.0669], [-0.0488, 0.0130, -0.0268], [0.0922, 0.0988, 0.0951], [-0.0278, 0.0524, -0.0542],
    [0.0332, 0.0456, 0.0895], [-0.0069, -0.0030, -0.0810], [-0.0596, -0.0465, -0.0293], [-0.1448, -0.1463, -0.1189],
])
FLUX1_PREVIEW_FACTORS = torch.tensor([
    [-0.0346, 0.0244, 0.0681], [0.0034, 0.0210, 0.0687], [0.0275, -0.0668, -0.0433], [-0.0174, 0.0160, 0.0617],
    [0.0859, 0.0721, 0.0329], [0.0004, 0.0383, 0.0115], [0.0405, 0.0861, 0.0915], [-0.0236, -0.0185, -0.0259],
    [-0.0245, 0.0250, 0.1180], [0.1008, 0.0755, -0.0421], [-0.0515, 0.0201, 0.0011], [0.0428, -0.0012, -0.0036],
    [0.0817, 0.0765, 0.0749], [-0.1264, -0.0522, -0.1103], [-0.0280, -0.0881, -0.0499], [-0.1262, -0.0982, -0.0778],
])


class PreviewFamily(NamedTuple):
    name: str
    channels: int
    scaling_factor: float  # the VAE's, which tells two families of one width apart
    factors: torch.Tensor  # [C, 3]
    bias: object  # [3] or None


PREVIEW_FAMILIES = (  # the first of a width is that width's default when no scaling factor matches
    PreviewFamily("SD1.5", 4, 0.18215, PREVIEW_FACTORS, None),
    PreviewFamily("SDXL", 4, 0.13025, SDXL_PREVIEW_FACTORS, torch.tensor([0.1084, -0.0175, -0.0011])),
    PreviewFamily("FLUX.1", 16, 0.3611, FLUX1_PREVIEW_FACTORS, torch.tensor([-0.0329, -0.0718, -0.0851])),
    PreviewFamily("SD3", 16, 1.5305, SD3_PREVIEW_FACTORS, torch.tensor([0.2394, 0.2135, 0.1925])),
)

VAE_DOWNSAMPLE = 8  # SD1.5: 256px image <-> 32x32 latent
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")  # what Pillow may parse: no other decoder ever sees a file


def as_space(space):
    """A LatentSpace; a bare number (an older caller's latent_scale) is SD1.5's space with that scale."""
    return space if isinstance(space, LatentSpace) else dataclasses.replace(SD15, scaling_factor=float(space))


def preview_family(space):
    """The PreviewFamily for `space`: its channels and scaling factor, else the first of its width;
    None for a width without published factors."""
    space = as_space(space)
    same_width = [f for f in PREVIEW_FAMILIES if f.channels == space.channels]
    exact = [f for f in same_width if math.isclose(f.scaling_factor, space.scaling_factor, rel_tol=1e-4)]
    return (exact or same_width or [None])[0]


_GENERIC_SAID = set()  # channel counts whose generic preview has been announced (one line each)


def latent_preview(scaled_latents, space=SD15, upscale=None, log=None):
    """[B, C, H, W] normalised latents -> [B, 3, H*upscale, W*upscale] RGB in [0, 1], no VAE needed:
    the latent family's linear factors, or for a width without them the first 3 channels (fewer
    repeated), each image min-max normalised, announced once per width on `log` (default: stderr).
    `upscale`: None = the space's downsampling factor."""
    space = as_space(space)
    family = preview_family(space)
    if family is None:
        rgb = generic_preview(scaled_latents.float(), space, log)  # [B, 3, H, W] in [0, 1]
    else:
        factors = family.factors.to(scaled_latents.device, torch.float32)
        rgb = torch.einsum("bchw,cr->brhw", scaled_latents.float(), factors)  # [B, 3, H, W] in ~[-1, 1]
        if family.bias is not None:
            rgb = rgb + family.bias.to(rgb.device)[None, :, None, None]
        rgb = ((rgb + 1) / 2).clamp(0, 1)
    upscale = space.downsample if upscale is None else upscale
    if upscale > 1:
        rgb = torch.nn.functional.interpolate(rgb, scale_factor=upscale, mode="nearest")
    return rgb


def generic_preview(latents, space, log):
    """[B, C, H, W] -> [B, 3, H, W] in [0, 1]: channels 0-2 (fewer repeated), min-max per image."""
    if space.channels not in _GENERIC_SAID:
        _GENERIC_SAID.add(space.channels)
        (log or (lambda line: print(line, file=sys.stderr)))(
            f"note: no published linear preview for {space.channels}-channel latents: pictures show their first "
            "3 channels, each image stretched to [0, 1] (set visualization.vae_path or preview_vae for real colours)")
    rgb = latents[:, [i % latents.shape[1] for i in range(3)]]  # [B, 3, H, W]
    low = rgb.flatten(1).amin(1)[:, None, None, None]
    high = rgb.flatten(1).amax(1)[:, None, None, None]
    return torch.nan_to_num((rgb - low) / (high - low).clamp_min(1e-6), 0.5).clamp(0, 1)


def quiet_hf():
    """Silence diffusers / huggingface_hub info and progress output (visualization.suppress_hf_warnings)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("diffusers", "huggingface_hub", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dlogging

        dlogging.set_verbosity_error()
        dlogging.disable_progress_bar()
        from huggingface_hub.utils import logging as hlogging

        hlogging.set_verbosity_error()
    except Exception:  # an old or missing diffusers: nothing to silence
        pass
    warnings.filterwarnings("ignore", module="diffusers")
    warnings.filterwarnings("ignore", module="huggingface_hub")


def looks_local(path):
    """A path meant as a local folder (absolute, ./ or ../, or existing) rather than a hub id."""
    return os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path)


HUB_PROBE_TIMEOUT_S = 5  # how long to wait for the hub before calling it unreachable


def load_vae(path, subfolder=None, device="cpu", dtype=torch.float32, quiet=True, log=None,
             model_class="AutoencoderKL"):
    """A diffusers autoencoder (`model_class`: AutoencoderKL, or AutoencoderTiny for previews) from a
    local folder or a hub id, in eval mode, frozen.

    A hub id is taken from the local Hugging Face cache when it is there (no network at all);
    otherwise the hub is probed first, so that a machine without a network gets an error in
    seconds that says so, instead of huggingface_hub's retries and a misleading "does not appear to
    have a file named config.json". Raises (InputError, ImportError, OSError, ValueError, ...) when
    it cannot be loaded; callers decide whether that is fatal (encode.py, evaluation) or falls back
    to the latent preview (training, translate.py, the app). `log` hears of a download.
    """
    if not path:
        raise ValueError("no VAE path given (visualization.vae_path / --vae is empty)")
    path = os.path.expanduser(str(path))
    if looks_local(path) and not os.path.isdir(path):
        raise FileNotFoundError(f"VAE folder {path!r} does not exist (expected a diffusers AutoencoderKL "
                                "folder with config.json, or a hub id such as 'stabilityai/sd-vae-ft-mse')")
    import diffusers

    AutoencoderKL = getattr(diffusers, model_class)  # the class asked for, whatever its name here
    if quiet:  # after the import: huggingface_hub sets its loggers' levels when it is imported
        quiet_hf()
    kwargs = dict(subfolder=subfolder or None, torch_dtype=dtype)
    if looks_local(path):
        vae = vae_class(path, subfolder).from_pretrained(path, **kwargs)
    else:
        try:
            vae = vae_class(path, subfolder, local_files_only=True).from_pretrained(path, local_files_only=True,
                                                                                    **kwargs)
        except (OSError, ValueError):  # not (wholly) in the cache
            check_hub_reachable(path)
            if log:
                log(f"downloading the VAE {path!r} from the Hugging Face hub into its cache (once)")
            vae = vae_class(path, subfolder).from_pretrained(path, **kwargs)
    vae.to(device).eval().requires_grad_(False)
    return vae


VAE_CLASSES = ("AutoencoderKL", "AutoencoderDC", "AutoencoderTiny")  # the diffusers VAEs this code reads


def vae_class(path, subfolder=None, local_files_only=False):
    """The diffusers class its config.json names (`_class_name`; AutoencoderKL when absent), one
    of VAE_CLASSES; InputError naming any other."""
    import diffusers

    config = diffusers.AutoencoderKL.load_config(path, subfolder=subfolder or None, local_files_only=local_files_only)
    name = config.get("_class_name") or "AutoencoderKL"
    if name not in VAE_CLASSES:
        raise InputError(f"the VAE {path!r} is a diffusers {name!r}; expected one of {', '.join(VAE_CLASSES)}")
    return getattr(diffusers, name)


def check_hub_reachable(repo_id):
    """InputError, in at most HUB_PROBE_TIMEOUT_S, when the Hugging Face hub cannot be reached (or
    HF_HUB_OFFLINE is set) for a model that is not in the local cache; saying how to go on."""
    import socket
    import urllib.request
    from urllib.parse import urlparse

    from huggingface_hub import constants

    how = (f"On a machine with a network, download it (`hf download {repo_id}`, or `huggingface-cli download "
           f"{repo_id}`) and copy the cache folder over, or save the model folder and pass its path (--vae PATH, "
           "visualization.vae_path, evaluation.vae_path)")
    cache = constants.HF_HUB_CACHE
    if constants.HF_HUB_OFFLINE:
        raise InputError(f"{repo_id!r} is not in the local Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set. "
                         f"{how}")
    url = urlparse(constants.ENDPOINT)
    if urllib.request.getproxies().get(url.scheme):  # reached through a proxy: only huggingface_hub can tell
        return
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as e:
        raise InputError(f"the Hugging Face hub ({constants.ENDPOINT}) cannot be reached from here "
                         f"({e.strerror or type(e).__name__}) and {repo_id!r} is not in its local cache ({cache}). "
                         f"{how}") from None


def error_line(err):
    """Why a load failed, in one line: the first of the error's text (ours whole, a library's cut short)."""
    first_line = str(err).splitlines()[0] if str(err) else ""
    return first_line if isinstance(err, InputError) else first_line[:300]  # ours are short enough


def check_vae_space(vae, path, space, what=""):
    """InputError, starting with `what`, when the VAE's latents (its config's channels and factors,
    VALUE_KEYS) are not the checkpoint's `space`'s (None: unchecked), naming both values."""
    if space is not None:
        check_same_space(LatentSpace.from_vae(vae), space, f"VAE {path!r}", "checkpoint", what, VALUE_KEYS)


def check_vae_config(path, subfolder, space, origin, keys=VALUE_KEYS, theirs="run"):
    """Before a run: InputError naming both values when the config.json of the VAE (or tiny
    autoencoder) at `origin`=`path` names latents other than `space`'s (the numbers of `keys`).
    Nothing when that config is not at hand (a hub id not in the local cache, no network): its
    load at first use says why then. No weights are read."""
    if not path:
        return
    import diffusers

    try:
        with warnings.catch_warnings():  # the hub client's deprecation notes are not this check's to print
            warnings.simplefilter("ignore")
            config = diffusers.AutoencoderKL.load_config(os.path.expanduser(str(path)), subfolder=subfolder or None,
                                                         local_files_only=True)
        found = LatentSpace.from_config(config)
    except Exception:  # not cached, not a diffusers folder, a malformed config: the load will say which
        return
    check_same_space(found, space, f"{origin} {path!r}", theirs, keys=keys)


def open_vae(path, subfolder=None, device="cpu", dtype=torch.float32, what="", hint="", space=None):
    """`load_vae` for work that cannot go on without the VAE (encoding, evaluation, an exported
    decoder): an InputError starting with `what` when it cannot be loaded (`hint` then says how to
    go on) or when its latent space is not `space` (None: any, as encode.py writes)."""
    try:
        vae = load_vae(path, subfolder, device, dtype)
    except Exception as e:  # diffusers / huggingface_hub raise OSError, ValueError, ImportError, ...
        where = f"{path!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")
        raise InputError(f"{what}the VAE {where} could not be loaded ({type(e).__name__}: {error_line(e)}){hint}") \
            from None
    check_vae_space(vae, path, space, what)
    return vae


def load_vae_or_preview(path, subfolder, device, log, quiet=True, origin="visualization.vae_path", space=None):
    """The VAE for pictures (grids, PNGs), or None when it cannot be loaded: the caller then shows
    the linear latent preview. `log` gets one line saying why. A VAE that loads but whose latent
    space is not `space` (None: unchecked) is an InputError. Evaluation never uses this: without
    a VAE its numbers would mean something else, so it calls `open_vae` and fails."""
    if not path:
        log(f"{origin} is not set: pictures use the linear latent preview")
        return None
    try:
        vae = load_vae(path, subfolder, device, torch.float32, quiet=quiet, log=log)
    except Exception as e:
        log(f"warning: cannot load the VAE from {origin}={path!r} ({type(e).__name__}: {error_line(e)}); "
            "pictures use the linear latent preview instead")
        return None
    check_vae_space(vae, path, space, f"{origin}: ")
    return vae


def load_preview_vae(path, space, device, log, quiet=True, origin="visualization.preview_vae"):
    """The tiny autoencoder (diffusers AutoencoderTiny: TAESD, TAESDXL, TAESD3, TAEF1) that decodes
    pictures instead of the full VAE, or None when `path` is empty or it cannot be loaded (`log`
    says why; pictures then use the full VAE or the linear preview). One whose latents are not
    `space.channels` wide is an InputError: it was made for another VAE."""
    if not path:
        return None
    try:
        tiny = load_vae(path, None, device, torch.float32, quiet=quiet, log=log, model_class="AutoencoderTiny")
    except Exception as e:
        log(f"warning: cannot load the tiny autoencoder from {origin}={path!r} ({type(e).__name__}: "
            f"{error_line(e)}); pictures use the full VAE or the linear preview instead")
        return None
    if tiny.config.latent_channels != space.channels:
        raise InputError(f"{origin}={path!r} decodes {tiny.config.latent_channels}-channel latents; this model's "
                         f"latents have {space.channels} (a tiny autoencoder serves the one VAE it was distilled from)")
    return tiny


def is_tiny(vae):
    return type(vae).__name__ == "AutoencoderTiny"


def tiny_input(tiny, space, raw_latents):
    """Raw latents of the full VAE -> what `tiny.decode` takes. TAESD decodes the full VAE's
    normalised latents (its diffusers config says scaling_factor 1.0, shift 0: a pipeline divides
    by those before decoding), so this is the pipeline's own step with the tiny one's factors."""
    z = space.normalize(raw_latents.float())  # [B, C, h, w]: what the networks see
    return z / tiny.config.scaling_factor + (tiny.config.get("shift_factor") or 0.0)


def picture_source(vae):
    """What draws the pictures, for a report line."""
    return "linear latent preview" if vae is None else "tiny autoencoder decode" if is_tiny(vae) else "VAE decode"


def to_rgb(raw_latents, vae, space, batch_size=16, on_batch=None):
    """[B, C, h, w] raw latents -> [B, 3, H, W] RGB in [0, 1] on the CPU: the VAE's decode, a tiny
    autoencoder's (AutoencoderTiny, from the normalised latents), or the linear preview of the
    normalised latents when `vae` is None. `space`: the LatentSpace (a bare number: SD1.5's with that
    scale). `on_batch(n)`: see decode_raw."""
    space = as_space(space)
    if vae is None:
        return latent_preview(space.normalize(raw_latents.float()), space=space).cpu()
    if is_tiny(vae):
        return decode_raw(vae, tiny_input(vae, space, raw_latents), batch_size, on_batch)
    return decode_raw(vae, raw_latents, batch_size, on_batch)


def vae_downsample_factor(vae):
    """Spatial factor between image and latent (`LatentSpace.from_vae`): 8 for SD1.5, 32 for a DC-AE f32."""
    return LatentSpace.from_vae(vae).downsample


@torch.no_grad()
def decode(vae, raw_latents):
    """[B, C, h, w] raw latents -> [B, 3, h*f, w*f] RGB in [0, 1], float32 on the VAE's device."""
    out = vae.decode(raw_latents.to(vae.device, vae.dtype)).sample  # [B, 3, H, W] in [-1, 1]
    return (out.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def decode_raw(vae, raw_latents, batch_size=16, on_batch=None):
    """`decode` in chunks of `batch_size`, gathered on the CPU. `on_batch(n)` after each chunk of n
    images: a progress display, and the place a stop request interrupts the work (it may raise)."""
    images = []
    for chunk in raw_latents.split(batch_size):
        images.append(decode(vae, chunk).cpu())
        if on_batch is not None:
            on_batch(len(chunk))
    return torch.cat(images)


@torch.no_grad()
def encode_raw(vae, images, sample=False, generator=None):
    """[B, 3, H, W] images in [-1, 1] -> [B, C, H/f, W/f] raw latents: the posterior mode, or a
    draw from the posterior when `sample` (AutoencoderKL; DC-AE and TAESD encode deterministically)."""
    out = vae.encode(images.to(vae.device, vae.dtype))
    if not hasattr(out, "latent_dist"):  # AutoencoderDC's EncoderOutput.latent, AutoencoderTiny's .latents
        return (out.latent if hasattr(out, "latent") else out.latents).float()
    dist = out.latent_dist
    return (dist.sample(generator) if sample else dist.mode()).float()


MAX_UPSCALE = 4  # an image's shorter side must be at least 1/4 of the size it is encoded at
MAX_IMAGE_PIXELS = 50_000_000  # the app's limit for uploads (PNG / WebP decode whole: memory and time)
GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "F")


class ImageInfo(NamedTuple):
    width: int
    height: int
    notes: list  # what encoding changes: "grayscale, used as RGB", "transparency dropped", "upscaled to S px"


def inspect_image(path, size, max_pixels=None, what="image"):
    """Check an image file before decoding it (the header alone): readable, at most `max_pixels`,
    shorter side at least size / MAX_UPSCALE. Returns an ImageInfo whose notes say what encoding
    will change; InputError saying why not otherwise. One rule for encode.py and the app."""
    from PIL import Image

    try:
        with Image.open(path, formats=IMAGE_FORMATS) as image:
            width, height, mode, info = image.width, image.height, image.mode, dict(image.info)
    except Exception as e:  # not an image, truncated, a decompression bomb; PIL's text names the path
        raise InputError(f"the {what} is not an image that can be read ({type(e).__name__}); expected a PNG, "
                         "JPEG, WebP or BMP file") from None
    if max_pixels and width * height > max_pixels:
        raise InputError(f"the {what} is {width}x{height} px ({width * height / 1e6:.0f} megapixels), more than the "
                         f"{max_pixels / 1e6:.0f} megapixels accepted; downscale it first")
    min_side = max(1, size // MAX_UPSCALE)
    if min(width, height) < min_side:
        raise InputError(f"the {what} is {width}x{height} px, too small: it is encoded at {size}x{size} px, so its "
                         f"shorter side needs at least {min_side} px (1/{MAX_UPSCALE} of that)")
    notes = []
    if mode in GRAYSCALE_MODES:
        notes.append("grayscale, used as RGB")
    if mode in ("RGBA", "LA", "PA") or "transparency" in info:
        notes.append("transparency dropped")
    if min(width, height) < size:
        notes.append(f"upscaled to {size} px")
    return ImageInfo(width, height, notes)


def load_image(path, size):
    """Image file -> uint8 [size, size, 3]: EXIF-rotated, RGB (alpha dropped, grey expanded),
    centre square crop, bicubic resize. A much larger image is decoded reduced (a JPEG at 1/2,
    1/4 or 1/8 scale by its decoder, anything else box-filtered by an integer factor), never to
    less than `size`: the same picture for a fraction of the time and memory."""
    from PIL import Image, ImageOps

    with Image.open(path, formats=IMAGE_FORMATS) as image:
        image.draft("RGB", (size, size))  # JPEG only: the smallest scale whose both sides stay >= size
        image = ImageOps.exif_transpose(image)  # phone photos: crop what the viewer shows, not the sensor
        image = image.convert("RGB")
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    # reducing_gap: while the square is over 3x the target, a box-filter reduce by an integer factor
    # first, then bicubic (Pillow's "fair" two-step resampling, near the one-step result); smaller
    # images take the one-step bicubic exactly
    image = image.resize((size, size), Image.BICUBIC, reducing_gap=3.0)
    return np.asarray(image, dtype=np.uint8)


def to_model_input(images):
    """list of uint8 [H, W, 3] -> float32 [B, 3, H, W] in [-1, 1]."""
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # [B, 3, H, W] uint8
    return batch.float() / 127.5 - 1


def to_uint8(images):
    """[B, 3, H, W] in [0, 1] -> numpy [B, H, W, 3] uint8."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images, nrow, row_labels=None, col_labels=None, pad=2, label_px=None):
    """Tile [N, 3, H, W] images in [0, 1] into a PIL image, `nrow` rows, N / nrow columns.

    With labels, a strip on the left names the rows and one on top names the columns.
    """
    from PIL import Image, ImageDraw

    grid = grid_array(images, nrow, pad)
    if not row_labels and not col_labels:
        return Image.fromarray(grid)
    h = images.shape[2]
    label_px = label_px or max(60, min(140, 7 * max(len(str(t)) for t in (row_labels or []) + (col_labels or []) + [""])))
    left = label_px if row_labels else 0
    top = 18 if col_labels else 0
    canvas = Image.new("RGB", (grid.shape[1] + left, grid.shape[0] + top), "white")
    canvas.paste(Image.fromarray(grid), (left, top))
    draw = ImageDraw.Draw(canvas)
    ncol = images.shape[0] // nrow
    for r, text in enumerate(row_labels or []):
        draw.text((4, top + pad + r * (h + pad) + h // 2 - 6), str(text), fill="black")
    for c, text in enumerate(col_labels or []):
        if c < ncol and text:
            draw.text((left + pad + c * (images.shape[3] + pad) + 4, 3), str(text), fill="black")
    return canvas


def grid_array(images, nrow, pad=2):
    """[N, 3, H, W] in [0, 1] -> uint8 [rows*(H+pad)+pad, cols*(W+pad)+pad, 3], white padding."""
    n, _, h, w = images.shape
    ncol = (n + nrow - 1) // nrow
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    tiles = to_uint8(images)
    for k in range(n):
        r, c = divmod(k, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = tiles[k]
    return grid


def save_image_grid(path, images, nrow, row_labels=None, col_labels=None):
    """Write a (labelled) grid PNG atomically."""
    grid = image_grid(images, nrow, row_labels, col_labels)
    return atomic_write(path, lambda f: grid.save(f, format="PNG"))
