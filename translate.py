"""Translate latents (or images) with a trained Latent StarGAN v2 checkpoint.

    # latent-guided: 4 random styles of the target domain per source, truncated toward its mean
    python translate.py --checkpoint runs/latest.pt --source photos/ --target-domain monet \\
        --num-styles 4 --seed 0 --psi 0.7 --output out/
    # reference-guided: the style of each reference, one output per (source, reference) pair
    python translate.py --checkpoint runs/latest.pt --source photos/ --target-domain monet \\
        --reference monet_refs/ --output out/ --vae stabilityai/sd-vae-ft-mse

G, F and E are rebuilt from the checkpoint alone (its saved config) and run with the EMA weights.
Latents on disk are raw; the networks see `raw * training.latent_scale` and their outputs are divided
back before saving or decoding. The output folder holds one raw float32 latent `[4, h, w]` per output,
`<stem>_to_<domain>_<k>.pt`, its PNG (VAE decode, or the linear latent preview when no VAE loads),
and one `sheet.png` (rows: sources; columns: the source, then its outputs).
"""

import argparse
import os
import sys

import torch
from PIL import Image

from dataset import LATENT_SUFFIXES, read_latent
from inference import (DEFAULT_LATENT_SIZE, MEAN_STYLE_SAMPLES, domain_index, latent_styles, load_networks,
                       open_vae_for, reference_styles, training_latent_size, translate_pairs)
from runtime import (InputError, atomic_write, check_psi, check_seed, check_writable_folder, remove_if_empty,
                     resolve_device, run_script)
from vae import (IMAGE_EXTENSIONS, encode_raw, inspect_image, load_image, save_image_grid, to_model_input, to_rgb,
                 to_uint8, vae_downsample_factor)

