"""What every script shares at run time: the one bad-input error, argument checks, atomic file
writes (and the one error a failed write becomes), the lock that gives a checkpoint folder to one
run, checkpoint files (save, load with complete validation, prune), RNG state, devices and their
capabilities (fused Adam, torch.compile options), stop signals and the process group.

Imported by the library (trainer, dataset, vae, inference, metrics) and by every script (run.py,
encode.py, translate.py, bench.py, evaluate.py, app.py). At import time it imports nothing of the
project; checkpoint validation imports config and model when it runs (they import this module).
"""

import datetime
import errno
import glob
import math
import os
import random
import re
import reprlib
import signal
import socket
import sys
import time
import warnings

import numpy as np
import torch


class InputError(ValueError):
    """Bad input from the user (a config key, a flag, a file, a folder): the message names it and
    says what was expected. Every command-line script prints the message and exits with code 2."""


class StopRequested(Exception):
    """A stop signal arrived during long work beside the training loop (a grid, an evaluation):
    raised at the work's next batch, so the run stops in seconds rather than minutes."""


class StopNow(KeyboardInterrupt):
    """A second stop signal: leave at once. What is on disk stays valid (atomic writes)."""


class WriteError(OSError):
    """A file could not be written (disk full, read-only or vanished folder, permissions): one
    message naming the file and the operating system's reason. Scripts exit with code 1.
    Built as WriteError(errno, message); printed as the message alone."""

    def __str__(self):
        return self.strerror if isinstance(self.strerror, str) else super().__str__()


class OtherRankFailed(RuntimeError):
    """Under torchrun: another rank failed (its error is printed by that rank); this one stops too."""


BAD_INPUT = (InputError, FileNotFoundError)


def run_script(prog, run, *args, errors=BAD_INPUT):
    """`run(*args)` for a command-line script: bad input (`errors`) prints `prog: error: message` on
    stderr and gives exit code 2, a failed write (`WriteError`) or another rank's failure the same
    with exit code 1, instead of a traceback."""
    try:
        return run(*args)
    except (WriteError, OtherRankFailed) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except errors as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what was written is complete (atomic writes); no traceback
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


def script_main(prog, parse_args, run, argv=None, errors=BAD_INPUT):
    """A script's main(argv): argparse's own exits (usage errors 2, --help 0) become the return code,
    as everything else does through `run_script`, so callers and tests always get a code."""
    try:
        args = parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    return run_script(prog, run, args, errors=errors)


# ---------------------------------------------------------------------- argument checks

SEED_LIMIT = 2 ** 63  # torch.Generator.manual_seed takes a signed 64-bit seed


def check_seed(seed, flag="--seed"):
    """An int in [0, 2**63): what every generator of the project can be seeded with."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise InputError(f"{flag} {seed!r}: expected an integer from 0 to 2**63 - 1")
    return seed


def check_psi(psi, flag="--psi"):
    """StarGAN v2's truncation psi: a finite number in [0, 1] (0: the domain's mean style, 1: none)."""
    try:
        value = float(psi)
    except (TypeError, ValueError):
        raise InputError(f"{flag} {psi!r}: expected a number from 0 to 1") from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise InputError(f"{flag} {psi!r}: expected a number from 0 (the domain's mean style) to 1 (no truncation)")
    return value


def path_component_problem(name):
    """Why `name` cannot be one path component (a domain name becomes a folder and file names in
    every tool), or None. Refused: empty, '.', '..', separators, NUL and other control characters."""
    if not isinstance(name, str) or not name:
        return "expected a non-empty string"
    if name in (".", ".."):
        return "'.' and '..' are not folder names"
    if "/" in name or "\\" in name:
        return "a name may not contain '/' or '\\'"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "a name may not contain NUL or other control characters"
    if len(name.encode("utf-8", "surrogatepass")) > 255:
        return "a name may be at most 255 bytes"
    return None


def check_writable_folder(folder, flag):
    """Create `folder` if needed and prove a file can be written in it, before any long work.
    Returns True when this call created it (so a run that fails at once can remove it again)."""
    folder = os.path.expanduser(str(folder))
    created = not os.path.isdir(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as e:
        raise InputError(f"{flag} {folder!r} is not writable: a folder must be created there and hold files "
                         f"({e.strerror or e})") from None
    return created


def remove_if_empty(folder):
    """Remove `folder` when nothing is in it (a run that failed before writing anything)."""
    try:
        os.rmdir(folder)
    except OSError:  # not empty, or already gone
        pass


# ---------------------------------------------------------------------- files

PID_MAX = 2 ** 22  # Linux's largest pid_max
TMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")  # atomic_write's temporary files


def os_error_in(err):
    """The OSError with an errno behind `err`, following its cause / context chain: torch.save
    reports a failed write as a RuntimeError of its zip writer, with the OSError far below."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno:
            return err
        err = err.__cause__ or err.__context__
    return None


