"""Images -> raw VAE latents: prepares `data.root`.

    python encode.py --input images/photo --output ../../latent-256/photo \\
        --vae stabilityai/sd-vae-ft-mse --size 256

Every image under --input (searched recursively; subfolders are mirrored under --output) is
converted to RGB, centre-cropped to a square, resized to --size (bicubic), scaled to [-1, 1] and
encoded by a diffusers `AutoencoderKL` or `AutoencoderDC`. Each becomes one float32 file `<stem>.pt` or `<stem>.npy`
holding the raw, unscaled posterior mode `[C, size/f, size/f]` (`[4, 32, 32]` for SD1.5 at 256px).
The data root (--output, or its parent when --output is one domain's folder) gets `latent_space.json`:
the VAE, its channels, scaling and shift factors and downsampling, which training reads.

Images whose shorter side is under --size / 4 are refused (upscaling them would invent the
picture), as the app refuses such uploads; what encoding changed (upscaled, grayscale used as RGB,
transparency dropped) is reported at the end, one line per kind.

With --pack, each output folder instead gets one packed shard: `latents.npy` [N, C, h, w] (float16
by default, --pack-dtype float32) plus `index.json` naming each row's image, rows in image-name
order (packing.py; the dataset memory-maps it).

Resumable: outputs that already exist are skipped, and each file is written to a temporary name and
renamed, so an existing output is always complete. With --pack, rows already in a folder's shard
(or written by an interrupted run) are reused by image name and the shard is replaced atomically.
A broken image is named, skipped, and makes the exit code 1 once everything else is encoded. Setup
errors (missing folder, no images, bad --size, VAE that cannot be loaded) exit with code 2 before
anything is written.
"""

import argparse
import hashlib
import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from tqdm import tqdm

from arguments import bounded, check_not_inputs
from latents import (PACKED_ARRAY, PACKED_INDEX, LatentSpace, check_same_space, file_stem, manifest_path, read_manifest,
                     save_latent, shown_name, vae_config_sha256, write_manifest)
from packing import PACK_DTYPES, PARTIAL_LOG, PackWriter, check_names
from runtime import AMP_DTYPES, InputError, output_folder, resolve_device, run_script
from vae import IMAGE_EXTENSIONS, encode_raw, inspect_image, load_image, open_vae, to_model_input, vae_downsample_factor

PREFETCH_BATCHES = 2  # batches decoded ahead of the VAE: bounds memory on huge folders


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Encode a folder of images into raw (unscaled) VAE latent files, one per image. "
                    "The input folder is searched recursively (hidden files and folders are ignored) and "
                    "its subfolders are mirrored in the output folder. Two images with the same stem in "
                    "one folder (a.jpg, a.png) are an error: rename one. Existing outputs are skipped, so "
                    "a rerun finishes an interrupted job.")
    parser.add_argument("--input", required=True, help="folder of images (" + ", ".join(IMAGE_EXTENSIONS) + ")")
    parser.add_argument("--output", required=True, help="folder for the latent files (created if missing)")
    parser.add_argument("--vae", required=True, help="diffusers AutoencoderKL or AutoencoderDC: local folder or hub id")
    parser.add_argument("--vae-subfolder", default=None,
                        help="subfolder of --vae holding the VAE ('vae' for a full Stable Diffusion pipeline)")
    parser.add_argument("--size", type=bounded(int, 8, 8192), default=256,
                        help="square image size; must be divisible by the VAE's downsampling factor (8 for SD1.5)")
    parser.add_argument("--batch-size", type=bounded(int, 1, 4096), default=16)
    parser.add_argument("--format", choices=("pt", "npy"), default=None, help="one file per latent (default pt)")
    parser.add_argument("--pack", action="store_true",
                        help="one packed shard per output folder (latents.npy + index.json) instead of one file per "
                             "image: training starts in seconds on a million latents")
    parser.add_argument("--pack-dtype", choices=tuple(PACK_DTYPES), default="float16",
                        help="with --pack: stored precision (float16 rounds each value to float16)")
    parser.add_argument("--sample", action="store_true",
                        help="write a draw from the posterior instead of its mode; the draw for an image "
                             "depends only on --seed and the image's path, not on batching or resuming")
    parser.add_argument("--seed", type=int, default=0, help="seed for --sample")
    parser.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="VAE precision")
    parser.add_argument("--workers", type=bounded(int, 0, 256), default=min(4, os.cpu_count() or 1),
                        help="threads decoding and resizing images while the VAE encodes (0: main thread)")
    return parser.parse_args(argv)


