"""FID, KID and LPIPS of a Latent StarGAN v2 checkpoint, as the StarGAN v2 paper reports them.

    python evaluate.py --checkpoint outputs/stargan_v2_latent/latest.pt [--data-root DIR]
        [--source-root DIR] [--vae PATH] [--out DIR] [--num-outs 10] [--max-sources N]

The official protocol (StarGAN v2's metrics/eval.py) on latents: for every ordered pair of the
checkpoint's domains (source != target) and both modes (latent-guided: z through F;
reference-guided: a random target-domain latent through E), each source latent is translated
--num-outs times by the EMA networks with a fixed seed. FID and KID compare the translations with the
target domain's real latents, both decoded by the same VAE; LPIPS is the mean distance among each
source's outputs (diversity). As the official protocol, the reals are the training set and the
sources and references a held-out split (--source-root; without it the training latents serve as
both, and metrics.json says so). Prints a table and writes <out>/metrics.json with the official keys
(`FID_latent/photo2Hayao`, `LPIPS_reference/mean`, ...) and `protocol`: everything the numbers depend
on (sample counts, KID's subset size and standard deviations, the Inception, LPIPS and VAE
identities, device, dtype, batch size, seed, the checkpoint's step, which sources). Exit codes: 0
done, 2 bad input.
"""

import argparse
import json
import os
import sys

import torch
from tqdm import tqdm

from arguments import bounded, check_not_inputs
from checkpoint import load_checkpoint
from config import latent_space, parse_metrics
from dataset import MultiDomainLatentDataset
from display import WorkProgress
from inference import beside_checkpoint, networks_from_checkpoint
from latents import check_root_space
from metrics import PREVIEW_DECODE, Evaluator, format_table
from runtime import AMP_DTYPES, InputError, atomic_write, check_seed, output_folder, resolve_device, script_main
from vae import check_vae_config

MAX_OUTS, MAX_SOURCES, MAX_BATCH = 1000, 10 ** 7, 4096  # translations per source, sources per domain, batch
METRICS_FILE = "metrics.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="FID / KID / LPIPS of a Latent StarGAN v2 checkpoint (StarGAN v2's "
                                            "evaluation protocol on VAE-decoded latents).")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by run.py (its EMA networks are used)")
    p.add_argument("--data-root", default=None,
                   help="the real latents FID/KID compare with, one folder per domain (default: the checkpoint's "
                        "data.root, the training latents, as the official code uses its train split)")
    p.add_argument("--source-root", default=None,
                   help="sources and references, same layout (e.g. a held-out split; default: --data-root)")
    p.add_argument("--vae", default=None, help="diffusers AutoencoderKL that decodes reals and fakes (default: "
                                              "the checkpoint's evaluation.vae_path, else visualization.vae_path)")
    p.add_argument("--vae-subfolder", default=None, help="subfolder of --vae ('vae' for a full SD pipeline)")
    p.add_argument("--preview-decode", action="store_true",
                   help="draw reals and fakes with the linear latent preview instead of a VAE (offline, e.g. the "
                        "demo, which has none): metrics.json says preview-decoded; not comparable with published "
                        "FIDs or VAE-decoded runs. FID/KID still need the Inception, LPIPS AlexNet's weights")
    p.add_argument("--out", default=None, help="folder for metrics.json (default: eval_<checkpoint name>/ beside "
                                               "the checkpoint)")
    p.add_argument("--num-outs", type=bounded(int, 2, MAX_OUTS), default=10,
                   help="translations per source (the paper: 10; at least 2: LPIPS compares a source's outputs)")
    p.add_argument("--max-sources", type=bounded(int, 1, MAX_SOURCES), default=None, help="at most N sources per domain (quick looks)")
    p.add_argument("--seed", type=int, default=0, help="seed of the z and reference draws")
    p.add_argument("--batch-size", type=bounded(int, 1, MAX_BATCH), default=32, help="images per decode / feature batch")
    p.add_argument("--device", default=None, help="cuda | cuda:N | cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="autocast of the networks and the decode (default: bf16 on CUDA, fp32 on the CPU); "
                        "features and LPIPS stay float32")
    p.add_argument("--inception-weights", default=None,
                   help="TF-Inception TorchScript (default: the checkpoint's evaluation.inception_weights, else "
                        "inception-2015-12-05.pt in the torch hub cache, downloaded once)")
    p.add_argument("--lpips-weights", default=None,
                   help="torchvision AlexNet state dict (default: evaluation.lpips_weights, else "
                        "alexnet-owt-7be5be79.pth in the torch hub cache, downloaded once)")
    p.add_argument("--no-cache", action="store_true",
                   help="recompute the real domains' Inception features (the cache, eval_cache/ beside the "
                        "checkpoint, shared with training-time evaluation, is keyed by a hash of the latents' content, "
                        "the VAE, the Inception and the dtype)")
    p.add_argument("--metrics", default=None,
                   help="which of fid, kid, lpips to compute, e.g. fid,kid (default: the checkpoint's evaluation.metrics, "
                        "all three unless set): LPIPS needs AlexNet weights, FID and KID the Inception")
    args = p.parse_args(argv)
    if args.max_sources is not None and args.max_sources < 1:
        p.error("--max-sources must be >= 1")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if args.preview_decode and (args.vae or args.vae_subfolder):
        p.error("--preview-decode draws pictures without a VAE: leave out --vae / --vae-subfolder")
    try:
        check_seed(args.seed)
    except InputError as e:
        p.error(str(e))
    return args


