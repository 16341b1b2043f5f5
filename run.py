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
import contextlib  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402

from checkpoint import load_checkpoint  # noqa: E402
from config import (RESOLVED_CONFIG, latent_space, load_config, model_kwargs, resolve_latent_space,  # noqa: E402
                    save_resolved)
from dataset import MultiDomainLatentDataset  # noqa: E402
from demo_data import generate_demo_data  # noqa: E402
from distributed import setup_distributed  # noqa: E402
from folder_lock import LOCK_NAME, FolderLock  # noqa: E402
from latents import MANIFEST_NAME, SD15, check_same_space, manifest_path, read_manifest  # noqa: E402
from model import build_models, count_parameters  # noqa: E402
from packing import ShardChanged, changed_shard  # noqa: E402
from runtime import (BAD_INPUT, InputError, WriteError, check_writable_folder, configure_backends,  # noqa: E402
                     remove_if_empty, remove_orphaned_temporaries, resolve_device, run_script, seed_everything)
from train_backend import choose_cpu_threads  # noqa: E402
from train_skips import NonFiniteError  # noqa: E402
from trainer import Trainer  # noqa: E402
from vae import check_vae_config  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train Latent StarGAN v2 on VAE latents.")
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
    """A resumed model must match the checkpoint's architecture and latent space: name the differing
    keys (a checkpoint without the latent keys is SD1.5's)."""
    check_same_space(latent_space(ckpt_cfg), latent_space(cfg), "checkpoint", "config",
                     f"cannot resume from {path}: ")
    diff = [f"model.{k}: checkpoint {ckpt_cfg['model'].get(k)!r} vs config {v!r}"
            for k, v in cfg["model"].items() if k != "latent_channels" and ckpt_cfg["model"].get(k) != v]
    if list(ckpt_cfg["data"]["domains"]) != list(cfg["data"]["domains"]):
        diff.append(f"data.domains: checkpoint {ckpt_cfg['data']['domains']} vs config {cfg['data']['domains']}")
    if diff:
        raise InputError(f"cannot resume from {path}: the model architecture differs from the checkpoint's:\n  "
                         + "\n  ".join(diff))


START_FILES, START_FOLDERS = (LOCK_NAME, RESOLVED_CONFIG), ("vis", "eval_cache")  # what a run writes before step 1


@contextlib.contextmanager
def claimed_folder(folder, dist, log):
    """The checkpoint folder for this run alone, for the run's life: rank 0 checks that it is
    writable before the first step, takes its lock (a second run on it is refused, naming the
    holder) and removes temporary files that killed saves left. Every rank learns of a refusal. A
    folder this run created and left with only what it wrote at start (it failed before its first
    save) is removed. Yields the lock (held by rank 0 alone)."""
    lock, created, problem = FolderLock(folder), False, None
    if dist.is_main:
        try:
            created = check_writable_folder(folder, "training.checkpoint_dir")
            lock.acquire()
            for sub in ("", *START_FOLDERS):
                remove_orphaned_temporaries(os.path.join(folder, sub), log)
        except InputError as err:
            problem = err
    if dist.max_int(int(problem is not None)):
        raise problem or InputError("rank 0 could not claim training.checkpoint_dir (its error is above)")
    try:
        yield lock
    finally:
        empty = dist.is_main and created and only_start_files(folder)
        lock.release(remove=empty)  # its watcher stops first: a removed lock file is not put back
        if empty:
            remove_start_files(folder)


def only_start_files(folder):
    """Whether `folder` holds only what a run writes before its first save: the lock, config.yaml and
    empty vis/ or eval_cache/ folders (a run that failed at start, such as its evaluator not opening)."""
    try:
        names = set(os.listdir(folder))
        return (names <= {*START_FILES, *START_FOLDERS}
                and not any(os.listdir(os.path.join(folder, name)) for name in names & set(START_FOLDERS)))
    except OSError:  # a file where vis/ goes, or the folder went away
        return False


def remove_start_files(folder):
    """Remove a folder `only_start_files` found, with what the run wrote in it."""
    for name in START_FILES:
        with contextlib.suppress(OSError):  # removed by hand meanwhile
            os.remove(os.path.join(folder, name))
    for name in (*START_FOLDERS, ""):
        remove_if_empty(os.path.join(folder, name))