def find_images(input_dir):
    """Sorted [(image path, output path relative to the output folder, without extension)].

    Recursive; hidden files and folders (macOS `._x.jpg`, `.cache/`) are skipped. Raises InputError
    when two images would write the same latent file.
    """
    found, by_stem = [], {}
    for folder, subfolders, files in os.walk(input_dir):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if name.startswith(".") or ext.lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.join(folder, name)
            rel_stem = os.path.relpath(os.path.join(folder, stem), input_dir)
            by_stem.setdefault(rel_stem, []).append(path)
            found.append((path, rel_stem))
    clashes = [paths for paths in by_stem.values() if len(paths) > 1]
    if clashes:
        listing = "\n  ".join(" / ".join(shown_name(p, None) for p in paths) for paths in clashes)
        raise InputError(f"{len(clashes)} image name(s) in {input_dir!r} differ only by extension and would "
                         f"write the same latent file; rename one of each:\n  {listing}")
    return sorted(found, key=lambda item: item[1])


def sample_generator(seed, rel_stem):
    """A CPU generator for one image's posterior draw, seeded by (seed, relative path)."""
    digest = hashlib.sha256(f"{seed}:{rel_stem}".encode()).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "little"))


def save_files(latents, jobs):
    """One latent file per job: its output path."""
    for latent, (_, out_path, _) in zip(latents, jobs):
        save_latent(latent, out_path)


def submit(pool, fn, *args):
    """pool.submit, or a finished Future computed here when there is no pool (--workers 0)."""
    if pool is not None:
        return pool.submit(fn, *args)
    future = Future()
    try:
        future.set_result(fn(*args))
    except Exception as e:
        future.set_exception(e)
    return future


def read_image(path, size):
    """(uint8 [size, size, 3], notes): checked by the rule the app follows (vae.inspect_image: too
    small to upscale is refused), then decoded, centre-cropped and resized."""
    notes = inspect_image(path, size).notes
    return load_image(path, size), notes


def decoded_batches(jobs, size, batch_size, workers):
    """Yield (jobs decoded, their uint8 [size, size, 3] images, [(image path, reason)] failures,
    [(image path, notes)]) per batch of `jobs`, decoded by `workers` threads up to PREFETCH_BATCHES
    batches ahead."""
    batches = [jobs[i:i + batch_size] for i in range(0, len(jobs), batch_size)]
    decoder = ThreadPoolExecutor(workers, thread_name_prefix="decode") if workers > 0 else None
    pending = deque()
    try:
        for k in range(len(batches)):
            while len(pending) < PREFETCH_BATCHES and k + len(pending) < len(batches):
                upcoming = batches[k + len(pending)]
                pending.append([submit(decoder, read_image, src, size) for src, _, _ in upcoming])
            ok, images, failed, changed = [], [], [], []
            for job, future in zip(batches[k], pending.popleft()):
                try:
                    image, notes = future.result()
                except InputError as e:
                    failed.append((job[0], str(e)))
                    continue
                except Exception as e:
                    failed.append((job[0], f"unreadable image: {type(e).__name__}: {e}"))
                    continue
                images.append(image)
                ok.append(job)
                if notes:
                    changed.append((job[0], notes))
            yield ok, images, failed, changed
    finally:
        if decoder is not None:
            decoder.shutdown(wait=True, cancel_futures=True)


def encode_jobs(vae, jobs, args, device, save=save_files, store_dtype=torch.float32):
    """Encode [(image path, output path, rel_stem)] in batches. Returns ([(image path, reason)]
    failures, {note: [image paths]} for images that encoding changed: upscaled, grayscale, alpha).

    Each batch is encoded on the device and moved to the CPU once; `save(latents, jobs)` writes it
    in one background thread while the next batch decodes and encodes. A latent that is not finite
    in `store_dtype` (float16 ends at 65504) is a failure.
    """
    failures, changed = [], {}
    writer = ThreadPoolExecutor(1, thread_name_prefix="write")
    pending_write = None
    bar = tqdm(total=len(jobs), unit="img", desc="encode", dynamic_ncols=True)
    batches = decoded_batches(jobs, args.size, args.batch_size, args.workers)
    try:
        for ok, images, failed, notes in batches:
            batch_len = len(ok) + len(failed)
            for path, image_notes in notes:
                for note in image_notes:
                    changed.setdefault(note, []).append(path)
            if ok:
                generator = [sample_generator(args.seed, rel) for _, _, rel in ok] if args.sample else None
                latents = encode_raw(vae, to_model_input(images).to(device), args.sample, generator)
                latents = latents.cpu()  # [b, C, h, w] float32: the one host sync per batch
                finite = torch.isfinite(latents.to(store_dtype)).flatten(1).all(1).tolist()
                reason = "non-finite latent (try --dtype fp32" + (")" if store_dtype == torch.float32 else
                                                                   " or --pack-dtype float32)")
                failed += [(job[0], reason) for job, fin in zip(ok, finite) if not fin]
                keep = [i for i, fin in enumerate(finite) if fin]
                if pending_write is not None:
                    pending_write.result()  # surfaces a write error (disk full) and bounds memory
                pending_write = writer.submit(save, latents[keep], [ok[i] for i in keep])
            for path, reason in failed:
                tqdm.write(f"encode.py: skipping {shown_name(path, None)}: {reason}", file=sys.stderr)
            failures += failed
            bar.update(batch_len)
        if pending_write is not None:
            pending_write.result()
    finally:
        batches.close()  # stops the decoding threads now, also when encoding raised
        bar.close()
        writer.shutdown(wait=True)
    return failures, changed