def read_domains(root, domains, flag, space):
    """({domain: raw latents [N, C, h, w]}, {domain: a hash of its content}, [C, h, w]) from
    root/<domain>/, whose manifest (if any) must name the checkpoint's LatentSpace `space`."""
    check_root_space(root, space, f"{flag} {root!r}: ")
    try:  # outliers (max |value| > 1e3) are refused, naming each file, as training does
        ds = MultiDomainLatentDataset(root, domains, preload_to_gpu=False, device="cpu", log=lambda *a: None,
                                      channels=space.channels)
    except FileNotFoundError as e:
        raise InputError(f"{flag} {root!r}: {e}; the checkpoint's domains are {', '.join(domains)}") from None
    return ds.by_domain(), ds.content_ids(), list(ds.shape)


def run(args):
    device = resolve_device(args.device, fallback=False)
    ckpt = load_checkpoint(args.checkpoint)
    cfg, nets = networks_from_checkpoint(ckpt, args.checkpoint, device)
    args.metrics = parse_metrics(args.metrics or cfg["evaluation"]["metrics"])
    out = args.out or beside_checkpoint(args.checkpoint, "eval")
    weights = (args.inception_weights or cfg["evaluation"]["inception_weights"], args.lpips_weights or
               cfg["evaluation"]["lpips_weights"], args.vae)
    check_not_inputs([(out, "--out"), (os.path.join(out, METRICS_FILE), "--out")],
                     [args.checkpoint, *(path for path in weights if path)])
    with output_folder(out, "--out"):  # before the data, the weights and the evaluation
        return evaluate(args, ckpt, cfg, nets, device, out)


def read_data(args, cfg):
    """The reals and the sources (held out with --source-root), their content ids and a line
    saying which sources were used; InputError for latents of another size than the model's or
    each other's, before any work."""
    domains, trained_on = list(cfg["data"]["domains"]), cfg["latent_shape"]
    data_root = args.data_root or cfg["data"]["root"]
    real, real_ids, real_shape = read_domains(data_root, domains, "--data-root", latent_space(cfg))
    if trained_on and real_shape != list(trained_on):
        raise InputError(f"--data-root {data_root!r} holds latents of shape {real_shape}; the checkpoint was trained "
                         f"on {list(trained_on)}: evaluate with data of the training size")
    if not args.source_root:
        return real, real, real_ids, "the training latents (not held out: the protocol wants a held-out split, " \
                                     "--source-root)"
    sources, _, source_shape = read_domains(args.source_root, domains, "--source-root", latent_space(cfg))
    if source_shape != real_shape:
        raise InputError(f"--source-root {args.source_root!r} holds latents of shape {source_shape}, --data-root "
                         f"{data_root!r} of shape {real_shape}: FIDs of translations of another size than the reals "
                         "compare different pictures")
    return real, sources, real_ids, f"held out: {os.path.abspath(args.source_root)}"


