"""Try a trained Latent StarGAN v2 in the browser: one Gradio page over a checkpoint.

    python app.py --checkpoint outputs/stargan_v2_latent/latest.pt --vae stabilityai/sd-vae-ft-mse
    # then open http://127.0.0.1:7860

The EMA networks and the VAE are loaded once, when the server starts; every request reuses them and
runs as one batch (CUDA with autocast when there is a GPU, else the CPU). Requests wait in Gradio's
queue and run one at a time. The page offers:

- a source: an uploaded image, centre-cropped, resized and encoded to the posterior mode as encode.py
  does, at the training latent size; or one of a few latents from the checkpoint's data.root when
  that folder is on this machine;
- the target: one domain, or every domain side by side;
- the style: latent-guided (K random styles from the mapping network, a seed, the psi truncation) or
  reference-guided (an uploaded image or a latent from the data, through the style encoder);
- the outputs as a gallery (each a PNG to download), their raw latents as one .pt, and a line saying
  what ran;
- style interpolation: a slider between two styles (two seeds, or two references) that redraws the
  source with the blended style as it moves, and a button that renders the video from one style to
  the other (StarGAN v2's easing, sampling.py) as an .mp4 or .gif to download.

Without a VAE the page still works on the data's latents, and shows the linear latent preview
instead of decodes. The translation is the library's (inference.py, vae.py), as in translate.py.
Exit codes: 2 for a bad checkpoint, VAE or flag (the message on stderr), else the server's.
"""

import argparse
import contextlib
import errno
import functools
import ipaddress
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from typing import NamedTuple

import torch
from PIL import Image

from config import latent_space
from display import leave_terminal
from inference import (check_psi, domain_index, latent_styles, load_networks, open_preview_for, open_vae_for,
                       output_name, reference_styles, training_latent_size, translate_pairs)
from latents import check_root_space, file_stem, list_latent_files, read_latent
from runtime import AMP_DTYPES, InputError, check_seed, configure_backends, resolve_device, script_main
from sampling import (FPS, FRAMES_PER_TRANSITION, default_hold, frame_styles, interpolation_schedule, video_frames,
                      write_video)
from vae import (MAX_IMAGE_PIXELS, encode_raw, inspect_image, load_image, picture_source, to_model_input, to_rgb,
                 to_uint8, vae_downsample_factor)

# before gradio is imported: no telemetry thread and no version check (on a closed network they only
# wait), no hub telemetry from the VAE loader
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
import gradio as gr  # noqa: E402

ALL_DOMAINS = "__all__"  # the target choice "every domain, side by side"
SEEDS, REFERENCES = "seeds", "references"  # the two styles an interpolation glides between
VIDEO_FORMATS = ("mp4", "gif")
MAX_FRAMES_PER_TRANSITION = 121  # about 8 s at the official 15 fps
VIDEO_BATCH = 16  # frames per generator / decode batch of a video (one source)
UPLOAD, DATA = "upload", "data"  # where a source or reference comes from
LATENT_GUIDED, REFERENCE_GUIDED = "latent", "reference"
MAX_STYLES = 8  # latent-guided styles per domain: one row of the gallery
EXAMPLES_PER_DOMAIN = 4  # latents offered from each domain folder of data.root
KEEP_REQUESTS = 64  # request folders of outputs kept on disk (Gradio serves its own copies)
MAX_UPLOAD = "25mb"  # Gradio refuses bigger uploads before they reach the handler


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="A web page to try a Latent StarGAN v2 checkpoint: upload an image (or pick a latent from "
                    "the checkpoint's data), pick a target domain and a style, get the translations.")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint written by run.py (e.g. <checkpoint_dir>/latest.pt)")
    p.add_argument("--vae", default=None,
                   help="diffusers AutoencoderKL (local folder or hub id) to encode uploads and decode outputs; "
                        "default: the checkpoint's visualization.vae_path. Without one, sources are latents "
                        "from the data and pictures are the linear latent preview")
    p.add_argument("--vae-subfolder", default=None,
                   help="subfolder of the VAE ('vae' for a full Stable Diffusion pipeline); default none "
                        "(with --vae) or the checkpoint's visualization.vae_subfolder")
    p.add_argument("--preview-vae", default=None,
                   help="diffusers AutoencoderTiny (TAESD) that draws the pictures instead of the VAE; uploads are "
                        "still encoded by the VAE. Default: the checkpoint's visualization.preview_vae")
    p.add_argument("--device", default=None, help="cuda | cuda:N | cpu (default: cuda when available)")
    p.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 serves the network)")
    p.add_argument("--share", action="store_true",
                   help="also ask Gradio for a temporary public link (needs the internet)")
    args = p.parse_args(argv)
    if not 0 < args.port < 65536:
        p.error(f"--port {args.port} is not a port (1-65535)")
    return args


def safe_stem(name, fallback="source"):
    """A file stem safe in download names: letters, digits, '-' and '_', at most 40 characters."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", file_stem(name or "")).strip("_")
    return stem[:40] or fallback


def stem_of(source_mode, source_image, source_latent):
    """The download names' stem: the upload's file name, or the data latent's `domain_file`."""
    return safe_stem(source_latent.replace("/", "_") if source_mode == DATA else source_image)


