"""One config object, validated once: YAML or JSON file -> defaults merged ->
unknown keys rejected by dotted path -> `KEY=VALUE` overrides -> values checked.

The defaults below are the ones documented in configs/stargan_v2_latent.yaml (a test keeps the two
in step). `visualization.every_epochs: None` means "absent": visualization then falls back to
`training.eval_interval`, as the seed's interval semantics say.
"""

import copy
import dataclasses
import json
import math
import os
import re

import yaml

from latents import (MAX_DOWNSAMPLE, MAX_FACTOR, MAX_LATENT_CHANNELS, SD15, LatentSpace, check_same_space, parse_file,
                     path_component_problem, short_repr)
from model import expected_state
from runtime import AMP_DTYPES, SEED_LIMIT, InputError, atomic_write

DEFAULTS = {
    "seed": 0,
    "data": {
        "root": "../../latent-256",
        "domains": ["photo", "Hayao", "monet", "cezanne", "vangogh"],
        "preload_to_gpu": True,
        "preload_max_fraction": 0.5,
        "samples_per_epoch": None,
        "hflip": False,
        "reject_outliers": True,
        "synthetic": False,
        "synthetic_files_per_domain": 64,
    },
    "model": {
        "style_dim": 64,
        "latent_dim": 16,
        "gen_channels": 256,
        "n_res_blocks": 6,
        "mapping_hidden_dim": 512,
        "mapping_shared_layers": 4,
        "style_encoder_channels": 128,
        "disc_channels": 128,
        "latent_channels": None,
    },
    "loss": {
        "w_adv": 1.0,
        "w_sty": 1.0,
        "w_ds": 1.0,
        "w_cyc": 1.0,
        "w_r1": 1.0,
        "r1_interval": 16,
        "ds_decay_steps": 100000,
    },
    "training": {
        "epochs": 100,
        "batch_size": 32,
        "lr": 1e-4,
        "lr_mapping": 1e-6,
        "weight_decay": 1e-4,
        "latent_scale": None,
        "latent_shift": None,
        "latent_downsample": None,
        "amp_dtype": "bf16",
        "ema_beta": 0.999,
        "num_workers": 4,
        "pin_memory": True,
        "drop_last": True,
        "use_compile": False,
        "compile_mode": "default",
        "compile_dynamic": False,
        "compile_fullgraph": False,
        "compile_cudagraphs": False,
        "compile_generator": True,
        "compile_mapping_network": True,
        "compile_style_encoder": True,
        "compile_discriminator": True,
        "progress_bar": True,
        "progress_style": "bar",
        "display_interval": 50,
        "log_json": False,
        "log_interval": 100,
        "save_interval": 1,
        "eval_interval": 1,
        "keep_checkpoints": None,
        "tensorboard": False,
        "max_nonfinite_steps": 20,
        "checkpoint_dir": "outputs/stargan_v2_latent",
        "device": "cuda",
        "cpu_threads": None,
    },
    "evaluation": {
        "every_epochs": None,
        "num_sources": 32,
        "num_outs": 4,
        "best_metric": "FID_latent/mean",
        "metrics": ["FID", "KID", "LPIPS"],
        "source_root": None,
        "vae_path": None,
        "inception_weights": None,
        "lpips_weights": None,
    },
    "visualization": {
        "every_epochs": None,
        "save_dir": None,
        "vae_path": "stabilityai/sd-vae-ft-mse",
        "vae_subfolder": None,
        "preview_vae": None,
        "suppress_hf_warnings": True,
    },
}

# keys whose default is None but which take a value of this type
OPTIONAL_TYPES = {
    "data.samples_per_epoch": int,
    "model.latent_channels": int,
    "training.latent_scale": float,
    "training.latent_shift": float,
    "training.latent_downsample": int,
    "training.keep_checkpoints": int,
    "training.cpu_threads": int,
    "evaluation.every_epochs": int,
    "evaluation.vae_path": str,
    "evaluation.inception_weights": str,
    "evaluation.lpips_weights": str,
    "evaluation.source_root": str,
    "visualization.every_epochs": int,
    "visualization.save_dir": str,
    "visualization.vae_path": str,
    "visualization.vae_subfolder": str,
    "visualization.preview_vae": str,
}

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
EVAL_METRICS = ("FID", "KID", "LPIPS")  # what evaluation can compute (evaluation.metrics, evaluate.py --metrics)
METRIC_KEY = re.compile(r"(FID|KID|LPIPS)_(latent|reference)/\S+")  # a metric's key: FID_latent/photo2monet

