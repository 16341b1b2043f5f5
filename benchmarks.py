"""The benchmarks beside the training step's, which bench.py runs behind its flags (figures in
docs/benchmarks.md): the evaluation's throughput, the exported graphs' latency, the interpolation video's
throughput and the dataset's start-up (per-file vs packed latents). Each returns its figures as
dicts; bench.py prints them as JSON lines.
"""

import multiprocessing
import os
import platform
import shutil
import statistics
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import exporting
import metrics
import sampling
from config import latent_space, model_kwargs
from dataset import MultiDomainLatentDataset
from inference import DEFAULT_LATENT_SIZE
from latents import LATENT_CHANNELS, PACKED_ARRAY, save_latent
from model import Discriminator, Generator, MappingNetwork, StyleEncoder, build_models
from packing import PackWriter
from runtime import seed_everything
from vae import VAE_DOWNSAMPLE


def quiet(*args, **kwargs):
    pass


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu ({model}, {torch.get_num_threads()} threads)"


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------- evaluation throughput

SD15_VAE_CONFIG = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                       up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=LATENT_CHANNELS,
                       norm_num_groups=32, sample_size=256)  # diffusers' SD1.5 AutoencoderKL, random weights
PROTOCOL = dict(domains=5, sources_per_domain=500, num_outs=10)  # the full protocol at AFHQ-like sizes


