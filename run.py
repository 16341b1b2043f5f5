"""Train Latent StarGAN v2.

    python run.py --config configs/stargan_v2_latent.yaml [--resume [PATH]] [KEY=VALUE ...]
    torchrun --nproc_per_node=8 run.py --config configs/stargan_v2_latent.yaml

Wiring only: config -> dataset -> G, F, E, D -> Trainer (resumed from a checkpoint when asked) ->
`trainer.fit(dataset)`, which owns the epochs, display, checkpoints and grids.
"""

import os

# before torch is imported: fewer fragmentation OOMs with varying shapes. Some torch releases read
# only the newer name, some only the older one.
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", os.environ["PYTORCH_ALLOC_CONF"])

import argparse  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402

from config import load_config, model_kwargs, save_resolved  # noqa: E402
from dataset import MultiDomainLatentDataset  # noqa: E402
from model import build_models, count_parameters  # noqa: E402
from runtime import (BAD_INPUT, InputError, configure_backends, load_checkpoint, resolve_device,  # noqa: E402
                     run_script, seed_everything, setup_distributed)
from trainer import NonFiniteError, Trainer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train Latent StarGAN v2 on SD1.5 VAE latents.")
    p.add_argument("--config", required=True, help="YAML or JSON config (see configs/stargan_v2_latent.yaml)")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue from PATH, or from <checkpoint_dir>/latest.pt when PATH is omitted")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="override a dotted config key, value parsed as YAML (e.g. training.batch_size=16)")
    args = p.parse_args(argv)
    # `--resume KEY=VALUE`: argparse gave the override to --resume; it means a bare --resume
    if args.resume and "=" in args.resume and not os.path.exists(args.resume):
        args.overrides.insert(0, args.resume)
        args.resume = ""
    return args


def check_architecture(ckpt_cfg, cfg, path):
    """A resumed model must match the checkpoint's architecture: name the differing keys."""
    diff = [f"model.{k}: checkpoint {ckpt_cfg['model'].get(k)!r} vs config {v!r}"
            for k, v in cfg["model"].items() if ckpt_cfg["model"].get(k) != v]
    if list(ckpt_cfg["data"]["domains"]) != list(cfg["data"]["domains"]):
        diff.append(f"data.domains: checkpoint {ckpt_cfg['data']['domains']} vs config {cfg['data']['domains']}")
    if diff:
        raise InputError(f"cannot resume from {path}: the model architecture differs from the checkpoint's:\n  "
                         + "\n  ".join(diff))


def check_writable(folder):
    """An unwritable checkpoint folder is an error before the first step, not after an hour."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as e:
        raise InputError(f"training.checkpoint_dir={folder!r} is not writable: {e}") from None


def main(argv=None):
    args = parse_args(argv)
    dist, local_rank = setup_distributed()
    log = print if dist.is_main else (lambda *a, **k: None)
    try:
        code = run_script("run.py", lambda: train(load_config(args.config, args.overrides), args.resume, dist,
                                                  local_rank, log), errors=BAD_INPUT + (NonFiniteError,))
    finally:
        if dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if code > 2:  # stopped by a signal (128 + its number): latest.pt holds the exact position
        log("resume with: " + " ".join(["python run.py", "--config", args.config, *args.overrides, "--resume"]))
    return code


def train(cfg, resume, dist, local_rank, log):
    t, d = cfg["training"], cfg["data"]
    device = resolve_device(t["device"], local_rank, flag="training.device")
    configure_backends(device)
    if dist.is_main:
        check_writable(t["checkpoint_dir"])

    ckpt = None
    if resume is not None:
        path = resume or os.path.join(t["checkpoint_dir"], "latest.pt")
        ckpt = load_checkpoint(path)
        check_architecture(ckpt["config"], cfg, path)
        log(f"resuming from {path}: epoch {ckpt['epoch']} done, step {ckpt['step']}")

    if d["synthetic"]:
        from demo_data import generate_demo_data

        if dist.is_main:
            generate_demo_data(d["root"], d["domains"], files_per_domain=d["synthetic_files_per_domain"],
                               seed=cfg["seed"], latent_scale=t["latent_scale"], log=log)
        dist.barrier()

    seed_everything(cfg["seed"])  # same weights on every rank
    dataset = MultiDomainLatentDataset(d["root"], d["domains"], preload_to_gpu=d["preload_to_gpu"], device=device,
                                       samples_per_epoch=d["samples_per_epoch"], seed=cfg["seed"], hflip=d["hflip"],
                                       preload_max_fraction=d["preload_max_fraction"],
                                       reject_outliers=d["reject_outliers"], log=log)
    models = build_models(**model_kwargs(cfg))
    log("parameters: " + ", ".join(f"{k} {count_parameters(m) / 1e6:.2f}M" for k, m in models.items()))
    trainer = Trainer(cfg, models, device, dist=dist, log=log)
    if ckpt is not None:
        trainer.load_state_dict(ckpt)
    else:
        seed_everything(cfg["seed"] + dist.rank)  # different z on each rank
    if dist.is_main:
        save_resolved(cfg, t["checkpoint_dir"])
    return trainer.fit(dataset)


if __name__ == "__main__":
    sys.exit(main())
