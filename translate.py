"""Translate latents (or images) with a trained Latent StarGAN v2 checkpoint.

    # latent-guided: 4 random styles of the target domain per source, truncated toward its mean
    python translate.py --checkpoint runs/latest.pt --source photos/ --target-domain monet \\
        --num-styles 4 --seed 0 --psi 0.7 --output out/
    # reference-guided: the style of each reference, one output per (source, reference) pair
    python translate.py --checkpoint runs/latest.pt --source photos/ --target-domain monet \\
        --reference monet_refs/ --output out/ --vae stabilityai/sd-vae-ft-mse

G, F and E are rebuilt from the checkpoint alone (its saved config) and run with the EMA weights.
Latents on disk are raw; the networks see `LatentSpace.normalize(raw)` and their outputs go back through
back before saving or decoding. The output folder holds one raw float32 latent `[C, h, w]` per output,
`<stem>_to_<domain>_<k>.pt`, its PNG (VAE decode, or the linear latent preview when no VAE loads),
and one `sheet.png` (rows: sources; columns: the source, then its outputs).

StarGAN v2's sample mode (the official `translate_using_reference`, `video_ref`, `video_latent`):

    # the reference grid: references along the top, sources down the side, one picture
    python translate.py --checkpoint runs/latest.pt --source photos/ --target-domain monet \
        --reference monet_refs/ --grid --output out/
    # a row of sources whose style glides from reference to reference (or through K random styles
    # of each target domain: --video latent with --num-styles K and one or more --target-domain)
    python translate.py --checkpoint runs/latest.pt --source a.pt b.pt c.pt --target-domain monet \
        --reference monet_refs/ --video ref out/monet.mp4

`--grid` writes `grid.png` into --output instead of one file per output; `--video MODE FILE` writes
FILE (.mp4, .mkv lossless, or .gif), with or without --output.
"""

import argparse
import contextlib
import os
import sys

import torch
from PIL import Image
from tqdm import tqdm

from arguments import bounded, check_not_inputs
from config import latent_space
from inference import (DEFAULT_LATENT_SIZE, MEAN_STYLE_SAMPLES, check_psi, domain_index, latent_styles, load_networks,
                       open_preview_for, open_vae_for, output_name, reference_styles, training_latent_size,
                       translate_pairs)
from latents import LATENT_SUFFIXES, check_root_space, file_stem, read_latent
from runtime import InputError, atomic_write, check_seed, output_folder, resolve_device, script_main
from sampling import (FPS, FRAMES_PER_TRANSITION, HOLD_FRAMES, check_video_path, default_hold, interpolation_schedule,
                      num_frames, reference_grid, source_grid, video_frames, write_video)
from vae import (IMAGE_EXTENSIONS, encode_raw, inspect_image, load_image, picture_source, save_image_grid,
                 to_model_input, to_rgb, to_uint8, vae_downsample_factor)

MAX_STYLES, MAX_BATCH = 1024, 4096  # styles per source (outputs: sources x styles), samples per forward pass
MIN_FPS, MAX_FPS, MAX_FRAMES = 0.1, 240, 10000  # a video's pace and frames per transition
MAX_CELL_SIZE = 2048  # pixels per side of a grid or video cell
SHEET_MAX_ROWS = 32  # sources shown in sheet.png (every output still gets its own PNG)
SHEET_MAX_COLS = 16  # outputs per source shown in sheet.png
GRID_MAX = 32  # --grid: sources and references in the one picture
VIDEO_MAX_SOURCES = 16  # --video: sources in the row (the official uses a batch of 8 or so)