def autocast_dtype(amp_dtype, device):
    """training.amp_dtype as the dtype requests autocast to, None for none: fp32, and the CPU (autocast
    gains little there); fp16 for bf16 on a GPU without bf16."""
    amp = AMP_DTYPES[amp_dtype]
    if device.type != "cuda" or amp == torch.float32:
        return None
    if amp is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return torch.float16
    return amp


# ---------------------------------------------------------------------- the model, loaded once

class Translator:
    """The checkpoint's EMA networks, the VAE (or None: linear preview) and the data's example
    latents, loaded once. `translate` serves one request; it never reloads anything."""

    def __init__(self, checkpoint, vae=None, vae_subfolder=None, device=None, log=print, preview_vae=None):
        self.device = resolve_device(device, fallback=False)
        configure_backends(self.device)
        self.checkpoint = checkpoint
        self.cfg, self.nets = load_networks(checkpoint, self.device)
        self.domains = list(self.cfg["data"]["domains"])
        self.space = latent_space(self.cfg)
        self.latent_dim = self.cfg["model"]["latent_dim"]
        self.vae, why = open_vae_for(self.cfg, vae, vae_subfolder, self.device)  # None: the linear latent preview
        tiny, tiny_why = open_preview_for(self.cfg, preview_vae, self.device)
        for line in why + tiny_why:
            log(line)
        self.decoder = tiny if tiny is not None else self.vae  # draws the pictures; self.vae encodes uploads
        self.latent_size = training_latent_size(self.cfg)
        self.image_size = self.latent_size * vae_downsample_factor(self.vae) if self.vae is not None else None
        self.examples = self._find_examples()  # {"domain/file.pt": path}
        self.amp_dtype = autocast_dtype(self.cfg["training"]["amp_dtype"], self.device)

    def _find_examples(self):
        """The first EXAMPLES_PER_DOMAIN latent files of each domain folder under data.root, when
        the folder is on this machine (the checkpoint may come from another one). A file name that
        is not valid UTF-8 cannot travel to the page as text: it is left out."""
        root = os.path.expanduser(self.cfg["data"]["root"])
        check_root_space(root, self.space, "data.root: ")  # examples of another VAE would decode wrongly
        examples = {}
        for domain in self.domains:
            try:
                files = list_latent_files(os.path.join(root, domain))
            except (OSError, InputError):
                continue
            for path in files:
                label = f"{domain}/{os.path.basename(path)}"
                try:
                    label.encode("utf-8")
                except UnicodeEncodeError:  # undecodable bytes, kept by Python as surrogates
                    continue
                examples[label] = path
                if sum(key.startswith(f"{domain}/") for key in examples) == EXAMPLES_PER_DOMAIN:
                    break
        return examples

    @property
    def device_label(self):
        if self.device.type != "cuda":
            return str(self.device)
        precision = {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast", None: "fp32"}[self.amp_dtype]
        return f"{self.device} ({torch.cuda.get_device_name(self.device)}, {precision})"

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------ inputs

    def read_image(self, path, what):
        """An uploaded image -> (raw latent [1, C, h, w], notes): checked by the rule encode.py
        follows (vae.inspect_image), then centre-cropped, resized and encoded as encode.py does."""
        if self.vae is None:
            raise InputError(f"the {what} is an image, but no VAE is loaded to encode it; restart the app with "
                             "--vae, or pick a latent from the data")
        if not path:
            raise InputError(f"no {what} image: upload one first")
        info = inspect_image(path, self.image_size, MAX_IMAGE_PIXELS, what=f"{what} upload")
        try:
            pixels = load_image(path, self.image_size)  # uint8 [S, S, 3], centre square crop
        except Exception as e:  # a truncated file: PIL's text would name the server's path
            raise InputError(f"cannot decode the {what} image ({type(e).__name__}); upload it again or use another "
                             "file") from None
        raw = encode_raw(self.vae, to_model_input([pixels])).cpu()  # [1, 4, S/f, S/f] raw
        return raw, [f"{what} {info.width}x{info.height}"] + info.notes

    def read_example(self, label, what):
        """A latent from the data -> (raw latent [1, C, h, w], notes)."""
        if not isinstance(label, str) or label not in self.examples:  # a dict or list from an API caller too
            offered = ", ".join(self.examples) or "none: data.root is not on this machine"
            raise InputError(f"no {what} latent {label!r:.80} in the data; offered: {offered}")
        path = self.examples[label]
        try:
            latent = read_latent(path, self.space.channels)  # [C, h, w] raw
        except (OSError, InputError) as e:  # the page sees the label, never the server's path
            raise InputError(str(e).replace(path, f"`{label}`")) from None
        return latent[None], [f"{what} `{label}`"]

    def read_input(self, mode, image_path, label, what):
        if mode == UPLOAD:
            return self.read_image(image_path, what)
        if mode == DATA:
            return self.read_example(label, what)
        raise InputError(f"{what} mode {mode!r}: expected {UPLOAD!r} or {DATA!r}")

    # ------------------------------------------------------------------ one request

    def styles(self, domain_ids, style_mode, num_styles, seed, psi, reference):
        """Styles ordered style-major, [K * D, S] (latent) or [D, S] (reference): row k of the
        gallery holds style k in every target domain."""
        if style_mode == LATENT_GUIDED:
            per_domain = [latent_styles(self.nets["mapping_network"], d, num_styles, self.latent_dim, seed, psi,
                                        self.device) for d in domain_ids]  # D x [K, S]
            return torch.stack(per_domain, dim=1).flatten(0, 1)  # [K * D, S]
        return torch.cat([reference_styles(self.nets["style_encoder"], reference, d, self.space,
                                           device=self.device) for d in domain_ids])  # [D, S]

    def translate(self, source_mode=UPLOAD, source_image=None, source_latent=None, target=ALL_DOMAINS,
                  style_mode=LATENT_GUIDED, num_styles=1, seed=0, psi=1.0, reference_mode=UPLOAD,
                  reference_image=None, reference_latent=None):
        """One request -> dict(rgb [N, 3, H, W] in [0, 1], latents [N, C, h, w] raw, names, captions,
        columns, source_rgb [3, H, W], source_stem, status). InputError for bad input."""
        if target == ALL_DOMAINS:
            domain_ids = list(range(len(self.domains)))
        else:
            domain_ids = [domain_index(self.cfg, target, "target")]
        num_styles, seed, psi = check_style_args(style_mode, num_styles, seed, psi)
        source, notes = self.read_input(source_mode, source_image, source_latent, "source")  # [1, C, h, w]
        reference = None
        if style_mode == REFERENCE_GUIDED:
            reference, ref_notes = self.read_input(reference_mode, reference_image, reference_latent, "reference")
            notes += ref_notes

        start = time.perf_counter()
        with self.autocast():
            styles = self.styles(domain_ids, style_mode, num_styles, seed, psi, reference)  # [N, S]
            # one batch: every (source, style) pair in a single generator call
            _, latents = next(translate_pairs(self.nets["generator"], source, styles, self.space,
                                              batch_size=styles.shape[0], device=self.device))  # [N, C, h, w] raw
        rgb = to_rgb(latents, self.decoder, self.space, batch_size=latents.shape[0])  # [N, 3, H, W], on the CPU
        seconds = time.perf_counter() - start  # the .cpu() copies above waited for the device

        source_stem = stem_of(source_mode, source_image, source_latent)
        names, captions = [], []
        for k in range(styles.shape[0] // len(domain_ids)):  # style-major, as `styles` orders them
            for d in domain_ids:
                tag = f"style {k}" if style_mode == LATENT_GUIDED else "reference"
                names.append(output_name(source_stem, self.domains[d], k if style_mode == LATENT_GUIDED else "ref"))
                captions.append(f"{self.domains[d]} · {tag}")
        status = (f"{len(names)} output(s) on {self.device_label} in {seconds * 1000:.0f} ms "
                  f"({seconds * 1000 / len(names):.0f} ms per image: styles, generator and {self.pictures}) · "
                  + " · ".join(notes))
        if style_mode == LATENT_GUIDED:
            status += f" · seed {seed}, psi {psi:g}"
        # every domain: one column each, so a row is one style; one domain: up to 4 styles a row
        columns = len(domain_ids) if len(domain_ids) > 1 else max(2, min(len(names), 4))
        return dict(rgb=rgb, latents=latents, names=names, captions=captions, columns=columns,
                    source_rgb=to_rgb(source, self.decoder, self.space)[0], source_stem=source_stem, status=status)

    # ------------------------------------------------------------------ interpolation

    def endpoints(self, source_mode=UPLOAD, source_image=None, source_latent=None, target=None, endpoint_mode=SEEDS,
                  seed_a=0, seed_b=1, psi=1.0, reference_a=(UPLOAD, None, None), reference_b=(UPLOAD, None, None)):
        """The two styles of an interpolation and what it translates: dict(source [1, C, h, w] raw,
        keys [2, S], key_latents [2, C, h', w'] raw (the references) or None, domain_id, stem, tag,
        notes). Style A of seed S is style 0 of the Translate button's seed S."""
        if target == ALL_DOMAINS or target not in self.domains:
            raise InputError(f"interpolation runs in one target domain: pick one of {', '.join(self.domains)}")
        domain_id = domain_index(self.cfg, target, "target")
        source, notes = self.read_input(source_mode, source_image, source_latent, "source")  # [1, C, h, w]
        if endpoint_mode == SEEDS:
            _, seed_a, psi = check_style_args(LATENT_GUIDED, 1, seed_a, psi)
            _, seed_b, _ = check_style_args(LATENT_GUIDED, 1, seed_b, psi)
            with self.autocast():
                keys = torch.cat([latent_styles(self.nets["mapping_network"], domain_id, 1, self.latent_dim, seed, psi,
                                                self.device) for seed in (seed_a, seed_b)])  # [2, S]
            key_latents, tag = None, f"seed{seed_a}-seed{seed_b}"
            notes.append(f"seed {seed_a} → seed {seed_b}, psi {psi:g}")
        elif endpoint_mode == REFERENCES:
            read = [self.read_input(*reference, f"reference {name}") for name, reference in
                    (("A", reference_a), ("B", reference_b))]
            if read[0][0].shape != read[1][0].shape:
                raise InputError(f"references A and B have latents of different sizes ({list(read[0][0].shape[1:])} "
                                 f"and {list(read[1][0].shape[1:])}); pick two of one size")
            key_latents = torch.cat([read[0][0], read[1][0]])  # [2, C, h', w']
            with self.autocast():
                keys = reference_styles(self.nets["style_encoder"], key_latents, domain_id, self.space,
                                        device=self.device)  # [2, S]
            tag = "refA-refB"
            notes += read[0][1] + read[1][1]
        else:
            raise InputError(f"interpolate between {endpoint_mode!r}: expected {SEEDS!r} or {REFERENCES!r}")
        stem = stem_of(source_mode, source_image, source_latent)
        return dict(source=source, keys=keys.float(), key_latents=key_latents, domain_id=domain_id, stem=stem, tag=tag,
                    notes=notes)

    def interpolate(self, alpha=0.5, **request):
        """The source with the style lerp(A, B, alpha), as the video's frame at that alpha shows it:
        dict(rgb [3, H, W] in [0, 1], status)."""
        alpha = check_alpha(alpha)
        e = self.endpoints(**request)
        start = time.perf_counter()
        one_frame = (torch.tensor([0]), torch.tensor([1]), torch.tensor([alpha], dtype=torch.float64))
        with self.autocast():
            style = frame_styles(e["keys"], one_frame)  # [1, S]
            _, latent = next(translate_pairs(self.nets["generator"], e["source"], style, self.space,
                                             batch_size=1, device=self.device))  # [1, C, h, w] raw
        rgb = to_rgb(latent, self.decoder, self.space)[0]  # [3, H, W]
        seconds = time.perf_counter() - start
        status = (f"alpha {alpha:g} in {self.domains[e['domain_id']]} · {seconds * 1000:.0f} ms on {self.device_label} "
                  f"({self.pictures}) · " + " · ".join(e["notes"]))
        return dict(rgb=rgb, status=status)

    def interpolation_video(self, folder, frames_per_transition=FRAMES_PER_TRANSITION, fps=FPS, video_format="mp4",
                            progress=None, **request):
        """The video from style A to style B (StarGAN v2's easing; the references slide in beside the
        row when they are the styles) into `folder`: dict(path, frames, status). `progress(fraction)`
        is told after each batch of frames."""
        frames_per_transition, fps, video_format = check_video_args(frames_per_transition, fps, video_format)
        e = self.endpoints(**request)
        hold = default_hold(frames_per_transition)
        schedule = interpolation_schedule([2], frames_per_transition, hold)
        written = []

        def on_frames(count):
            written.append(count)
            if progress is not None:
                progress(sum(written) / len(schedule[0]))

        start = time.perf_counter()
        chunks = video_frames(self.nets["generator"], e["source"], e["keys"], schedule, self.space, self.decoder,
                              e["key_latents"], VIDEO_BATCH, self.device, autocast=self.autocast)
        name = f"{output_name(e['stem'], self.domains[e['domain_id']], e['tag'])}.{video_format}"
        path, count = write_video(os.path.join(folder, name), chunks, fps, on_frames)
        seconds = time.perf_counter() - start
        status = (f"{count} frames ({frames_per_transition} from A to B, {hold} more held at the end) at {fps:g} fps, "
                  f"rendered in {seconds:.1f} s on {self.device_label} ({self.pictures}) · " + " · ".join(e["notes"]))
        return dict(path=path, frames=count, status=status)

    @property
    def pictures(self):
        return picture_source(self.decoder)


def check_alpha(alpha):
    try:
        alpha = float(alpha)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"alpha must be a number, got {alpha!r}") from None
    if not 0.0 <= alpha <= 1.0:  # False for NaN too
        raise InputError(f"alpha {alpha}: expected 0 (style A) to 1 (style B)")
    return alpha


def check_video_args(frames_per_transition, fps, video_format):
    try:
        frames_per_transition, fps = int(frames_per_transition), float(fps)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"frames per transition and fps must be numbers, got {frames_per_transition!r}, "
                         f"{fps!r}") from None
    if not 3 <= frames_per_transition <= MAX_FRAMES_PER_TRANSITION:
        raise InputError(f"frames per transition {frames_per_transition}: expected 3 to {MAX_FRAMES_PER_TRANSITION}")
    if not 1.0 <= fps <= 60.0:
        raise InputError(f"fps {fps:g}: expected 1 to 60")
    if video_format not in VIDEO_FORMATS:
        raise InputError(f"video format {video_format!r}: expected one of {', '.join(VIDEO_FORMATS)}")
    return frames_per_transition, fps, video_format


