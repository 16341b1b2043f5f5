"""What the device and the installed torch offer the training step: fused Adam, torch.compile (its
options, and the nets the config asks it for), how an out-of-memory error looks, and how many CPU
threads pay on this machine now."""

import time
import warnings

import torch


def is_oom(err):
    """An out-of-memory error, whichever way the device reported it."""
    return isinstance(err, torch.cuda.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


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


def compile_nets(nets, t):
    """torch.compile each of `nets` that training.compile_<name> asks for, with the mode, CUDA graphs,
    dynamic and fullgraph settings of the training section `t`. Returns {name: compiled module}; a
    net that fails to wrap stays eager, with a warning, and training goes on."""
    options = compile_options(t["compile_mode"], t["compile_cudagraphs"])
    compiled = {}
    for name, net in nets.items():
        if not t[f"compile_{name}"]:
            continue
        try:
            compiled[name] = torch.compile(net, options=options, dynamic=t["compile_dynamic"],
                                           fullgraph=t["compile_fullgraph"])
        except Exception as e:  # wrap-time failure: eager for this module, training goes on
            warnings.warn(f"torch.compile failed for {name}, using eager: {e}")
    return compiled


def choose_cpu_threads(log, rounds=3, convs=2):
    """training.cpu_threads null on the CPU: time a few small convolutions at torch's default thread
    count and at 1 thread (about 50 ms in all), keep the faster and say so in one line. Why: on a
    small machine busy with other work, torch's default (one thread per core) ran the demo 1.25x
    slower, and in bad cases 30x (docs/benchmarks.md). Never more threads than torch's default;
    nothing to do at 1. The probe draws from its own generator: the global RNG is untouched.
    Returns the count set."""
    default = torch.get_num_threads()
    if default <= 1:
        return default
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 32, 32, 32, generator=g), torch.randn(32, 32, 3, 3, generator=g)  # a demo-sized conv
    best = {default: float("inf"), 1: float("inf")}
    for _ in range(rounds):  # interleaved: a burst of other work hits both counts alike
        for threads in best:
            torch.set_num_threads(threads)
            torch.nn.functional.conv2d(x, w, padding=1)  # warm the pool at this count
            start = time.perf_counter()
            for _ in range(convs):
                torch.nn.functional.conv2d(x, w, padding=1)
            best[threads] = min(best[threads], (time.perf_counter() - start) / convs)
        if max(best.values()) > 3 * min(best.values()):  # plain already (a busy pool: 100 ms a conv)
            break
    chosen = 1 if best[1] < best[default] else default
    torch.set_num_threads(chosen)
    log(f"cpu threads: {chosen} (a probe conv took {best[default] * 1e3:.1f} ms with torch's {default}, "
        f"{best[1] * 1e3:.1f} ms with 1); training.cpu_threads=N sets it")
    return chosen