def build_parser():
    p = argparse.ArgumentParser(
        description="Translate latents (or images, with a VAE) to a target domain with a Latent StarGAN v2 "
                    "checkpoint. Writes <stem>_to_<domain>_<k>.pt (raw float32 latent [C, h, w]; C: the VAE's "
                    "latent channels, 4 for SD1.5) and <stem>_to_<domain>_<k>.png per output, and one sheet.png "
                    "(rows: sources; columns: the source, then its outputs); or, as StarGAN v2's sample mode, the "
                    "reference grid (--grid) and style-interpolation videos (--video).")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by run.py (e.g. <checkpoint_dir>/latest.pt)")
    p.add_argument("--source", required=True, nargs="+",
                   help="latent files (.pt/.npy, [C, h, w] or [1, C, h, w], raw) or folders of them (not "
                        "recursive, sorted by name), in the order given; images (" + ", ".join(IMAGE_EXTENSIONS) +
                        ") too when a VAE loads: centre-cropped, resized so that their latent matches the training "
                        "latent size (else 256 px), and encoded to the posterior mode")
    p.add_argument("--target-domain", required=True, nargs="+",
                   help="one of the checkpoint's domains; several only with --video latent (one segment each)")
    p.add_argument("--reference", default=None, nargs="+",
                   help="reference-guided: reference latents/images or folders of them. Every source is "
                        "translated with every reference: N sources and M references give N*M outputs, "
                        "output k of a source uses the k-th reference (folders in name order)")
    p.add_argument("--num-styles", type=bounded(int, 1, MAX_STYLES), default=None,
                   help="latent-guided: K styles from the mapping network; style k is the same for every "
                        "source: z = torch.randn(K, latent_dim, generator=torch.Generator().manual_seed(seed))[k]")
    p.add_argument("--seed", type=int, default=None, help="latent-guided: seed of the z draws (default 0)")
    p.add_argument("--psi", type=float, default=None,
                   help="latent-guided: truncation toward the domain's mean style (mean of F over "
                        f"{MEAN_STYLE_SAMPLES} z): s = mean + psi * (s - mean); 1.0 (default) = none, 0 = the mean")
    p.add_argument("--output", default=None,
                   help="output folder (created if missing; outputs of the same name are replaced, others kept with a "
                        "warning). Needed unless --video is given")
    add_sample_mode_flags(p)
    p.add_argument("--vae", default=None,
                   help="diffusers AutoencoderKL (local folder or hub id) for PNGs and image inputs; default: "
                        "the checkpoint's visualization.vae_path. When none loads, PNGs use the linear latent "
                        "preview (one warning) and image inputs are an error")
    p.add_argument("--vae-subfolder", default=None,
                   help="subfolder of the VAE ('vae' for a full Stable Diffusion pipeline); default none "
                        "(with --vae) or the checkpoint's visualization.vae_subfolder")
    p.add_argument("--preview-vae", default=None,
                   help="diffusers AutoencoderTiny (TAESD: madebyollin/taesd, taesdxl, taesd3, taef1; local folder "
                        "or hub id) that decodes the PNGs, grid and video instead of the VAE, in milliseconds; image "
                        "inputs are still encoded by the VAE. Default: the checkpoint's visualization.preview_vae")
    p.add_argument("--device", default=None, help="cuda | cuda:N | cpu (default: cuda when available)")
    p.add_argument("--batch-size", type=bounded(int, 1, MAX_BATCH), default=16,
                   help="generator samples (source x style pairs) per forward pass; also the VAE batch")
    return p