def check_style_args(style_mode, num_styles, seed, psi):
    """The latent-guided knobs as numbers in range (an API caller can send anything); ignored,
    whatever they are, when the style comes from a reference."""
    if style_mode not in (LATENT_GUIDED, REFERENCE_GUIDED):
        raise InputError(f"style mode {style_mode!r}: expected {LATENT_GUIDED!r} or {REFERENCE_GUIDED!r}")
    if style_mode == REFERENCE_GUIDED:
        return 1, 0, 1.0  # unused: the reference gives the style
    try:
        num_styles, seed = int(num_styles), int(seed)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
        raise InputError(f"number of styles and seed must be integers, got {num_styles!r}, {seed!r}") from None
    if not 1 <= num_styles <= MAX_STYLES:
        raise InputError(f"number of styles {num_styles}: expected 1 to {MAX_STYLES}")
    return num_styles, check_seed(seed, "seed"), check_psi(psi, "psi")


# ---------------------------------------------------------------------- the page

def write_outputs(result, folder):
    """The request's PNGs and its latents .pt into `folder`. Returns (gallery items, .pt path,
    source PNG path)."""
    os.makedirs(folder, exist_ok=True)
    items = []
    for pixels, name, caption in zip(to_uint8(result["rgb"]), result["names"], result["captions"]):
        path = os.path.join(folder, f"{name}.png")
        Image.fromarray(pixels).save(path, format="PNG")
        items.append((path, caption))
    source_png = os.path.join(folder, f"{result['source_stem']}_as_seen.png")
    Image.fromarray(to_uint8(result["source_rgb"][None])[0]).save(source_png, format="PNG")
    latents_pt = os.path.join(folder, f"{result['source_stem']}_latents.pt")
    # loadable with torch.load(weights_only=True): tensors and lists of str only
    torch.save({"latents": result["latents"].clone(), "names": result["names"], "captions": result["captions"]},
               latents_pt)
    return items, latents_pt, source_png


