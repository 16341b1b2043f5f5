"""Throughput, memory and FLOPs of the training step (figures in docs/benchmarks.md).

    python bench.py --config configs/stargan_v2_latent.yaml [--device cuda|cpu] [--steps N] [--warmup N]
                    [--matrix] [--peak-tflops X] [--latent-size N] [--threads N] [--sync-check]
                    [--forward-flops] [KEY=VALUE ...]
    python bench.py --config ... --evaluation --inception-weights FILE [--lpips-weights FILE] [--eval-batch N]
    python bench.py --config ... --export [--export-batch 1 8] [--threads N]   (exported graphs, CPU)
    python bench.py --config ... --video preview|sd15 [--video-sources N] [--video-frames T] [--eval-batch N]
    python bench.py --config ... --data-startup N [--layout packed|files] [--data-root DIR] [--ranks K] [--cold]
                    [--touch] [--latent-size N]

Times the real `Trainer.train_step` (imported from trainer.py, the code run.py runs) fed by the real
batch path: a `MultiDomainLatentDataset` over a temporary folder of random latents of the configured
domains, preloaded to the device as `data.preload_to_gpu` says, read through `build_loader`. One
timed iteration is what run.py's loop does per batch: fetch the batch, then `train_step`.
Compilation and autotuning happen in the `--warmup` steps and are excluded.

`--evaluation`, `--export`, `--video` and `--data-startup N` time other work instead, measured by
benchmarks.py: the evaluation's decode and features, the exported graphs, the interpolation video,
and the dataset's start-up (per-file vs packed latents: seconds, peak and shared host memory, batch
gathers; see docs/benchmarks.md).

Prints one JSON line per configuration (the only stdout lines that begin with `{`); `--matrix` runs
bf16/fp32 x compile off/on, each in a fresh Trainer, then prints a markdown table.

- `step_ms`: median iteration time. CUDA: events recorded between iterations; bench adds no host
  sync inside the timed window, so the host runs ahead as in training, and any sync the fetch or
  the step makes is part of the figure. CPU: perf_counter (CPU ops are synchronous).
  `step_ms_mean` is the mean over the same window (R1 steps included).
- `samples_per_s` = batch_size x 1000 / step_ms.
- `host_ms`: median host time of one `train_step` call, without the fetch and without a sync; on
  CUDA, host_ms ~ step_ms means the step is bound by Python and kernel launches, not by the GPU.
- `data_ms`: median time of one batch fetch (`next()` on the loader, i.e. `__getitems__` plus the
  loader's sampler and collate), timed separately with a sync on each side; `data_fraction` =
  data_ms / step_ms.
- `flops_per_step`: counted once by `torch.utils.flop_counter.FlopCounterMode` around whole
  eager fp32 `train_step`s (forward, backward and R1's double backward; matmuls and convolutions,
  as usual for MFU) on the benchmarked device: one R1 step and one plain step, amortised over
  `loss.r1_interval` (lazy R1 runs on one step in r1_interval). Both raw counts are in the line.
- `mfu` = flops_per_step / (step_ms / 1000) / peak; null unless the device's dense peak is in
  PEAK_TFLOPS or `--peak-tflops` is given.
- `peak_memory_mb`: torch.cuda.max_memory_allocated on CUDA (reset per configuration); on the CPU
  the process's peak RSS since it started (ru_maxrss), so under `--matrix` it never goes down.
"""

import os

# as run.py, before torch is imported: the allocator settings training runs with
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", os.environ["PYTORCH_ALLOC_CONF"])

import argparse  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from arguments import bounded  # noqa: E402
from benchmarks import (decode_costs, device_name, evaluation_throughput, export_latency,  # noqa: E402
                        latent_space_step, measure_data_startup, quiet, synchronize, video_throughput)