def evaluation_throughput(device, inception_weights, lpips_weights=None, latent_size=DEFAULT_LATENT_SIZE,
                          batch_size=16, batches=3, amp_dtype=None):
    """Images/s through the evaluation's hot path on random latents: SD1.5-config VAE decode, then
    Inception features (and LPIPS pairs when weights are given), batched as metrics.py runs them;
    plus the full protocol's time extrapolated from it (PROTOCOL: n (n - 1) tasks x 2 modes x
    sources x outputs fakes, and every domain's reals once)."""
    from diffusers import AutoencoderKL  # on first use: its import takes seconds

    device = torch.device(device)
    torch.manual_seed(0)
    vae = AutoencoderKL(**SD15_VAE_CONFIG).to(device).eval().requires_grad_(False)
    inception = metrics.load_inception(inception_weights, device)
    lpips = metrics.load_lpips(lpips_weights, device) if lpips_weights else None
    evaluator = metrics.Evaluator(vae, "random-sd15", inception, lpips, device, amp_dtype, batch_size)
    latents = torch.randn(batch_size, LATENT_CHANNELS, latent_size, latent_size, device=device) * 5  # [B, C, h, w] raw
    times = {"decode": [], "decode_features": [], "lpips": []}
    for i in range(batches + 1):  # the first batch warms up (cuDNN autotuning, allocator)
        synchronize(device)
        start = time.perf_counter()
        with metrics.autocast_context(device, amp_dtype):
            images = evaluator.decode(latents)  # [B, 3, H, W]
        synchronize(device)
        decoded = time.perf_counter()
        inception(images)
        synchronize(device)
        featured = time.perf_counter()
        if lpips is not None:  # a batch of num_outs = 2 groups: B / 2 pairs
            metrics.mean_pairwise_lpips(lpips, images.view(batch_size // 2, 2, *images.shape[1:]))
            synchronize(device)
        if i:
            times["decode"].append(decoded - start)
            times["decode_features"].append(featured - start)
            times["lpips"].append(time.perf_counter() - featured)
    per_image = {k: statistics.median(v) / batch_size for k, v in times.items()}
    n = PROTOCOL["domains"]
    fakes = n * (n - 1) * 2 * PROTOCOL["sources_per_domain"] * PROTOCOL["num_outs"]
    reals = n * PROTOCOL["sources_per_domain"]
    seconds = (fakes + reals) * per_image["decode_features"] + (fakes * per_image["lpips"] if lpips else 0)
    return {"images_per_s_decode": 1 / per_image["decode"],
            "images_per_s_decode_features": 1 / per_image["decode_features"],
            "lpips_ms_per_image": 1e3 * per_image["lpips"] if lpips else None,
            "protocol_images": fakes + reals, "protocol_minutes_extrapolated": seconds / 60,
            "batch_size": batch_size, "image_size": latent_size * VAE_DOWNSAMPLE, "amp_dtype": str(amp_dtype or "fp32"),
            "inception": inception.identity, "device": device_name(device), "torch": torch.__version__}


# ---------------------------------------------------------------------- exported graphs

def export_latency(cfg, batch_sizes, latent_size=DEFAULT_LATENT_SIZE, repeats=20, warmup=3, threads=None):
    """CPU ms per image of the exported graphs (exporting.py) against eager PyTorch, on a random-weight
    model of the config's `model:` section: per graph and batch size, the median of `repeats` calls of
    the eager module, of ONNX Runtime (CPUExecutionProvider, `threads` intra-op threads) on the ONNX
    file's bytes, and of the torch.export.load-ed .pt2 module. `*_ms_per_image` is wall time;
    `*_cpu_ms_per_image` the process's CPU time, which a machine shared with other jobs inflates less
    (with one thread it is the compute alone). One dict per (graph, batch size)."""
    exporting.require_onnx_packages(runtime=True)
    seed_everything(cfg["seed"])
    nets = {k: m.eval().requires_grad_(False) for k, m in build_models(**model_kwargs(cfg)).items()}
    num_domains, latent_dim = len(cfg["data"]["domains"]), cfg["model"]["latent_dim"]
    channels = latent_space(cfg).channels
    graphs = exporting.build_graphs(cfg, nets, list(range(num_domains)))
    generator = torch.Generator().manual_seed(cfg["seed"])
    ref_size = max(latent_size, exporting.MIN_REFERENCE_SIZE)
    rows = []
    for graph, module in graphs.items():
        example = exporting.random_inputs(graph, 2, latent_size, num_domains, latent_dim, generator, ref_size,
                                          channels)
        program = exporting.export_program(module, graph, example)
        runners = {"eager": exporting.eager_runner(module),
                   "onnx": exporting.onnx_runner(exporting.onnx_bytes(program, graph, {}), threads)[0],
                   "pt2": exporting.pt2_runner(exporting.pt2_bytes(program, {}))[0]}
        for batch in batch_sizes:
            inputs = exporting.random_inputs(graph, batch, latent_size, num_domains, latent_dim, generator, ref_size,
                                             channels)
            row = {"graph": graph, "batch_size": batch}
            for name, run in runners.items():
                wall, cpu = [], []
                for i in range(warmup + repeats):
                    start, start_cpu = time.perf_counter(), time.process_time()
                    run(*inputs)
                    wall.append(time.perf_counter() - start)
                    cpu.append(time.process_time() - start_cpu)
                row[f"{name}_ms_per_image"] = 1e3 * statistics.median(wall[warmup:]) / batch
                row[f"{name}_cpu_ms_per_image"] = 1e3 * statistics.median(cpu[warmup:]) / batch
            rows.append(row)
    common = {"weights": "random", "latent_shape": [channels, latent_size, latent_size], "repeats": repeats,
              "threads": threads or torch.get_num_threads(), "device": device_name(torch.device("cpu")),
              "torch": torch.__version__}
    return [{**row, **common} for row in rows]


# ---------------------------------------------------------------------- the video path

def video_throughput(cfg, device, decode="preview", num_sources=4, frames_per_transition=13,
                     latent_size=DEFAULT_LATENT_SIZE, batch_size=16, suffix=".mp4"):
    """Frames/s of the interpolation video path (sampling.video_frames into sampling.write_video),
    as translate.py --video runs it: the config's networks (random weights: speed does not depend
    on them), `num_sources` random latents in the row, one latent-guided transition between two
    styles plus the end's hold, decoded by the linear preview or a random SD1.5-config VAE (of the
    config's latent channels). Frames
    sharing a style (the holds) are generated and decoded once, so `unique_frames` did the work."""
    device = torch.device(device)
    torch.manual_seed(0)
    models = build_models(**model_kwargs(cfg))
    nets = {k: models[k].to(device).eval().requires_grad_(False) for k in ("generator", "mapping_network")}
    vae, space = None, latent_space(cfg)
    if decode == "sd15":
        from diffusers import AutoencoderKL  # on first use: its import takes seconds

        vae = AutoencoderKL(**{**SD15_VAE_CONFIG, "latent_channels": space.channels})
        vae = vae.to(device).eval().requires_grad_(False)
    sources = space.denormalize(torch.randn(num_sources, space.channels, latent_size, latent_size))  # [N, C, h, w] raw
    with torch.no_grad():
        z = torch.randn(2, cfg["model"]["latent_dim"], device=device)
        keys = nets["mapping_network"](z, torch.zeros(2, dtype=torch.long, device=device))  # [2, S]
    schedule = sampling.interpolation_schedule([2], frames_per_transition, sampling.default_hold(frames_per_transition))
    unique = len(torch.unique(sampling.frame_styles(keys, schedule), dim=0))

    def frames():
        return sampling.video_frames(nets["generator"], sources, keys, schedule, space, vae, None, batch_size, device)

    synchronize(device)
    start = time.perf_counter()
    count = sum(len(chunk) for chunk in frames())  # generator + decode + frame assembly, no encoder
    render = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="bench-video-") as folder:
        start = time.perf_counter()
        _, written = sampling.write_video(os.path.join(folder, f"video{suffix}"), frames(), sampling.FPS)
        seconds = time.perf_counter() - start
        size = os.path.getsize(os.path.join(folder, f"video{suffix}"))
    assert written == count
    return {"video_frames_per_s": count / seconds, "render_frames_per_s": count / render, "frames": count,
            "unique_frames": unique, "pictures_per_s": unique * num_sources / render, "seconds": seconds,
            "file_mb": size / 2**20, "decode": decode,
            "num_sources": num_sources, "frames_per_transition": frames_per_transition, "format": suffix,
            "frame_size": [2 * latent_size * space.downsample, num_sources * latent_size * space.downsample],
            "batch_size": batch_size, "device": device_name(device), "torch": torch.__version__}


# ---------------------------------------------------------------------- data start-up

STARTUP_BATCH = 32  # samples per gathered batch in the start-up figures
GENERATE_ROWS = 16384  # latents generated (and written) at a time


def write_startup_data(root, domains, n, size=DEFAULT_LATENT_SIZE, layout="packed", seed=0):
    """`n` random latents (SD1.5's spread, values float16 holds exactly) split evenly over `domains`
    under `root`: one float32 .pt per latent ("files") or a float16 packed shard per domain
    ("packed", through packing.PackWriter). Returns the bytes written."""
    g = torch.Generator().manual_seed(seed)
    written = 0
    for k, domain in enumerate(domains):
        count = n // len(domains) + (k < n % len(domains))
        folder = os.path.join(root, domain)
        os.makedirs(folder, exist_ok=True)
        writer = PackWriter(folder, (LATENT_CHANNELS, size, size), "float16", log=quiet) if layout == "packed" else None
        for first in range(0, count, GENERATE_ROWS):
            latents = (torch.randn(min(GENERATE_ROWS, count - first), LATENT_CHANNELS, size, size,
                                   generator=g) * 5).half().float()  # [k, 4, size, size]
            names = [f"{first + i:07d}.pt" for i in range(len(latents))]
            if writer is None:
                for latent, name in zip(latents, names):
                    written += os.path.getsize(save_latent(latent, os.path.join(folder, name)))
            else:
                writer.append(latents, names)
        if writer is not None:
            writer.finish(writer.names)
            written += os.path.getsize(os.path.join(folder, PACKED_ARRAY))
    return written


def evict_from_page_cache(root):
    """Drop `root`'s files from the page cache (posix_fadvise DONTNEED: clean pages of these files
    only), so the next read comes from the disk: a cold start."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def memory_mb():
    """This process's resident memory (MB): now (total, anonymous = private, file-backed = shared
    with the page cache, and its proportional share: shared pages divided among their users), and
    its peak (VmHWM; getrusage's ru_maxrss would carry the parent's peak over a spawn's exec)."""
    fields = {}
    for path in ("/proc/self/status", "/proc/self/smaps_rollup"):
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if value.strip().endswith("kB"):
                    fields[key] = int(value.split()[0]) / 1024
    return {"rss_mb": fields["VmRSS"], "rss_anon_mb": fields["RssAnon"], "rss_file_mb": fields["RssFile"],
            "pss_mb": fields["Pss"], "peak_rss_mb": fields["VmHWM"]}


def time_gathers(ds, n=200, seed=0):
    """Median ms of `__getitems__` for STARTUP_BATCH random samples, `n` times."""
    g = torch.Generator().manual_seed(seed)
    times = []
    for _ in range(n):
        indices = torch.randint(0, len(ds), (STARTUP_BATCH,), generator=g).tolist()
        start = time.perf_counter()
        ds.__getitems__(indices)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def startup_child(root, domains, touch, results, barrier):
    """In a fresh process: build the dataset as run.py does on the CPU, time it, then time batch
    gathers. `touch`: then gather every row once (an epoch of CPU training reads them all) and, once
    every rank has, measure memory again; a packed set of at most 2 GB also times gathers from one
    contiguous float16 copy, the alternative to gathering from the maps."""
    barrier.wait()  # the ranks start together
    torch.set_num_threads(1)  # as torchrun's default OMP_NUM_THREADS=1
    baseline = memory_mb()  # after the imports
    start = time.perf_counter()
    ds = MultiDomainLatentDataset(root, domains, preload_to_gpu=False, device="cpu", log=quiet)
    startup_s = time.perf_counter() - start
    result = {"startup_s": startup_s, "baseline_rss_mb": baseline["rss_mb"],
              "baseline_peak_rss_mb": baseline["peak_rss_mb"], **memory_mb(), "gather_ms": time_gathers(ds),
              "rows": sum(ds.counts)}
    if touch:
        start = time.perf_counter()
        for chunk in torch.arange(sum(ds.counts)).split(4096):
            ds._gather(chunk)
        result["touch_all_s"] = time.perf_counter() - start
        result["gather_ms_after_touch"] = time_gathers(ds, seed=1)
        barrier.wait()  # every rank has read everything: their shares of the page cache are final
        result["after_touch"] = memory_mb()
        barrier.wait()
        if ds.shards and ds.nbytes <= 2**31:
            ds.data = torch.cat([s.tensor() for s in ds.shards])  # [N_total, C, H, W] float16, private
            result["gather_ms_float16_copy"] = time_gathers(ds, seed=1)
    results.put(result)


def data_startup(root, domains, ranks=1, touch=False, cold=False):
    """Start-up of `ranks` fresh processes at once on the data under `root` ({...} per rank)."""
    if cold:
        evict_from_page_cache(root)
    context = multiprocessing.get_context("spawn")  # fresh interpreters: nothing inherited
    results, barrier = context.Queue(), context.Barrier(ranks)
    procs = [context.Process(target=startup_child, args=(root, domains, touch, results, barrier))
             for _ in range(ranks)]
    for proc in procs:
        proc.start()
    out = [results.get() for _ in procs]
    for proc in procs:
        proc.join()
    return out


def measure_data_startup(domains, n, latent_size=DEFAULT_LATENT_SIZE, layout="packed", seed=0, data_root=None, ranks=1,
                         touch=False, cold=False):
    """`data_startup` on `n` random latents (`write_startup_data`), generated under `data_root` (kept,
    reused when present) or a temporary folder (deleted): one dict per rank."""
    root = data_root or tempfile.mkdtemp(prefix="bench-startup-", dir="/tmp")
    try:
        start, generated = time.perf_counter(), None
        if not os.path.isdir(os.path.join(root, domains[0])):
            generated = write_startup_data(root, domains, n, latent_size, layout, seed)
        generate_s = time.perf_counter() - start
        return [{"layout": layout, "latents": result.pop("rows"), "rank": rank, **result,
                 "cache": "cold" if cold else "warm", "generated_bytes": generated,
                 "generate_s": generate_s if generated else None,
                 "latent_shape": [LATENT_CHANNELS, latent_size, latent_size],
                 "device": device_name(torch.device("cpu")).replace(f"{torch.get_num_threads()} threads", "1 thread"),
                 "torch": torch.__version__, "load_average_1min": os.getloadavg()[0]}
                for rank, result in enumerate(data_startup(root, domains, ranks, touch, cold))]
    finally:
        if not data_root:
            shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------- latent spaces

DCAE_F32C32_CONFIG = dict(  # diffusers' scripts/convert_dcae_to_diffusers.py, dc-ae-f32c32-in-1.0
    latent_channels=32, encoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    decoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    encoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
    decoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
    encoder_layers_per_block=[0, 4, 8, 2, 2, 2], decoder_layers_per_block=[0, 5, 10, 2, 2, 2],
    encoder_qkv_multiscales=[[]] * 6, decoder_qkv_multiscales=[[]] * 6,
    decoder_norm_types=["batch_norm"] * 3 + ["rms_norm"] * 3, decoder_act_fns=["relu"] * 3 + ["silu"] * 3)


def step_proxy(nets, x, y, s):
    """One D update and one G update without R1 (forward + backward of D on real and fake, of G
    through D and E): the training step's network work, for any latent width."""
    G, E, D = nets["generator"], nets["style_encoder"], nets["discriminator"]
    (D(x, y).mean() - D(G(x, s).detach(), y).mean()).backward()  # D step
    fake = G(x, s)  # [B, C, H, W]
    (-D(fake, y).mean() + (E(fake, y) - s).abs().mean()).backward()  # G step: adversarial + style


def saved_mb(fn):
    """MB of the tensors autograd saves for backward during `fn()`: the activation memory of a step."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0] / 2**20


def latent_space_step(name, model_cfg, channels, side, batch_size=2, steps=2, device="cpu"):
    """Step-proxy time, FLOPs and memory of the networks for `channels` x `side` x `side` latents,
    random weights (speed and memory do not depend on them)."""
    device = torch.device(device)
    torch.manual_seed(0)
    m, domains = model_cfg, 5
    nets = {"generator": Generator(channels, m["gen_channels"], m["n_res_blocks"], m["style_dim"]),
            "mapping_network": MappingNetwork(m["latent_dim"], m["style_dim"], domains, m["mapping_hidden_dim"],
                                              m["mapping_shared_layers"]),
            "style_encoder": StyleEncoder(channels, m["style_dim"], domains, m["style_encoder_channels"]),
            "discriminator": Discriminator(channels, domains, m["disc_channels"])}
    nets = {k: v.to(device) for k, v in nets.items()}
    x = torch.randn(batch_size, channels, side, side, device=device)  # [B, C, h, w]
    y = torch.zeros(batch_size, dtype=torch.long, device=device)  # [B]
    s = torch.randn(batch_size, m["style_dim"], device=device)  # [B, S]
    with FlopCounterMode(display=False) as counter:
        step_proxy(nets, x, y, s)
    activations = saved_mb(lambda: step_proxy(nets, x, y, s))
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        step_proxy(nets, x, y, s)
        synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    params = sum(p.numel() for n in ("generator", "style_encoder", "discriminator") for p in nets[n].parameters())
    return {"preset": name, "latent_shape": [channels, side, side], "batch_size": batch_size,
            "step_ms": statistics.median(times), "gflops_per_step": counter.get_total_flops() / 1e9,
            "activation_mb": activations, "params_m": params / 1e6, "weights": "random",
            "device": device_name(device), "torch": torch.__version__}


def decode_ms(vae, latent, repeats=2):
    """Median ms of one `vae.decode(latent)`, after one untimed call."""
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            synchronize(latent.device)
            start = time.perf_counter()
            vae.decode(latent)
            synchronize(latent.device)
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times[1:])


def decode_costs(image_size=256, repeats=2, device="cpu"):
    """ms per 1-image decode at `image_size` px of each family's full VAE and its tiny autoencoder:
    random weights in the real architectures (diffusers' SD1.5 AutoencoderKL config with 4 or 16
    latent channels, the DC-AE f32c32 config, TAESD's AutoencoderTiny defaults)."""
    from diffusers import AutoencoderDC, AutoencoderKL, AutoencoderTiny

    device, rows = torch.device(device), []
    for family, channels in (("SD1.5 / SDXL", 4), ("SD3 / FLUX.1", 16)):
        latent = torch.randn(1, channels, image_size // 8, image_size // 8, device=device)
        full = AutoencoderKL(**{**SD15_VAE_CONFIG, "latent_channels": channels}).to(device).eval()
        tiny = AutoencoderTiny(latent_channels=channels).to(device).eval()
        rows.append({"family": family, "full_ms": decode_ms(full, latent, repeats),
                     "tiny_ms": decode_ms(tiny, latent, repeats)})
        del full, tiny
    full = AutoencoderDC(**DCAE_F32C32_CONFIG).to(device).eval()
    latent = torch.randn(1, 32, image_size // 32, image_size // 32, device=device)
    rows.append({"family": "DC-AE f32c32", "full_ms": decode_ms(full, latent, repeats), "tiny_ms": None})
    common = {"image_size": image_size, "weights": "random", "device": device_name(device),
              "torch": torch.__version__}
    return [{**row, **common} for row in rows]