def prune_requests(root, keep=KEEP_REQUESTS):
    """Keep the `keep` newest request folders under `root`; Gradio has copied their files to its cache."""
    folders = sorted((os.path.join(root, n) for n in os.listdir(root)), key=os.path.getmtime)
    for folder in folders[:-keep]:
        shutil.rmtree(folder, ignore_errors=True)


def received_upload(value, what, upload_root=None):
    """The path of a file that Gradio received for this server, from the upload record the page
    sends (or a path). The translate API is open to any caller, and with preprocess=False Gradio
    checks only records that carry its `meta` tag: so every path is checked here, and anything
    that is not a regular file inside Gradio's upload folder (`upload_root`) gets one message,
    whatever the path, so an error never tells whether a file exists on the server."""
    path = value.get("path") if isinstance(value, dict) else value
    if path is None or path == "":
        return None
    root = os.path.realpath(upload_root or gr.utils.get_upload_folder())
    try:
        real = os.path.realpath(path) if isinstance(path, str) and "\0" not in path else None
    except (OSError, ValueError):
        real = None
    if real is None or os.path.commonpath([real, root]) != root or not os.path.isfile(real):
        raise InputError(f"the {what} image is not a file uploaded to this page; upload it again")
    return real


def request_folder(output_root):
    """A fresh folder for one request's files; only the newest KEEP_REQUESTS are kept."""
    os.makedirs(output_root, exist_ok=True)
    prune_requests(output_root)
    return tempfile.mkdtemp(dir=output_root)


