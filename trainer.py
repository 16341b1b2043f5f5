"""The Latent StarGAN v2 Trainer: networks, EMA copies, optimizers, the training step and the loop.

One iteration (`train_step`) is one D step (real latents against both paths' fakes, lazy R1), one G
step (reference-guided path training G, latent-guided path training G, F and E) and the EMA update.
Merging both paths into one D and one G step halves the official implementation's optimizer steps
per iteration (it takes two of each), so its iteration budgets do not carry over one to one.

Losses stay on the device: the host reads them only at the display / log intervals. `fit` runs the
epochs and calls the work beside the loop at its named points, each in its own module: evaluation and
best.pt (train_eval), checkpoint files (train_checkpoints), grids (train_grid), the display and log
(train_log), TensorBoard (train_curves), skipped steps (train_skips) and stop signals (train_stop).
"""

import copy
import warnings
from types import SimpleNamespace

import torch

import loss as L
from checkpoint import get_rng_state, set_rng_state
from config import latent_space
from dataset import build_loader, check_epoch_has_steps, rank_indices
from distributed import Distributed
from model import EMA_NETS, NETS
from runtime import AMP_DTYPES, WriteError
from train_backend import compile_nets, fused_adam_supported, is_oom
from train_checkpoints import CheckpointWriter
from train_curves import Curves
from train_eval import TrainingEvaluation
from train_grid import TrainingGrid
from train_log import EpochLog
from train_skips import SkipCounter, step_all_or_none
from train_stop import StopRequest

PHASE_NETS = {"d": ("discriminator",), "g": EMA_NETS}  # what each phase's optimizers train