def check_decoders(cfg):
    """The VAEs that will decode this run's latents (grids; evaluation when it runs), by their
    config.json when at hand (no weights read), before the folder is claimed: one of another latent
    space is refused naming both numbers, instead of being found at the first grid, an epoch later."""
    space, v, e = latent_space(cfg), cfg["visualization"], cfg["evaluation"]
    check_vae_config(v["preview_vae"], None, space, "visualization.preview_vae", keys=("channels",))
    check_vae_config(v["vae_path"], v["vae_subfolder"], space, "visualization.vae_path")
    if e["every_epochs"] and e["vae_path"]:
        check_vae_config(e["vae_path"], None, space, "evaluation.vae_path")


def check_folders(cfg):
    """The folders a run reads or writes besides its checkpoint folder, before that is claimed (no
    config.yaml or lock left behind by a run that cannot start): evaluation.source_root holding a
    folder per domain, visualization.save_dir writable (else the first grid, an epoch later, would
    find out)."""
    source_root = cfg["evaluation"]["source_root"]
    if cfg["evaluation"]["every_epochs"] and source_root:
        root = os.path.expanduser(source_root)
        missing = [d for d in cfg["data"]["domains"] if not os.path.isdir(os.path.join(root, d))]
        if missing:
            problem = "is not a folder" if not os.path.isdir(root) else f"has no folder {', '.join(map(repr, missing))}"
            raise InputError(f"evaluation.source_root {source_root!r} {problem} (expected one folder of latents "
                             "per domain of data.domains)")
    save_dir = cfg["visualization"]["save_dir"]
    if save_dir:
        if check_writable_folder(save_dir, "visualization.save_dir"):
            remove_if_empty(save_dir)  # made again by the first grid


def resume_command(args, path=None):
    """The command that continues this run (from `path` when it is not the folder's latest.pt)."""
    return shlex.join(["python", "run.py", "--config", args.config, *args.overrides, "--resume",
                       *([path] if path else [])])


def main(argv=None):
    args = parse_args(argv)
    dist, local_rank = setup_distributed()
    log = print if dist.is_main else (lambda *a, **k: None)
    try:
        return run_script("run.py", lambda: train(load_config(args.config, args.overrides), args.resume, dist,
                                                  local_rank, log, args), errors=BAD_INPUT + (NonFiniteError,))
    finally:
        if dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def data_latent_space(cfg, log):
    """The run's latent space, written into `cfg`: the config's latent keys, the rest from the data
    root's manifest (encode.py writes it), else SD1.5's. A demo root is made with the config's space.
    Returns the manifest's record (None without one), which every checkpoint then carries."""
    d = cfg["data"]
    found = None if d["synthetic"] else read_manifest(d["root"])
    space = resolve_latent_space(cfg, found and found[0], None if d["synthetic"] else manifest_path(d["root"]))
    if found is None and not d["synthetic"]:
        log(f"{d['root']} has no {MANIFEST_NAME} (encode.py writes one): latent space {space.describe()}"
            + (" (SD1.5's is assumed)" if space == SD15 else " (the config's latent keys)"))
    return found and found[1]


def train(cfg, resume, dist, local_rank, log, args):
    t = cfg["training"]
    latent_record = data_latent_space(cfg, log)
    device = resolve_device(t["device"], local_rank, flag="training.device")
    configure_backends(device)
    if t["cpu_threads"]:  # torch's default (one per core) crawls when the cores are busy with other work
        torch.set_num_threads(t["cpu_threads"])
    elif device.type == "cpu":  # null: measured, the faster of torch's default and 1
        choose_cpu_threads(log)
    ckpt = None
    if resume is not None:  # checked completely before the folder is claimed or anything is built
        path = resume or os.path.join(t["checkpoint_dir"], "latest.pt")
        ckpt = load_checkpoint(path, resume=True)
        check_architecture(ckpt["config"], cfg, path)
    check_decoders(cfg)
    check_folders(cfg)
    with claimed_folder(t["checkpoint_dir"], dist, log) as lock:
        if ckpt is not None:
            log(f"resuming from {path}: epoch {ckpt['epoch']} done, step {ckpt['step']}")
        trainer, dataset = build(cfg, ckpt, dist, device, log)
        checkpoints = trainer.checkpoints  # knows the newest checkpoint this run can resume from
        checkpoints.lock = lock  # checked before each save: the folder is still this run's
        lock.on_lost = lambda err: trainer.stop_request.from_within(f"stopping: {err}")  # the save then refuses
        checkpoints.latent_record = latent_record
        if ckpt is not None:
            checkpoints.resumed_from(path, ckpt["epoch"], ckpt["step"])
        try:
            code = trainer.fit(dataset)
        except WriteError as err:  # disk full, read-only folder: say what is intact and how to go on
            if checkpoints.last_saved is None:
                raise
            raise WriteError(err.errno, f"{err}\nresume with: {resume_command(args, resume_path(checkpoints, t))}") \
                from None
        except (ShardChanged, RuntimeError) as err:  # data changed under the run, here or in a loader worker
            changed = data_changed(err, dataset)
            if changed is None:
                raise
            resume = f" Resume with: {resume_command(args, resume_path(checkpoints, t))}" if checkpoints.last_saved else ""
            raise ShardChanged(f"{changed}; training stopped at step {trainer.step}. {checkpoints.saved_summary()}"
                               f"{resume}") from None
        except KeyboardInterrupt:  # a second stop signal: no traceback, just what is on disk
            log(f"\nstopped at once at step {trainer.step}. {checkpoints.saved_summary()}")
            code = 128 + int(trainer.stop_request.signum or signal.SIGINT)
        if code > 2 and checkpoints.last_saved is not None:  # stopped by a signal (128 + its number)
            log("resume with: " + resume_command(args, resume_path(checkpoints, t)))
        return code