def reported(title, serve):
    """`serve` as a page handler: bad input raises gr.Error with the message; anything else is
    printed to the server's log and reported in one line (no server path, no stack trace) on the
    page."""

    @functools.wraps(serve)
    def handle(*args, **kwargs):
        try:
            return serve(*args, **kwargs)
        except InputError as e:
            raise gr.Error(str(e), title=title, print_exception=False) from None
        except Exception as e:  # its text may name server paths: the log has it, the page the type
            traceback.print_exc()
            raise gr.Error(f"internal error ({type(e).__name__}); the server's log has the details",
                           print_exception=False) from None

    return handle


def make_handler(translator, output_root, upload_root=None):
    """The page's request function: inputs in the order of the page's widgets -> (gallery, latents
    file, source as seen, status line). Images are accepted only from `upload_root` (default:
    Gradio's upload folder)."""

    def handle(source_mode, source_image, source_latent, target, style_mode, num_styles, seed, psi,
               reference_mode, reference_image, reference_latent):
        source_path = received_upload(source_image, "source", upload_root) if source_mode == UPLOAD else None
        reference_path = received_upload(reference_image, "reference", upload_root) \
            if style_mode == REFERENCE_GUIDED and reference_mode == UPLOAD else None
        result = translator.translate(source_mode, source_path, source_latent, target, style_mode, num_styles, seed,
                                      psi, reference_mode, reference_path, reference_latent)
        items, latents_pt, source_png = write_outputs(result, request_folder(output_root))
        return gr.update(value=items, columns=result["columns"]), latents_pt, source_png, result["status"]

    return reported("Cannot translate", handle)


def interpolation_request(upload_root, source_mode, source_image, source_latent, target, endpoint_mode, seed_a,
                          seed_b, psi, reference_a_mode, reference_a_image, reference_a_latent, reference_b_mode,
                          reference_b_image, reference_b_latent):
    """The interpolation widgets, in the page's order, as Translator.endpoints' keywords; uploads
    only from `upload_root`."""
    def upload(mode, image, what):
        return received_upload(image, what, upload_root) if mode == UPLOAD else None

    references = endpoint_mode == REFERENCES
    return dict(source_mode=source_mode, source_image=upload(source_mode, source_image, "source"),
                source_latent=source_latent, target=target, endpoint_mode=endpoint_mode, seed_a=seed_a, seed_b=seed_b,
                psi=psi,
                reference_a=(reference_a_mode, upload(reference_a_mode if references else None, reference_a_image,
                                                      "reference A"), reference_a_latent),
                reference_b=(reference_b_mode, upload(reference_b_mode if references else None, reference_b_image,
                                                      "reference B"), reference_b_latent))


