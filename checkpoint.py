"""The checkpoint format: what `Trainer.state_dict` writes, saved atomically, loaded with
`torch.load(weights_only=True)` and validated completely before anything is built from it (every
tool calls `load_checkpoint`), pruned, and the RNG state it carries.
"""

import glob
import math
import os
import random
import re

import numpy as np
import torch

from config import METRIC_KEY, latent_space, model_kwargs, resolve_config
from latents import (MAX_LATENT_SIZE, LatentSpace, check_manifest, load_error_reason, load_plain, plain_tensor,
                     short_repr)
from model import EMA_NETS, MIN_LATENT_SIZE, NETS, expected_state
from runtime import InputError, atomic_write

# what Trainer.state_dict writes; rng_per_rank only under torchrun, latent_space when the data root has a
# manifest (latents.MANIFEST_NAME: which VAE encoded the latents the run trained on)
CHECKPOINT_KEYS = ("epoch", "step", "position", "config", "domains", "latent_shape", "models", "ema", "optimizers",
                   "scaler", "counters", "rng", "best")

OPTIONAL_CHECKPOINT_KEYS = ("rng_per_rank", "latent_space")

COUNTER_LIMIT = 10 ** 12  # epochs, steps and positions beyond this are no run of this world


class CheckpointError(InputError):
    """A checkpoint that is not what run.py writes: the message names the file and the entry."""


def load_checkpoint(path, map_location="cpu", resume=False):
    """torch.load with weights_only=True (never a full unpickle: a hostile file cannot run code),
    then `validate_checkpoint` (weights_only stops code, not bad values). CheckpointError (an
    InputError) naming the file and the entry for anything that is not a sound checkpoint.

    The returned checkpoint's `config` is resolved: a key added to the code after the checkpoint
    was written takes its default, in every tool alike. A key this code does not know is refused
    where it matters: in `model` always (the networks could not be rebuilt), anywhere when
    `resume` (the run would go on without it); for inference the others are ignored."""
    if not os.path.isfile(path):
        raise InputError(f"checkpoint {path!r} not found")
    try:
        ckpt = load_plain(path, map_location)
    except Exception as e:
        raise CheckpointError(f"{path}: not a Latent StarGAN v2 checkpoint ({load_error_reason(e)})") from None
    ckpt["config"] = validate_checkpoint(ckpt, path, strict=resume)
    return ckpt


def validate_checkpoint(ckpt, path, strict=True):
    """Check a checkpoint completely before anything is built from it, on save and on load: every
    entry present; the config valid and within bounds; every weight (live and EMA) and optimizer
    moment of the right shape and dtype for the networks that config describes, and finite;
    optimizer settings and scaler state sane; counters non-negative and consistent; RNG states
    loadable; every tensor owning storage of exactly its size (a tiny file cannot expand into gigabytes,
    or feed a kernel a zero-stride view). Raises CheckpointError naming `path` and the entry;
    returns the resolved config. `strict`: an unknown config key anywhere is refused, else only in
    the model section (see `load_checkpoint`)."""
    try:
        return _CheckpointChecker(path, strict).check(ckpt)
    except (RecursionError, OverflowError, MemoryError) as err:  # absurdly nested or sized values
        raise CheckpointError(f"{path}: not a Latent StarGAN v2 checkpoint ({type(err).__name__} while checking "
                              "it: values nested or sized beyond any checkpoint run.py writes)") from None


def _describe(value):
    if isinstance(value, torch.Tensor):
        if value.is_nested or value.layout != torch.strided:
            return f"a {'nested' if value.is_nested else str(value.layout).replace('torch.', '')} tensor"
        where = f" on the {value.device.type} device" if value.device.type != "cpu" else ""
        return f"a {str(value.dtype).replace('torch.', '')} tensor of shape {list(value.shape)}{where}"
    return f"{type(value).__name__} {short_repr(value)}"