def write_failure(path, err):
    """A WriteError naming `path` and the operating system's reason, when `err` is (or hides) an
    OSError with an errno; None for any other failure (a bug must keep its traceback)."""
    os_err = os_error_in(err)
    if os_err is None:
        return None
    reason = os.strerror(os_err.errno)
    hint = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
            errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
            errno.EFBIG: "the file is larger than this process may write"}.get(os_err.errno)
    detail = reason if not hint or hint.lower() == reason.lower() else f"{reason}: {hint}"
    return WriteError(os_err.errno, f"cannot write {path} ({detail})")


def atomic_write(path, write, fsync=False):
    """write(f) into a hidden temporary file beside `path` (binary), then rename over `path`: a crash
    at any moment leaves the previous file intact and no partial file behind. A failure of the file
    system (disk full, read-only, permissions) is a WriteError naming `path`."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            if os.path.exists(tmp):
                os.remove(tmp)
        except OSError:  # the folder went away or read-only: the start of the next run removes it
            pass
        failure = write_failure(path, err) if isinstance(err, Exception) else None
        if failure is not None:
            raise failure from None
        raise
    return path


def remove_orphaned_temporaries(folder, log=print):
    """Remove atomic_write's temporary files in `folder` left by processes that no longer run (a
    save killed half-way): only names `.NAME.PID.tmp` whose PID is not alive. Says what it removed."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in sorted(names):
        match = TMP_PATTERN.match(name)
        if not match or int(match.group("pid")) > PID_MAX or pid_alive(int(match.group("pid"))):
            continue  # not ours (no PID is that large), or its process still runs
        path = os.path.join(folder, name)
        try:
            size = os.path.getsize(path)
            os.remove(path)
        except OSError:
            continue
        removed.append(path)
        log(f"removed {path} ({size / 2**20:.1f} MB): a temporary file of an interrupted save "
            f"(process {match.group('pid')} no longer runs)")
    return removed


