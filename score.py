"""A learning score to compare variants with: train N steps on synthetic domains whose truth is
known, then measure the EMA networks' translations (scoring.py says how).

    python score.py --config configs/demo.yaml [--steps 300] [--seeds 0 1 2] [--threads 1]
                    [--domains 3] [--size 16] [--model-config FILE] [--eval-every N] [KEY=VALUE ...]
    python score.py --config configs/demo.yaml --seeds 0 1 2 loss.w_sty=2      # a variant

Prints a table (mean ± std over the seeds, at init and after training) and one JSON line, the only
stdout line that begins with `{`. The config and the overrides govern the model, the losses and the
optimisation (`training.batch_size`, `lr`, `lr_mapping`, `ema_beta`, `loss.*`). `--steps` replaces
`training.epochs`, `--seeds` the `seed` key, `--threads` `training.cpu_threads`; the data are the
synthetic domains (`data.synthetic_files_per_domain` training latents each, `--test-per-domain`
held out), whatever `data.*` says. The step runs in fp32 unless an override says otherwise.
`--model-config configs/demo.yaml` takes the `model:` section of that file, so the default
hyperparameters can be scored at the demo's widths on a CPU.
Same seed, same thread count: the same figures on the CPU.
"""

import argparse
import json
import math
import platform
import sys
import time

import torch

import scoring
from arguments import bounded
from config import MAX_DOMAINS, load_config
from latents import MAX_LATENT_SIZE
from model import MIN_LATENT_SIZE, N_DOWN
from runtime import InputError, check_seed, resolve_device, script_main

MAX_STEPS, MAX_THREADS = 10 ** 5, 1024  # days of CPU time per seed; more threads than any machine
MAX_OUTS, MAX_TEST = 1000, 10_000  # styles per source and target domain, held-out latents per domain


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Score how well a config learns on synthetic domains with known truth.")
    p.add_argument("--config", required=True, help="YAML or JSON config (e.g. configs/demo.yaml)")
    p.add_argument("--steps", type=bounded(int, 1, MAX_STEPS), default=300,
                   help="training steps per seed (default 300)")
    p.add_argument("--seeds", nargs="+", default=["0"], help="seeds; several give mean ± std (default 0)")
    p.add_argument("--threads", type=bounded(int, 1, MAX_THREADS), default=1,
                   help="torch CPU threads (default 1: fastest on a busy machine)")
    p.add_argument("--domains", type=bounded(int, 2, MAX_DOMAINS), default=3, help="synthetic domains (default 3)")
    p.add_argument("--size", type=bounded(int, MIN_LATENT_SIZE, MAX_LATENT_SIZE), default=16,
                   help=f"latent height and width (default 16; at least {MIN_LATENT_SIZE}: E and D halve it "
                        f"{N_DOWN} times)")
    p.add_argument("--num-outs", type=bounded(int, 2, MAX_OUTS), default=4,
                   help="styles per source and target domain (default 4; at least 2: diversity compares outputs)")
    p.add_argument("--test-per-domain", type=bounded(int, 4, MAX_TEST), default=32,
                   help="held-out latents per domain: sources, references, classifier check (default 32, even)")
    p.add_argument("--model-config", default=None, metavar="FILE",
                   help="take the model: section from FILE (e.g. configs/demo.yaml); overrides still apply")
    p.add_argument("--eval-every", type=bounded(int, 1, MAX_STEPS), default=None, metavar="N",
                   help="also score every N steps")
    p.add_argument("--device", default="cpu", help="cpu (default; the figures are deterministic there) or cuda")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="override a dotted config key, value parsed as YAML (e.g. loss.w_sty=2)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_intermixed_args(argv)  # overrides may come before, between and after the flags
    # `--seeds 0 1 loss.w_sty=2`: the seeds' list took the overrides that follow it
    taken = [s for s in args.seeds if "=" in s]
    args.overrides = sorted(args.overrides + taken, key=argv.index)
    try:
        args.seeds = [int(s) for s in args.seeds if "=" not in s]
    except ValueError as err:
        p.error(f"argument --seeds: {err}")
    return args