from config import DEFAULTS, latent_space, load_config, model_kwargs, read_config_file  # noqa: E402
from dataset import MultiDomainLatentDataset, build_loader  # noqa: E402
from inference import DEFAULT_LATENT_SIZE  # noqa: E402
from latents import MAX_LATENT_SIZE, write_latent_folders  # noqa: E402
from model import MIN_LATENT_SIZE, NETS, build_models  # noqa: E402
from runtime import (AMP_DTYPES, InputError, configure_backends, resolve_device, script_main,  # noqa: E402
                     seed_everything)
from trainer import Trainer  # noqa: E402

FILES_PER_DOMAIN = 64
# the bounds of the flags: a figure is read off a run of minutes, not days (--steps, --warmup, --data-startup)
MAX_STEPS, MAX_BATCH, MAX_LATENTS = 10 ** 5, 4096, 10 ** 7
MAX_THREADS, MAX_RANKS, MAX_SOURCES, MAX_FRAMES = 1024, 256, 1024, 10000
MAX_PEAK_TFLOPS = 10 ** 5  # an H100's dense bf16 is 989
MATRIX = (("bf16", False), ("fp32", False), ("bf16", True), ("fp32", True))  # eager rows first: they survive a timeout

# Dense (no sparsity) tensor-core peaks in TFLOP/s from NVIDIA's datasheets, by a substring of
# torch.cuda.get_device_name; first match wins. fp32 means TF32 tensor cores: run.py enables TF32
# for matmuls and cuDNN convolutions on CUDA.
PEAK_TFLOPS = (
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 417.0}),
    ("H200 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 417.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0}),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}),
)

RESULT_KEYS = ("samples_per_s", "step_ms", "data_ms", "data_fraction", "flops_per_step", "mfu", "peak_memory_mb",
               "batch_size", "device", "torch", "amp_dtype", "use_compile", "compile_mode", "steps", "warmup")


def peak_tflops_for(device_name, amp_dtype):
    """Dense peak TFLOP/s of a known GPU for the step's dtype, else None."""
    for key, peaks in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peaks[amp_dtype]
    return None