def report_changes(changed, shown=5):
    """One line per kind of change encoding made (upscaled, grayscale, transparency), with examples."""
    for note, paths in sorted(changed.items()):
        examples = ", ".join(shown_name(os.path.basename(p)) for p in paths[:shown])
        examples += " ..." if len(paths) > shown else ""
        print(f"encode.py: {len(paths)} image(s) {note}: {examples}", flush=True)


def encode_packed(vae, images, input_dir, output_dir, latent_shape, args, device, mode):
    """--pack: one shard per output folder, rows in image-name order. Rows already in the folder's
    shard (of this --pack-dtype) or in an interrupted run's partial file are reused by image name;
    the rest are encoded. Returns (jobs encoded, failures, {note: [image paths]} as encode_jobs)."""
    folders = {}
    for src, rel_stem in images:
        folders.setdefault(os.path.dirname(rel_stem), []).append(src)
    writers = {}
    for rel_folder, sources in folders.items():
        check_names([os.path.basename(s) for s in sources], os.path.join(input_dir, rel_folder))
        writers[rel_folder] = PackWriter(os.path.join(output_dir, rel_folder), latent_shape, args.pack_dtype,
                                         reuse_shard=True)
    jobs = {f: [(s, None, os.path.join(f, file_stem(s))) for s in sources
                if not writers[f].has(os.path.basename(s))] for f, sources in folders.items()}
    todo = sum(len(j) for j in jobs.values())
    print(f"{len(images)} images in {input_dir}: {len(images) - todo} already in packed shards under {output_dir} "
          f"(reused), {todo} to encode -> {latent_shape} {args.pack_dtype} latents.npy per folder ({mode})", flush=True)
    failures, changed, store_dtype = [], {}, PACK_DTYPES[args.pack_dtype]
    for rel_folder, sources in sorted(folders.items()):
        writer = writers[rel_folder]

        def append(latents, done, writer=writer):
            writer.append(latents, [os.path.basename(src) for src, _, _ in done])

        if jobs[rel_folder]:
            failed, notes = encode_jobs(vae, jobs[rel_folder], args, device, append, store_dtype)
            failures += failed
            for note, paths in notes.items():
                changed.setdefault(note, []).extend(paths)
        rows = [os.path.basename(s) for s in sources if writer.has(os.path.basename(s))]
        if rows:
            writer.finish(rows)
    return [job for folder_jobs in jobs.values() for job in folder_jobs], failures, changed


def data_root(output_dir, images):
    """The data root the outputs belong to: --output itself when every image sits in a subfolder
    (one per domain, mirrored), else its parent (--output is one domain's folder)."""
    top_level = any(os.path.dirname(rel_stem) == "" for _, rel_stem in images)
    return os.path.dirname(os.path.abspath(output_dir)) if top_level else os.path.abspath(output_dir)


def record_latent_space(vae, args, root):
    """The data root's manifest (latents.MANIFEST_NAME): written when the root has none; a root whose
    manifest names another latent space is refused before anything is encoded (one root, one VAE)."""
    space, found = LatentSpace.from_vae(vae), read_manifest(root)
    details = dict(vae_source=str(args.vae), vae_subfolder=args.vae_subfolder, vae_class=type(vae).__name__,
                   vae_config_sha256=vae_config_sha256(vae), image_size=args.size, dtype=args.dtype,
                   posterior="sample" if args.sample and type(vae).__name__ == "AutoencoderKL" else "mode")
    if found is None:
        os.makedirs(root, exist_ok=True)
        write_manifest(root, space, **details)
        print(f"latent space: {space.describe()} ({type(vae).__name__}), recorded in {manifest_path(root)}",
              flush=True)
        return
    check_same_space(space, found[0], f"VAE {args.vae!r}", f"data root's {manifest_path(root)}",
                     "--vae: encode into another data root: ")
    if found[1].get("vae_config_sha256") not in (None, details["vae_config_sha256"]):
        print(f"warning: {manifest_path(root)} records another VAE config ({found[1].get('vae_source')!r}) with the "
              "same latent space; latents of both go into one data set", flush=True)


