"""Export a trained Latent StarGAN v2 checkpoint for use without this code: ONNX and torch.export.

    python export.py --checkpoint outputs/stargan_v2_latent/latest.pt --output exported/ --verify
    python export.py --checkpoint runs/best.pt --domains monet,vangogh --format onnx \\
        --with-decoder --vae stabilityai/sd-vae-ft-mse --verify

Writes, from the checkpoint's EMA networks, one graph per mode in each format (exporting.py has
their inputs): `latent_guided` (raw content latent, domain id, z, psi -> raw translated latent) and
`reference_guided` (raw content, domain id, raw reference latent -> raw translated latent), as
`<output>/<graph>.onnx` (opset exporting.ONNX_OPSET, weights inside) and `<output>/<graph>.pt2`
(torch.export.save); with --with-decoder also `decoder.onnx` / `decoder.pt2` (raw latent -> RGB in
[0, 1]). Batch and spatial sizes are dynamic; each file carries its metadata (domains, latent shape,
dimensions, scale, source step) as JSON under "latent_stargan_v2".

--verify runs every exported file (ONNX Runtime on the CPU, torch.export.load) on random inputs
(batch 1 and 3 at the training size, batch 2 at another size) against the eager EMA networks, prints
the max abs difference, and writes nothing when one exceeds --tolerance.
Exit codes: 0 done, 1 verification failed (nothing written), 2 bad input (message on stderr).
"""

import argparse
import os
import sys

import torch

from arguments import bounded, check_not_inputs
from checkpoint import load_checkpoint
from config import latent_space
from exporting import (FORMATS, GRAPHS, MIN_REFERENCE_SIZE, Decoder, build_graphs, export_program, max_abs_diff,
                       metadata_for, onnx_bytes, pt2_bytes, random_inputs, require_onnx_packages)
from inference import (beside_checkpoint, domain_index, mean_style, networks_from_checkpoint, training_latent_size,
                       vae_source)
from runtime import InputError, atomic_write, check_output_folder, check_seed, run_script
from vae import decode, open_vae, vae_downsample_factor

# max abs difference: in raw latent units (a raw SD1.5 latent's std is ~5.5), or for RGB in [0, 1] a
# quarter of one 8-bit level
DEFAULT_TOLERANCE = 1e-3
EXAMPLE_BATCH = 2  # the traced example; the exported batch is dynamic


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Export a Latent StarGAN v2 checkpoint's EMA networks to ONNX and torch.export (.pt2): one "
                    "self-contained graph per mode (latent_guided, reference_guided), optionally the VAE decoder.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by run.py (latest.pt, best.pt, ...)")
    p.add_argument("--output", default=None,
                   help="output folder (default: export_<checkpoint name>/ beside the checkpoint); files of the "
                        "same name are replaced")
    p.add_argument("--format", choices=("onnx", "pt2", "both"), default="both",
                   help="onnx (needs requirements-export.txt), pt2 (torch.export.save), or both (default)")
    p.add_argument("--domains", default=None,
                   help="comma-separated domains the exported model serves, in the order of their exported ids "
                        "(default: all of the checkpoint's, in its order)")
    p.add_argument("--with-decoder", action="store_true",
                   help="also export the VAE decoder (raw latent -> RGB in [0, 1]) as decoder.onnx / decoder.pt2")
    p.add_argument("--vae", default=None,
                   help="with --with-decoder: diffusers AutoencoderKL, local folder or hub id (default: the "
                        "checkpoint's visualization.vae_path)")
    p.add_argument("--vae-subfolder", default=None, help="subfolder of the VAE ('vae' for a full SD pipeline)")
    p.add_argument("--verify", action="store_true",
                   help="compare every exported file with the eager EMA networks on random inputs before writing")
    p.add_argument("--tolerance", type=bounded(float, 1e-12, 1e6), default=DEFAULT_TOLERANCE,
                   help=f"--verify: largest max abs difference accepted (default {DEFAULT_TOLERANCE:g})")
    p.add_argument("--seed", type=int, default=0, help="--verify: seed of the random inputs")
    args = p.parse_args(argv)
    try:
        check_seed(args.seed)
    except InputError as e:
        p.error(str(e))
    if (args.vae or args.vae_subfolder) and not args.with_decoder:
        p.error("--vae and --vae-subfolder apply to --with-decoder only")
    args.formats = ("onnx", "pt2") if args.format == "both" else (args.format,)
    return args


