"""The Latent StarGAN v2 training engine (SPEC.md §7, §9, §10).

One iteration = one D step (both paths' fakes, lazy R1) + one G step (latent- and reference-guided
paths) + EMA. Losses stay on the device; the host reads them only at the display / log intervals.
Non-finite and out-of-memory steps are skipped without a per-step host sync: each phase ends in one
flag that fused Adam (or the GradScaler) reads on the device.

Multi-GPU (torchrun) touches two places only: `Distributed.average_gradients` (one all-reduce per
phase) and `Distributed.is_main` (only rank 0 prints, logs and writes files).
"""

import copy
import glob
import json
import os
import random
import re
import signal
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn as nn

import loss as L
from config import visualization_every
from vae import atomic_write, decode_raw, latent_preview, load_vae, save_image_grid

NETS = ("generator", "mapping_network", "style_encoder", "discriminator")
EMA_NETS = ("generator", "mapping_network", "style_encoder")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LOSS_KEYS = ("d_loss", "d_adv", "r1", "g_loss", "lat_adv", "lat_sty", "lat_ds", "lat_cyc",
             "ref_adv", "ref_sty", "ref_ds", "ref_cyc")


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps (training.max_nonfinite_steps)."""


def is_oom(err):
    return isinstance(err, torch.cuda.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


class Distributed:
    """Process-group facts for the trainer; a single process is world_size 1, rank 0."""

    def __init__(self, rank=0, world_size=1):
        self.rank, self.world_size = rank, world_size
        # host-side decisions (stop signals) travel through a CPU group: no GPU sync for a flag
        self.cpu_group = torch.distributed.new_group(backend="gloo") if world_size > 1 else None

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def enabled(self):
        return self.world_size > 1

    def average_gradients(self, params, flags):
        """Average `params`' grads over ranks and sum `flags` (skip votes), one all-reduce.

        We all-reduce ourselves after every backward of the phase (as StyleGAN2-ADA does) instead
        of wrapping in DDP: a GAN phase runs several backward passes, R1 a double backward, and
        the G step drops E's grads between its two passes, none of which DDP's hooks handle well.
        Ranks with no grad for a parameter contribute zeros, so every rank takes the same decision.
        """
        if not self.enabled:
            return flags
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [flags.reshape(-1).float()])
        torch.distributed.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = (flat[offset:offset + n] / self.world_size).view_as(p).to(p.dtype)
            offset += n
        return flat[offset:].view_as(flags)

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()

    def max_int(self, value):
        """The largest of every rank's `value` (e.g. a stop signal number, 0 for none)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self.cpu_group)
        return int(t.item())

    def gather(self, obj):
        """Every rank's `obj` in rank order (small host objects: RNG states)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj, group=self.cpu_group)
        return out

    def check_in_sync(self, modules):
        """Weights must stay identical on every rank: compare a float64 checksum of each net."""
        if not self.enabled:
            return
        sums = [float(sum(p.detach().double().sum() for p in m.parameters())) for m in modules.values()]
        ranks = self.gather(sums)
        if any(r != ranks[0] for r in ranks):
            raise RuntimeError(f"weights diverged across ranks: per-rank checksums {ranks}")


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


class Trainer:
    """Owns the nets, their EMA copies, optimizers, scalers and counters.

    `models`: {generator, mapping_network, style_encoder, discriminator} (eager nn.Modules).
    """

    def __init__(self, cfg, models, device, dist=None, log=print):
        self.cfg, self.device = cfg, torch.device(device)
        self.dist = dist or Distributed()
        self._log = log
        t = cfg["training"]
        self.domains = list(cfg["data"]["domains"])
        self.latent_scale = t["latent_scale"]
        self.latent_dim = cfg["model"]["latent_dim"]
        self.nets = {k: models[k].to(self.device).train() for k in NETS}
        self.ema = {k: copy.deepcopy(self.nets[k]).eval().requires_grad_(False) for k in EMA_NETS}
        self.amp_dtype = AMP_DTYPES[t["amp_dtype"]]
        self.fused = self._fused_supported()
        self.optimizers = {
            k: torch.optim.Adam(self.nets[k].parameters(), lr=t["lr_mapping"] if k == "mapping_network" else t["lr"],
                                betas=(0.0, 0.99), weight_decay=t["weight_decay"], fused=self.fused or None)
            for k in NETS
        }
        fp16 = self.amp_dtype == torch.float16
        self.scalers = {phase: torch.amp.GradScaler(self.device.type, enabled=fp16) for phase in ("d", "g")}
        self.step = 0  # completed iterations (one D + one G update each), global
        self.epoch = 0  # completed epochs
        # device-side counters: no host sync until something is shown
        self.nonfinite_total = torch.zeros((), device=self.device)
        self.nonfinite_run = torch.zeros((), device=self.device)  # consecutive skipped steps
        self.nonfinite_run_max = torch.zeros((), device=self.device)  # longest run since last check
        self.oom_skipped = 0
        self._skips_reported = (0, 0)  # (non-finite, OOM) totals at the last epoch-end report
        self.last_r1 = torch.zeros((), device=self.device)
        self.stop_signal = None
        self.latent_shape = None  # set by run.py from the dataset; recorded in checkpoints
        self._vae, self._vae_failed = None, False
        self.call = dict(self.nets)  # what the step calls: compiled or eager
        self._compile_unverified = set()
        if t["use_compile"]:
            self._compile()

    # ------------------------------------------------------------------ setup

    def log(self, *args, **kwargs):
        if self.dist.is_main:
            self._log(*args, **kwargs)

    def _fused_supported(self):
        try:
            p = nn.Parameter(torch.zeros(1, device=self.device))
            p.grad = torch.zeros(1, device=self.device)
            torch.optim.Adam([p], fused=True).step()
            return True
        except Exception:
            return False

    def _compile(self):
        t = self.cfg["training"]
        options = compile_options(t["compile_mode"], t["compile_cudagraphs"])
        for name in NETS:
            if not t[f"compile_{name}"]:
                continue
            try:
                self.call[name] = torch.compile(self.nets[name], options=options, dynamic=t["compile_dynamic"],
                                                fullgraph=t["compile_fullgraph"])
                self._compile_unverified.add(name)
            except Exception as e:  # wrap-time failure: eager for this module, training goes on
                warnings.warn(f"torch.compile failed for {name}, using eager: {e}")
        if t["compile_cudagraphs"] and self.device.type == "cuda":
            self.log("compile: CUDA graphs on; if Inductor/CUDA-graph errors appear, set "
                     "training.compile_cudagraphs=false first (README, troubleshooting)")

    def _uncompile(self, err):
        names = sorted(self._compile_unverified)
        warnings.warn(f"compiled step failed ({type(err).__name__}: {str(err)[:300]}); "
                      f"falling back to eager for {', '.join(names)}")
        for name in names:
            self.call[name] = self.nets[name]
        self._compile_unverified.clear()
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype != torch.float32)

    def w_ds_at(self, step):
        """Diversity weight, decaying linearly to 0 over ds_decay_steps: a function of the global
        step, so a resumed run continues the same schedule (StarGAN v2 forgot to save it)."""
        w, decay = self.cfg["loss"]["w_ds"], self.cfg["loss"]["ds_decay_steps"]
        return w if decay == 0 else w * max(0.0, 1.0 - step / decay)

    # ------------------------------------------------------------------ step

    def prepare_batch(self, batch):
        """Move a loader batch to the device and scale latents: the networks never see raw ones."""
        content = batch["content"]
        if content.dim() != 4 or content.shape[1] != 4:
            raise ValueError(f"batch['content'] must be [B, 4, H, W], got {list(content.shape)}")
        move = lambda v: v.to(self.device, non_blocking=True)  # noqa: E731
        s = self.latent_scale
        return {
            "x": move(content).float() * s,  # [B, 4, H, W]
            "x_ref": move(batch["target_style"]).float() * s,
            "x_ref2": move(batch["target_style_2"]).float() * s,
            "y_src": move(batch["source_style_id"]).long(),  # [B]
            "y_trg": move(batch["target_style_id"]).long(),
        }

    def train_step(self, batch):
        """One iteration; returns a dict of 0-dim device tensors (see LOSS_KEYS) plus `w_ds`."""
        if self._compile_unverified:  # first compiled step: on failure, undo it and redo it eagerly
            snapshot = copy.deepcopy(self.state_dict(self.epoch))
            try:
                out = self._train_step(batch)
                self._compile_unverified.clear()
                return out
            except Exception as e:
                if is_oom(e):
                    raise
                self.load_state_dict(snapshot)  # a failure in the G phase must not leave D stepped twice
                self._uncompile(e)
        return self._train_step(batch)

    def _train_step(self, batch):
        b = self.prepare_batch(batch)
        if self.cfg["training"]["use_compile"] and self.cfg["training"]["compile_cudagraphs"]:
            torch.compiler.cudagraph_mark_step_begin()
        z = torch.randn(2, b["x"].shape[0], self.latent_dim, device=self.device)  # [2, B, L]: z1, z2
        d_losses, d_skip = self._phase("d", self.d_losses, b, z[0])
        w_ds = self.w_ds_at(self.step)
        g_losses, g_skip = self._phase("g", self.g_losses, b, z, w_ds)
        self.update_ema()
        skipped = torch.maximum(d_skip, g_skip)
        self.nonfinite_total += skipped
        self.nonfinite_run = (self.nonfinite_run + skipped) * skipped
        self.nonfinite_run_max = torch.maximum(self.nonfinite_run_max, self.nonfinite_run)
        self.step += 1
        return {**d_losses, **g_losses, "w_ds": w_ds}

    def _phase(self, phase, losses_fn, *args):
        """Forward/backward of one phase, then one collective skip decision and the updates.

        OOM frees the phase and votes to skip it; a non-finite loss or float32 total gradient norm
        (inf on absurd gradients) votes likewise. Within a phase every optimizer steps or none does.
        """
        names = ("discriminator",) if phase == "d" else EMA_NETS
        params = [p for n in names for p in self.nets[n].parameters()]
        scaler = self.scalers[phase]
        losses = None
        try:
            losses = losses_fn(*args)
        except Exception as e:
            if not is_oom(e):
                raise
        # OOM: clean up outside the except block, whose traceback still holds the activations
        oom = torch.zeros((), device=self.device) if losses is not None else self._free_after_oom(phase, params)
        # the back-propagated objective: a stale value (the last R1) never votes to skip a step
        total = losses["d_objective" if phase == "d" else "g_loss"].float() if losses is not None else oom
        # one all-reduce (grads averaged, skip votes summed), then unscale and the finiteness test
        bad = self.dist.average_gradients(params, (~torch.isfinite(total)).float() + oom)
        opts = [self.optimizers[n] for n in names]
        if scaler.is_enabled():
            for opt in opts:
                scaler.unscale_(opt)
        grads = [p.grad for p in params if p.grad is not None]
        if grads:  # the float32 total norm overflows to inf on absurd gradients
            bad = bad + (~torch.isfinite(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))).float()
        skip = (bad > 0).float()
        self._apply(opts, scaler, skip)
        return (losses or {}), skip

    def _free_after_oom(self, phase, params):
        """Count the OOM, release the cache, and give every parameter a zero grad so the skip
        takes the same path as any other (the GradScaler needs grads to record; ranks stay in step)."""
        self.oom_skipped += 1
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        for p in params:
            p.grad = torch.zeros_like(p)
        oom = torch.ones((), device=self.device)
        self.scalers[phase].scale(oom)  # creates the fp16 scale if the very first step ran out of memory
        self.log(f"out of memory in the {phase.upper()} step at step {self.step}: skipped ({self.oom_skipped} so far)")
        return oom

    def _apply(self, opts, scaler, skip):
        """Step every optimizer of the phase unless `skip` (a 0-dim device flag), without a sync."""
        if scaler.is_enabled():
            for opt in opts:  # one combined found-inf for the phase (the scaler's per-optimizer record)
                for found in scaler._per_optimizer_states[id(opt)]["found_inf_per_device"].values():
                    found.copy_(skip)
                scaler.step(opt)
            scaler.update()
        elif self.fused:  # fused Adam skips on device when found_inf is set
            for opt in opts:
                opt.found_inf = skip
                opt.step()
                del opt.found_inf
        elif skip.item() == 0:  # fallback without fused Adam: one tiny sync
            for opt in opts:
                opt.step()
        for opt in self.optimizers.values():  # the G step also left grads on D: none may leak into the next phase
            opt.zero_grad(set_to_none=True)

    def d_losses(self, b, z):
        """D step: hinge on reals vs both paths' fakes; lazy R1 every r1_interval steps."""
        lcfg = self.cfg["loss"]
        G, F, E, D = (self.call[n] for n in NETS)
        x, y_src, y_trg = b["x"], b["y_src"], b["y_trg"]
        with torch.no_grad(), self.autocast():
            s_lat = F(z, y_trg)  # [B, S]
            s_ref = E(b["x_ref"], y_trg)
            # both paths in one G call: samples are independent, so this equals two calls
            fakes = G(torch.cat([x, x]), torch.cat([s_lat, s_ref]))  # [2B, 4, H, W]
        with self.autocast():
            logits = D(torch.cat([x, fakes.to(x.dtype)]), torch.cat([y_src, y_trg, y_trg]))  # [3B, 1, H', W']
        real, fake_lat, fake_ref = logits.float().chunk(3)
        d_adv = L.d_hinge_loss(real, fake_lat) + L.d_hinge_loss(real, fake_ref)
        objective = d_adv
        if self.step % lcfg["r1_interval"] == 0 and lcfg["w_r1"] > 0:
            # lazy R1 (StyleGAN2 §4): scaled by the interval so the average strength is unchanged;
            # eager D in float32 (double backward fails through torch.compile, fp16 grads underflow)
            x_r1 = x.detach().float().requires_grad_(True)
            with torch.autocast(self.device.type, enabled=False):
                r1 = L.r1_penalty(self.nets["discriminator"](x_r1, y_src), x_r1)
            objective = objective + lcfg["w_r1"] * lcfg["r1_interval"] * r1
            self.last_r1 = r1.detach()
        self.scalers["d"].scale(objective).backward()
        d_adv = d_adv.detach()
        # shown: the per-step average objective, the same on R1 and plain steps (r1 is its last value)
        return {"d_objective": objective.detach(), "d_loss": d_adv + lcfg["w_r1"] * self.last_r1, "d_adv": d_adv,
                "r1": self.last_r1}

    def g_losses(self, b, z, w_ds):
        """G step. Reference path first, trains G only: its grads on E are dropped before the
        latent path, which trains G, F and E (as the official code; training E on the reference
        path degrades results). No requires_grad toggling, so compiled modules stay valid."""
        E = self.call["style_encoder"]
        x, y_src, y_trg = b["x"], b["y_src"], b["y_trg"]
        with torch.no_grad(), self.autocast():  # the reference path's styles, in one E call
            s_ref, s_ref2, s_src_ref = E(torch.cat([b["x_ref"], b["x_ref2"], x]),
                                         torch.cat([y_trg, y_trg, y_src])).chunk(3)  # [B, S] each
        ref = self._g_path(x, y_trg, s_ref, s_ref2, s_src_ref, w_ds)
        self.scalers["g"].scale(ref["total"]).backward()
        for p in self.nets["style_encoder"].parameters():
            p.grad = None
        with self.autocast():
            F = self.call["mapping_network"]
            s_lat = F(z[0], y_trg)  # [B, S]
            with torch.no_grad():
                s_lat2 = F(z[1], y_trg)
            s_src = E(x, y_src)
        lat = self._g_path(x, y_trg, s_lat, s_lat2, s_src, w_ds)
        self.scalers["g"].scale(lat["total"]).backward()
        out = {"g_loss": (ref["total"] + lat["total"]).detach()}
        for path, parts in (("lat", lat), ("ref", ref)):
            out.update({f"{path}_{k}": parts[k].detach() for k in ("adv", "sty", "ds", "cyc")})
        return out

    def _g_path(self, x, y_trg, s_trg, s_trg2, s_src, w_ds):
        """L = w_adv*L_adv + w_sty*L_sty - w_ds*L_ds + w_cyc*L_cyc for one path (StarGAN v2 Eq. 5)."""
        w = self.cfg["loss"]
        G, E, D = self.call["generator"], self.call["style_encoder"], self.call["discriminator"]
        with self.autocast():
            fake = G(x, s_trg)  # [B, 4, H, W]
            adv = L.g_adversarial_loss(D(fake, y_trg).float())
            sty = L.style_reconstruction_loss(E(fake, y_trg).float(), s_trg.float())
            with torch.no_grad():
                fake2 = G(x, s_trg2)  # the second fake is detached, as in the official code
            ds = L.diversity_sensitive_loss(fake.float(), fake2.float())
            cyc = L.cycle_consistency_loss(G(fake, s_src).float(), x)
        total = w["w_adv"] * adv + w["w_sty"] * sty - w_ds * ds + w["w_cyc"] * cyc
        return {"total": total, "adv": adv, "sty": sty, "ds": ds, "cyc": cyc}

    @torch.no_grad()
    def update_ema(self):
        """EMA with warm-up: beta_t = min(ema_beta, (1 + step) / (10 + step))."""
        beta = min(self.cfg["training"]["ema_beta"], (1 + self.step) / (10 + self.step))
        for name in EMA_NETS:
            ema_p = list(self.ema[name].parameters())
            torch._foreach_lerp_(ema_p, list(self.nets[name].parameters()), 1.0 - beta)

    # ------------------------------------------------------------------ epoch loop, display, log

    def check_nonfinite(self, run_max=None):
        """Stop on too many consecutive skipped steps. `run_max` comes from `scalars`' one sync at
        display/log time; without it the device counter is read here."""
        if run_max is None:
            run_max = self.nonfinite_run_max.item()
        run_max = int(run_max)
        self.nonfinite_run_max.zero_()
        limit = self.cfg["training"]["max_nonfinite_steps"]
        if run_max >= limit:
            raise NonFiniteError(
                f"{run_max} consecutive steps had a non-finite loss or gradient (limit "
                f"training.max_nonfinite_steps={limit}); stopping at step {self.step}. Check the data "
                "for absurd values, lower training.lr, or try training.amp_dtype=fp32.")

    def scalars(self, losses):
        """One host sync: every loss, the skip counters and w_ds as Python numbers; also checks the
        consecutive-skip limit."""
        keys = [k for k in LOSS_KEYS if k in losses]
        counters = [self.nonfinite_total.float(), self.nonfinite_run_max.float()]
        *values, total, run_max = torch.stack([losses[k].float() for k in keys] + counters).tolist()
        self.check_nonfinite(run_max)
        out = dict(zip(keys, values))
        out["nonfinite_skipped"] = int(total)
        out["oom_skipped"] = self.oom_skipped
        out["w_ds"] = losses["w_ds"]
        return out

    def train_epoch(self, loader, epoch, start_batch=0, total_batches=None):
        """Run one epoch from `start_batch`. Returns the number of batches completed in this epoch
        (== total unless a stop signal arrived, in which case `self.stop_signal` is set)."""
        t = self.cfg["training"]
        total = total_batches if total_batches is not None else start_batch + len(loader)
        display = Display(t["progress_style"] if self.dist.is_main else "off", epoch, t["epochs"], total,
                          start_batch)
        done = start_batch
        losses = final = None
        start = time.perf_counter()
        try:
            for batch in loader:
                losses = self.train_step(batch)
                done += 1
                show = self.step % t["display_interval"] == 0
                log = t["log_json"] and self.step % t["log_interval"] == 0
                if show or log:
                    values = self.scalars(losses)  # the one sync of a display/log step
                    if show:
                        display.update(done, values)
                    if log and self.dist.is_main:
                        record = {"step": self.step, "epoch": epoch, **{k: round(v, 6) if isinstance(v, float) else v
                                                                        for k, v in values.items()}}
                        display.write(json.dumps(record))
                if self.dist.enabled:  # every rank stops at the same step (CPU all-reduce, no GPU sync)
                    self.stop_signal = self.dist.max_int(self.stop_signal or 0) or None
                if self.stop_signal is not None:
                    break
            final = self.scalars(losses) if losses else self.check_nonfinite()
        finally:
            rate = (done - start_batch) / max(time.perf_counter() - start, 1e-9)
            display.close(done, final, rate)
        if final:
            self.report_skips(epoch, final)
        return done

    def report_skips(self, epoch, values):
        """One line whenever steps of this epoch were skipped, whatever the display style."""
        counts = (values["nonfinite_skipped"], values["oom_skipped"])
        new = [now - before for now, before in zip(counts, self._skips_reported)]
        self._skips_reported = counts
        if any(new):
            self.log(f"epoch {epoch}: {new[0]} step(s) skipped (non-finite loss or gradient), {new[1]} (out of "
                     f"memory); {counts[0]} and {counts[1]} in all")

    def install_signal_handlers(self):
        """SIGINT / SIGTERM: finish the current step, then the run loop saves and exits."""
        owner = os.getpid()

        def handler(signum, frame):
            if os.getpid() != owner:  # a forked loader worker: the main process decides
                return
            if self.stop_signal is not None:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            self.stop_signal = signum
            self.log(f"\nreceived {signal.Signals(signum).name}: finishing this step, then saving latest.pt")

        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, handler)
        return previous

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self, epoch, position=0):
        """A plain dict loadable with weights_only=True (SPEC.md §10)."""
        return {
            "epoch": epoch,
            "step": self.step,
            "position": position,  # batches completed inside epoch + 1 (0: the epoch is complete)
            "config": self.cfg,
            "domains": self.domains,
            "latent_shape": list(self.latent_shape) if self.latent_shape else None,  # [4, h, w] trained on
            "models": {k: self.nets[k].state_dict() for k in NETS},
            "ema": {k: self.ema[k].state_dict() for k in EMA_NETS},
            "optimizers": {k: opt.state_dict() for k, opt in self.optimizers.items()},
            "scaler": {k: s.state_dict() for k, s in self.scalers.items()},
            "counters": {"nonfinite_total": self.nonfinite_total.item(), "nonfinite_run": self.nonfinite_run.item(),
                         "oom_skipped": self.oom_skipped, "last_r1": self.last_r1.item()},
            "rng": get_rng_state(),
        }

    def save_checkpoint(self, path, epoch, position=0):
        """Atomic write: temporary file in the same folder, flushed, fsynced, renamed. Every rank
        calls it (their RNG states are gathered); rank 0 alone writes."""
        rng_per_rank = self.dist.gather(get_rng_state())
        self.dist.check_in_sync(self.nets)
        if not self.dist.is_main:
            return path
        for name in NETS:
            for p in self.nets[name].parameters():
                if not torch.isfinite(p).all():
                    raise NonFiniteError(f"refusing to save {path}: {name} has non-finite weights")
        state = self.state_dict(epoch, position)
        if self.dist.enabled:
            state["rng_per_rank"] = rng_per_rank
        atomic_save(state, path)
        return path

    def load_state_dict(self, ckpt):
        for k in NETS:
            self.nets[k].load_state_dict(ckpt["models"][k])
        for k in EMA_NETS:
            self.ema[k].load_state_dict(ckpt["ema"][k])
        for k, opt in self.optimizers.items():
            opt.load_state_dict(ckpt["optimizers"][k])
        self._apply_config_hyperparameters()
        for k, s in self.scalers.items():
            if ckpt["scaler"].get(k):
                s.load_state_dict(ckpt["scaler"][k])
        self.step, self.epoch = int(ckpt["step"]), int(ckpt["epoch"])
        c = ckpt.get("counters", {})
        self.nonfinite_total.fill_(c.get("nonfinite_total", 0))
        self.nonfinite_run.fill_(c.get("nonfinite_run", 0))
        self.oom_skipped = int(c.get("oom_skipped", 0))
        self._skips_reported = (int(c.get("nonfinite_total", 0)), self.oom_skipped)
        self.last_r1 = torch.tensor(float(c.get("last_r1", 0.0)), device=self.device)
        per_rank = ckpt.get("rng_per_rank")
        if self.dist.enabled and per_rank and len(per_rank) == self.dist.world_size:
            set_rng_state(per_rank[self.dist.rank], self.device)
        elif self.dist.enabled:  # another world size: a fresh, distinct stream per rank
            torch.manual_seed(int(self.cfg["seed"]) + 1000003 * self.step + self.dist.rank)
        else:
            set_rng_state(ckpt["rng"], self.device)

    def _apply_config_hyperparameters(self):
        """The config governs a resumed run: `load_state_dict` of an optimizer restores the saved
        param_groups, so set lr (F: lr_mapping) and weight_decay again and say what changed."""
        t = self.cfg["training"]
        for name, opt in self.optimizers.items():
            wanted = {"lr": t["lr_mapping"] if name == "mapping_network" else t["lr"], "weight_decay": t["weight_decay"]}
            for key, value in wanted.items():
                saved = opt.param_groups[0][key]
                if saved != value:
                    self.log(f"resume: {name} {key} {saved:g} -> {value:g} (from the config)")
                for group in opt.param_groups:
                    group[key] = value

    def skipped_summary(self):
        """', 3 skipped (non-finite)' etc. for the final line; '' when no step was skipped."""
        parts = [f", {n} skipped ({why})" for n, why in ((int(self.nonfinite_total.item()), "non-finite"),
                                                        (self.oom_skipped, "out of memory")) if n]
        return "".join(parts)

    # ------------------------------------------------------------------ visualization

    def vae(self):
        """The VAE for grids, loaded once and lazily; None (latent preview) if it cannot be."""
        v = self.cfg["visualization"]
        if self._vae is None and not self._vae_failed and not v["vae_path"]:
            self._vae_failed = True
            self.log("visualization.vae_path is null: grids use the linear latent preview")
        if self._vae is None and not self._vae_failed:
            try:
                self._vae = load_vae(v["vae_path"], v["vae_subfolder"], self.device, torch.float32,
                                     quiet=v["suppress_hf_warnings"])
            except Exception as e:
                self._vae_failed = True
                self.log(f"warning: cannot load the VAE from visualization.vae_path={v['vae_path']!r} "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); grids use the "
                         "linear latent preview instead")
        return self._vae

    def to_rgb(self, scaled):
        """[N, 4, h, w] scaled latents -> [N, 3, H, W] in [0, 1]: VAE decode, or the linear preview."""
        vae = self.vae()
        if vae is None:
            return latent_preview(scaled)
        return decode_raw(vae, scaled.float() / self.latent_scale)

    @torch.no_grad()
    def evaluate(self, epoch, samples):
        """Grid of fixed samples (`samples`: sources [N, 4, h, w], refs [N, 4, h, w], raw, one per
        domain) translated to every domain by the EMA nets. Rows: sources x latent-guided, then the
        references, then sources x reference-guided; columns: the source, then each domain."""
        if not self.dist.is_main:
            return None
        G, F, E = (self.ema[n] for n in EMA_NETS)
        n = len(self.domains)
        src = samples["sources"].to(self.device).float() * self.latent_scale  # [N, 4, h, w]
        refs = samples["references"].to(self.device).float() * self.latent_scale
        gen = torch.Generator(device="cpu").manual_seed(int(self.cfg["seed"]))  # fixed z, global RNG untouched
        z = torch.randn(n, self.latent_dim, generator=gen).to(self.device)
        y = torch.arange(n, device=self.device)
        s_lat, s_ref = F(z, y), E(refs, y)  # [N, S]: style of domain j
        x_rep = src.repeat_interleave(n, dim=0)  # [N*N, ...]: source i for each target j
        lat = G(x_rep, s_lat.repeat(n, 1)).view(n, n, *src.shape[1:])
        ref = G(x_rep, s_ref.repeat(n, 1)).view(n, n, *src.shape[1:])
        blank = torch.full_like(src[:1], float("nan"))
        rows = [torch.cat([src[i:i + 1], lat[i]]) for i in range(n)]
        rows.append(torch.cat([blank, refs]))
        rows += [torch.cat([src[i:i + 1], ref[i]]) for i in range(n)]
        cells = torch.cat(rows)  # [(2N+1)*(N+1), 4, h, w]
        keep = ~torch.isnan(cells.flatten(1)).any(1)  # the blank corner stays white
        decoded = self.to_rgb(cells[keep]).cpu()
        rgb = torch.ones(cells.shape[0], *decoded.shape[1:])
        rgb[keep.cpu()] = decoded
        labels = [f"{d} (latent)" for d in self.domains] + ["references"] + [f"{d} (ref)" for d in self.domains]
        path = os.path.join(self.vis_dir(), f"epoch_{epoch:04d}.png")
        return save_image_grid(path, rgb, nrow=2 * n + 1, row_labels=labels, col_labels=["source"] + self.domains)

    def vis_dir(self):
        return self.cfg["visualization"]["save_dir"] or os.path.join(self.cfg["training"]["checkpoint_dir"], "vis")

    def visualize_now(self, epoch):
        return epoch % visualization_every(self.cfg) == 0