def data_changed(err, dataset):
    """One line for a packed file changed under the run: ShardChanged's own message (a loader worker's
    comes back with the worker's traceback in its text), or a worker's death by SIGBUS (a file was
    truncated between the check and the read), naming the shard whose file is no longer the one
    mapped; None for any other error."""
    text = str(err)
    if isinstance(err, ShardChanged):
        marker = f"{ShardChanged.__name__}: "
        return text[text.rindex(marker) + len(marker):].strip() if "Original Traceback" in text else text
    causes = [str(e) for e in (err, err.__cause__, err.__context__) if e is not None]  # the loader's "killed by"
    if any("Bus error" in cause or "SIGBUS" in cause for cause in causes):
        found = changed_shard(dataset.shards or [])
        if found is not None:
            return f"a data loader worker was killed by SIGBUS: {found}"
        where = (f"every latents.npy under {dataset.root} is the file this run mapped" if dataset.shards else
                 f"the data under {dataset.root} is not memory-mapped")
        return (f"a data loader worker was killed by SIGBUS, yet {where}: a full /dev/shm also does this; free or "
                "enlarge it, or set training.num_workers 0")
    return None


def resume_path(checkpoints, t):
    """The checkpoint a resumed run starts from: None for the folder's latest.pt (the default)."""
    saved = checkpoints.last_saved[0]
    return None if os.path.abspath(saved) == os.path.abspath(os.path.join(t["checkpoint_dir"], "latest.pt")) else saved


def build(cfg, ckpt, dist, device, log):
    """The data set, the networks and the Trainer (resumed from `ckpt` when given)."""
    t, d = cfg["training"], cfg["data"]
    if d["synthetic"]:
        if dist.is_main:
            generate_demo_data(d["root"], d["domains"], files_per_domain=d["synthetic_files_per_domain"],
                               seed=cfg["seed"], space=latent_space(cfg), log=log)
        dist.barrier()

    seed_everything(cfg["seed"])  # same weights on every rank
    dataset = MultiDomainLatentDataset(d["root"], d["domains"], preload_to_gpu=d["preload_to_gpu"], device=device,
                                       samples_per_epoch=d["samples_per_epoch"], seed=cfg["seed"], hflip=d["hflip"],
                                       preload_max_fraction=d["preload_max_fraction"],
                                       reject_outliers=d["reject_outliers"], log=log, progress=dist.is_main,
                                       channels=cfg["model"]["latent_channels"])
    models = build_models(**model_kwargs(cfg))
    log("parameters: " + ", ".join(f"{k} {count_parameters(m) / 1e6:.2f}M" for k, m in models.items()))
    trainer = Trainer(cfg, models, device, dist=dist, log=log)
    if ckpt is not None:
        trainer.load_state_dict(ckpt)
    else:
        seed_everything(cfg["seed"] + dist.rank)  # different z on each rank
    if dist.is_main:
        save_resolved(cfg, t["checkpoint_dir"])
    return trainer, dataset


if __name__ == "__main__":
    sys.exit(main())