def evaluate(args, ckpt, cfg, nets, device, out):
    domains, e = list(cfg["data"]["domains"]), cfg["evaluation"]
    vae_path = None if args.preview_decode else args.vae or e["vae_path"] or cfg["visualization"]["vae_path"]
    # the subfolder belongs to the path it came with: --vae's flag, else visualization.vae_subfolder
    # only for visualization.vae_path (as training-time evaluation does)
    subfolder = args.vae_subfolder if (args.vae or args.vae_subfolder) else (
        None if e["vae_path"] else cfg["visualization"]["vae_subfolder"])
    check_vae_config(vae_path, subfolder, latent_space(cfg), "VAE", theirs="checkpoint")  # before the data is read
    real, sources, real_ids, which_sources = read_data(args, cfg)
    dtype = AMP_DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    evaluator = Evaluator.load(vae_path, subfolder, args.inception_weights or e["inception_weights"],
                               args.lpips_weights or e["lpips_weights"], device, amp_dtype=dtype,
                               batch_size=args.batch_size, metrics=args.metrics, space=latent_space(cfg),
                               preview=args.preview_decode,
                               cache_dir=None if args.no_cache else os.path.join(
                                   os.path.dirname(os.path.abspath(args.checkpoint)), "eval_cache"))  # training's too
    print(f"evaluating {args.checkpoint} (epoch {ckpt['epoch']}, step {ckpt['step']}) on {device}: "
          f"{', '.join(args.metrics)}, {task_sizes(domains, sources, args)}; sources: {which_sources}", flush=True)
    if args.preview_decode:
        print(f"--preview-decode: {PREVIEW_DECODE}", flush=True)
    progress = WorkProgress("evaluating", "bar")
    try:
        results = evaluator(nets, domains, real, sources, latent_space(cfg), cfg["model"]["latent_dim"],
                            num_outs=args.num_outs, max_sources=args.max_sources, seed=args.seed, real_ids=real_ids,
                            log=lambda line: tqdm.write("  " + line), progress=progress)
    finally:
        seconds = progress.close()
    print(format_table(results))
    results["protocol"].update(checkpoint=os.path.abspath(args.checkpoint), epoch=ckpt["epoch"], step=ckpt["step"],
                               data_root=os.path.abspath(args.data_root or cfg["data"]["root"]),
                               sources=which_sources, vae_path=vae_path, vae_subfolder=subfolder,
                               max_sources=args.max_sources, seconds=round(seconds, 1),
                               decode=PREVIEW_DECODE if args.preview_decode else "vae")
    if args.preview_decode:
        results["protocol"]["warnings"].append(PREVIEW_DECODE)
    path = atomic_write(os.path.join(out, METRICS_FILE), lambda f: f.write(json.dumps(results, indent=2).encode()))
    print(f"wrote {path} ({seconds:.1f}s)")
    return 0


def task_sizes(domains, sources, args):
    """'20 tasks x 2 modes, each 2 sources x 2 outputs = 4 translations': what one task holds (a task
    translates one source domain's sources into one target)."""
    per_domain = [len(sources[d]) if args.max_sources is None else min(len(sources[d]), args.max_sources)
                  for d in domains]
    span = lambda values: f"{min(values)}" if min(values) == max(values) else f"{min(values)}-{max(values)}"  # noqa: E731
    return (f"{len(domains) * (len(domains) - 1)} tasks x 2 modes, each {span(per_domain)} sources x {args.num_outs} "
            f"outputs = {span([n * args.num_outs for n in per_domain])} translations")


def main(argv=None):
    """Exit codes: 0 done, 2 bad arguments, checkpoint, data or weights (message on stderr), 1 a
    failed write, 130 Ctrl-C."""
    return script_main("evaluate.py", parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