def check_args(args):
    for seed in args.seeds:
        check_seed(seed, "--seeds")
    if args.test_per_domain % 2:
        raise InputError(f"--test-per-domain {args.test_per_domain}: expected an even number (halves for the "
                         "ridge fit and its check)")
    if args.num_outs > args.test_per_domain:
        raise InputError(f"--num-outs {args.num_outs}: expected at most --test-per-domain {args.test_per_domain} "
                         "(the references are held-out latents)")
    if len(set(args.seeds)) != len(args.seeds):
        raise InputError(f"--seeds {args.seeds}: each seed once")


def score_config(args, names):
    """The resolved config: the file, fp32, the --model-config's model section, the overrides, and
    the synthetic domains' names last (they decide the networks' domain count)."""
    model = [f"model.{k}={v}" for k, v in load_config(args.model_config)["model"].items()] if args.model_config else []
    return load_config(args.config, ["training.amp_dtype=fp32", *model, *args.overrides,
                                     f"data.domains=[{', '.join(names)}]"])


def clean(value):
    """JSON-ready: NaN -> null, floats to 6 significant digits, dict keys as strings."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, float):
        return None if not math.isfinite(value) else float(f"{value:.6g}")
    return value


def run(args):
    check_args(args)
    start, load_start = time.perf_counter(), scoring.load_average()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device, fallback=False)
    names = scoring.domain_names(args.domains)
    cfg = score_config(args, names)
    t = cfg["training"]
    data = scoring.make_domains(args.domains, args.size, cfg["data"]["synthetic_files_per_domain"],
                                args.test_per_domain)
    classifier = scoring.DomainClassifier(data.train)
    reference = scoring.reference_points(data, classifier)
    log = lambda *a: print(*a, file=sys.stderr)  # noqa: E731
    runs = []
    for seed in args.seeds:
        result = scoring.run_seed(cfg, data, classifier, args.steps, seed, args.num_outs, device, args.eval_every, log)
        f = result["final"]
        log(f"seed {seed}: {args.steps} steps in {result['train_s']:.1f} s ({result['steps_per_s']:.2f} steps/s), "
            f"target acc lat {f['lat_target_acc']:.3f} ref {f['ref_target_acc']:.3f}, content R^2 lat "
            f"{f['lat_content_r2']:.3f} ref {f['ref_content_r2']:.3f}")
        runs.append(result)
    summary = scoring.summarize(runs)
    wall_s, load_end = time.perf_counter() - start, scoring.load_average()
    command = ["--config", args.config] + (["--model-config", args.model_config] if args.model_config else [])
    header = (f"score: {' '.join(command + args.overrides)}\n"
              f"{args.steps} steps, batch {t['batch_size']}, {args.domains} domains {args.size}x{args.size}, "
              f"seeds {' '.join(map(str, args.seeds))}, {args.threads} thread(s), {device}")
    print(scoring.format_table(summary, reference, args.steps, header))
    load = "n/a" if load_start is None else f"{load_start:.1f} at start, {load_end:.1f} at end"
    print(f"time: training {scoring.cell(summary['train_s'], 1)} s per seed ({scoring.cell(summary['steps_per_s'], 2)} "
          f"steps/s), {wall_s:.0f} s in all; load (1 min) {load}")
    record = {"score": summary["final"], "init": summary["init"], "curve": summary["curve"],
              "losses": summary["losses"], "reference": reference, "per_seed": runs,
              "config": args.config, "model_config": args.model_config, "overrides": args.overrides,
              "steps": args.steps, "seeds": args.seeds, "batch_size": t["batch_size"], "domains": names,
              "size": args.size, "num_outs": args.num_outs, "test_per_domain": args.test_per_domain,
              "train_per_domain": cfg["data"]["synthetic_files_per_domain"], "threads": args.threads,
              "device": str(device), "torch": torch.__version__, "machine": platform.machine(),
              "train_s": summary["train_s"], "wall_s": wall_s, "load_start": load_start, "load_end": load_end}
    print(json.dumps(clean(record)), flush=True)
    return 0


def main(argv=None):
    return script_main("score.py", parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