def selected_domains(cfg, names):
    """Checkpoint ids of the --domains names (all of them by default), in the order given."""
    if names is None:
        return list(range(len(cfg["data"]["domains"])))
    names = [n.strip() for n in names.split(",") if n.strip()]
    if not names or len(set(names)) != len(names):
        raise InputError(f"--domains {','.join(names)!r}: expected distinct domain names separated by commas")
    return [domain_index(cfg, name, "--domains") for name in names]


def decoder_vae(cfg, path, subfolder):
    """The VAE whose decoder --with-decoder exports (inference.vae_source); never the linear preview."""
    path, subfolder = vae_source(cfg, path, subfolder)
    if not path:
        raise InputError("--with-decoder needs a VAE: pass --vae (a diffusers AutoencoderKL folder or hub id); the "
                         "checkpoint's visualization.vae_path is not set")
    return open_vae(path, subfolder, what="--with-decoder: ", space=latent_space(cfg))


@torch.no_grad()
def eager_output(cfg, nets, vae, ids, graph, inputs):
    """What the eager EMA networks give for the exported graph's inputs, the way translate.py runs
    them: checkpoint domain ids, the latent space's normalisation around the networks, psi toward
    inference's mean style."""
    if graph == "decoder":
        return decode(vae, inputs[0])
    space, latent_dim = latent_space(cfg), cfg["model"]["latent_dim"]
    content, domain = space.normalize(inputs[0]), torch.as_tensor(ids)[inputs[1]]  # [B, C, H, W], [B] checkpoint ids
    if graph == "latent_guided":
        z, psi = inputs[2], inputs[3][:, None]  # [B, L], [B, 1]
        means = [mean_style(nets["mapping_network"], i, latent_dim) for i in range(len(cfg["data"]["domains"]))]
        mean = torch.cat(means)[domain]  # [B, S]
        s = mean + psi * (nets["mapping_network"](z, domain) - mean)  # [B, S]
    else:
        s = nets["style_encoder"](space.normalize(inputs[2]), domain)  # [B, S]
    return space.denormalize(nets["generator"](content, s))  # [B, C, H, W] raw


def verify_cases(graph, size, num_domains, latent_dim, seed, channels):
    """Random inputs: batch 1 and 3 at the training size, batch 2 at another (H != W) size."""
    generator = torch.Generator().manual_seed(seed)
    ref = max(size, MIN_REFERENCE_SIZE)
    shapes = ((1, (size, size), ref), (3, (size, size), ref), (2, (size + 8, size + 16), (ref + 8, ref)))
    return [random_inputs(graph, batch, hw, num_domains, latent_dim, generator, ref_hw, channels)
            for batch, hw, ref_hw in shapes]


def verify(data, fmt, cases, expected_cases):
    """(max abs difference of one exported file's outputs from the eager ones, the case it came from);
    NaN or a wrong shape is the worst there is."""
    run_exported, _ = FORMATS[fmt](data)
    worst = (-1.0, None)
    for inputs, expected in zip(cases, expected_cases):
        out = run_exported(*inputs)
        where = f"batch {inputs[0].shape[0]}, latent {inputs[0].shape[2]}x{inputs[0].shape[3]}"
        if out.shape != expected.shape:
            return float("inf"), f"{where}: output {list(out.shape)}, expected {list(expected.shape)}"
        diff = max_abs_diff(out, expected)
        if diff != diff:
            return diff, where
        worst = max(worst, (diff, where), key=lambda pair: pair[0])
    return worst


