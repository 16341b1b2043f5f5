"""What every script shares at run time: the one bad-input error, atomic file writes, checkpoint
files (save, load, prune), RNG state, devices and their capabilities (fused Adam, torch.compile
options), stop signals and the process group.

Imported by the library (trainer, dataset, vae, inference, metrics) and by every script (run.py,
encode.py, translate.py, bench.py, evaluate.py, app.py); it imports nothing of the project.
"""

import datetime
import glob
import os
import random
import re
import signal
import sys
import warnings

import numpy as np
import torch


class InputError(ValueError):
    """Bad input from the user (a config key, a flag, a file, a folder): the message names it and
    says what was expected. Every command-line script prints the message and exits with code 2."""


BAD_INPUT = (InputError, FileNotFoundError)


def run_script(prog, run, *args, errors=BAD_INPUT):
    """`run(*args)` for a command-line script: bad input (`errors`) prints `prog: error: message` on
    stderr and gives exit code 2, instead of a traceback."""
    try:
        return run(*args)
    except errors as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------------- files

def atomic_write(path, write, fsync=False):
    """write(f) into a hidden temporary file beside `path` (binary), then rename over `path`: a crash
    at any moment leaves the previous file intact and no partial file behind."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_save(obj, path):
    """torch.save through a temporary file in the same folder, fsynced, then renamed."""
    return atomic_write(path, lambda f: torch.save(obj, f), fsync=True)


CHECKPOINT_KEYS = ("epoch", "step", "config", "models", "ema")


def load_checkpoint(path, map_location="cpu"):
    """torch.load with weights_only=True (never a full unpickle: a hostile file cannot run code);
    InputError for anything that is not a Latent StarGAN v2 checkpoint."""
    if not os.path.isfile(path):
        raise InputError(f"checkpoint {path!r} not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise InputError(f"{path!r} is not a Latent StarGAN v2 checkpoint (cannot be loaded with "
                         f"weights_only=True: {type(e).__name__}: {str(e)[:200]})") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise InputError(f"{path!r} is not a Latent StarGAN v2 checkpoint (missing keys: {', '.join(missing)})")
    return ckpt


def prune_checkpoints(folder, keep):
    """Keep the `keep` newest epoch_NNNN.pt files (None: keep all). Returns the removed paths."""
    if not keep:
        return []
    numbered = []
    for path in glob.glob(os.path.join(folder, "epoch_*.pt")):
        match = re.search(r"epoch_(\d+)\.pt$", path)
        if match:
            numbered.append((int(match.group(1)), path))
    removed = [path for _, path in sorted(numbered)[:-keep]]
    for path in removed:
        os.remove(path)
    return removed


# ---------------------------------------------------------------------- RNG

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_rng_state():
    """torch (CPU and every CUDA device), numpy and Python RNG states as plain tensors and lists, so
    a checkpoint holding them loads with weights_only=True."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]),
                   "gauss": py_state[2] if py_state[2] is None else float(py_state[2])},
    }


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


# ---------------------------------------------------------------------- devices

def resolve_device(requested=None, local_rank=None, fallback=True, flag="--device"):
    """torch.device for `requested` (None: cuda when available). Without CUDA, a cuda request falls
    back to the CPU with one warning when `fallback` (training: the default config runs as a CPU
    smoke test), else it is an InputError naming `flag`. Under torchrun, cuda means cuda:LOCAL_RANK."""
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError) as e:
        raise InputError(f"{flag} {requested!r} is not a device (expected cuda, cuda:N or cpu): {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        if not fallback:
            raise InputError(f"{flag} {requested} asked for, but CUDA is not available here; use {flag} cpu")
        warnings.warn(f"{flag}={requested!r} but CUDA is not available: running on the CPU")
        return torch.device("cpu")
    if device.type == "cuda" and local_rank is not None:
        return torch.device("cuda", local_rank)
    return device


def is_oom(err):
    """An out-of-memory error, whichever way the device reported it."""
    return isinstance(err, torch.cuda.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


def configure_backends(device):
    """cuDNN autotuning for the fixed latent shapes, TF32 matmuls/convs for the fp32 path."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def fused_adam_supported(device):
    """Whether fused Adam runs on `device` (CUDA and, in recent torch, the CPU): probe it once."""
    try:
        p = torch.nn.Parameter(torch.zeros(1, device=device))
        p.grad = torch.zeros(1, device=device)
        torch.optim.Adam([p], fused=True).step()
        return True
    except Exception:
        return False


def compile_options(mode, cudagraphs):
    """torch refuses `mode` and `options` together: translate the pair into options alone, so
    `compile_cudagraphs` decides CUDA graphs whatever the mode."""
    try:
        import torch._inductor

        opts = dict(torch._inductor.list_mode_options(mode)) if mode != "default" else {}
    except Exception:
        opts = {}
    opts["triton.cudagraphs"] = bool(cudagraphs)
    return opts


def on_stop_signal(callback):
    """Call `callback(signum)` on SIGINT / SIGTERM in this process (forked loader workers ignore
    them: the main process decides). Returns the previous handlers, for `signal.signal` to restore."""
    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() == owner:
            callback(signum)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, handler)
    return previous


# ---------------------------------------------------------------------- process group

class Distributed:
    """Process-group facts; a single process is world_size 1, rank 0, and every method a no-op."""

    def __init__(self, rank=0, world_size=1):
        self.rank, self.world_size = rank, world_size
        # host-side decisions (stop signals, evaluation verdicts) travel through a CPU group: no GPU
        # sync for a flag. Its long timeout lets the other ranks wait while rank 0 evaluates.
        self.cpu_group = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(hours=6)) \
            if world_size > 1 else None

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def enabled(self):
        return self.world_size > 1

    def average_gradients(self, params, flags):
        """Average `params`' grads over ranks and sum `flags` (skip votes), one all-reduce.

        We all-reduce ourselves after every backward of the phase (as StyleGAN2-ADA does) instead
        of wrapping in DDP: a GAN phase runs several backward passes, R1 a double backward, and
        the G step drops E's grads between its two passes, none of which DDP's hooks handle well.
        Ranks with no grad for a parameter contribute zeros, so every rank takes the same decision.
        """
        if not self.enabled:
            return flags
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [flags.reshape(-1).float()])
        torch.distributed.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = (flat[offset:offset + n] / self.world_size).view_as(p).to(p.dtype)
            offset += n
        return flat[offset:].view_as(flags)

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()

    def max_int(self, value):
        """The largest of every rank's `value` (e.g. a stop signal number, 0 for none)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self.cpu_group)
        return int(t.item())

    def gather(self, obj):
        """Every rank's `obj` in rank order (small host objects: RNG states)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj, group=self.cpu_group)
        return out

    def check_in_sync(self, modules):
        """Weights must stay identical on every rank: compare a float64 checksum of each net."""
        if not self.enabled:
            return
        sums = [float(sum(p.detach().double().sum() for p in m.parameters())) for m in modules.values()]
        ranks = self.gather(sums)
        if any(r != ranks[0] for r in ranks):
            raise RuntimeError(f"weights diverged across ranks: per-rank checksums {ranks}")


def setup_distributed():
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK: join the group (NCCL on CUDA, gloo on the CPU).
    Returns (Distributed, local rank or None)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Distributed(), None
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        torch.distributed.init_process_group("nccl", device_id=torch.device("cuda", local))
    else:
        torch.distributed.init_process_group("gloo")
    return Distributed(rank, world), local