def pid_alive(pid):
    """Whether a process with this PID runs on this machine (one of another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


# ---------------------------------------------------------------------- one run per folder

LOCK_NAME = ".run.lock"
_HELD_LOCKS = set()  # the lock files this process holds


def _drop_inherited_locks():
    """In a forked child (a DataLoader worker), close the parent's lock files: an flock belongs to the
    open file, which a fork shares, so a worker would otherwise hold the folder after its run died."""
    for file in list(_HELD_LOCKS):
        try:
            file.close()
        except OSError:
            pass
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


class FolderLock:
    """An exclusive OS lock on `<folder>/.run.lock`, held for the life of a training run.

    The operating system drops the lock when the process ends, however it ends (kill -9 included),
    so a crashed run never leaves a stale lock behind. The file keeps the holder's PID, host and
    start time for the message a second run gets. flock locks are per open file, so two runs in
    one process exclude each other too.
    """

    def __init__(self, folder):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self.file = None

    def acquire(self, what="training.checkpoint_dir"):
        """Take the lock or raise InputError naming the folder and the run that holds it."""
        try:
            import fcntl
        except ImportError:  # not a POSIX system: no lock, as before
            return self
        try:
            file = open(self.path, "a+", encoding="utf-8")
        except OSError as e:
            raise InputError(f"{what} {self.folder!r}: cannot create the lock file {LOCK_NAME} "
                             f"({e.strerror or e})") from None
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise InputError(f"{what} {self.folder!r} is in use by another training run ({holder}); one "
                                 "folder holds one run: wait for it to finish, stop it, or choose another "
                                 "training.checkpoint_dir") from None
            raise InputError(f"{what} {self.folder!r}: cannot lock {LOCK_NAME} ({e.strerror or e})") from None
        file.seek(0)
        file.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        file.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n")
        file.flush()
        self.file = file
        _HELD_LOCKS.add(file)
        return self

    def release(self):
        if self.file is not None:
            _HELD_LOCKS.discard(self.file)
            self.file.close()  # closing the file drops the lock; the file stays for the next run
            self.file = None

    def __enter__(self):
        return self if self.file is not None else self.acquire()

    def __exit__(self, *exc):
        self.release()


def atomic_save(obj, path):
    """torch.save through a temporary file in the same folder, fsynced, then renamed."""
    return atomic_write(path, lambda f: torch.save(obj, f), fsync=True)


# ---------------------------------------------------------------------- checkpoints

# what Trainer.state_dict writes; rng_per_rank only under torchrun
CHECKPOINT_KEYS = ("epoch", "step", "position", "config", "domains", "latent_shape", "models", "ema", "optimizers",
                   "scaler", "counters", "rng", "best")
OPTIONAL_CHECKPOINT_KEYS = ("rng_per_rank",)
COUNTER_LIMIT = 10 ** 12  # epochs, steps and positions beyond this are no run of this world
MAX_LATENT_SIZE = 1024  # latent H and W: an 8192 px image for an SD VAE


class CheckpointError(InputError):
    """A checkpoint that is not what run.py writes: the message names the file and the entry."""


def load_error_reason(err):
    """Why torch.load(weights_only=True) refused a file, in one line. torch's own message advises
    retrying with weights_only=False: wrong for a corrupt file and unsafe for a hostile one."""
    text = str(err)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return (f"it holds a pickled {found.group(1)}, which is refused: only tensors and plain containers load "
                "safely (unpickling anything else could run code)")
    found = re.search(r"WeightsUnpickler error: \s*(.+)", text)
    if found or "Weights only load failed" in text:
        detail = found.group(1).strip().splitlines()[0] if found else "unsupported content"
        return f"it is not a torch.save file of tensors (the weights-only unpickler stopped: {detail})"
    if "zip archive" in text or "central directory" in text:
        return "it is not a torch.save file, or a truncated or corrupted one"
    first = text.strip().splitlines()[0][:200] if text.strip() else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def load_checkpoint(path, map_location="cpu"):
    """torch.load with weights_only=True (never a full unpickle: a hostile file cannot run code),
    then `validate_checkpoint` (weights_only stops code, not bad values). CheckpointError (an
    InputError) naming the file and the entry for anything that is not a sound checkpoint."""
    if not os.path.isfile(path):
        raise InputError(f"checkpoint {path!r} not found")
    try:
        with warnings.catch_warnings():  # torch's note on a plain pickle's protocol: the error says enough
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a Latent StarGAN v2 checkpoint ({load_error_reason(e)})") from None
    validate_checkpoint(ckpt, path)
    return ckpt


def validate_checkpoint(ckpt, path):
    """Check a checkpoint completely before anything is built from it, on save and on load: every
    entry present; the config valid and within bounds; every weight (live and EMA) and optimizer
    moment of the right shape and dtype for the networks that config describes, and finite;
    optimizer settings and scaler state sane; counters non-negative and consistent; RNG states
    loadable; every tensor owning storage of exactly its size (a tiny file cannot expand into gigabytes,
    or feed a kernel a zero-stride view). Raises CheckpointError naming `path` and the entry;
    returns the resolved config."""
    try:
        return _CheckpointChecker(path).check(ckpt)
    except (RecursionError, OverflowError, MemoryError) as err:  # absurdly nested or sized values
        raise CheckpointError(f"{path}: not a Latent StarGAN v2 checkpoint ({type(err).__name__} while checking "
                              "it: values nested or sized beyond any checkpoint run.py writes)") from None


_REPR = reprlib.Repr()  # bounded: a hostile value may be nested or long beyond any repr's patience
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 2, 60, 60, 40


def _describe(value):
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).replace('torch.', '')} tensor of shape {list(value.shape)}"
    return f"{type(value).__name__} {_REPR.repr(value)}"


def _all_finite(tensor):
    return bool(torch.isfinite(tensor).all()) if tensor.is_floating_point() else True


class _CheckpointChecker:
    """One walk over a checkpoint dict; `fail` names the entry as a dotted path."""

    def __init__(self, path):
        self.path = path

    def fail(self, entry, expected, value=None, got=None):
        got = got if got is not None else _describe(value)
        raise CheckpointError(f"{self.path}: entry {entry}: expected {expected}, got {got}")

    def mapping(self, entry, value, keys, optional=(), exact=True):
        if not isinstance(value, dict):
            self.fail(entry, f"a dict with keys {', '.join(map(str, keys))}", value)
        missing = [k for k in keys if k not in value]
        if missing:
            self.fail(f"{entry}.{missing[0]}" if entry else str(missing[0]), "an entry here", got="nothing (missing)")
        extra = [k for k in value if k not in keys and k not in optional]
        if exact and extra:
            self.fail(f"{entry}.{extra[0]}" if entry else str(extra[0]), "no such entry (not written by run.py)",
                      got="one")
        return value

    def integer(self, entry, value, low=0, high=COUNTER_LIMIT):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.fail(entry, f"an int from {low} to {high}", value)
        return value

    def number(self, entry, value, low=-math.inf, high=math.inf, integral=False):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 1e300 \
            and math.isfinite(value) and low <= value <= high and (not integral or float(value).is_integer())
        if not ok:
            kind = "a whole number" if integral else "a finite number"
            self.fail(entry, f"{kind} from {low:g} to {high:g}", value)
        return value

    def flag(self, entry, value, allowed=(True, False, None)):
        if not any(value is a for a in allowed):
            self.fail(entry, " or ".join(map(str, allowed)), value)

    def tensor(self, entry, value, shape, dtype, finite=True, non_negative=False, what=""):
        expected = f"a {str(dtype).replace('torch.', '')} tensor of shape {list(shape)}{what}"
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided or value.dtype != dtype \
                or tuple(value.shape) != tuple(shape):
            self.fail(entry, expected, value)
        nbytes = value.untyped_storage().nbytes()
        if not value.is_contiguous() or value.storage_offset() != 0 or nbytes != value.numel() * value.element_size():
            self.fail(entry, f"{expected}, contiguous, with storage of its own", got=f"a view (strides "
                      f"{list(value.stride())}, offset {value.storage_offset()}, storage of {nbytes} bytes)")
        if finite and not _all_finite(value):
            self.fail(entry, "finite values", got="non-finite values (NaN or inf)")
        if non_negative and not bool((value >= 0).all()):
            self.fail(entry, "non-negative values", got="negative values")
        return value

    # the parts

    def check(self, ckpt):
        from config import model_kwargs, resolve_config  # config imports this module
        from model import EMA_NETS, NETS, expected_state

        if not isinstance(ckpt, dict) or not {"config", "models", "ema"} & set(ckpt):
            raise CheckpointError(f"{self.path}: not a Latent StarGAN v2 checkpoint (expected the dict run.py writes, "
                                  f"with entries {', '.join(CHECKPOINT_KEYS)}; got {_describe(ckpt)})")
        self.mapping("", ckpt, CHECKPOINT_KEYS, OPTIONAL_CHECKPOINT_KEYS)
        if not isinstance(ckpt["config"], dict):
            self.fail("config", "the resolved config (a dict)", ckpt["config"])
        try:
            cfg = resolve_config(ckpt["config"], source=f"the config saved in {self.path}")
        except InputError as e:
            raise CheckpointError(f"{self.path}: entry config: {e}") from None
        domains = list(cfg["data"]["domains"])
        if ckpt["domains"] != domains:
            self.fail("domains", f"the config's data.domains {domains}", ckpt["domains"])
        self.latent_shape(ckpt["latent_shape"])
        states, params = expected_state(**model_kwargs(cfg))
        for group, nets in (("models", NETS), ("ema", EMA_NETS)):
            self.mapping(group, ckpt[group], nets)
            for net in nets:
                self.state_dict(f"{group}.{net}", ckpt[group][net], states[net])
        self.mapping("optimizers", ckpt["optimizers"], NETS)
        for net in NETS:
            self.optimizer(f"optimizers.{net}", ckpt["optimizers"][net], params[net], net)
        self.mapping("scaler", ckpt["scaler"], ("d", "g"))
        for phase in ("d", "g"):
            self.scaler(f"scaler.{phase}", ckpt["scaler"][phase])
        self.counters(ckpt)
        self.best(ckpt["best"], ckpt)
        self.rng("rng", ckpt["rng"])
        if "rng_per_rank" in ckpt:
            per_rank = ckpt["rng_per_rank"]
            if not isinstance(per_rank, list) or not 1 <= len(per_rank) <= 65536:
                self.fail("rng_per_rank", "a list of RNG states, one per rank", per_rank)
            for rank, state in enumerate(per_rank):
                self.rng(f"rng_per_rank.{rank}", state)
        return cfg

    def latent_shape(self, shape):
        from model import MIN_LATENT_SIZE

        if shape is None:  # a Trainer that never trained (no data seen): translation uses the default size
            return
        expected = f"None or [4, h, w] with {MIN_LATENT_SIZE} <= h, w <= {MAX_LATENT_SIZE}"
        if not isinstance(shape, (list, tuple)) or len(shape) != 3 or shape[0] != 4 or not all(
                isinstance(v, int) and not isinstance(v, bool) and MIN_LATENT_SIZE <= v <= MAX_LATENT_SIZE
                for v in shape[1:]):
            self.fail("latent_shape", expected, shape)

    def state_dict(self, entry, state, expected):
        self.mapping(entry, state, list(expected))
        for key, (shape, dtype) in expected.items():
            self.tensor(f"{entry}.{key}", state[key], shape, dtype)

    def optimizer(self, entry, state, param_shapes, net):
        """Adam's state_dict for the parameters of `net`, in `parameters()` order."""
        self.mapping(entry, state, ("state", "param_groups"))
        groups = state["param_groups"]
        if not isinstance(groups, list) or len(groups) != 1 or not isinstance(groups[0], dict):
            self.fail(f"{entry}.param_groups", "a list of one parameter group (a dict)", groups)
        group, where = groups[0], f"{entry}.param_groups.0"
        self.mapping(where, group, ("params", "lr", "betas", "eps", "weight_decay"), exact=False)
        if group["params"] != list(range(len(param_shapes))):
            self.fail(f"{where}.params", f"the indices 0..{len(param_shapes) - 1} of the {net}'s parameters",
                      group["params"])
        self.number(f"{where}.lr", group["lr"], 0.0, 1e3)
        self.number(f"{where}.eps", group["eps"], 1e-30, 1.0)
        self.number(f"{where}.weight_decay", group["weight_decay"], 0.0, 1e3)
        betas = group["betas"]
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            self.fail(f"{where}.betas", "two numbers in [0, 1)", betas)
        for k, beta in enumerate(betas):
            self.number(f"{where}.betas.{k}", beta, 0.0, 0.999999999)
        for key in ("amsgrad", "maximize", "differentiable"):  # what this Adam never uses
            if key in group:
                self.flag(f"{where}.{key}", group[key], (False,))
        for key in ("foreach", "fused", "capturable", "decoupled_weight_decay"):
            if key in group:
                self.flag(f"{where}.{key}", group[key])
        moments = state["state"]
        if not isinstance(moments, dict):
            self.fail(f"{entry}.state", "a dict of per-parameter states", moments)
        for index, per_param in moments.items():
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(param_shapes):
                self.fail(f"{entry}.state", f"parameter indices 0..{len(param_shapes) - 1}", got=f"index {index!r}")
            at, shape = f"{entry}.state.{index}", param_shapes[index]
            self.mapping(at, per_param, ("step", "exp_avg", "exp_avg_sq"))
            self.tensor(f"{at}.step", per_param["step"], (), torch.float32, non_negative=True)
            what = f" (the {net}'s parameter {index})"
            self.tensor(f"{at}.exp_avg", per_param["exp_avg"], shape, torch.float32, what=what)
            self.tensor(f"{at}.exp_avg_sq", per_param["exp_avg_sq"], shape, torch.float32, non_negative=True,
                        what=what)

    def scaler(self, entry, state):
        """GradScaler.state_dict(): empty when fp16 is off."""
        if state == {}:
            return
        self.mapping(entry, state, ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"))
        self.number(f"{entry}.scale", state["scale"], 1e-30, 3.4e38)
        self.number(f"{entry}.growth_factor", state["growth_factor"], 1.0, 1e3)
        self.number(f"{entry}.backoff_factor", state["backoff_factor"], 1e-3, 1.0)
        self.integer(f"{entry}.growth_interval", state["growth_interval"], 1)
        self.integer(f"{entry}.growth_tracker", state["_growth_tracker"])

    def counters(self, ckpt):
        epoch = self.integer("epoch", ckpt["epoch"])
        step = self.integer("step", ckpt["step"])
        position = self.integer("position", ckpt["position"])
        if step < epoch + position:  # every epoch trains at least one step
            self.fail("step", f"at least epoch + position = {epoch + position} (every epoch trains at least "
                              "one step)", step)
        c = self.mapping("counters", ckpt["counters"], ("nonfinite_total", "nonfinite_run", "oom_skipped", "last_r1"))
        total = self.number("counters.nonfinite_total", c["nonfinite_total"], 0, step, integral=True)
        self.number("counters.nonfinite_run", c["nonfinite_run"], 0, total, integral=True)
        self.integer("counters.oom_skipped", c["oom_skipped"], 0, 2 * step)  # at most one per phase
        self.number("counters.last_r1", c["last_r1"], 0.0)

    def best(self, best, ckpt):
        if best is None:
            return
        self.mapping("best", best, ("metric", "value", "epoch", "step"))
        from config import METRIC_KEY

        if not isinstance(best["metric"], str) or not METRIC_KEY.fullmatch(best["metric"]):
            self.fail("best.metric", "a metric key such as FID_latent/mean", best["metric"])
        self.number("best.value", best["value"])
        self.integer("best.epoch", best["epoch"], 0, ckpt["epoch"])
        self.integer("best.step", best["step"], 0, ckpt["step"])

    def rng(self, entry, state):
        """Each state as get_rng_state writes it, and loadable: tried on throwaway generators."""
        self.mapping(entry, state, ("torch", "cuda", "numpy", "python"))
        cpu = torch.get_rng_state()
        self.tensor(f"{entry}.torch", state["torch"], cpu.shape, torch.uint8)
        try:
            torch.Generator().set_state(state["torch"])
        except (RuntimeError, ValueError, TypeError):
            self.fail(f"{entry}.torch", "a torch CPU generator state", got="bytes torch refuses")
        cuda = state["cuda"]
        if not isinstance(cuda, list) or len(cuda) > 1024:
            self.fail(f"{entry}.cuda", "a list of CUDA generator states", cuda)
        size = torch.cuda.get_rng_state().numel() if torch.cuda.is_available() else None
        for k, t in enumerate(cuda):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1 or \
                    (size is not None and t.numel() != size) or t.numel() > 4096:
                self.fail(f"{entry}.cuda.{k}", "a CUDA generator state (uint8 bytes)", t)
        n = self.mapping(f"{entry}.numpy", state["numpy"], ("keys", "pos", "has_gauss", "cached_gaussian"))
        self.tensor(f"{entry}.numpy.keys", n["keys"], (624,), torch.int64)
        if not bool(((n["keys"] >= 0) & (n["keys"] < 2 ** 32)).all()):
            self.fail(f"{entry}.numpy.keys", "624 words in [0, 2**32)", got="values out of range")
        self.integer(f"{entry}.numpy.pos", n["pos"], 0, 624)
        self.integer(f"{entry}.numpy.has_gauss", n["has_gauss"], 0, 1)
        self.number(f"{entry}.numpy.cached_gaussian", n["cached_gaussian"])
        p = self.mapping(f"{entry}.python", state["python"], ("version", "state", "gauss"))
        words = p["state"]
        if not isinstance(words, (list, tuple)) or len(words) != 625 or not all(
                isinstance(w, int) and not isinstance(w, bool) and 0 <= w < 2 ** 32 for w in words):
            self.fail(f"{entry}.python.state", "625 ints in [0, 2**32) (Python's MT19937 state)", words)
        if p["gauss"] is not None:
            self.number(f"{entry}.python.gauss", p["gauss"])
        try:
            np.random.RandomState().set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                                               n["has_gauss"], n["cached_gaussian"]))
            random.Random().setstate((p["version"], tuple(words), p["gauss"]))
        except (ValueError, TypeError, OverflowError) as e:
            self.fail(entry, "numpy and Python generator states that load", got=f"{type(e).__name__}: {e}")


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
    back to the CPU with one warning line on stderr when `fallback` (training: the default config runs as a CPU
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
        print(f"warning: {flag}={requested!r} but CUDA is not available: running on the CPU", file=sys.stderr)
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

    def raise_if_any_failed(self, error):
        """Every rank learns whether work that may fail on one rank alone (rank 0's writes, its
        evaluation, its grid) failed anywhere: the rank that failed raises `error`, the others
        OtherRankFailed, so none is left waiting in a collective. `error`: this rank's, or None."""
        if self.max_int(int(error is not None)):
            raise error or OtherRankFailed(f"rank {self.rank}: another rank failed (its error is above); stopping too")

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