# Upper bounds: far beyond any sensible run, low enough that a typo or a tampered checkpoint's config
# is an error naming the key instead of a terabyte allocation.
UPPER_BOUNDS = {
    "model.style_dim": 4096, "model.latent_dim": 4096, "model.gen_channels": 4096, "model.n_res_blocks": 64,
    "model.mapping_hidden_dim": 8192, "model.mapping_shared_layers": 64, "model.style_encoder_channels": 4096,
    "model.disc_channels": 4096,
    "data.samples_per_epoch": 10 ** 8,  # the epoch's index table is ~40 bytes per sample
    "data.synthetic_files_per_domain": 100_000,
    "training.epochs": 10 ** 7, "training.batch_size": 65_536, "training.num_workers": 1024,
    "training.latent_scale": MAX_FACTOR,  # SD1.5 0.18215, SDXL 0.13025, SD3 1.5305: raw x scale must stay a number
    "training.latent_downsample": MAX_DOWNSAMPLE,
    "evaluation.num_sources": 1_000_000, "evaluation.num_outs": 1000,
}
# model keys with a range of their own; any other int key must be positive, a bool or float key of the right type
MODEL_BOUNDS = {"latent_channels": (1, MAX_LATENT_CHANNELS)}
MAX_DOMAINS = 1024
MAX_PARAMETERS = 2 * 10 ** 9  # G + F + E + D; the default model has about 10M


def read_config_file(path):
    if not os.path.isfile(path):
        raise InputError(f"config file {path!r} not found")
    kind = "JSON" if path.endswith(".json") else "YAML"
    data = parse_file(path, json.loads if kind == "JSON" else yaml.safe_load, kind, f"config file {path!r}",
                      (yaml.YAMLError,))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"config file {path!r} must hold a mapping of sections, got {type(data).__name__}")
    return data


def merge(base, update, source, prefix="", ignore_unknown=False, ignored=None):
    """Recursively merge `update` into `base` in place; unknown keys are an error naming the path.
    With `ignore_unknown` (a checkpoint's config read for inference), unknown keys outside the
    `model` section are skipped and their paths appended to `ignored`: they cannot change how a
    checkpoint's networks are built."""
    for key, value in update.items():
        path = f"{prefix}{key}"
        if key not in base:
            if ignore_unknown and not path.startswith("model."):
                if ignored is not None:
                    ignored.append(path)
                continue
            raise InputError(f"unknown config key {path!r} in {source}; known keys here: "
                              f"{', '.join(sorted(map(str, base)))}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise InputError(f"config key {path!r} in {source} must be a section (mapping), "
                                 f"got {short_repr(value)}")
            merge(base[key], value, source, f"{path}.", ignore_unknown, ignored)
        else:
            base[key] = value


def parse_override(text):
    """'training.batch_size=16' -> {'training': {'batch_size': 16}} (value parsed as YAML)."""
    if "=" not in text:
        raise InputError(f"override {text!r} must look like KEY=VALUE, e.g. training.batch_size=16")
    key, _, raw = text.partition("=")
    try:
        value = yaml.safe_load(raw)
    except (yaml.YAMLError, ValueError, RecursionError) as e:  # ValueError: an int beyond 4300 digits
        raise InputError(f"override {short_repr(text)}: value is not valid YAML: {' '.join(str(e).split())[:200]}")
    nested = value
    for part in reversed(key.strip().split(".")):
        nested = {part: nested}
    return nested


