"""What the device and the installed torch offer the training step: fused Adam, torch.compile (its
options, and the nets the config asks it for), and how an out-of-memory error looks."""

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