def add_sample_mode_flags(p):
    """--grid, --video and their settings: StarGAN v2's sample mode."""
    p.add_argument("--grid", action="store_true",
                   help="reference-guided: write one picture, <output>/grid.png, instead of a file per output: the "
                        "references along the top, the sources down the side, each cell the source in that "
                        f"reference's style (StarGAN v2's reference.jpg); at most {GRID_MAX} of each")
    p.add_argument("--video", nargs=2, metavar=("MODE", "FILE"), default=None,
                   help="MODE ref (with --reference: the style glides from each reference to the next, the "
                        "reference sliding in beside the row) or latent (with --num-styles K: through K random styles "
                        "of each --target-domain, cutting between domains); FILE .mp4 (H.264), .mkv (lossless "
                        f"FFV1) or .gif. Frames: a row of the sources (at most {VIDEO_MAX_SOURCES}) above their "
                        "translations")
    p.add_argument("--fps", type=bounded(float, MIN_FPS, MAX_FPS), default=FPS, help=f"--video: frames per second (default {FPS}, the official's pace)")
    p.add_argument("--frames-per-transition", type=bounded(int, 2, MAX_FRAMES), default=FRAMES_PER_TRANSITION,
                   help="--video: frames from one key style to the next, the holds included (default "
                        f"{FRAMES_PER_TRANSITION}: 1 + {FRAMES_PER_TRANSITION - 1 - HOLD_FRAMES} eased by a sigmoid + "
                        f"{HOLD_FRAMES} held, as the official)")
    p.add_argument("--hold-frames", type=bounded(int, 0, MAX_FRAMES), default=None,
                   help="--video: frames held at each key style, and again at the end (default: the official's "
                        f"proportion, {HOLD_FRAMES} of {FRAMES_PER_TRANSITION}, rounded)")
    p.add_argument("--cell-size", type=bounded(int, 1, MAX_CELL_SIZE), default=None,
                   help="--grid and --video: side in pixels of every picture (default: as decoded, the latent "
                        "size x 8); smaller makes small GIFs")


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if (args.reference is None) == (args.num_styles is None):
        p.error("give exactly one of --reference (reference-guided) or --num-styles (latent-guided)")
    if args.reference is not None and (args.seed is not None or args.psi is not None):
        p.error("--seed and --psi apply to latent-guided translation (--num-styles) only")
    if args.num_styles is not None and args.num_styles < 1:
        p.error("--num-styles must be >= 1")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    try:
        args.seed = check_seed(0 if args.seed is None else args.seed)
        args.psi = check_psi(1.0 if args.psi is None else args.psi)
    except InputError as e:
        p.error(str(e))
    check_products(p, args)
    return args


def check_products(p, args):
    """What to write: per-output files (--output), the grid (--grid, into --output), a video."""
    if args.grid and (args.reference is None or args.output is None):
        p.error("--grid needs --reference (its header row) and --output (the folder for grid.png)")
    if args.output is None and args.video is None:
        p.error("give --output (a folder for the translations or the grid) or --video MODE FILE")
    if len(args.target_domain) > 1 and not (args.video is not None and args.video[0] == "latent" and
                                            args.output is None):
        p.error("several --target-domain values are for --video latent alone (one segment per domain); "
                "translations and the grid take one")
    if args.cell_size is not None and args.cell_size < 1:
        p.error("--cell-size must be >= 1")
    if args.video is None:
        return
    mode = args.video[0]
    if mode not in ("ref", "latent"):
        p.error(f"--video mode {mode!r}: expected ref or latent")
    if mode == "ref" and args.reference is None:
        p.error("--video ref interpolates between references: give --reference (at least 2)")
    if mode == "latent" and (args.num_styles is None or args.num_styles < 2):
        p.error("--video latent interpolates between random styles: give --num-styles K with K >= 2")
    if args.hold_frames is None:
        args.hold_frames = default_hold(args.frames_per_transition)
    if not args.fps > 0 or args.fps > 240:
        p.error(f"--fps {args.fps}: expected a number above 0 and at most 240")
    if args.hold_frames < 0 or args.frames_per_transition < args.hold_frames + 2:
        p.error(f"--frames-per-transition {args.frames_per_transition} must be at least --hold-frames "
                f"{args.hold_frames} + 2 (the first frame and one eased frame), and --hold-frames >= 0")


def warn(message):
    print(f"translate.py: warning: {message}", file=sys.stderr)


# ------------------------------------------------------------------ inputs