class Display:
    """bar (tqdm) | percent (one line refreshed with \\r, a newline per epoch) | off."""

    SHOWN = ("d_loss", "g_loss", "r1", "lat_sty", "lat_ds", "lat_cyc")

    def __init__(self, style, epoch, epochs, total, start):
        self.style, self.epoch, self.epochs, self.total, self.last = style, epoch, epochs, max(total, 1), start
        self.bar, self.width = None, 0  # width: length of the open percent line (0: none open)
        if style == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=f"epoch {epoch}/{epochs}", dynamic_ncols=True,
                            leave=True, file=sys.stderr)

    def text(self, values):
        parts = [f"{k} {values[k]:.3f}" for k in self.SHOWN if k in values]
        if values.get("nonfinite_skipped"):
            parts.append(f"skipped {values['nonfinite_skipped']}")
        if values.get("oom_skipped"):
            parts.append(f"oom {values['oom_skipped']}")
        return "  ".join(parts)

    def update(self, done, values):
        if self.style == "bar":
            self.bar.update(done - self.last)
            self.bar.set_postfix_str(self.text(values), refresh=True)
        elif self.style == "percent":
            pct = 100.0 * done / self.total
            line = f"epoch {self.epoch}/{self.epochs} {pct:5.1f}% ({done}/{self.total})  {self.text(values)}"
            sys.stdout.write("\r" + line.ljust(self.width))  # padded: no residue of a longer line
            sys.stdout.flush()
            self.width = len(line)
        self.last = done

    def write(self, line):
        """A JSON line: never inside the bar or the percent line."""
        if self.style == "bar":
            self.bar.write(line, file=sys.stdout)
        elif self.style == "percent":  # end the percent line first: a JSON line must begin with {
            sys.stdout.write(("\n" if self.width else "") + line + "\n")
            sys.stdout.flush()
            self.width = 0
        else:
            print(line, flush=True)

    def close(self, done, values, rate):
        if self.style == "bar":
            self.bar.update(done - self.last)
            if values:
                self.bar.set_postfix_str(self.text(values))
            self.bar.close()
        elif self.style == "percent":
            if values:
                self.update(done, values)
            sys.stdout.write(f"  [{rate:.2f} it/s]\n")
            sys.stdout.flush()