def load_config(path=None, overrides=()):
    """Resolved config dict: defaults <- file <- overrides, then validated."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        merge(cfg, read_config_file(path), f"config file {path!r}")
    for text in overrides:
        merge(cfg, parse_override(text), f"override {text!r}")
    validate(cfg)
    return cfg


def resolve_config(cfg, source="checkpoint config", ignore_unknown=False, ignored=None):
    """Defaults merged with a config dict (e.g. a checkpoint's), validated. A key the dict lacks (a
    checkpoint written before the key existed) takes its default. `ignore_unknown`: see `merge`."""
    out = copy.deepcopy(DEFAULTS)
    merge(out, cfg, source, ignore_unknown=ignore_unknown, ignored=ignored)
    validate(out)
    return out


def flatten(cfg, template=DEFAULTS, prefix=""):
    """(dotted key, value) of every leaf of `template` (DEFAULTS' shape): a mapping given where a
    value belongs is yielded as that key's value, for the type check to name."""
    for key, default in template.items():
        value = cfg[key]
        if isinstance(default, dict):
            yield from flatten(value, default, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


DEFAULTS_FLAT = dict(flatten(DEFAULTS))


def validate(cfg):
    """Every value of a merged config: its type (the type of its default, OPTIONAL_TYPES for keys
    whose default is None), then its range. InputError naming the key and what was expected."""
    if cfg["training"].get("progress_style") is False:  # YAML 1.1 reads a bare `off` as false
        cfg["training"]["progress_style"] = "off"
    check_types(cfg)
    check_data(cfg)
    check_model(cfg)
    check_loss(cfg["loss"])
    check_training(cfg["training"])
    check_evaluation(cfg)
    if not cfg["training"]["progress_bar"]:  # the seed's older switch: progress_bar false means no display
        cfg["training"]["progress_style"] = "off"
    check_model_size(cfg)


def check_types(cfg):
    for key, value in flatten(cfg):
        default = DEFAULTS_FLAT[key]
        expected = OPTIONAL_TYPES.get(key) or type(default)
        if value is None and (default is None or key in OPTIONAL_TYPES):
            continue
        if expected is float:
            set_key(cfg, key, to_float(key, value))
            continue
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise InputError(f"config key {key!r} must be {expected.__name__}, got {short_repr(value)}")
    for key, limit in UPPER_BOUNDS.items():
        value = cfg
        for part in key.split("."):
            value = value[part]
        check(value is None or value <= limit, key, value, f"at most {limit:,}")
    check(0 <= cfg["seed"] < SEED_LIMIT, "seed", cfg["seed"], "an integer from 0 to 2**63 - 1")


def check(ok, key, value, expected):
    if not ok:
        raise InputError(f"config key {key!r} = {short_repr(value)}: expected {expected}")


def check_data(cfg):
    d = cfg["data"]
    domains = d["domains"]
    check(2 <= len(domains) <= MAX_DOMAINS and all(isinstance(x, str) and x for x in domains),
          "data.domains", domains, f"a list of 2 to {MAX_DOMAINS} domain folder names")
    for name in domains:  # each becomes a folder under data.root and part of output file names
        problem = path_component_problem(name)
        if problem:
            raise InputError(f"config key 'data.domains': domain name {name!r} is not a plain folder name: {problem}")
    check(len(set(domains)) == len(domains), "data.domains", domains, "distinct names")
    check(0 < d["preload_max_fraction"] <= 1, "data.preload_max_fraction", d["preload_max_fraction"],
          "a fraction in (0, 1]")
    check(d["samples_per_epoch"] is None or d["samples_per_epoch"] > 0, "data.samples_per_epoch",
          d["samples_per_epoch"], "a positive int or null")
    check(d["synthetic_files_per_domain"] > 0, "data.synthetic_files_per_domain", d["synthetic_files_per_domain"],
          "a positive int")


def check_model(cfg):
    """Each model key by the type of its default: widths and counts are positive ints; a bool or a
    float option is checked by its type alone unless MODEL_BOUNDS names its range."""
    for key, value in cfg["model"].items():
        if value is None:  # latent_channels: from the data root's manifest (run.py)
            continue
        low, high = MODEL_BOUNDS.get(key, (1, None) if type(DEFAULTS["model"][key]) is int else (None, None))
        check((low is None or value >= low) and (high is None or value <= high), f"model.{key}", value,
              f"a number from {low} to {high}" if high is not None else f"a positive int")


def check_loss(loss):
    for key in (k for k in loss if k.startswith("w_")):  # every weight, a new term's too
        check(loss[key] >= 0, f"loss.{key}", loss[key], "a non-negative weight")
    check(loss["r1_interval"] >= 1, "loss.r1_interval", loss["r1_interval"], "an int >= 1")
    check(loss["ds_decay_steps"] >= 0, "loss.ds_decay_steps", loss["ds_decay_steps"], "an int >= 0 (0 = no decay)")


def check_training(t):
    for key in ("epochs", "batch_size", "display_interval", "log_interval", "save_interval", "eval_interval",
                "max_nonfinite_steps"):
        check(t[key] >= 1, f"training.{key}", t[key], "a positive int")
    for key in ("lr", "lr_mapping", "latent_scale"):
        check(t[key] is None or t[key] > 0, f"training.{key}", t[key], "a positive number")
    check(t["latent_shift"] is None or abs(t["latent_shift"]) <= MAX_FACTOR, "training.latent_shift",
          t["latent_shift"], f"null or a number from {-MAX_FACTOR:g} to {MAX_FACTOR:g}")
    check(t["latent_downsample"] is None or t["latent_downsample"] >= 1, "training.latent_downsample",
          t["latent_downsample"], "null or a positive int")
    check(t["weight_decay"] >= 0, "training.weight_decay", t["weight_decay"], "a non-negative number")
    check(0 <= t["ema_beta"] < 1, "training.ema_beta", t["ema_beta"], "a number in [0, 1)")
    check(t["num_workers"] >= 0, "training.num_workers", t["num_workers"], "an int >= 0")
    check(t["cpu_threads"] is None or 1 <= t["cpu_threads"] <= 1024, "training.cpu_threads", t["cpu_threads"],
          "null (torch's choice) or an int from 1 to 1024")
    check(t["keep_checkpoints"] is None or t["keep_checkpoints"] >= 1, "training.keep_checkpoints",
          t["keep_checkpoints"], "null (keep all) or an int >= 1")
    check(t["amp_dtype"] in AMP_DTYPES, "training.amp_dtype", t["amp_dtype"], "one of " + " | ".join(AMP_DTYPES))
    check(t["progress_style"] in ("bar", "percent", "off"), "training.progress_style", t["progress_style"],
          "one of bar | percent | off")
    if t["compile_mode"] not in COMPILE_MODES:  # listing this torch's modes imports Inductor (seconds)
        check(t["compile_mode"] in compile_modes(), "training.compile_mode", t["compile_mode"],
              f"one of {' | '.join(compile_modes())}")
    check(t["device"] == "cpu" or t["device"].startswith("cuda"), "training.device", t["device"], "cuda, cuda:N or cpu")


def check_evaluation(cfg):
    v, e = cfg["visualization"], cfg["evaluation"]
    check(v["every_epochs"] is None or v["every_epochs"] >= 1, "visualization.every_epochs", v["every_epochs"],
          "a positive int or null")
    check(e["every_epochs"] is None or e["every_epochs"] >= 1, "evaluation.every_epochs", e["every_epochs"],
          "a positive int or null (off)")
    check(e["num_sources"] >= 1, "evaluation.num_sources", e["num_sources"], "a positive int (sources per domain)")
    check(e["num_outs"] >= 2, "evaluation.num_outs", e["num_outs"],
          "an int >= 2 (LPIPS compares the outputs of one source)")
    check(METRIC_KEY.fullmatch(e["best_metric"]) is not None, "evaluation.best_metric", e["best_metric"],
          "a metric key such as FID_latent/mean, KID_reference/mean or FID_latent/photo2monet")
    e["metrics"] = parse_metrics(e["metrics"], "config key 'evaluation.metrics'")
    check(e["best_metric"].split("_")[0] in e["metrics"], "evaluation.best_metric", e["best_metric"],
          f"a metric of evaluation.metrics {e['metrics']}")


def parse_metrics(value, flag="--metrics"):
    """'fid,kid' or ['FID', 'KID'] -> ['FID', 'KID'] in EVAL_METRICS' order; InputError naming `flag`."""
    names = value.split(",") if isinstance(value, str) else list(value)
    chosen = {n.strip().upper() for n in names if isinstance(n, str) and n.strip()}
    unknown = sorted(chosen - set(EVAL_METRICS))
    if unknown or not chosen or not all(isinstance(n, str) for n in names):
        raise InputError(f"{flag} {short_repr(value)}: expected one or more of "
                         f"{', '.join(m.lower() for m in EVAL_METRICS)}, separated by commas")
    return [m for m in EVAL_METRICS if m in chosen]


def check_model_size(cfg):
    """The four networks' parameter count, from shapes alone (nothing allocated), within MAX_PARAMETERS."""
    _, params = expected_state(**model_kwargs(cfg))
    total = sum(math.prod(shape) for shapes in params.values() for shape in shapes)
    if total > MAX_PARAMETERS:
        raise InputError(f"config section 'model' describes {total:,} parameters in all (G, F, E, D), more than the "
                         f"{MAX_PARAMETERS:,} this code accepts; lower model.gen_channels, n_res_blocks or the other "
                         "widths")


def to_float(key, value):
    """A float key's value as a finite float. Numeric strings are accepted: YAML 1.1 (PyYAML) reads
    `1e-4`, without a dot, as the string '1e-4', in files and in KEY=VALUE overrides alike."""
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise InputError(f"config key {key!r} must be a number, got {short_repr(value)}") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an int beyond any float
            raise InputError(f"config key {key!r} must be a finite number, got {short_repr(value)}") from None
    else:
        raise InputError(f"config key {key!r} must be a number, got {short_repr(value)}")
    if not math.isfinite(number):
        raise InputError(f"config key {key!r} must be a finite number, got {short_repr(value)}")
    return number


def set_key(cfg, key, value):
    *sections, last = key.split(".")
    for part in sections:
        cfg = cfg[part]
    cfg[last] = value


def compile_modes():
    """The modes this torch's torch.compile knows (plus 'default')."""
    try:
        import torch._inductor

        return ("default",) + tuple(m for m in torch._inductor.list_mode_options() if m != "default")
    except Exception:
        return COMPILE_MODES


def model_kwargs(cfg, num_domains=None):
    """build_models(...) keyword arguments from a resolved config."""
    return dict(num_domains=num_domains or len(cfg["data"]["domains"]), **cfg["model"])


LATENT_KEYS = {"channels": ("model", "latent_channels"), "scaling_factor": ("training", "latent_scale"),
               "shift_factor": ("training", "latent_shift"), "downsample": ("training", "latent_downsample")}


def latent_space(cfg):
    """The LatentSpace of a resolved config; a key left null (a checkpoint written before the key
    existed) takes SD1.5's number."""
    values = {field: cfg[section][key] for field, (section, key) in LATENT_KEYS.items()}
    return LatentSpace(**{field: getattr(SD15, field) if v is None else v for field, v in values.items()})


def resolve_latent_space(cfg, found, source):
    """Fill the config's null latent keys from `found` (the data root's LatentSpace, read from
    `source`), else SD1.5's, and return the space. A key set by hand that contradicts `found` is an
    InputError naming both values; so is a null key beside keys of another space than SD1.5's when
    `source` (not None: a real data root) has no manifest, since SD1.5's number would be wrong."""
    given = {f: cfg[sec][key] for f, (sec, key) in LATENT_KEYS.items() if cfg[sec][key] is not None}
    if found is not None:
        check_same_space(dataclasses.replace(found, **given), found, "config", source)
    elif source is not None:
        other = [f"{'.'.join(LATENT_KEYS[f])} {v!r}" for f, v in given.items() if v != getattr(SD15, f)]
        unset = [".".join(k) for f, k in LATENT_KEYS.items() if f not in given]
        if other and unset:
            raise InputError(f"{source} does not exist and the config sets {', '.join(other)} (not SD1.5's), "
                             f"so SD1.5's number for {', '.join(unset)} would be wrong: set it by hand, or "
                             "encode the data with encode.py, which writes that file")
    space = found or SD15
    for field, (section, key) in LATENT_KEYS.items():
        if cfg[section][key] is None:
            cfg[section][key] = getattr(space, field)
    return latent_space(cfg)


def visualization_every(cfg):
    """Epochs between grids: visualization.every_epochs, else training.eval_interval."""
    every = cfg["visualization"]["every_epochs"]
    return every if every is not None else cfg["training"]["eval_interval"]


RESOLVED_CONFIG = "config.yaml"


def save_resolved(cfg, folder):
    """Write the resolved config next to the checkpoints (StyleGAN2's training_options.json)."""
    text = yaml.safe_dump(cfg, sort_keys=False).encode("utf-8")
    return atomic_write(os.path.join(folder, RESOLVED_CONFIG), lambda f: f.write(text))