def list_inputs(paths, flag):
    """Files given, and the latent / image files of folders given (not recursive, sorted, hidden files
    skipped), in the order given."""
    suffixes = LATENT_SUFFIXES + IMAGE_EXTENSIONS
    files = []
    for path in map(os.path.expanduser, paths):
        if os.path.isfile(path):
            if not path.lower().endswith(suffixes):
                raise InputError(f"{flag} {path!r}: expected a latent ({', '.join(LATENT_SUFFIXES)}) or an image "
                                 f"({', '.join(IMAGE_EXTENSIONS)})")
            files.append(path)
            continue
        if not os.path.isdir(path):
            raise InputError(f"{flag} {path!r} does not exist")
        found = sorted(os.path.join(path, name) for name in os.listdir(path)
                       if not name.startswith(".") and name.lower().endswith(suffixes)
                       and os.path.isfile(os.path.join(path, name)))
        if not found:
            raise InputError(f"{flag} folder {path!r} holds no latents ({', '.join(LATENT_SUFFIXES)}) or images "
                             f"({', '.join(IMAGE_EXTENSIONS)})")
        files += found
    return files


def check_distinct_stems(paths, flag):
    """Outputs are named by their source's stem: two sources of one stem would write the same files."""
    stems = [file_stem(p) for p in paths]
    clashes = sorted({s for s in stems if stems.count(s) > 1})
    if clashes:
        raise InputError(f"{flag} inputs share a file name stem and would write the same outputs: "
                         f"{', '.join(clashes)}; rename one of each")


def is_image(path):
    return path.lower().endswith(IMAGE_EXTENSIONS)


def read_latents(paths, space):
    """Latent files of the LatentSpace `space` -> {path: raw [C, h, w] float32}; errors name the file, and a
    data root's manifest (beside the file or one folder up) that names another space is refused."""
    for root in sorted({os.path.dirname(os.path.abspath(p)) for p in paths}):
        for folder in (root, os.path.dirname(root)):
            check_root_space(folder, space)
    return {path: read_latent(path, space.channels) for path in paths}


@torch.no_grad()
def encode_images(vae, paths, image_size, batch_size):
    """Images -> {path: raw [C, h, w]}: centre crop, resize to `image_size`, VAE posterior mode."""
    latents = {}
    with progress_bar(len(paths), "encoding images", "image") as bar:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            images = []
            for path in chunk:
                inspect_image(path, image_size, what=f"image {path}")  # encode.py's rule: not too small to upscale
                try:
                    images.append(load_image(path, image_size))  # uint8 [S, S, 3]
                except Exception as e:
                    raise InputError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
            raw = encode_raw(vae, to_model_input(images)).cpu()  # [b, 4, S/f, S/f]
            latents.update(zip(chunk, raw))
            bar.update(len(chunk))
    return latents


def stack_inputs(paths, latents, flag):
    """[N, C, h, w] in the order of `paths`; every input of one flag must share its shape."""
    shapes = {tuple(latents[p].shape) for p in paths}
    if len(shapes) > 1:
        listing = "\n  ".join(f"{p}: {list(latents[p].shape)}" for p in paths)
        raise InputError(f"{flag} inputs have different shapes; they must all share one [C, h, w]:\n  {listing}")
    return torch.stack([latents[p] for p in paths])


# ------------------------------------------------------------------ outputs

def save_outputs(raw, rgb, names, output_dir):
    """Per output: `<name>.pt` (raw float32 [C, h, w]) and `<name>.png`."""
    pixels = to_uint8(rgb)  # [B, H, W, 3]
    for latent, image, name in zip(raw, pixels, names):
        atomic_write(os.path.join(output_dir, f"{name}.pt"), lambda f: torch.save(latent.clone(), f))
        atomic_write(os.path.join(output_dir, f"{name}.png"), lambda f: Image.fromarray(image).save(f, format="PNG"))


def write_outputs(args, nets, sources, styles, space, vae, names):
    """Translate every (source, style) pair, writing each chunk's outputs as they come. Returns the RGB
    of the pairs shown in the sheet, {(source i, style k): [3, H, W]}."""
    num_styles, sheet_cells = styles.shape[0], {}
    with progress_bar(len(names), "translating", "output") as bar:
        for chunk, raw in translate_pairs(nets["generator"], sources, styles, space, args.batch_size,
                                          args.device):
            rgb = to_rgb(raw, vae, space, args.batch_size)  # [b, 3, H, W]
            save_outputs(raw, rgb, [names[i] for i in chunk.tolist()], args.output)
            for j, pair in enumerate(chunk.tolist()):
                i, k = divmod(pair, num_styles)
                if i < SHEET_MAX_ROWS and k < SHEET_MAX_COLS:
                    sheet_cells[(i, k)] = rgb[j]
            bar.update(len(chunk))
    return sheet_cells