class Trainer:
    """Owns the nets, their EMA copies, optimizers, scalers, step and position; runs the step and the loop.

    `models`: {generator, mapping_network, style_encoder, discriminator} (eager nn.Modules).
    State: `step` (completed iterations, global), `epoch` (completed epochs), `position` (batches
    done inside epoch + 1 when a run stopped mid-epoch), `latent_shape` (set by `fit`).
    """

    def __init__(self, cfg, models, device, dist=None, log=print):
        self.cfg, self.device = cfg, torch.device(device)
        self.dist = dist or Distributed()
        self._log = log
        t = cfg["training"]
        self.domains = list(cfg["data"]["domains"])
        self.space = latent_space(cfg)  # what the networks see: space.normalize(raw latents)
        self.latent_dim = cfg["model"]["latent_dim"]
        self.nets = {k: models[k].to(self.device).train() for k in NETS}
        self.ema = {k: copy.deepcopy(self.nets[k]).eval().requires_grad_(False) for k in EMA_NETS}
        self.amp_dtype = AMP_DTYPES[t["amp_dtype"]]
        self.fused = fused_adam_supported(self.device)
        self.optimizers = {
            k: torch.optim.Adam(self.nets[k].parameters(), lr=t["lr_mapping"] if k == "mapping_network" else t["lr"],
                                betas=(0.0, 0.99), weight_decay=t["weight_decay"], fused=self.fused or None)
            for k in NETS
        }
        # how this process steps (fused, foreach, ...): a loaded state must not bring another device's choice back
        self._optimizer_flags = {k: {key: v for key, v in opt.param_groups[0].items() if v is None or isinstance(v, bool)}
                                 for k, opt in self.optimizers.items()}
        fp16 = self.amp_dtype == torch.float16
        self.scalers = {phase: torch.amp.GradScaler(self.device.type, enabled=fp16) for phase in PHASE_NETS}
        self.step, self.epoch, self.position = 0, 0, 0
        self.latent_shape = None
        self.last_r1 = torch.zeros((), device=self.device)
        self._loader_gen = torch.Generator()  # the loader's base seed must not draw from the global RNG
        self._loader_noted = False  # the loader's notices (workers, pinning): once per run
        compiled = compile_nets(self.nets, t) if t["use_compile"] else {}
        self.call = {**self.nets, **compiled}  # what the step calls: compiled or eager
        self._compile_unverified = set(compiled)  # until the first step through them (_first_compiled_step)
        self.cudagraphs = t["use_compile"] and t["compile_cudagraphs"]
        if self.cudagraphs and self.device.type == "cuda":
            self.log("compile: CUDA graphs on; if Inductor/CUDA-graph errors appear, set "
                     "training.compile_cudagraphs=false first (docs/training.md, troubleshooting)")
        # the work beside the step, each called at its point of the loop
        self.skips = SkipCounter(self.device, t["max_nonfinite_steps"], self.log)  # device-side: no host sync
        self.stop_request = StopRequest(self.log, t["progress_style"])  # SIGINT / SIGTERM
        self.curves = Curves()  # TensorBoard, opened by fit when training.tensorboard
        self.checkpoints = CheckpointWriter(cfg, self.dist)  # knows the newest one a run can resume from
        self.grid = TrainingGrid(cfg, self.device, self.dist, self.log, self.stop_request, self.curves)
        best_pt = self.checkpoints.path("best.pt")
        self.evaluation = TrainingEvaluation(cfg, self.device, self.amp_dtype, self.dist, self.log, self.stop_request,
                                             self.curves, save_best=lambda: self.save_checkpoint(best_pt))

    @property
    def oom_skipped(self):  # bench.py reads it
        return self.skips.oom_skipped

    def log(self, *args, **kwargs):
        if self.dist.is_main:
            self._log(*args, **kwargs)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype != torch.float32)

    def w_ds_at(self, step):
        """Diversity weight, decaying linearly to 0 over ds_decay_steps: a function of the global
        step, so a resumed run continues the same schedule (StarGAN v2 forgot to save it)."""
        w, decay = self.cfg["loss"]["w_ds"], self.cfg["loss"]["ds_decay_steps"]
        return w if decay == 0 else w * max(0.0, 1.0 - step / decay)

    # ------------------------------------------------------------------ the step

    def prepare_batch(self, batch):
        """Move a loader batch to the device and normalise latents: the networks never see raw ones."""
        content, channels = batch["content"], self.space.channels
        if content.dim() != 4 or content.shape[1] != channels:
            raise ValueError(f"batch['content'] must be [B, {channels}, H, W], got {list(content.shape)}")
        move = lambda v: v.to(self.device, non_blocking=True)  # noqa: E731
        norm = self.space.normalize
        return {
            "x": norm(move(content).float()),  # [B, C, H, W]
            "x_ref": norm(move(batch["target_style"]).float()),
            "x_ref2": norm(move(batch["target_style_2"]).float()),
            "y_src": move(batch["source_style_id"]).long(),  # [B]
            "y_trg": move(batch["target_style_id"]).long(),
        }

    def train_step(self, batch):
        """One iteration. Returns 0-dim device tensors (`loss.loss_keys` and `d_objective`) and `w_ds`."""
        if self._compile_unverified:  # the first compiled step: undone and redone eagerly if it fails
            return self._first_compiled_step(batch)
        b = self.prepare_batch(batch)
        z1, z2 = torch.randn(2, b["x"].shape[0], self.latent_dim, device=self.device)  # [B, L] each
        w_ds = self.w_ds_at(self.step)
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        # D step: reals against both paths' fakes (StarGAN v2 Eq. 1, hinge form), lazy R1
        d_logs, d_skip = self.update("d", lambda: self.d_backward(b, z1))
        # G step (Eq. 5): reference-guided path trains G, latent-guided path trains G, F and E
        g_logs, g_skip = self.update("g", lambda: self.g_backward(b, z1, z2, w_ds))
        # EMA of G, F and E
        self.update_ema()
        self.skips.count(torch.maximum(d_skip, g_skip))
        self.step += 1
        return {**d_logs, **g_logs, "w_ds": w_ds}

    def d_backward(self, b, z1):
        """Forward and backward of the D step. Returns (the back-propagated objective, logs)."""
        w = self.cfg["loss"]
        G, F, E, D = (self.call[n] for n in NETS)
        x, y_src, y_trg = b["x"], b["y_src"], b["y_trg"]
        with torch.no_grad(), self.autocast():
            s_lat = F(z1, y_trg)  # [B, S]
            s_ref = E(b["x_ref"], y_trg)  # [B, S]
            # both paths in one G call: samples are independent, so this equals two calls
            fakes = G(torch.cat([x, x]), torch.cat([s_lat, s_ref]))  # [2B, C, H, W]
        with self.autocast():
            logits = D(torch.cat([x, fakes.to(x.dtype)]), torch.cat([y_src, y_trg, y_trg]))  # [3B, 1, H', W']
        real, fake_lat, fake_ref = logits.float().chunk(3)
        d_adv = L.d_hinge_loss(real, fake_lat) + L.d_hinge_loss(real, fake_ref)
        objective = d_adv
        if self.step % w["r1_interval"] == 0 and w["w_r1"] > 0:
            # lazy R1 (StyleGAN2 §4): scaled by the interval so the average strength is unchanged;
            # eager D in float32 (double backward fails through torch.compile, fp16 grads underflow)
            x_r1 = x.detach().float().requires_grad_(True)
            with torch.autocast(self.device.type, enabled=False):
                r1 = L.r1_penalty(self.nets["discriminator"](x_r1, y_src), x_r1)
            objective = objective + w["w_r1"] * w["r1_interval"] * r1
            self.last_r1 = torch.where(torch.isfinite(r1), r1.detach(), self.last_r1)  # a skipped step keeps the last
        self.scalers["d"].scale(objective).backward()
        d_adv, objective = d_adv.detach(), objective.detach()
        # shown: the per-step average objective, the same on R1 and plain steps (r1: its last value)
        if not w["w_r1"]:
            return objective, {"d_loss": d_adv, "d_adv": d_adv, "d_objective": objective}
        return objective, {"d_loss": d_adv + w["w_r1"] * self.last_r1, "d_adv": d_adv, "r1": self.last_r1,
                           "d_objective": objective}

    def g_backward(self, b, z1, z2, w_ds):
        """Forward and backward of the G step. The reference path goes first and trains G only (as
        the official code: training E on it degrades results), so its grads on E are dropped before
        the latent path, which trains G, F and E. No requires_grad toggling: that is unsafe under
        torch.compile. Returns (the objective, logs)."""
        E, F = self.call["style_encoder"], self.call["mapping_network"]
        x, y_src, y_trg = b["x"], b["y_src"], b["y_trg"]
        with torch.no_grad(), self.autocast():  # the reference path's styles, in one E call
            s_ref, s_ref2, s_src = E(torch.cat([b["x_ref"], b["x_ref2"], x]),
                                     torch.cat([y_trg, y_trg, y_src])).chunk(3)  # [B, S] each
        ref = self.g_path_losses(x, y_trg, s_ref, s_ref2, s_src, w_ds)
        self.scalers["g"].scale(ref["total"]).backward()
        for p in self.nets["style_encoder"].parameters():
            p.grad = None
        with self.autocast():
            s_lat = F(z1, y_trg)  # [B, S]
            with torch.no_grad():
                s_lat2 = F(z2, y_trg)
            s_src = E(x, y_src)
        lat = self.g_path_losses(x, y_trg, s_lat, s_lat2, s_src, w_ds)
        self.scalers["g"].scale(lat["total"]).backward()
        g_loss = (ref["total"] + lat["total"]).detach()
        logs = {"g_loss": g_loss}
        for path, parts in (("lat", lat), ("ref", ref)):
            logs.update({f"{path}_{k}": v.detach() for k, v in parts.items() if k != "total"})
        return g_loss, logs

    def g_path_losses(self, x, y_trg, s_trg, s_trg2, s_src, w_ds):
        """One path's L = w_adv*L_adv + w_sty*L_sty - w_ds*L_ds + w_cyc*L_cyc (StarGAN v2 Eq. 5), from
        L.G_TERMS in their order; a term of weight 0 is skipped. Returns {"total": L, name: term}."""
        weights = {**self.cfg["loss"], "w_ds": w_ds}
        terms = [term for term in L.G_TERMS if self.cfg["loss"][term.weight]]
        with self.autocast():
            fake = self.call["generator"](x, s_trg)  # [B, C, H, W]
            p = SimpleNamespace(x=x, y_trg=y_trg, s_trg=s_trg, s_trg2=s_trg2, s_src=s_src, fake=fake)
            parts = {term.name: term.fn(self.call, p) for term in terms}
        total = None  # summed left to right, so the default terms keep Eq. 5's arithmetic exactly
        for term in terms:
            weighted = weights[term.weight] * parts[term.name]
            if total is None:
                total = weighted if term.sign > 0 else -weighted
            else:
                total = total + weighted if term.sign > 0 else total - weighted
        return {"total": total, **parts}

    @torch.no_grad()
    def update_ema(self):
        """EMA with warm-up, beta_t = min(ema_beta, (1 + step) / (10 + step)), so short runs are not
        dominated by the initial weights."""
        beta = min(self.cfg["training"]["ema_beta"], (1 + self.step) / (10 + self.step))
        for name in EMA_NETS:
            torch._foreach_lerp_(list(self.ema[name].parameters()), list(self.nets[name].parameters()), 1.0 - beta)

    def update(self, phase, forward_backward):
        """Run one phase's forward and backward passes, then step its networks' optimizers together
        or not at all (`step_all_or_none`). Out of memory skips the phase like a non-finite step.
        Returns (the phase's logs, its 0-dim skip flag)."""
        params = [p for n in PHASE_NETS[phase] for p in self.nets[n].parameters()]
        objective = logs = None
        try:
            objective, logs = forward_backward()
        except Exception as e:
            if not is_oom(e):
                raise
        # OOM: clean up outside the except block, whose traceback still holds the activations
        bad = self._free_after_oom(phase, params) if objective is None else (~torch.isfinite(objective)).float()
        bad = self.dist.average_gradients(params, bad)  # one all-reduce: grads averaged, votes summed
        opts = [self.optimizers[n] for n in PHASE_NETS[phase]]
        skip = step_all_or_none(opts, self.scalers[phase], params, bad, self.fused)
        for opt in self.optimizers.values():  # the G step also left grads on D: none may leak into the next phase
            opt.zero_grad(set_to_none=True)
        return logs or {}, skip

    def _free_after_oom(self, phase, params):
        """Count the OOM, release the cache, and give every parameter a zero grad so the skip
        takes the same path as any other (the GradScaler needs grads to record; ranks stay in step)."""
        skipped = self.skips.count_oom()
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        for p in params:
            p.grad = torch.zeros_like(p)
        oom = torch.ones((), device=self.device)
        self.scalers[phase].scale(oom)  # creates the fp16 scale if the very first step ran out of memory
        self.log(f"out of memory in the {phase.upper()} step at step {self.step}: skipped ({skipped} so far)")
        return oom

    def _first_compiled_step(self, batch):
        """The first step through compiled modules compiles them. If that fails, restore the state
        from before it (a failure in the G phase must not leave D stepped twice), fall back to eager
        for those modules, and take the step eagerly."""
        names, self._compile_unverified = sorted(self._compile_unverified), set()
        snapshot = copy.deepcopy(self.state_dict())
        try:
            return self.train_step(batch)
        except Exception as e:
            if is_oom(e):
                raise
            self.load_state_dict(snapshot)
            warnings.warn(f"compiled step failed ({type(e).__name__}: {str(e)[:300]}); "
                          f"falling back to eager for {', '.join(names)}")
            for name in names:
                self.call[name] = self.nets[name]
            for opt in self.optimizers.values():
                opt.zero_grad(set_to_none=True)
        return self.train_step(batch)

    # ------------------------------------------------------------------ the loop

    def fit(self, dataset):
        """Train from the current position to training.epochs. Returns 0, or 128 + the signal's
        number when SIGINT / SIGTERM stopped the run (latest.pt then holds the exact position)."""
        t = self.cfg["training"]
        self.latent_shape = dataset.shape
        if self.epoch < t["epochs"]:
            check_epoch_has_steps(dataset, self.dist, t, self.position)
        samples = dataset.grid_samples()  # the grids' fixed sources and references
        if self.cfg["evaluation"]["every_epochs"] and self.epoch < t["epochs"]:
            self.evaluation.open(self.latent_shape)  # a missing file fails now, not after an epoch
        if t["tensorboard"] and self.dist.is_main:
            self.curves.open(self.checkpoints.path("tb"))
        try:
            with self.stop_request.handling_signals():
                for epoch in range(self.epoch + 1, t["epochs"] + 1):
                    # train, from the batch a mid-epoch stop left off at
                    start, self.position = self.position, 0
                    done, steps, stop = self.train_epoch(dataset, epoch, start)
                    if stop:
                        return self.stop(epoch, done, steps, stop)
                    # evaluate, save, grid
                    stop = self.end_epoch(epoch, dataset, samples)
                    if stop:
                        self.log(f"stopped after epoch {epoch} (step {self.step}); saved "
                                 f"{self.checkpoints.path('latest.pt')}")
                        return 128 + stop
        except WriteError as err:
            raise WriteError(err.errno, f"{err}; training stopped at step {self.step}. "
                                        f"{self.checkpoints.saved_summary()}") from None
        finally:
            self.curves.close()
        self.log(f"done: {t['epochs']} epochs, {self.step} steps{self.skips.summary()}; "
                 f"checkpoints in {t['checkpoint_dir']}")
        return 0

    def train_epoch(self, dataset, epoch, start_batch=0):
        """One epoch from batch `start_batch`, through a loader built for it (this rank's share of
        the epoch's index table). Returns (batches done, batches in the epoch, the stop signal every
        rank agreed on after the last step, 0 for none): fewer done only when one arrived. A signal
        that lands later is taken up at the next step's agreement, so ranks never part ways."""
        t = self.cfg["training"]
        dataset.set_epoch(epoch)
        indices, total = rank_indices(len(dataset), self.dist, t["batch_size"], t["drop_last"])
        loader = build_loader(dataset, t["batch_size"], num_workers=t["num_workers"], pin_memory=t["pin_memory"],
                              drop_last=t["drop_last"], sampler=indices[start_batch * t["batch_size"]:],
                              log=self.log if not self._loader_noted else (lambda *a: None),
                              generator=self._loader_gen)
        self._loader_noted = True
        keys = L.loss_keys(self.cfg["loss"])
        epoch_log = EpochLog(t, self.dist, self.skips, self.curves, keys, epoch, total, start_batch)
        done, losses, final, stop = start_batch, None, None, 0
        try:
            for batch in loader:
                losses = self.train_step(batch)
                done += 1
                epoch_log.after_step(losses, self.step, done)  # display / log, at their intervals
                stop = self.stop_request.agreed(self.dist)  # stop? one agreed value (CPU all-reduce, no GPU sync)
                if stop:
                    break
            # the epoch's last losses and counters, and the consecutive-skip limit
            final = self.skips.scalars(losses, keys, self.step) if losses else self.skips.check(self.step)
        finally:
            epoch_log.close(done, final)
        if final:  # skip report
            self.skips.report(epoch, final)
        return done, total, stop

    def end_epoch(self, epoch, dataset, samples):
        """The work at an epoch's end, each at its interval. A stop signal ends the evaluation or the grid at
        its next batch; the epoch is saved (latest.pt too) all the same. Returns the agreed stop signal (0: none)."""
        self.epoch = epoch
        # evaluate: first, so that the checkpoints carry the best value so far
        every = self.cfg["evaluation"]["every_epochs"]
        if every and epoch % every == 0:
            self.evaluation.evaluate(epoch, self.step, self.ema, dataset)
        # save: latest.pt too at the last epoch or when stopping
        stop = self.stop_request.agreed(self.dist)
        self.checkpoints.save_epoch(epoch, epoch == self.cfg["training"]["epochs"] or bool(stop), self.save_checkpoint)
        # grid: not when stopping (exit promptly); a stop that ends it still gets this epoch's latest.pt
        self.grid.epoch_end(epoch, self.ema, samples, stopping=bool(stop))
        stop = self.stop_request.agreed(self.dist)
        if stop and not self.checkpoints.holds_latest(epoch):
            self.save_checkpoint(self.checkpoints.path("latest.pt"))
        return stop

    def stop(self, epoch, done, steps, signum):
        """After SIGINT / SIGTERM: save the exact position and return 128 + the signal's number."""
        if done >= steps:  # the epoch happened to be complete: save it as any other (no grid: exit promptly)
            self.epoch = epoch
            path = self.checkpoints.save_epoch(epoch, True, self.save_checkpoint)
        else:
            path = self.save_checkpoint(self.checkpoints.path("latest.pt"), position=done)
        self.dist.barrier()
        self.log(f"stopped at step {self.step} (epoch {epoch}, batch {done}/{steps}); saved {path}")
        return 128 + int(signum)

    # ------------------------------------------------------------------ state

    def state_dict(self, epoch=None, position=0):
        """A plain dict loadable with weights_only=True."""
        return {
            "epoch": self.epoch if epoch is None else epoch,
            "step": self.step,
            "position": position,  # batches completed inside epoch + 1 (0: the epoch is complete)
            "config": self.cfg,
            "domains": self.domains,
            "latent_shape": list(self.latent_shape) if self.latent_shape else None,  # [C, h, w] trained on
            "models": {k: self.nets[k].state_dict() for k in NETS},
            "ema": {k: self.ema[k].state_dict() for k in EMA_NETS},
            "optimizers": {k: opt.state_dict() for k, opt in self.optimizers.items()},
            "scaler": {k: s.state_dict() for k, s in self.scalers.items()},
            "counters": {**self.skips.state_dict(), "last_r1": self.last_r1.item()},
            "rng": get_rng_state(),
            "best": self.evaluation.best,  # the best evaluation so far: best.pt's metric, value, epoch and step
        }

    def save_checkpoint(self, path, epoch=None, position=0):
        """`state_dict(epoch, position)` to `path`, atomically and checked (CheckpointWriter.save):
        every rank calls it, rank 0 writes. Returns the path."""
        epoch = self.epoch if epoch is None else epoch
        return self.checkpoints.save(path, lambda: self.state_dict(epoch, position), self.nets, epoch, self.step)

    def load_state_dict(self, ckpt):
        """Resume from `ckpt`, a checkpoint that checkpoint.validate_checkpoint accepted (every
        entry present and sound) or this Trainer's own state_dict."""
        for k in NETS:
            self.nets[k].load_state_dict(ckpt["models"][k])
        for k in EMA_NETS:
            self.ema[k].load_state_dict(ckpt["ema"][k])
        t = self.cfg["training"]
        for k, opt in self.optimizers.items():
            opt.load_state_dict(ckpt["optimizers"][k])
            # the saved param_groups come back too, but the config governs a resumed run (lr, F: lr_mapping,
            # weight_decay: say what changed) and this process its flags (fused, foreach, ...)
            wanted = {"lr": t["lr_mapping"] if k == "mapping_network" else t["lr"], "weight_decay": t["weight_decay"]}
            for key, value in wanted.items():
                if opt.param_groups[0][key] != value:
                    self.log(f"resume: {k} {key} {opt.param_groups[0][key]:g} -> {value:g} (from the config)")
            for group in opt.param_groups:
                group.update(wanted, **self._optimizer_flags[k])
        for k, s in self.scalers.items():
            if ckpt["scaler"][k]:  # {}: saved without fp16
                s.load_state_dict(ckpt["scaler"][k])
        self.step, self.epoch, self.position = ckpt["step"], ckpt["epoch"], ckpt["position"]
        self.skips.load_state_dict(ckpt["counters"])
        self.last_r1 = torch.tensor(float(ckpt["counters"]["last_r1"]), device=self.device)
        self.evaluation.load_best(ckpt["best"])
        per_rank = ckpt.get("rng_per_rank")  # under torchrun only
        if self.dist.enabled and per_rank and len(per_rank) == self.dist.world_size:
            set_rng_state(per_rank[self.dist.rank])
        elif self.dist.enabled:  # another world size: a fresh, distinct stream per rank
            torch.manual_seed(int(self.cfg["seed"]) + 1000003 * self.step + self.dist.rank)
        else:
            set_rng_state(ckpt["rng"])
