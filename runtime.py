"""What every script shares at run time: errors and exit codes, argument checks, output folders, atomic
writes (a failed one is a WriteError) and their orphans' cleanup, seeds and devices. The bottom of the
module graph: it imports nothing of the project."""

import contextlib
import errno
import os
import random
import re
import signal
import sys

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
    """A file could not be written (disk full, read-only or vanished folder, permissions): one message naming
    the file and the OS's reason; scripts exit with code 1. WriteError(errno, message), printed as the message."""

    def __str__(self):
        return self.strerror if isinstance(self.strerror, str) else super().__str__()


class OtherRankFailed(RuntimeError):
    """Under torchrun: another rank failed (its error is printed by that rank); this one stops too."""


BAD_INPUT = (InputError, FileNotFoundError)


def run_script(prog, run, *args, errors=BAD_INPUT):
    """`run(*args)` for a script: bad input (`errors`) prints `prog: error: message` on stderr, exit code 2;
    a failed write (`WriteError`) or another rank's failure the same with exit code 1. No traceback."""
    getattr(sys.stdout, "reconfigure", lambda **_: None)(errors="backslashreplace")  # names in no encoding
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
    with contextlib.suppress(OSError):  # not empty, or already gone
        os.rmdir(folder)


def check_output_folder(folder, flag):
    """`check_writable_folder` for a script's output folder, a file in the way named as such."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise InputError(f"{flag} {folder!r} exists and is not a folder")
    return check_writable_folder(folder, flag)


@contextlib.contextmanager
def output_folder(folder, flag):
    """A script's output folder for the work inside the `with`, checked and created before any work;
    removed again when this run created it and leaves it empty (it failed before writing anything)."""
    created = check_output_folder(folder, flag)
    try:
        yield folder
    finally:
        if created:
            remove_if_empty(folder)


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
        with contextlib.suppress(OSError):  # the folder went away or read-only: the next run's start removes it
            if os.path.exists(tmp):
                os.remove(tmp)
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
    except OSError as e:
        return isinstance(e, PermissionError)
    return True


# ---------------------------------------------------------------------- seeds and devices

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # training.amp_dtype, --dtype

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(requested=None, local_rank=None, fallback=True, flag="--device"):
    """torch.device for `requested` (None: cuda when available). Without CUDA, a cuda request falls back to the
    CPU with a warning when `fallback` (a CPU smoke test), else InputError naming `flag`. torchrun: cuda:LOCAL_RANK."""
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


def configure_backends(device):
    """cuDNN autotuning for the fixed latent shapes, TF32 matmuls/convs for the fp32 path."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
