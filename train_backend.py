"""What the device and the installed torch offer the training step: fused Adam, torch.compile's
options, and how an out-of-memory error looks."""

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