def make_interpolation_handlers(translator, output_root, upload_root=None):
    """(slider, video): the slider's handler takes the interpolation widgets and alpha -> (the
    translation with the blended style as uint8 [H, W, 3], status); the video's takes them and the
    frames per transition, fps and format -> (the video file, status)."""

    def interpolate(*widgets):
        *request, alpha = widgets
        result = translator.interpolate(alpha, **interpolation_request(upload_root, *request))
        return to_uint8(result["rgb"][None])[0], result["status"]

    def video(*widgets, progress=gr.Progress()):
        *request, frames_per_transition, fps, video_format = widgets
        result = translator.interpolation_video(request_folder(output_root), frames_per_transition, fps, video_format,
                                                lambda done: progress(done, desc="rendering frames"),
                                                **interpolation_request(upload_root, *request))
        return result["path"], result["status"]

    return reported("Cannot interpolate", interpolate), reported("Cannot make the video", video)


def header_markdown(translator):
    size, drawn_by = translator.latent_size, picture_source(translator.decoder)
    if translator.vae is not None:
        vae_line = (f"VAE: {translator.image_size}x{translator.image_size} px images ↔ "
                    f"{translator.space.channels}x{size}x{size} latents")
    else:
        vae_line = "**No VAE loaded**"
    if translator.decoder is not translator.vae:  # a tiny autoencoder draws the pictures
        vae_line += f" · pictures: {drawn_by}"
    lines = [  # file names only: the page is for visitors, who have no business with the server's paths
        "# Latent StarGAN v2",
        f"Checkpoint `{os.path.basename(translator.checkpoint)}` · domains: {', '.join(translator.domains)} · "
        f"device: {translator.device_label} · {vae_line}",
    ]
    if translator.vae is None:
        pictures = (f"every picture is a {drawn_by} (fast, less detail than the VAE)" if translator.decoder is not None
                    else "every picture is the linear latent preview (colours roughly right, no detail), not a VAE "
                    "decode")
        lines.append(f"> **No VAE**: sources and references are latents from the data, and {pictures}. Restart "
                     "with `--vae` to upload images (the server's log says why none loaded).")
        if not translator.examples:
            lines.append("> Nothing to translate: the checkpoint's data.root holds no latents on this server "
                         "either.")
    return "\n\n".join(lines)


CSS = """
#results .grid-wrap { min-height: 200px; }  /* Gradio's 450 px minimum leaves a blank half under one row */
#source-seen img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
"""


class Sources(NamedTuple):
    """Where a source or reference can come from on this page: the radio's choices (an upload with a
    VAE, a latent of the data when there are any), the first of them, and the data's latents."""
    choices: list
    first: str
    examples: list


def page_sources(translator):
    examples = list(translator.examples)
    choices = ([("Upload an image", UPLOAD)] if translator.vae is not None else []) + \
              ([("A latent from the data", DATA)] if examples else [])
    return Sources(choices, choices[0][1] if choices else None, examples)


def show_for(mode):
    """The upload widget or the data dropdown, as the source radio says."""
    return gr.update(visible=mode == UPLOAD), gr.update(visible=mode == DATA)


def picker(sources, label, default, height=200):
    """A reference's widgets: where it comes from, the upload, the data latent."""
    mode = gr.Radio(sources.choices, value=sources.first, label=label)
    image = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"], label=f"{label} image",
                     height=height, visible=sources.first == UPLOAD)
    latent = gr.Dropdown(sources.examples, value=sources.examples[default] if sources.examples else None,
                         label=f"{label} latent", visible=sources.first == DATA)
    mode.change(show_for, mode, [image, latent], api_visibility="private", queue=False)
    return mode, image, latent


def request_panel(translator, sources):
    """The left column: source, target and style, and the Translate button. {name: widget}."""
    examples, w = sources.examples, {}
    with gr.Column(scale=2, min_width=320):
        w["source_mode"] = gr.Radio(sources.choices, value=sources.first, label="Source")
        w["source_image"] = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                     label="Source image (centre-cropped to a square)", height=260,
                                     visible=sources.first == UPLOAD, elem_id="source-image")
        w["source_latent"] = gr.Dropdown(examples, value=examples[0] if examples else None, label="Source latent",
                                         visible=sources.first == DATA)
        domains = [(d, d) for d in translator.domains] + [("all domains (one row)", ALL_DOMAINS)]
        w["target"] = gr.Radio(domains, value=translator.domains[-1], label="Target domain")
        w["style_mode"] = gr.Radio([("Random styles (latent-guided)", LATENT_GUIDED),
                                    ("Style of a reference (reference-guided)", REFERENCE_GUIDED)],
                                   value=LATENT_GUIDED, label="Style")
        with gr.Group(visible=True) as w["latent_group"]:
            with gr.Row():
                w["num_styles"] = gr.Slider(1, MAX_STYLES, value=4, step=1, label="Number of styles", scale=2)
                w["seed"] = gr.Number(value=0, precision=0, minimum=0, label="Seed", scale=1, min_width=100)
            w["psi"] = gr.Slider(0.0, 1.0, value=1.0, step=0.05,
                                 label="psi: truncation toward the domain's mean style (1: none, 0: the mean)")
        with gr.Group(visible=False) as w["reference_group"]:
            w["reference_mode"], w["reference_image"], w["reference_latent"] = picker(sources, "Reference", -1)
        w["button"] = gr.Button("Translate", variant="primary", elem_id="translate-button")
    return w