# ---------------------------------------------------------------------- checkpoint helpers

def get_rng_state():
    """torch (CPU and every CUDA device), numpy and Python RNG states as plain tensors and lists."""
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


def set_rng_state(state, device=None):
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        cuda = state["cuda"][:torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda)
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def atomic_save(obj, path):
    """torch.save through a temporary file in the same folder, fsynced, then renamed."""
    return atomic_write(path, lambda f: torch.save(obj, f), fsync=True)


def load_checkpoint(path, map_location="cpu"):
    """torch.load with weights_only=True (never a full unpickle); clear errors for foreign files."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path!r} is not a Latent StarGAN v2 checkpoint (cannot be loaded with "
                         f"weights_only=True: {type(e).__name__}: {str(e)[:200]})") from None
    missing = [k for k in ("epoch", "step", "config", "models", "ema") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path!r} is not a Latent StarGAN v2 checkpoint (missing keys: {', '.join(missing)})")
    return ckpt


def prune_checkpoints(folder, keep):
    """Keep the `keep` newest epoch_NNNN.pt files (None: keep all)."""
    if not keep:
        return []
    files = sorted(glob.glob(os.path.join(folder, "epoch_*.pt")),
                   key=lambda p: int(re.findall(r"epoch_(\d+)\.pt$", p)[0]) if re.findall(r"epoch_(\d+)\.pt$", p) else -1)
    removed = files[:-keep] if len(files) > keep else []
    for path in removed:
        os.remove(path)
    return removed