SHEET_MAX_ROWS = 32  # sources shown in sheet.png (every output still gets its own PNG)
SHEET_MAX_COLS = 16  # outputs per source shown in sheet.png


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Translate latents (or images, with a VAE) to a target domain with a Latent StarGAN v2 "
                    "checkpoint. Writes <stem>_to_<domain>_<k>.pt (raw float32 latent [4, h, w]) and "
                    "<stem>_to_<domain>_<k>.png per output, and one sheet.png (rows: sources; columns: the "
                    "source, then its outputs).")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by run.py (e.g. <checkpoint_dir>/latest.pt)")
    p.add_argument("--source", required=True,
                   help="a latent file (.pt/.npy, [4, h, w] or [1, 4, h, w], raw) or a folder of them (not "
                        "recursive, sorted by name); images (" + ", ".join(IMAGE_EXTENSIONS) + ") too when a VAE "
                        "loads: centre-cropped, resized so that their latent matches the training latent size "
                        "(else 256 px), and encoded to the posterior mode")
    p.add_argument("--target-domain", required=True, help="one of the checkpoint's domains")
    p.add_argument("--reference", default=None,
                   help="reference-guided: a reference latent/image or a folder of them. Every source is "
                        "translated with every reference: N sources and M references give N*M outputs, "
                        "output k of a source uses the k-th reference in name order")
    p.add_argument("--num-styles", type=int, default=None,
                   help="latent-guided: K styles from the mapping network; style k is the same for every "
                        "source: z = torch.randn(K, latent_dim, generator=torch.Generator().manual_seed(seed))[k]")
    p.add_argument("--seed", type=int, default=None, help="latent-guided: seed of the z draws (default 0)")
    p.add_argument("--psi", type=float, default=None,
                   help="latent-guided: truncation toward the domain's mean style (mean of F over "
                        f"{MEAN_STYLE_SAMPLES} z): s = mean + psi * (s - mean); 1.0 (default) = none, 0 = the mean")
    p.add_argument("--output", required=True, help="output folder (created if missing; outputs of the same name are replaced, others kept with a warning)")
    p.add_argument("--vae", default=None,
                   help="diffusers AutoencoderKL (local folder or hub id) for PNGs and image inputs; default: "
                        "the checkpoint's visualization.vae_path. When none loads, PNGs use the linear latent "
                        "preview (one warning) and image inputs are an error")
    p.add_argument("--vae-subfolder", default=None,
                   help="subfolder of the VAE ('vae' for a full Stable Diffusion pipeline); default none "
                        "(with --vae) or the checkpoint's visualization.vae_subfolder")
    p.add_argument("--device", default=None, help="cuda | cuda:N | cpu (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="generator samples (source x style pairs) per forward pass; also the VAE batch")
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
    return args


def warn(message):
    print(f"translate.py: warning: {message}", file=sys.stderr)


# ------------------------------------------------------------------ inputs

def list_inputs(path, flag):
    """A file, or the latent / image files of a folder (not recursive, sorted, hidden files skipped)."""
    path = os.path.expanduser(path)
    suffixes = LATENT_SUFFIXES + IMAGE_EXTENSIONS
    if os.path.isfile(path):
        if not path.lower().endswith(suffixes):
            raise InputError(f"{flag} {path!r}: expected a latent ({', '.join(LATENT_SUFFIXES)}) or an image "
                                 f"({', '.join(IMAGE_EXTENSIONS)})")
        return [path]
    if not os.path.isdir(path):
        raise InputError(f"{flag} {path!r} does not exist")
    files = sorted(os.path.join(path, name) for name in os.listdir(path)
                   if not name.startswith(".") and name.lower().endswith(suffixes)
                   and os.path.isfile(os.path.join(path, name)))
    if not files:
        raise InputError(f"{flag} folder {path!r} holds no latents ({', '.join(LATENT_SUFFIXES)}) or images "
                             f"({', '.join(IMAGE_EXTENSIONS)})")
    stems = [os.path.splitext(os.path.basename(f))[0] for f in files]
    clashes = sorted({s for s in stems if stems.count(s) > 1})
    if clashes:
        raise InputError(f"{flag} folder {path!r}: files differ only by extension and would write the same "
                             f"outputs: {', '.join(clashes)}; rename one of each")
    return files


def is_image(path):
    return path.lower().endswith(IMAGE_EXTENSIONS)


def read_latents(paths):
    """Latent files -> {path: raw [4, h, w] float32}; errors name the file."""
    return {path: read_latent(path) for path in paths}


@torch.no_grad()
def encode_images(vae, paths, image_size, batch_size):
    """Images -> {path: raw [4, h, w]}: centre crop, resize to `image_size`, VAE posterior mode."""
    latents = {}
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
    return latents


def stack_inputs(paths, latents, flag):
    """[N, 4, h, w] in the order of `paths`; every input of one flag must share its shape."""
    shapes = {tuple(latents[p].shape) for p in paths}
    if len(shapes) > 1:
        listing = "\n  ".join(f"{p}: {list(latents[p].shape)}" for p in paths)
        raise InputError(f"{flag} inputs have different shapes; they must all share one [4, h, w]:\n  {listing}")
    return torch.stack([latents[p] for p in paths])


# ------------------------------------------------------------------ outputs

def save_outputs(raw, rgb, names, output_dir):
    """Per output: `<name>.pt` (raw float32 [4, h, w]) and `<name>.png`."""
    pixels = to_uint8(rgb)  # [B, H, W, 3]
    for latent, image, name in zip(raw, pixels, names):
        atomic_write(os.path.join(output_dir, f"{name}.pt"), lambda f: torch.save(latent.clone(), f))
        atomic_write(os.path.join(output_dir, f"{name}.png"), lambda f: Image.fromarray(image).save(f, format="PNG"))


def write_outputs(args, nets, sources, styles, latent_scale, vae, names):
    """Translate every (source, style) pair, writing each chunk's outputs as they come. Returns the RGB
    of the pairs shown in the sheet, {(source i, style k): [3, H, W]}."""
    num_styles, sheet_cells = styles.shape[0], {}
    for chunk, raw in translate_pairs(nets["generator"], sources, styles, latent_scale, args.batch_size, args.device):
        rgb = to_rgb(raw, vae, latent_scale, args.batch_size)  # [b, 3, H, W]
        save_outputs(raw, rgb, [names[i] for i in chunk.tolist()], args.output)
        for j, pair in enumerate(chunk.tolist()):
            i, k = divmod(pair, num_styles)
            if i < SHEET_MAX_ROWS and k < SHEET_MAX_COLS:
                sheet_cells[(i, k)] = rgb[j]
    return sheet_cells


def write_sheet(path, source_rgb, sheet_cells, num_styles, row_labels, col_labels, ref_rgb=None):
    """Rows: sources (plus, reference-guided, a first row of the references); columns: source, outputs."""
    rows, cols = source_rgb.shape[0], min(num_styles, SHEET_MAX_COLS)
    blank = torch.ones_like(source_rgb[0])
    cells = []
    if ref_rgb is not None:
        cells += [blank] + list(ref_rgb[:cols])
        row_labels = ["references"] + row_labels
    for i in range(rows):
        cells += [source_rgb[i]] + [sheet_cells[(i, k)] for k in range(cols)]
    return save_image_grid(path, torch.stack(cells), nrow=len(row_labels), row_labels=row_labels,
                           col_labels=["source"] + col_labels[:cols])


def warn_about_stale_outputs(output_dir, names):
    """Never delete what a user has; say when the folder also holds outputs of an earlier run."""
    stale = sorted(set(f[:-3] for f in os.listdir(output_dir) if f.endswith(".pt") and "_to_" in f) - set(names))
    if stale:
        warn(f"{output_dir} already holds {len(stale)} output latent(s) of an earlier run (e.g. {stale[0]}.pt); "
             "they are kept: use a fresh --output folder for one latent per output of this run")


# ------------------------------------------------------------------ run

def open_vae(args, cfg, device):
    """The VAE for PNGs and image inputs, or None (linear latent preview); and why it is None."""
    problems = []
    return open_vae_for(cfg, args.vae, args.vae_subfolder, device, problems.append), "; ".join(problems)


def load_inputs(args, cfg, vae, source_paths, ref_paths):
    """{path: raw [4, h, w]} for every source and reference: latent files read, images encoded."""
    images = [p for p in source_paths + ref_paths if is_image(p)]
    if images and vae is None:
        raise InputError(f"image inputs ({images[0]}{' ...' if len(images) > 1 else ''}) need a VAE to be "
                         "encoded; pass --vae")
    latents = read_latents([p for p in source_paths + ref_paths if not is_image(p)])
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
    domain_id = domain_index(cfg, args.target_domain)
    source_paths = list_inputs(args.source, "--source")
    ref_paths = list_inputs(args.reference, "--reference") if args.reference is not None else []
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise InputError(f"--output {args.output!r} exists and is not a folder")
    created = check_writable_folder(args.output, "--output")  # before the VAE, the encoding, the outputs
    try:
        return translate(args, cfg, nets, domain_id, source_paths, ref_paths)
    finally:
        if created:  # a run that failed before writing anything leaves no empty folder behind
            remove_if_empty(args.output)


def translate(args, cfg, nets, domain_id, source_paths, ref_paths):
    latent_scale = cfg["training"]["latent_scale"]
    vae, vae_problem = open_vae(args, cfg, args.device)
    latents = load_inputs(args, cfg, vae, source_paths, ref_paths)
    if vae is None:
        warn(f"{vae_problem}: PNGs use the linear latent preview")
    sources = stack_inputs(source_paths, latents, "--source")  # [N, 4, h, w] raw, CPU

    if ref_paths:  # styles: [M, S] one per reference, or [K, S] from the mapping network
        refs = stack_inputs(ref_paths, latents, "--reference")  # [M, 4, h', w'] raw
        styles = reference_styles(nets["style_encoder"], refs, domain_id, latent_scale, args.batch_size, args.device)
        col_labels = [os.path.splitext(os.path.basename(p))[0] for p in ref_paths]
    else:
        styles = latent_styles(nets["mapping_network"], domain_id, args.num_styles, cfg["model"]["latent_dim"],
                               args.seed, args.psi, args.device)
        col_labels = [f"style {k}" for k in range(args.num_styles)]

    stems = [os.path.splitext(os.path.basename(p))[0] for p in source_paths]
    names = [f"{stem}_to_{args.target_domain}_{k}" for stem in stems for k in range(styles.shape[0])]
    warn_about_stale_outputs(args.output, names)
    sheet_cells = write_outputs(args, nets, sources, styles, latent_scale, vae, names)

    ref_rgb = to_rgb(refs[:SHEET_MAX_COLS], vae, latent_scale, args.batch_size) if ref_paths else None
    if ref_rgb is not None and ref_rgb.shape[2:] != sheet_cells[(0, 0)].shape[1:]:
        ref_rgb = None  # references of another size than the sources: leave their row out
    sheet = write_sheet(os.path.join(args.output, "sheet.png"),
                        to_rgb(sources[:SHEET_MAX_ROWS], vae, latent_scale, args.batch_size), sheet_cells,
                        styles.shape[0], stems[:SHEET_MAX_ROWS], col_labels, ref_rgb)
    report(args, source_paths, ref_paths, styles.shape[0], len(names), vae, sheet)
    return 0


def report(args, source_paths, ref_paths, num_styles, num_outputs, vae, sheet):
    mode = "reference" if ref_paths else "style"
    print(f"{len(source_paths)} source(s) x {num_styles} {mode}(s) -> {num_outputs} outputs in {args.output} "
          f"(PNGs: {'VAE decode' if vae is not None else 'latent preview'}); sheet {sheet}")
    for k, p in enumerate(ref_paths):
        print(f"  _{k}: reference {p}")
    if len(source_paths) > SHEET_MAX_ROWS or num_styles > SHEET_MAX_COLS:
        print(f"  the sheet shows the first {SHEET_MAX_ROWS} sources x {SHEET_MAX_COLS} outputs")


def main(argv=None):
    """Exit codes: 0 done, 2 bad arguments, checkpoint or inputs (message on stderr)."""
    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse: usage errors (2) and --help (0)
        return e.code if isinstance(e.code, int) else 2
    return run_script("translate.py", run, args, errors=(InputError, OSError))  # OSError: an unwritable --output


if __name__ == "__main__":
    sys.exit(main())