def results_panel():
    """The right column: the gallery, the status line, the source as seen and the latents file."""
    w = {}
    with gr.Column(scale=3, min_width=400):
        w["gallery"] = gr.Gallery(label="Outputs (click one to enlarge; download as PNG)", format="png", columns=4,
                                  object_fit="contain", buttons=["download", "fullscreen"], interactive=False,
                                  elem_id="results")
        w["status"] = gr.Markdown("Choose a source, a target and a style, then press **Translate**.", elem_id="status")
        with gr.Row():
            w["source_seen"] = gr.Image(label="The source as the model sees it", type="filepath", format="png",
                                        interactive=False, height=180, elem_id="source-seen")
            w["latents_file"] = gr.File(label="Raw output latents (.pt)", interactive=False, height=180)
    return w


def interpolation_panel(sources):
    """The accordion: two styles, the alpha slider and its picture, the video. {name: widget}."""
    w = {}
    with gr.Accordion("Style interpolation: glide from one style to another, and make a video", open=False,
                      elem_id="interpolation"):
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                gr.Markdown("Source, target domain and psi are the ones above. The style moves from A to B "
                            "as StarGAN v2 interpolates: a lerp of the two style codes.")
                w["endpoint_mode"] = gr.Radio([("Two seeds (random styles)", SEEDS), ("Two references", REFERENCES)],
                                              value=SEEDS, label="Between")
                with gr.Row(visible=True) as w["seeds_row"]:
                    w["seed_a"] = gr.Number(value=0, precision=0, minimum=0, label="Seed A (its style 0)")
                    w["seed_b"] = gr.Number(value=1, precision=0, minimum=0, label="Seed B (its style 0)")
                with gr.Group(visible=False) as w["references_group"]:
                    w["reference_a"] = picker(sources, "Reference A", 0)
                    w["reference_b"] = picker(sources, "Reference B", -1)
                w["alpha"] = gr.Slider(0.0, 1.0, value=0.5, step=0.01, label="alpha: 0 is style A, 1 is style B",
                                       elem_id="alpha")
                with gr.Row():
                    w["frames_per_transition"] = gr.Slider(3, MAX_FRAMES_PER_TRANSITION, value=FRAMES_PER_TRANSITION,
                                                           step=1, label="Video: frames from A to B")
                    w["fps"] = gr.Slider(1, 60, value=FPS, step=1, label="frames per second")
                    w["video_format"] = gr.Radio(list(VIDEO_FORMATS), value=VIDEO_FORMATS[0], label="format")
                w["video_button"] = gr.Button("Make the video", elem_id="video-button")
            with gr.Column(scale=3, min_width=400):
                w["blended"] = gr.Image(label="The source with the blended style", type="numpy", format="png",
                                        interactive=False, height=260, elem_id="blended")
                w["interpolation_status"] = gr.Markdown("Move the slider to translate with a blend of A and B.",
                                                        elem_id="interpolation-status")
                w["video_file"] = gr.File(label="Video, A to B (download)", interactive=False, height=120,
                                          elem_id="video-file")
    return w


def connect(translator, output_root, request, results, interpolation):
    """The page's events: what each radio shows, and the three handlers (translate, interpolate, video)."""
    r, i = request, interpolation
    r["source_mode"].change(show_for, r["source_mode"], [r["source_image"], r["source_latent"]],
                            api_visibility="private", queue=False)
    i["endpoint_mode"].change(lambda m: (gr.update(visible=m == SEEDS), gr.update(visible=m == REFERENCES)),
                              i["endpoint_mode"], [i["seeds_row"], i["references_group"]], api_visibility="private",
                              queue=False)
    r["style_mode"].change(lambda m: (gr.update(visible=m == LATENT_GUIDED), gr.update(visible=m == REFERENCE_GUIDED)),
                           r["style_mode"], [r["latent_group"], r["reference_group"]], api_visibility="private",
                           queue=False)
    # preprocess=False: the handler gets the upload's record as sent (Gradio still checks that
    # its path is in the upload folder) and checks the file itself; gr.Image's own
    # preprocessing would fail in Pillow on a non-image with a bare "Error" on the page
    r["button"].click(make_handler(translator, output_root),
                      [r[k] for k in ("source_mode", "source_image", "source_latent", "target", "style_mode",
                                      "num_styles", "seed", "psi", "reference_mode", "reference_image",
                                      "reference_latent")],
                      [results[k] for k in ("gallery", "latents_file", "source_seen", "status")], api_name="translate",
                      preprocess=False)
    interpolate, video = make_interpolation_handlers(translator, output_root)
    widgets = [r["source_mode"], r["source_image"], r["source_latent"], r["target"], i["endpoint_mode"], i["seed_a"],
               i["seed_b"], r["psi"], *i["reference_a"], *i["reference_b"]]
    # always_last: while the slider moves, only its latest position is drawn after the one running
    i["alpha"].input(interpolate, widgets + [i["alpha"]], [i["blended"], i["interpolation_status"]],
                     api_name="interpolate", preprocess=False, trigger_mode="always_last", show_progress="hidden")
    i["video_button"].click(video, widgets + [i["frames_per_transition"], i["fps"], i["video_format"]],
                            [i["video_file"], i["interpolation_status"]], api_name="interpolation_video",
                            preprocess=False)