def progress_bar(total, desc, unit):
    """A tqdm bar on stderr for work that may take minutes (a VAE decode on the CPU is seconds per
    picture); none for a single batch's worth."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, disable=total < 2)


def write_sheet(path, source_rgb, sheet_cells, num_styles, row_labels, col_labels, ref_rgb=None):
    """Rows: sources (plus, reference-guided, a first row of the references); columns: source, outputs."""
    rows, cols = source_rgb.shape[0], min(num_styles, SHEET_MAX_COLS)
    outputs = torch.stack([torch.stack([sheet_cells[(i, k)] for k in range(cols)]) for i in range(rows)])
    cells, nrow = source_grid(source_rgb, outputs, None if ref_rgb is None else ref_rgb[:cols])
    return save_image_grid(path, cells, nrow=nrow, row_labels=(["references"] if ref_rgb is not None else []) + row_labels,
                           col_labels=["source"] + col_labels[:cols])


def warn_about_stale_outputs(output_dir, names):
    """Never delete what a user has; say when the folder also holds outputs of an earlier run."""
    stale = sorted(set(f[:-3] for f in os.listdir(output_dir) if f.endswith(".pt") and "_to_" in f) - set(names))
    if stale:
        warn(f"{output_dir} already holds {len(stale)} output latent(s) of an earlier run (e.g. {stale[0]}.pt); "
             "they are kept: use a fresh --output folder for one latent per output of this run")


# ------------------------------------------------------------------ run

def load_inputs(args, cfg, vae, source_paths, ref_paths):
    """{path: raw [C, h, w]} for every source and reference: latent files read, images encoded."""
    images = [p for p in source_paths + ref_paths if is_image(p)]
    if images and vae is None:
        raise InputError(f"image inputs ({images[0]}{' ...' if len(images) > 1 else ''}) need a VAE to be "
                         "encoded; pass --vae")
    latents = read_latents([p for p in source_paths + ref_paths if not is_image(p)], latent_space(cfg))
    if images:
        from_sources = [latents[p].shape[-1] for p in source_paths if p in latents]
        latent_size = from_sources[0] if from_sources else training_latent_size(cfg, default=None)
        image_size = (latent_size or DEFAULT_LATENT_SIZE) * vae_downsample_factor(vae)
        print(f"encoding {len(images)} image(s) at {image_size}x{image_size} px "
              f"({'latent size ' + str(latent_size) if latent_size else 'training latent size unknown'})")
        latents.update(encode_images(vae, images, image_size, args.batch_size))
    return latents


def run(args):
    args.device = resolve_device(args.device, fallback=False)
    cfg, nets = load_networks(args.checkpoint, args.device)
    domain_ids = [domain_index(cfg, d) for d in args.target_domain]
    source_paths = list_inputs(args.source, "--source")
    ref_paths = list_inputs(args.reference, "--reference") if args.reference is not None else []
    check_counts(args, source_paths, ref_paths)
    check_not_inputs(planned_outputs(args, cfg, domain_ids, source_paths, ref_paths),
                     [*source_paths, *ref_paths, args.checkpoint])
    folders = [(args.output, "--output")] if args.output is not None else []
    if args.video is not None:
        folders.append((os.path.dirname(os.path.abspath(os.path.expanduser(args.video[1]))), "--video's folder"))
    with contextlib.ExitStack() as stack:
        for folder, flag in folders:
            stack.enter_context(output_folder(folder, flag))
        return translate(args, cfg, nets, domain_ids, source_paths, ref_paths)


def planned_outputs(args, cfg, domain_ids, source_paths, ref_paths):
    """(path, flag) of every file this run may write: checked against the inputs before any work."""
    planned = [(args.video[1], "--video")] if args.video is not None else []
    if args.output is None:
        return planned
    if args.grid:
        return planned + [(os.path.join(args.output, "grid.png"), "--output")]
    domain = cfg["data"]["domains"][domain_ids[0]]
    names = [output_name(file_stem(p), domain, k) for p in source_paths
             for k in range(len(ref_paths) if ref_paths else args.num_styles)]
    files = [f"{name}{suffix}" for name in names for suffix in (".pt", ".png")] + ["sheet.png"]
    return planned + [(os.path.join(args.output, name), "--output") for name in files]


def translate(args, cfg, nets, domain_ids, source_paths, ref_paths):
    space = latent_space(cfg)
    vae, why = open_vae_for(cfg, args.vae, args.vae_subfolder, args.device)  # None: the linear latent preview
    latents = load_inputs(args, cfg, vae, source_paths, ref_paths)
    tiny, tiny_why = open_preview_for(cfg, args.preview_vae, args.device)  # pictures only: never encodes
    for line in tiny_why:
        warn(line.removeprefix("warning: "))
    vae = tiny if tiny is not None else vae  # from here on `vae` only draws pictures
    if vae is None:
        warn("; ".join(why).removeprefix("warning: "))  # it says why, and that pictures use the latent preview
    sources = stack_inputs(source_paths, latents, "--source")  # [N, C, h, w] raw, CPU
    refs = stack_inputs(ref_paths, latents, "--reference") if ref_paths else None  # [M, C, h', w'] raw

    if args.output is not None and not args.grid:
        translate_each(args, cfg, nets, vae, sources, source_paths, refs, ref_paths, domain_ids[0])
    if args.grid:
        path = reference_grid_file(args, nets, vae, space, sources, source_paths, refs, ref_paths, domain_ids[0])
        print(f"grid: {len(source_paths)} source(s) x {len(ref_paths)} reference(s) -> {path} "
              f"({picture_source(vae)})")
    if args.video is not None:
        video_file(args, cfg, nets, vae, sources, refs, domain_ids)
    return 0


def check_counts(args, source_paths, ref_paths):
    """Inputs that a product cannot take, before any work."""
    if args.output is not None and not args.grid:
        check_distinct_stems(source_paths, "--source")
    if args.grid and max(len(source_paths), len(ref_paths)) > GRID_MAX:
        raise InputError(f"--grid draws at most {GRID_MAX} sources and {GRID_MAX} references in one picture; got "
                         f"{len(source_paths)} and {len(ref_paths)}: pass fewer")
    if args.video is None:
        return
    check_video_path(args.video[1])
    if len(source_paths) > VIDEO_MAX_SOURCES:
        raise InputError(f"--video shows at most {VIDEO_MAX_SOURCES} sources in its row; got {len(source_paths)}: "
                         "pass fewer --source files")
    if args.video[0] == "ref" and len(ref_paths) < 2:
        raise InputError(f"--video ref interpolates between references; --reference gives {len(ref_paths)}: "
                         "give at least 2")


def translate_each(args, cfg, nets, vae, sources, source_paths, refs, ref_paths, domain_id):
    """One latent and one PNG per (source, style) pair, and sheet.png, into --output."""
    space = latent_space(cfg)
    if refs is not None:  # styles: [M, S] one per reference, or [K, S] from the mapping network
        styles = reference_styles(nets["style_encoder"], refs, domain_id, space, args.batch_size, args.device)
        col_labels = [file_stem(p) for p in ref_paths]
    else:
        styles = latent_styles(nets["mapping_network"], domain_id, args.num_styles, cfg["model"]["latent_dim"],
                               args.seed, args.psi, args.device)
        col_labels = [f"style {k}" for k in range(args.num_styles)]

    stems = [file_stem(p) for p in source_paths]
    domain = cfg["data"]["domains"][domain_id]
    names = [output_name(s, domain, k) for s in stems for k in range(styles.shape[0])]
    warn_about_stale_outputs(args.output, names)
    sheet_cells = write_outputs(args, nets, sources, styles, space, vae, names)
    ref_rgb = to_rgb(refs[:SHEET_MAX_COLS], vae, space, args.batch_size) if refs is not None else None
    sheet = write_sheet(os.path.join(args.output, "sheet.png"),
                        to_rgb(sources[:SHEET_MAX_ROWS], vae, space, args.batch_size), sheet_cells,
                        styles.shape[0], stems[:SHEET_MAX_ROWS], col_labels, ref_rgb)
    report(args, source_paths, ref_paths, styles.shape[0], len(names), vae, sheet)


def report(args, source_paths, ref_paths, num_styles, num_outputs, vae, sheet):
    mode = "reference" if ref_paths else "style"
    print(f"{len(source_paths)} source(s) x {num_styles} {mode}(s) -> {num_outputs} outputs in {args.output} "
          f"(PNGs: {picture_source(vae)}); sheet {sheet}")
    for k, p in enumerate(ref_paths):
        print(f"  _{k}: reference {p}")
    if len(source_paths) > SHEET_MAX_ROWS or num_styles > SHEET_MAX_COLS:
        print(f"  the sheet shows the first {SHEET_MAX_ROWS} sources x {SHEET_MAX_COLS} outputs")


def reference_grid_file(args, nets, vae, space, sources, source_paths, refs, ref_paths, domain_id):
    """<output>/grid.png: StarGAN v2's reference.jpg, labelled with the files' stems."""
    with progress_bar(len(sources) * len(refs), "grid", "cell") as bar:
        cells, rows = reference_grid(nets["generator"], nets["style_encoder"], sources, refs, domain_id, space,
                                     vae, args.batch_size, args.device, args.cell_size, on_batch=bar.update)
    path = os.path.join(args.output, "grid.png")
    return save_image_grid(path, cells, nrow=rows, row_labels=["references"] + [file_stem(p) for p in source_paths],
                           col_labels=["source"] + [file_stem(p) for p in ref_paths])


def video_file(args, cfg, nets, vae, sources, refs, domain_ids):
    """The interpolation video: key styles from the references (ref) or K random styles per target
    domain (latent, psi applied), the frames rendered in batches and streamed to the encoder."""
    mode, path = args.video
    space = latent_space(cfg)
    if mode == "ref":
        key_styles = reference_styles(nets["style_encoder"], refs, domain_ids[0], space, args.batch_size,
                                      args.device)  # [M, S]
        keys_per_segment, key_latents = [refs.shape[0]], refs
    else:
        key_styles = torch.cat([latent_styles(nets["mapping_network"], d, args.num_styles, cfg["model"]["latent_dim"],
                                              args.seed, args.psi, args.device) for d in domain_ids])  # [D*K, S]
        keys_per_segment, key_latents = [args.num_styles] * len(domain_ids), None
    schedule = interpolation_schedule(keys_per_segment, args.frames_per_transition, args.hold_frames)
    frames = video_frames(nets["generator"], sources, key_styles, schedule, space, vae, key_latents,
                          args.batch_size, args.device, args.cell_size)
    total = num_frames(keys_per_segment, args.frames_per_transition, args.hold_frames)
    with tqdm(total=total, unit="frame", desc=f"video {mode}", file=sys.stderr) as bar:
        path, count = write_video(path, frames, args.fps, on_frames=bar.update)
    domains = ", ".join(cfg["data"]["domains"][d] for d in domain_ids)
    print(f"video: {sources.shape[0]} source(s), {sum(keys_per_segment)} key styles ({mode}; {domains}) -> {path}: "
          f"{count} frames at {args.fps:g} fps ({picture_source(vae)})")


def main(argv=None):
    """Exit codes: 0 done, 2 bad arguments, checkpoint or inputs (message on stderr; OSError: an
    unwritable --output), 1 a failed write, 130 Ctrl-C."""
    return script_main("translate.py", parse_args, run, argv, errors=(InputError, OSError))


if __name__ == "__main__":
    sys.exit(main())
