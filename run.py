"""Train Latent StarGAN v2.

    python run.py --config configs/stargan_v2_latent.yaml [--resume [PATH]] [KEY=VALUE ...]
    torchrun --nproc_per_node=8 run.py --config configs/stargan_v2_latent.yaml

config -> dataset/loader -> G, F, E, D -> Trainer -> epochs of (set_epoch, train_epoch, save, evaluate).
"""

import os

# before torch is imported: fewer fragmentation OOMs with varying shapes. Some torch releases read
# only the newer name, some only the older one.
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", os.environ["PYTORCH_ALLOC_CONF"])

import argparse  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from config import ConfigError, load_config, model_kwargs, save_resolved  # noqa: E402
from dataset import MultiDomainLatentDataset, build_loader  # noqa: E402
from model import build_models, count_parameters  # noqa: E402
from trainer import Distributed, NonFiniteError, Trainer, load_checkpoint, prune_checkpoints  # noqa: E402


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


def setup_distributed():
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK: join the group (NCCL on CUDA, gloo on the CPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Distributed(), None
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        torch.distributed.init_process_group("nccl", device_id=torch.device("cuda", local))
    else:
        torch.distributed.init_process_group("gloo")
    return Distributed(rank, world), local


def resolve_device(requested, local_rank, log):
    if requested.startswith("cuda") and not torch.cuda.is_available():
        warnings.warn(f"training.device={requested!r} but CUDA is not available: training on the CPU")
        return torch.device("cpu")
    if requested.startswith("cuda") and local_rank is not None:
        return torch.device("cuda", local_rank)
    return torch.device(requested)


def configure_backends(device):
    """cuDNN autotuning for the fixed latent shapes, TF32 matmuls/convs for the fp32 path."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_architecture(ckpt_cfg, cfg, path):
    """A resumed model must match the checkpoint's architecture: name the differing keys."""
    diff = [f"model.{k}: checkpoint {ckpt_cfg['model'].get(k)!r} vs config {v!r}"
            for k, v in cfg["model"].items() if ckpt_cfg["model"].get(k) != v]
    if list(ckpt_cfg["data"]["domains"]) != list(cfg["data"]["domains"]):
        diff.append(f"data.domains: checkpoint {ckpt_cfg['data']['domains']} vs config {cfg['data']['domains']}")
    if diff:
        raise ConfigError(f"cannot resume from {path}: the model architecture differs from the checkpoint's:\n  "
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
        raise ConfigError(f"training.checkpoint_dir={folder!r} is not writable: {e}") from None


def rank_indices(n, dist, batch_size, drop_last):
    """This rank's disjoint share of the epoch table: strided, equal length on every rank."""
    per_rank = n // dist.world_size
    indices = list(range(dist.rank, per_rank * dist.world_size, dist.world_size))
    steps = per_rank // batch_size if drop_last else -(-per_rank // batch_size)
    return indices, steps


def check_epoch_has_steps(dataset, dist, t):
    """An epoch of zero steps would write checkpoints and grids of untrained networks and exit 0."""
    _, steps = rank_indices(len(dataset), dist, t["batch_size"], t["drop_last"])
    if steps > 0:
        return
    files, per_rank = sum(dataset.counts), len(dataset) // dist.world_size
    raise ConfigError(
        f"an epoch would train 0 steps: {files} latent files, data.samples_per_epoch="
        f"{dataset.samples_per_epoch} -> {len(dataset)} samples per epoch over {dist.world_size} process(es) = "
        f"{per_rank} per process, fewer than training.batch_size={t['batch_size']}"
        f"{' with training.drop_last true' if t['drop_last'] else ''}. Lower training.batch_size, raise "
        f"data.samples_per_epoch to at least {t['batch_size'] * dist.world_size}, or add data")


def fixed_samples(dataset):
    """One source and one reference latent per domain, for the grids: the first two files."""
    sources, refs = [], []
    for d in range(dataset.num_domains):
        first = dataset.offsets[d]
        sources.append(dataset.data[first])
        refs.append(dataset.data[first + min(1, dataset.counts[d] - 1)])
    return {"sources": torch.stack(sources), "references": torch.stack(refs)}


def main(argv=None):
    args = parse_args(argv)
    dist, local_rank = setup_distributed()
    log = print if dist.is_main else (lambda *a, **k: None)
    try:
        cfg = load_config(args.config, args.overrides)
        return train(cfg, args, dist, local_rank, log)
    except (ConfigError, FileNotFoundError, ValueError, NonFiniteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def train(cfg, args, dist, local_rank, log):
    t, d = cfg["training"], cfg["data"]
    device = resolve_device(t["device"], local_rank, log)
    configure_backends(device)
    ckpt_dir = t["checkpoint_dir"]
    if dist.is_main:
        check_writable(ckpt_dir)

    ckpt = None
    if args.resume is not None:
        path = args.resume or os.path.join(ckpt_dir, "latest.pt")
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
    start_epoch, start_batch = 1, 0
    if ckpt is not None:
        trainer.load_state_dict(ckpt)
        start_epoch, start_batch = int(ckpt["epoch"]) + 1, int(ckpt.get("position", 0))
    else:
        seed_everything(cfg["seed"] + dist.rank)  # different z on each rank
    if dist.is_main:
        save_resolved(cfg, ckpt_dir)
    samples = fixed_samples(dataset)
    trainer.latent_shape = dataset.shape
    previous_handlers = trainer.install_signal_handlers()
    try:
        return train_epochs(trainer, dataset, cfg, args, start_epoch, start_batch, samples, log)
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)


def train_epochs(trainer, dataset, cfg, args, start_epoch, start_batch, samples, log):
    t, dist, ckpt_dir = cfg["training"], trainer.dist, cfg["training"]["checkpoint_dir"]
    quiet = lambda *a, **k: None  # noqa: E731  (loader notices once, not every epoch)
    loader_gen = torch.Generator()  # the loader's base seed must not draw from the global RNG (exact resume)

    if start_epoch <= t["epochs"]:
        check_epoch_has_steps(dataset, dist, t)
    for epoch in range(start_epoch, t["epochs"] + 1):
        dataset.set_epoch(epoch)
        indices, steps = rank_indices(len(dataset), dist, t["batch_size"], t["drop_last"])
        skip = start_batch * t["batch_size"] if epoch == start_epoch else 0
        loader = build_loader(dataset, t["batch_size"], num_workers=t["num_workers"], pin_memory=t["pin_memory"],
                              drop_last=t["drop_last"], sampler=indices[skip:], log=log if epoch == start_epoch else quiet,
                              generator=loader_gen)
        done = trainer.train_epoch(loader, epoch, start_batch=skip // t["batch_size"], total_batches=steps)
        if trainer.stop_signal is not None:
            return stop(trainer, args, ckpt_dir, epoch, done, steps, log)
        save_epoch(trainer, t, epoch, latest=epoch == t["epochs"])
        if trainer.visualize_now(epoch):
            path = trainer.evaluate(epoch, samples)
            if path:
                log(f"epoch {epoch}: grid {path}")
        dist.barrier()
    log(f"done: {t['epochs']} epochs, {trainer.step} steps{trainer.skipped_summary()}; checkpoints in {ckpt_dir}")
    return 0


def save_epoch(trainer, t, epoch, latest=False):
    """End of an epoch: every save_interval epochs write epoch_NNNN.pt and latest.pt (the seed's
    semantics); `latest` forces latest.pt (last epoch, stop signal). Returns latest.pt's path."""
    trainer.epoch = epoch
    ckpt_dir = t["checkpoint_dir"]
    path = os.path.join(ckpt_dir, "latest.pt")
    if epoch % t["save_interval"] == 0:
        trainer.save_checkpoint(os.path.join(ckpt_dir, f"epoch_{epoch:04d}.pt"), epoch)
    if epoch % t["save_interval"] == 0 or latest:
        trainer.save_checkpoint(path, epoch)
        if trainer.dist.is_main:
            prune_checkpoints(ckpt_dir, t["keep_checkpoints"])
    return path


def stop(trainer, args, ckpt_dir, epoch, done, steps, log):
    """After SIGINT/SIGTERM: save the exact position, say how to resume, exit non-zero."""
    if done >= steps:  # the epoch happened to be complete: save it as any other (no grid: exit promptly)
        path = save_epoch(trainer, trainer.cfg["training"], epoch, latest=True)
    else:
        path = trainer.save_checkpoint(os.path.join(ckpt_dir, "latest.pt"), epoch - 1, position=done)
    trainer.dist.barrier()
    cmd = " ".join(["python run.py", "--config", args.config, *args.overrides, "--resume"])
    log(f"stopped at step {trainer.step} (epoch {epoch}, batch {done}/{steps}); saved {path}\nresume with: {cmd}")
    return 128 + int(trainer.stop_signal)


if __name__ == "__main__":
    sys.exit(main())