def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def release(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------- the real data path

def random_latents(domains, space, files_per_domain=FILES_PER_DOMAIN, size=DEFAULT_LATENT_SIZE, seed=0):
    """{domain: raw latents [files_per_domain, C, size, size]} of `space`, unit normal once normalised."""
    g = torch.Generator().manual_seed(seed)
    return {d: space.denormalize(torch.randn(files_per_domain, space.channels, size, size, generator=g))
            for d in domains}


def build_data(cfg, device, num_batches, size=DEFAULT_LATENT_SIZE):
    """(dataset, loader) of `num_batches` batches over random latents, through the real classes.

    The files live only while the dataset reads them: the dataset keeps everything in memory."""
    d, t, space = cfg["data"], cfg["training"], latent_space(cfg)
    with tempfile.TemporaryDirectory(prefix="bench-latents-") as root:
        write_latent_folders(root, random_latents(d["domains"], space, size=size, seed=cfg["seed"]))
        dataset = MultiDomainLatentDataset(root, d["domains"], preload_to_gpu=d["preload_to_gpu"], device=device,
                                           samples_per_epoch=num_batches * t["batch_size"], seed=cfg["seed"],
                                           hflip=d["hflip"], preload_max_fraction=d["preload_max_fraction"],
                                           log=quiet, channels=space.channels)
    loader = build_loader(dataset, t["batch_size"], num_workers=t["num_workers"], pin_memory=t["pin_memory"],
                          drop_last=True, log=quiet)
    return dataset, loader


def build_trainer(cfg, device):
    seed_everything(cfg["seed"])
    if cfg["training"]["use_compile"]:
        import torch._dynamo

        torch._dynamo.reset()  # a fresh Trainer compiles afresh, as a fresh run.py process would
    return Trainer(cfg, build_models(**model_kwargs(cfg)), device, log=quiet)


# ---------------------------------------------------------------------- FLOPs

class _GlobalOnly:
    """Stands in for FlopCounterMode's ModuleTracker. The tracker hooks every module's backward,
    and those hooks make autograd.grad on a leaf input (R1's gradient w.r.t. the reals) fail with
    "A leaf node was passed to _will_engine_execute_node"; a total needs no per-module split."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def flop_counter():
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    return counter


def count_flops(cfg, device, batch):
    """FLOPs of whole train_steps on `batch`: an R1 step, a plain step, and their average over
    one r1_interval. Eager fp32 on a fresh Trainer: the count does not depend on dtype or compile."""
    cfg = copy.deepcopy(cfg)
    cfg["training"].update(use_compile=False, amp_dtype="fp32")
    trainer = build_trainer(cfg, device)
    interval, has_r1 = cfg["loss"]["r1_interval"], cfg["loss"]["w_r1"] > 0
    counts = []
    for _ in range(2 if has_r1 and interval > 1 else 1):  # Trainer.step 0 runs R1 (0 % interval == 0), step 1 not
        with flop_counter() as counter:
            trainer.train_step(batch)
        counts.append(counter.get_total_flops())
    r1, plain = (counts[0], counts[-1]) if has_r1 else (None, counts[0])
    amortised = (r1 + (interval - 1) * plain) / interval if has_r1 else plain  # lazy R1: 1 step in `interval`
    if trainer.oom_skipped:  # a phase skipped for OOM counts short: no number rather than a wrong one
        amortised = r1 = plain = None
    del trainer
    release(torch.device(device))
    return {"flops_per_step": amortised, "flops_r1_step": r1, "flops_plain_step": plain}


def forward_flops(cfg, device, size=DEFAULT_LATENT_SIZE, batch_size=4):
    """FLOPs per sample of one forward of each network at [C, size, size] (FlopCounterMode)."""
    device = torch.device(device)
    seed_everything(cfg["seed"])
    nets = {k: m.to(device).eval() for k, m in build_models(**model_kwargs(cfg)).items()}
    x = torch.randn(batch_size, latent_space(cfg).channels, size, size, device=device)  # [B, C, H, W]
    y = torch.zeros(batch_size, dtype=torch.long, device=device)  # [B]
    z = torch.randn(batch_size, cfg["model"]["latent_dim"], device=device)  # [B, L]
    s = torch.randn(batch_size, cfg["model"]["style_dim"], device=device)  # [B, S]
    calls = {"generator": (x, s), "mapping_network": (z, y), "style_encoder": (x, y), "discriminator": (x, y)}
    out = {}
    with torch.no_grad():
        for name in NETS:
            with flop_counter() as counter:
                nets[name](*calls[name])
            out[name] = counter.get_total_flops() / batch_size
    return out


# ---------------------------------------------------------------------- timing

def time_steps(trainer, fetch, steps, device):
    """Per-iteration times (ms) of `fetch()` + train_step, and host issue times (ms) of train_step."""
    step_ms, host_ms = [], []
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        synchronize(device)
        events[0].record()
        for i in range(steps):
            batch = fetch()
            start = time.perf_counter()
            trainer.train_step(batch)
            host_ms.append((time.perf_counter() - start) * 1e3)
            events[i + 1].record()
        synchronize(device)  # the only sync: after the window
        step_ms = [a.elapsed_time(b) for a, b in zip(events[:-1], events[1:])]
    else:
        for _ in range(steps):
            start = time.perf_counter()
            batch = fetch()
            issue = time.perf_counter()
            trainer.train_step(batch)
            end = time.perf_counter()
            step_ms.append((end - start) * 1e3)
            host_ms.append((end - issue) * 1e3)
    return step_ms, host_ms


def time_fetch(loader, device, n):
    """Median ms of one `next()` on the loader, synchronised on both sides (the gathers are async)."""
    times = []
    it = iter(loader)
    for _ in range(n):
        synchronize(device)
        start = time.perf_counter()
        batch = next(it)
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    del batch
    return statistics.median(times)


def bench(cfg, device, steps, warmup, peak_tflops=None, flops=None, latent_size=DEFAULT_LATENT_SIZE):
    """Benchmark one configuration; returns the JSON line's dict (see the module docstring).

    `flops`: a previous count_flops result to reuse (the count depends on shapes only)."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    device = torch.device(device)
    release(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    dataset, loader = build_data(cfg, device, warmup + steps, latent_size)
    timed = time_training(cfg, device, loader, steps, warmup)
    data_ms = time_fetch(loader, device, min(steps, len(loader)))
    if flops is None:
        flops = count_flops(cfg, device, next(iter(loader)))
    data_device = str(dataset.device)
    del loader, dataset
    release(device)
    return result_line(cfg, device, steps, warmup, latent_size, peak_tflops, flops, timed, data_ms, data_device)


def time_training(cfg, device, loader, steps, warmup):
    """`warmup` untimed iterations of a fresh Trainer, then `time_steps`: the times, the peak memory,
    the nets whose compilation fell back to eager and the phases skipped for OOM."""
    t = cfg["training"]
    trainer = build_trainer(cfg, device)
    it = iter(loader)
    for _ in range(warmup):  # compilation, cuDNN autotuning, allocator growth
        trainer.train_step(next(it))
    step_ms, host_ms = time_steps(trainer, lambda: next(it), steps, device)
    timed = dict(step_ms=step_ms, host_ms=host_ms, memory=peak_memory_mb(device), oom_skipped=trainer.oom_skipped,
                 compiled_fallback=sorted(n for n in NETS if t["use_compile"] and t[f"compile_{n}"]
                                          and trainer.call[n] is trainer.nets[n]))
    del it, trainer
    release(device)
    return timed


def result_line(cfg, device, steps, warmup, latent_size, peak_tflops, flops, timed, data_ms, data_device):
    """The JSON line's dict of one configuration (see the module docstring)."""
    t = cfg["training"]
    batch_size = t["batch_size"]
    step_ms, host_ms = timed["step_ms"], timed["host_ms"]
    step = statistics.median(step_ms)
    name = device_name(device)
    peak = peak_tflops if peak_tflops is not None else (
        peak_tflops_for(name, t["amp_dtype"]) if device.type == "cuda" else None)
    achieved = flops["flops_per_step"] / (step / 1e3) if flops["flops_per_step"] else None  # FLOP/s
    return {
        "samples_per_s": batch_size * 1e3 / step,
        "step_ms": step,
        "data_ms": data_ms,
        "data_fraction": data_ms / step,
        "flops_per_step": flops["flops_per_step"],
        "mfu": achieved / (peak * 1e12) if peak and achieved else None,
        "peak_memory_mb": timed["memory"],
        "batch_size": batch_size,
        "device": name,
        "torch": torch.__version__,
        "amp_dtype": t["amp_dtype"],
        "use_compile": t["use_compile"],
        "compile_mode": t["compile_mode"],
        "compile_cudagraphs": t["compile_cudagraphs"],
        "steps": steps,
        "warmup": warmup,
        "steps_per_s": 1e3 / step,
        "step_ms_mean": statistics.fmean(step_ms),
        "step_ms_min": min(step_ms),
        "host_ms": statistics.median(host_ms),
        "achieved_tflops": achieved / 1e12 if achieved else None,
        "peak_tflops": peak,
        "flops_r1_step": flops["flops_r1_step"],
        "flops_plain_step": flops["flops_plain_step"],
        "r1_interval": cfg["loss"]["r1_interval"],
        "latent_shape": [latent_space(cfg).channels, latent_size, latent_size],
        "data_device": data_device,
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss",
        "compile_fell_back_to_eager": timed["compiled_fallback"],
        "oom_skipped": timed["oom_skipped"],
    }


# ---------------------------------------------------------------------- CUDA-only checks

def sync_check(cfg, device, steps=4, warmup=3):
    """Run steady-state train_steps, then loader fetches, under torch.cuda.set_sync_debug_mode
    ("error"): {"train_step": None or the first sync's error, "fetch": ...}. The train_step window
    covers at least one lazy R1 step."""
    device = torch.device(device)
    if device.type != "cuda":
        return {"skipped": "needs CUDA"}
    steps = max(steps, cfg["loss"]["r1_interval"] + 1)
    dataset, loader = build_data(cfg, device, warmup + 2 * steps)
    trainer = build_trainer(cfg, device)
    it = iter(loader)
    for _ in range(warmup):
        trainer.train_step(next(it))
    batches = [next(it) for _ in range(steps)]
    result = {}
    for name, work in (("train_step", lambda: [trainer.train_step(b) for b in batches]),
                       ("fetch", lambda: [next(it) for _ in range(steps)])):
        synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            work()
            result[name] = None
        except RuntimeError as e:
            result[name] = str(e).splitlines()[0][:300]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    del trainer, it, batches, loader, dataset
    release(device)
    return result


def count_recompiles(cfg, device, steps=6, warmup=3):
    """(graphs compiled during warm-up, graphs compiled after it, nets that fell back to eager)
    with training.use_compile on; the post-warm-up window covers at least one lazy R1 step."""
    from torch._dynamo.utils import counters

    cfg = copy.deepcopy(cfg)
    cfg["training"]["use_compile"] = True
    device = torch.device(device)
    steps = max(steps, cfg["loss"]["r1_interval"] + 1)
    dataset, loader = build_data(cfg, device, warmup + steps)
    trainer = build_trainer(cfg, device)  # resets dynamo
    it = iter(loader)
    start = counters["stats"]["unique_graphs"]
    for _ in range(warmup):
        trainer.train_step(next(it))
    warm = counters["stats"]["unique_graphs"]
    for _ in range(steps):
        trainer.train_step(next(it))
    synchronize(device)
    after = counters["stats"]["unique_graphs"]
    eager = sorted(n for n in NETS if cfg["training"][f"compile_{n}"] and trainer.call[n] is trainer.nets[n])
    del trainer, it, loader, dataset
    release(device)
    return warm - start, after - warm, eager


def run_data_startup(args, cfg):
    """--data-startup: generate (or reuse under --data-root) the latents, then one JSON line per rank."""
    domains = cfg["data"]["domains"]
    if args.data_startup < len(domains):
        raise InputError(f"--data-startup {args.data_startup}: expected at least one latent per domain "
                         f"({len(domains)} domains)")
    for row in measure_data_startup(domains, args.data_startup, args.latent_size, args.layout, cfg["seed"],
                                    args.data_root, args.ranks, args.touch, args.cold):
        print(json.dumps({**row, "config": args.config, "overrides": args.overrides}), flush=True)
    return 0


PRESETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "presets")
DECODE_SIZE = 256  # px of the decode-cost comparison (one image)


def latent_space_rows(args, device):
    """--latent-spaces: benchmarks.latent_space_step per distinct preset shape, then decode_costs, on `device`."""
    rows, seen = [], {}
    for path in sorted(glob.glob(os.path.join(PRESETS, "*.yaml"))):
        raw = read_config_file(path)
        model = {**DEFAULTS["model"], **raw["model"]}  # the preset's widths over the defaults
        channels, down = model.pop("latent_channels"), raw["training"]["latent_downsample"]
        px = int(os.path.basename(path)[:-5].rsplit("_", 1)[1])
        key = (channels, px // down, json.dumps(model, sort_keys=True))
        if key not in seen:
            seen[key] = latent_space_step(os.path.basename(path)[:-5], model, channels, px // down, steps=args.steps,
                                          device=device)
        rows.append({**seen[key], "preset": os.path.basename(path)[:-5]})
    return rows + decode_costs(DECODE_SIZE, repeats=args.steps, device=device)


def other_benchmark(args, cfg, device):
    """--export, --video or --evaluation: the rows of benchmarks.py's measurement."""
    if args.export:
        return export_latency(cfg, args.export_batch, args.latent_size, args.steps, args.warmup, args.threads)
    if args.video:
        return [video_throughput(cfg, device, args.video, args.video_sources, args.video_frames, args.latent_size,
                                 args.eval_batch, args.video_format)]
    dtype = AMP_DTYPES[cfg["training"]["amp_dtype"]] if device.type == "cuda" else None
    return [evaluation_throughput(device, args.inception_weights, args.lpips_weights, args.latent_size,
                                  args.eval_batch, amp_dtype=dtype)]


# ---------------------------------------------------------------------- CLI

def fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


def format_table(rows):
    """Markdown table of bench results (one row each)."""
    lines = ["| amp | compile | step ms | samples/s | host ms | data ms | data % | TFLOP/s | MFU | peak MB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        compiled = "on" if r["use_compile"] else "off"
        compiled += " (fell back)" if r.get("compile_fell_back_to_eager") else ""
        mfu = None if r["mfu"] is None else 100 * r["mfu"]
        lines.append(f"| {r['amp_dtype']} | {compiled} | {r['step_ms']:.2f} | {r['samples_per_s']:.1f} | "
                     f"{r['host_ms']:.2f} | {r['data_ms']:.3f} | {100 * r['data_fraction']:.2f} | "
                     f"{fmt(r['achieved_tflops'], '.3g')} | {fmt(mfu, '.1f')}{'' if mfu is None else '%'} | "
                     f"{r['peak_memory_mb']:.0f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Benchmark the Latent StarGAN v2 training step (one JSON line).")
    p.add_argument("--config", required=True, help="YAML or JSON config (see configs/stargan_v2_latent.yaml)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: training.device; cuda falls "
                                                  "back to the CPU with a warning)")
    p.add_argument("--steps", type=bounded(int, 1, MAX_STEPS), default=30, help="timed iterations (median reported)")
    p.add_argument("--warmup", type=bounded(int, 0, MAX_STEPS), default=5,
                   help="untimed iterations first (compilation, autotuning)")
    p.add_argument("--matrix", action="store_true", help="bf16/fp32 x compile off/on, then a markdown table")
    p.add_argument("--peak-tflops", type=bounded(float, 1e-3, MAX_PEAK_TFLOPS), default=None,
                   help="device peak for MFU (default: known GPUs)")
    p.add_argument("--latent-size", type=bounded(int, MIN_LATENT_SIZE, MAX_LATENT_SIZE), default=DEFAULT_LATENT_SIZE,
                   help="latent H = W (32: 256px images)")
    p.add_argument("--threads", type=bounded(int, 1, MAX_THREADS), default=None,
                   help="CPU threads for torch (default: torch's own)")
    p.add_argument("--sync-check", action="store_true",
                   help="CUDA: run steady-state steps and fetches under set_sync_debug_mode('error')")
    p.add_argument("--forward-flops", action="store_true",
                   help="print FLOPs per sample of one forward of G, F, E, D instead of timing")
    p.add_argument("--evaluation", action="store_true",
                   help="time the evaluation instead: images/s through a random SD1.5-config VAE decode and "
                        "Inception features (--inception-weights), and the full protocol's extrapolated time")
    p.add_argument("--inception-weights", default=None, help="with --evaluation: the TF-Inception TorchScript")
    p.add_argument("--lpips-weights", default=None, help="with --evaluation: AlexNet weights (LPIPS timed too)")
    p.add_argument("--export", action="store_true",
                   help="time the exported graphs instead (CPU): ONNX Runtime and torch.export .pt2 against eager, "
                        "ms per image, on a random-weight model of the config (--steps repeats after --warmup)")
    p.add_argument("--export-batch", type=bounded(int, 1, MAX_BATCH), nargs="+", default=[1, 8],
                   help="with --export: batch sizes (default 1 8)")
    p.add_argument("--eval-batch", type=bounded(int, 1, MAX_BATCH), default=16,
                   help="with --evaluation or --video: images per batch")
    p.add_argument("--video", choices=["preview", "sd15"], default=None,
                   help="time the interpolation video path instead (translate.py --video): frames/s decoded by the "
                        "linear preview or a randomly initialised SD1.5-config VAE (timing only), into an .mp4")
    p.add_argument("--video-sources", type=bounded(int, 1, MAX_SOURCES), default=4,
                   help="with --video: sources in the row")
    p.add_argument("--video-frames", type=bounded(int, 3, MAX_FRAMES), default=13,
                   help="with --video: frames per transition")
    p.add_argument("--video-format", choices=[".mp4", ".mkv", ".gif"], default=".mp4", help="with --video: the writer")
    p.add_argument("--latent-spaces", action="store_true",
                   help="per preset of configs/presets/ (256 and 512 px): step time, FLOPs and activation memory of "
                        "the networks (random weights), then the full VAE's vs the tiny autoencoder's decode time")
    p.add_argument("--data-startup", type=bounded(int, 1, MAX_LATENTS), default=None, metavar="N",
                   help="time the dataset's start-up instead, on N random latents of the config's domains "
                        "(--layout, --latent-size), in fresh processes: seconds, peak and shared host memory")
    p.add_argument("--layout", choices=("packed", "files"), default="packed",
                   help="with --data-startup: one float16 shard per domain, or one float32 .pt per latent")
    p.add_argument("--data-root", default=None,
                   help="with --data-startup: where the latents go (kept, reused when present; default: a "
                        "temporary folder, deleted)")
    p.add_argument("--ranks", type=bounded(int, 1, MAX_RANKS), default=1,
                   help="with --data-startup: processes starting at once (ranks)")
    p.add_argument("--cold", action="store_true",
                   help="with --data-startup: drop the data's files from the page cache first (a cold start)")
    p.add_argument("--touch", action="store_true",
                   help="with --data-startup: then read every latent once, as an epoch of CPU training does")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="override a dotted config key, value parsed as YAML (e.g. training.batch_size=16)")
    return p.parse_args(argv)


def main(argv=None):
    return script_main("bench.py", parse_args, run, argv)


def run(args):
    cfg = load_config(args.config, args.overrides)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.data_startup is not None:
        return run_data_startup(args, cfg)
    device = resolve_device(args.device or cfg["training"]["device"], flag="--device")
    configure_backends(device)  # as run.train
    common = {"config": args.config, "overrides": args.overrides}
    if args.latent_spaces:
        for row in latent_space_rows(args, device):
            print(json.dumps({**row, **common}), flush=True)
        return 0
    if args.export or args.video or args.evaluation:
        for row in other_benchmark(args, cfg, device):
            print(json.dumps({**row, **common}), flush=True)
        return 0
    if args.forward_flops:
        flops = forward_flops(cfg, device, args.latent_size)
        print(json.dumps({"forward_gflops_per_sample": {k: v / 1e9 for k, v in flops.items()},
                          "latent_shape": [latent_space(cfg).channels, args.latent_size, args.latent_size],
                          "device": device_name(device), "torch": torch.__version__, **common}), flush=True)
        return 0
    if args.sync_check:
        result = sync_check(cfg, device)
        print(json.dumps({"sync_check": result, "device": device_name(device),
                          "amp_dtype": cfg["training"]["amp_dtype"], "torch": torch.__version__, **common}), flush=True)
        return 1 if any(result.get(k) for k in ("train_step", "fetch")) else 0
    return run_steps(args, cfg, device, common)


def run_steps(args, cfg, device, common):
    """The training step's JSON line, per --matrix variant; then the matrix's table."""
    variants = MATRIX if args.matrix else ((cfg["training"]["amp_dtype"], cfg["training"]["use_compile"]),)
    if args.matrix and device.type == "cpu":
        warnings.warn("--matrix on the CPU: the compile-on rows compile with Inductor's C++ backend, which "
                      "takes minutes on a few cores")
    rows, flops = [], None
    for amp_dtype, use_compile in variants:
        run_cfg = copy.deepcopy(cfg)
        run_cfg["training"].update(amp_dtype=amp_dtype, use_compile=use_compile)
        result = bench(run_cfg, device, args.steps, args.warmup, args.peak_tflops, flops, args.latent_size)
        flops = {k: result[k] for k in ("flops_per_step", "flops_r1_step", "flops_plain_step")}
        print(json.dumps({**result, **common}), flush=True)
        rows.append(result)
    if args.matrix:
        print(format_table(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