def run(args):
    input_dir = os.path.expanduser(args.input)
    output_dir = os.path.expanduser(args.output)
    if not os.path.isdir(input_dir):
        raise InputError(f"input folder {input_dir!r} does not exist or is not a folder")
    if args.size <= 0 or args.batch_size <= 0 or args.workers < 0:
        raise InputError("--size and --batch-size must be positive, --workers non-negative")
    if args.pack and args.format:
        raise InputError("--format names the files of one latent per image; --pack writes one latents.npy per folder")
    args.format = args.format or "pt"
    images = find_images(input_dir)
    if not images:
        raise InputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {input_dir!r} or its subfolders")
    check_not_inputs(planned_outputs(args, output_dir, images), [src for src, _ in images])
    with output_folder(output_dir, "--output"):  # a file in the way or a folder that cannot be written: one line
        return encode(args, input_dir, output_dir, images)


def planned_outputs(args, output_dir, images):
    """(path, flag) of --output and every file this run may write: checked against the images
    before any work (an image under another name, a link, is one of them too)."""
    if args.pack:
        folders = sorted({os.path.dirname(rel_stem) for _, rel_stem in images})
        names = (PACKED_ARRAY, PACKED_INDEX, PARTIAL_LOG)
        files = [os.path.join(output_dir, folder, name) for folder in folders for name in names]
    else:
        files = [os.path.join(output_dir, f"{rel_stem}.{args.format}") for _, rel_stem in images]
    return [(path, "--output") for path in (output_dir, manifest_path(data_root(output_dir, images)), *files)]


def encode(args, input_dir, output_dir, images):
    """Open the VAE, record the data root's latent space, encode every image not encoded yet."""
    device = resolve_device(args.device, fallback=False)
    hint = ""
    if not args.vae_subfolder and os.path.isdir(os.path.join(os.path.expanduser(args.vae), "vae")):
        hint = "\n  it has a 'vae' subfolder: for a full Stable Diffusion pipeline add --vae-subfolder vae"
    # any latent width: the latents' shape is the VAE's, [C, size/f, size/f]
    vae = open_vae(args.vae, args.vae_subfolder, device, AMP_DTYPES[args.dtype], hint=hint)
    factor = vae_downsample_factor(vae)
    if args.size % factor:
        raise InputError(f"--size {args.size} is not divisible by the VAE's downsampling factor {factor} "
                         f"(e.g. use {max(factor, args.size // factor * factor)})")
    record_latent_space(vae, args, data_root(output_dir, images))

    latent_shape = [vae.config.latent_channels, args.size // factor, args.size // factor]
    mode = f"{'posterior sample' if args.sample else 'posterior mode'}, {device}, {args.dtype}"
    start = time.perf_counter()
    if args.pack:
        jobs, failures, changed = encode_packed(vae, images, input_dir, output_dir, latent_shape, args, device, mode)
    else:
        jobs = [(src, os.path.join(output_dir, f"{rel_stem}.{args.format}"), rel_stem) for src, rel_stem in images]
        jobs = [job for job in jobs if not os.path.exists(job[1])]
        for folder in sorted({os.path.dirname(out_path) for _, out_path, _ in jobs}):
            os.makedirs(folder, exist_ok=True)
        print(f"{len(images)} images in {input_dir}: {len(images) - len(jobs)} already encoded in {output_dir} "
              f"(skipped), {len(jobs)} to encode -> {latent_shape} float32 .{args.format} ({mode})", flush=True)
        failures, changed = encode_jobs(vae, jobs, args, device) if jobs else ([], {})
    skipped = len(images) - len(jobs)
    seconds = time.perf_counter() - start
    encoded = len(jobs) - len(failures)
    print(f"encoded {encoded}, skipped {skipped}, failed {len(failures)} in {seconds:.1f}s "
          f"({encoded / max(seconds, 1e-9):.3g} images/s)", flush=True)
    report_changes(changed)
    if failures:
        print(f"encode.py: {len(failures)} image(s) failed and were not written:", file=sys.stderr)
        for path, reason in failures:
            print(f"  {shown_name(path, None)}: {reason}", file=sys.stderr)
        return 1
    return 0


def main(argv=None):
    """Exit codes: 0 all done, 1 some images failed (the rest written), 2 setup error (nothing written)."""
    return run_script("encode.py", run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