def build_page(translator, output_root):
    """The Gradio Blocks page over a loaded Translator."""
    sources = page_sources(translator)
    with gr.Blocks(title="Latent StarGAN v2", delete_cache=(600, 3600)) as page:
        gr.Markdown(header_markdown(translator))
        with gr.Row():
            request = request_panel(translator, sources)
            results = results_panel()
        connect(translator, output_root, request, results, interpolation_panel(sources))
    # one request at a time: the model is on one device, and two batches at once only compete for it
    page.queue(default_concurrency_limit=1, max_size=64)
    return page


def launch(page, output_root, host="127.0.0.1", port=7860, share=False, block=True, quiet=False):
    """Serve the page; with block=False return at once (tests), page.close() stops it."""
    return page.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
                       quiet=quiet, show_error=False, max_file_size=MAX_UPLOAD, allowed_paths=[output_root],
                       css=CSS)


def stop_on_sigterm():
    """SIGTERM (what `kill` and service managers send) and SIGHUP (a closed terminal or SSH session)
    stop the server as Ctrl-C does: Gradio closes it, and main() removes its outputs folder. Returns
    the handlers it replaced, {signal: handler}. After SIGHUP the terminal is gone: output to it
    goes to /dev/null, so that the lines of the stop never fail on it."""
    def interrupt(signum, frame):
        if signum == signal.SIGHUP:
            leave_terminal()
        raise KeyboardInterrupt

    return {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}


def main(argv=None):
    """Exit codes: 0 after the server stops (Ctrl-C, SIGTERM), 2 for bad arguments, checkpoint, VAE
    or an address that cannot be served."""
    return script_main("app.py", parse_args, serve, argv, errors=(InputError, OSError))


def bare_host(host):
    """--host without the brackets of a URL's IPv6 address (`[::1]` -> `::1`): what a socket binds."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def server_name(host):
    """--host as Gradio's launch takes it: an IPv6 address in brackets (`[::1]`), as in a URL. Gradio
    writes `http://{host}:{port}/` for its own start-up request, which a bare `::1` turns into an
    invalid URL; it removes the brackets again where it binds."""
    address = bare_host(host)
    try:
        ipaddress.IPv6Address(address)
    except ValueError:
        return address
    return f"[{address}]"


def check_address(host, port):
    """Bind `host`:`port` once, before the model loads, so that a wrong address is named as what it
    is (Gradio says "Cannot find empty port" for a busy port and a foreign host alike, and names its
    own launch() parameters rather than our flags). An IPv6 address may be given bare or in brackets."""
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(bare_host(host), port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise InputError(f"--host {host!r} is not a name or address this machine can resolve "
                         f"({getattr(e, 'strerror', None) or e})") from None
    try:
        probe = socket.socket(family, kind, proto)
    except OSError as e:  # an IPv6 address on a machine whose kernel has IPv6 off
        kind_name = "IPv6" if family == socket.AF_INET6 else family.name
        raise InputError(f"--host {host!r} is an {kind_name} address and this machine cannot open an {kind_name} "
                         f"socket ({e.strerror or e}): use 127.0.0.1 (this machine only) or 0.0.0.0 (every "
                         "network interface)") from None
    with probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server: TIME_WAIT is no conflict
        try:
            probe.bind(sockaddr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise InputError(f"--port {port} is in use on {host} by another program: choose another with --port N "
                                 "(or stop that program)") from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise InputError(f"--host {host!r} is not an address of this machine: use 127.0.0.1 (this machine "
                                 "only) or 0.0.0.0 (every network interface)") from None
            if e.errno == errno.EACCES:
                raise InputError(f"--port {port} needs administrator rights here (ports below 1024): use one "
                                 "from 1024 up") from None
            raise InputError(f"cannot serve on {host}:{port} ({e.strerror or e})") from None


def serve(args):
    """Load the model once, then serve until Ctrl-C / SIGTERM; an address that cannot be served is
    bad input, named before the model loads."""
    check_address(args.host, args.port)
    translator = Translator(args.checkpoint, args.vae, args.vae_subfolder, args.device,
                            log=lambda line: print(f"app.py: {line}", file=sys.stderr), preview_vae=args.preview_vae)
    base = tempfile.mkdtemp(prefix="latent-stargan-app-")
    output_root = os.path.join(base, "outputs")
    # uploads (and Gradio's copies of our outputs) in a folder of this server's own, unless the user
    # chose one: Gradio's default, /tmp/gradio, is shared by every Gradio app of the machine, and
    # images are accepted from the upload folder only
    os.environ.setdefault("GRADIO_TEMP_DIR", os.path.join(base, "gradio"))
    print(f"loaded {args.checkpoint} on {translator.device_label}; "
          f"pictures: {translator.pictures}; "
          f"{len(translator.examples)} latent(s) from the data")
    previous_handlers = stop_on_sigterm()
    try:
        launch(build_page(translator, output_root), output_root, server_name(args.host), args.port, args.share)
    except OSError as e:  # taken between the check and the launch
        raise InputError(f"cannot serve on {args.host}:{args.port} (--host / --port): "
                         f"{str(e).splitlines()[0][:200]}") from None
    except ValueError as e:  # Gradio's own checks: say which of our flags they concern
        message = str(e).replace("share=True", "--share").replace("server_port", "--port")
        raise InputError(f"cannot serve: {message.replace('server_name', '--host')}") from None
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
