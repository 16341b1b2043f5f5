"""Skipped steps: the all-or-none step of a GAN phase that skips on a non-finite loss or gradient
or an out-of-memory error without a host sync; device-side counters of the skipped steps, read on
the host only when something is shown; the consecutive-skip limit; the epoch-end and final reports."""

import torch


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps (training.max_nonfinite_steps), or non-finite weights
    that a checkpoint must not hold."""


def step_all_or_none(optimizers, scaler, params, bad, fused):
    """Step every optimizer of one GAN phase, or none of them, deciding on the device.

    Why: a skip (non-finite objective or gradient, out of memory, any rank's vote in `bad`) must
    cover all the phase's networks at once, or G, F and E drift apart; and reading the flag on the
    host would sync the GPU on every step. So the decision stays a 0-dim device tensor:
    - the float32 total gradient norm (`torch._foreach_norm`, one kernel per dtype) overflows to inf
      on absurd gradients that are finite element by element;
    - fp16: every optimizer is unscaled, then the GradScaler's per-optimizer found-inf record
      (`_per_optimizer_states`) is overwritten with the phase's combined flag, so `scaler.step` skips
      all or none and `scaler.update` backs the scale off;
    - fused Adam takes the flag as its `found_inf` attribute and skips inside the kernel;
    - any other optimizer reads the flag on the host (one tiny sync).
    These are private torch details; tests/test_skip.py checks each against the installed torch.
    Returns the 0-dim float skip flag.
    """
    if scaler.is_enabled():
        for opt in optimizers:
            scaler.unscale_(opt)
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        bad = bad + (~torch.isfinite(norm)).float()
    skip = (bad > 0).float()
    if scaler.is_enabled():
        for opt in optimizers:
            for found in scaler._per_optimizer_states[id(opt)]["found_inf_per_device"].values():
                found.copy_(skip)
            scaler.step(opt)
        scaler.update()
    elif fused:
        for opt in optimizers:
            opt.found_inf = skip
            opt.step()
            del opt.found_inf
    elif skip.item() == 0:
        for opt in optimizers:
            opt.step()
    return skip


class SkipCounter:
    """`nonfinite_total`, `nonfinite_run` (consecutive) and `nonfinite_run_max` (the longest run since
    the last check) are 0-dim device tensors, so counting costs no host sync; `oom_skipped` is
    counted on the host, where the error is caught."""

    def __init__(self, device, max_consecutive, log):
        self.nonfinite_total = torch.zeros((), device=device)
        self.nonfinite_run = torch.zeros((), device=device)
        self.nonfinite_run_max = torch.zeros((), device=device)
        self.oom_skipped = 0
        self.max_consecutive, self.log = max_consecutive, log
        self._reported = (0, 0)  # (non-finite, OOM) totals at the last epoch-end report

    def count(self, skipped):
        """One step: `skipped` is its 0-dim float skip flag, on the device."""
        self.nonfinite_total += skipped
        self.nonfinite_run = (self.nonfinite_run + skipped) * skipped
        self.nonfinite_run_max = torch.maximum(self.nonfinite_run_max, self.nonfinite_run)

    def count_oom(self):
        """One phase skipped for out of memory. Returns how many so far."""
        self.oom_skipped += 1
        return self.oom_skipped

    def scalars(self, losses, keys, step):
        """One host sync: the losses named in `keys`, the skip counters and w_ds as Python numbers;
        also checks the consecutive-skip limit."""
        keys = [k for k in keys if k in losses]
        counters = [self.nonfinite_total.float(), self.nonfinite_run_max.float()]
        *values, total, run_max = torch.stack([losses[k].float() for k in keys] + counters).tolist()
        self.check(step, run_max)
        out = dict(zip(keys, values))
        out["nonfinite_skipped"] = int(total)
        out["oom_skipped"] = self.oom_skipped
        out["w_ds"] = losses["w_ds"]
        return out

    def check(self, step, run_max=None):
        """Stop on too many consecutive skipped steps. `run_max` comes from `scalars`' one sync at
        display/log time; without it the device counter is read here."""
        run_max = int(self.nonfinite_run_max.item() if run_max is None else run_max)
        self.nonfinite_run_max.zero_()
        if run_max >= self.max_consecutive:
            raise NonFiniteError(
                f"{run_max} consecutive steps had a non-finite loss or gradient (limit "
                f"training.max_nonfinite_steps={self.max_consecutive}); stopping at step {step}. Check the data "
                "for absurd values, lower training.lr, or try training.amp_dtype=fp32.")

    def report(self, epoch, values):
        """One line whenever steps of this epoch were skipped, whatever the display style."""
        counts = (values["nonfinite_skipped"], values["oom_skipped"])
        new = [now - before for now, before in zip(counts, self._reported)]
        self._reported = counts
        if any(new):
            self.log(f"epoch {epoch}: {new[0]} step(s) skipped (non-finite loss or gradient), {new[1]} (out of "
                     f"memory); {counts[0]} and {counts[1]} in all")

    def summary(self):
        """', 3 skipped (non-finite)' etc. for the final line; '' when no step was skipped."""
        counts = ((int(self.nonfinite_total.item()), "non-finite"), (self.oom_skipped, "out of memory"))
        return "".join(f", {n} skipped ({why})" for n, why in counts if n)

    def state_dict(self):
        return {"nonfinite_total": self.nonfinite_total.item(), "nonfinite_run": self.nonfinite_run.item(),
                "oom_skipped": self.oom_skipped}

    def load_state_dict(self, counters):
        self.nonfinite_total.fill_(counters["nonfinite_total"])
        self.nonfinite_run.fill_(counters["nonfinite_run"])
        self.oom_skipped = counters["oom_skipped"]
        self._reported = (int(counters["nonfinite_total"]), self.oom_skipped)  # saved as a float