def _all_finite(tensor):
    return bool(torch.isfinite(tensor).all()) if tensor.is_floating_point() else True


class _CheckpointChecker:
    """One walk over a checkpoint dict; `fail` names the entry as a dotted path."""

    def __init__(self, path, strict=True):
        self.path, self.strict = path, strict
        self.storages = {}  # data_ptr -> the entry whose tensor owns that storage

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
        if not plain_tensor(value) or value.dtype != dtype or tuple(value.shape) != tuple(shape):
            self.fail(entry, expected, value)
        nbytes = value.untyped_storage().nbytes()
        if not value.is_contiguous() or value.storage_offset() != 0 or nbytes != value.numel() * value.element_size():
            self.fail(entry, f"{expected}, contiguous, with storage of its own", got=f"a view (strides "
                      f"{list(value.stride())}, offset {value.storage_offset()}, storage of {nbytes} bytes)")
        if nbytes:  # two entries on one storage would load as one tensor and train differently
            owner = self.storages.setdefault(value.untyped_storage().data_ptr(), entry)
            if owner != entry:
                self.fail(entry, f"{expected} with storage of its own", got=f"the storage of {owner}")
        if finite and not _all_finite(value):
            self.fail(entry, "finite values", got="non-finite values (NaN or inf)")
        if non_negative and not bool((value >= 0).all()):
            self.fail(entry, "non-negative values", got="negative values")
        return value

    # the parts

    def check(self, ckpt):
        if not isinstance(ckpt, dict) or not {"config", "models", "ema"} & set(ckpt):
            raise CheckpointError(f"{self.path}: not a Latent StarGAN v2 checkpoint (expected the dict run.py writes, "
                                  f"with entries {', '.join(CHECKPOINT_KEYS)}; got {_describe(ckpt)})")
        self.mapping("", ckpt, CHECKPOINT_KEYS, OPTIONAL_CHECKPOINT_KEYS)
        if not isinstance(ckpt["config"], dict):
            self.fail("config", "the resolved config (a dict)", ckpt["config"])
        try:
            cfg = resolve_config(ckpt["config"], source=f"the config saved in {self.path}",
                                 ignore_unknown=not self.strict)
        except InputError as e:
            raise CheckpointError(f"{self.path}: entry config: {e}") from None
        domains = list(cfg["data"]["domains"])
        if ckpt["domains"] != domains:
            self.fail("domains", f"the config's data.domains {domains}", ckpt["domains"])
        self.latent_shape(ckpt["latent_shape"], latent_space(cfg).channels)
        if "latent_space" in ckpt:
            self.latent_record(ckpt["latent_space"], latent_space(cfg))
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

    def latent_shape(self, shape, channels):
        if shape is None:  # a Trainer that never trained (no data seen): translation uses the default size
            return
        expected = f"None or [{channels}, h, w] with {MIN_LATENT_SIZE} <= h, w <= {MAX_LATENT_SIZE}"
        if not isinstance(shape, (list, tuple)) or len(shape) != 3 or shape[0] != channels or not all(
                isinstance(v, int) and not isinstance(v, bool) and MIN_LATENT_SIZE <= v <= MAX_LATENT_SIZE
                for v in shape[1:]):
            self.fail("latent_shape", expected, shape)

    def latent_record(self, record, space):
        """The data root's manifest record: valid as a manifest file is, and of the config's space."""
        try:
            check_manifest(record, f"{self.path}: entry latent_space")
        except InputError as e:
            raise CheckpointError(str(e)) from None
        differences = LatentSpace.from_dict(record).differences(space, "manifest", "config")
        if differences:
            self.fail("latent_space", "the manifest of the config's latent space", got="; ".join(differences))

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
            if not plain_tensor(t) or t.dtype != torch.uint8 or t.dim() != 1 or \
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


def atomic_save(obj, path):
    """torch.save through a temporary file in the same folder, fsynced, then renamed."""
    return atomic_write(path, lambda f: torch.save(obj, f), fsync=True)


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