def run(args):
    if "onnx" in args.formats:
        require_onnx_packages(runtime=args.verify)
    ckpt = load_checkpoint(args.checkpoint)
    cfg, nets = networks_from_checkpoint(ckpt, args.checkpoint, "cpu")
    ids = selected_domains(cfg, args.domains)
    output = args.output or beside_checkpoint(args.checkpoint, "export")
    graphs = GRAPHS + (("decoder",) if args.with_decoder else ())
    check_not_inputs([(output, "--output")] + [(os.path.join(output, f"{graph}.{fmt}"), "--output")
                                               for graph in graphs for fmt in args.formats],
                     [args.checkpoint, *([args.vae] if args.vae else [])])
    check_output_folder(output, "--output")  # before the export work
    vae = decoder_vae(cfg, args.vae, args.vae_subfolder) if args.with_decoder else None

    domains = [cfg["data"]["domains"][i] for i in ids]
    size = training_latent_size(cfg)
    modules = build_graphs(cfg, nets, ids)
    if vae is not None:
        modules["decoder"] = Decoder(vae).eval()
    print(f"exporting {args.checkpoint} (step {ckpt['step']}, domains {', '.join(domains)}, latent {size}x{size}) "
          f"to {output}: {', '.join(modules)} as {', '.join(args.formats)}", flush=True)
    files, generator = {}, torch.Generator().manual_seed(args.seed)
    for graph, module in modules.items():
        extra = {} if graph != "decoder" else {"vae": args.vae or cfg["visualization"]["vae_path"],
                                                "downsample_factor": vae_downsample_factor(vae)}
        metadata = metadata_for(cfg, graph, domains, ckpt, size, source=os.path.basename(args.checkpoint), **extra)
        example = random_inputs(graph, EXAMPLE_BATCH, size, len(ids), cfg["model"]["latent_dim"], generator,
                                max(size, MIN_REFERENCE_SIZE), latent_space(cfg).channels)
        program = export_program(module, graph, example)
        cases = verify_cases(graph, size, len(ids), cfg["model"]["latent_dim"], args.seed,
                             latent_space(cfg).channels) if args.verify else []
        expected = [eager_output(cfg, nets, vae, ids, graph, inputs) for inputs in cases]
        for fmt in args.formats:
            data = onnx_bytes(program, graph, metadata) if fmt == "onnx" else pt2_bytes(program, metadata)
            if args.verify and not verified(f"{graph}.{fmt}", data, cases, expected, args.tolerance):
                return 1
            files[f"{graph}.{fmt}"] = data
    write_files(files, output)
    return 0


def verified(name, data, cases, expected, tolerance):
    """--verify of one exported file: its max abs difference from eager printed, and an error
    line when it exceeds `tolerance` (nothing is written then)."""
    diff, where = verify(data, name.rsplit(".", 1)[1], cases, expected)
    ok = diff <= tolerance
    print(f"  {name}: max abs diff vs eager {diff:.3g} ({where}; tolerance {tolerance:g}){'' if ok else '  FAILED'}",
          flush=True)
    if not ok:
        eager = "the VAE's eager decode" if name.startswith("decoder.") else "the eager EMA networks"
        print(f"export.py: error: {name} differs from {eager} by {diff:.3g} > --tolerance {tolerance:g} ({where}); "
              "nothing was written", file=sys.stderr)
    return ok


def write_files(files, output):
    """{name: bytes} into `output`; a warning names files of an earlier export left beside them."""
    for name, data in files.items():
        path = atomic_write(os.path.join(output, name), lambda f: f.write(data))
        print(f"wrote {path} ({len(data) / 2**20:.1f} MiB)")
    ours = {f"{graph}.{fmt}" for graph in GRAPHS + ("decoder",) for fmt in FORMATS}
    stale = sorted(set(os.listdir(output)) & ours - set(files))
    if stale:
        print(f"export.py: warning: {output} also holds {', '.join(stale)} of an earlier export, kept (their metadata "
              "names their checkpoint and step)", file=sys.stderr)


def main(argv=None):
    return run_script("export.py", run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
