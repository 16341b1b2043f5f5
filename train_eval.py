"""Evaluation during training (evaluation.every_epochs): the evaluator built from a training config
and its data folders; FID / KID / LPIPS of the EMA networks at an epoch's end, a line on stdout and
in <checkpoint_dir>/metrics.jsonl, TensorBoard, and best.pt when evaluation.best_metric improves."""

import math
import os

from config import latent_space
from dataset import MultiDomainLatentDataset
from display import json_line
from latents import check_root_space
from metrics import Evaluator, metric_keys
from model import EMA_NETS
from runtime import InputError, StopRequested, write_failure


def open_evaluator(cfg, device, cache_dir, amp_dtype=None, latent_shape=None):
    """`Evaluator.load` from a training config's evaluation section (the VAE: evaluation.vae_path, else
    visualization.vae_path; the metrics: evaluation.metrics); its best_metric must name one of
    them for the config's domains. With evaluation.source_root, its latents (same domains, of
    `latent_shape`, the training latents') are the sources and references, held out."""
    e, v, domains = cfg["evaluation"], cfg["visualization"], list(cfg["data"]["domains"])
    what = "evaluation.every_epochs is set: "
    keys = metric_keys(domains, metrics=e["metrics"])
    if e["best_metric"] not in keys:
        raise InputError(f"evaluation.best_metric={e['best_metric']!r} is not a metric of these domains and of "
                         f"evaluation.metrics {e['metrics']}; e.g. {', '.join(keys[:4])}, ...")
    held_out = None
    if e["source_root"]:
        check_root_space(e["source_root"], latent_space(cfg), "evaluation.source_root: ", "run")
        held = MultiDomainLatentDataset(e["source_root"], domains, preload_to_gpu=False, device="cpu",
                                        log=lambda *a: None, channels=latent_space(cfg).channels)
        if latent_shape is not None and tuple(held.shape) != tuple(latent_shape):
            raise InputError(f"evaluation.source_root {e['source_root']!r} holds latents of shape "
                             f"{list(held.shape)}; the training latents are {list(latent_shape)}")
        held_out = held.by_domain()
    evaluator = Evaluator.load(e["vae_path"] or v["vae_path"], None if e["vae_path"] else v["vae_subfolder"],
                         e["inception_weights"], e["lpips_weights"], device, amp_dtype=amp_dtype,
                         batch_size=cfg["training"]["batch_size"], cache_dir=cache_dir, what=what,
                         metrics=e["metrics"], space=latent_space(cfg))
    evaluator.held_out, evaluator.source_root = held_out, e["source_root"]
    return evaluator


class TrainingEvaluation:
    """Rank 0 evaluates; the other ranks wait for the verdict in a CPU collective with a long
    timeout. `best`: {metric, value, epoch, step} of the best evaluation so far (every checkpoint
    carries it); `save_best()` writes best.pt (every rank calls it)."""

    def __init__(self, cfg, device, amp_dtype, dist, log, stop_request, curves, save_best):
        self.cfg, self.device, self.amp_dtype, self.dist, self.log = cfg, device, amp_dtype, dist, log
        self.stop_request, self.curves, self.save_best = stop_request, curves, save_best
        self.folder = cfg["training"]["checkpoint_dir"]
        self.evaluator, self.best = None, None

    def open(self, latent_shape):
        """Load the evaluation's VAE, Inception and LPIPS now, on rank 0, so a missing file is an
        error before the first step rather than after an epoch; every rank learns of a failure."""
        problem = None
        if self.dist.is_main:
            try:
                self.evaluator = open_evaluator(self.cfg, self.device, os.path.join(self.folder, "eval_cache"),
                                                amp_dtype=self.amp_dtype if self.device.type == "cuda" else None,
                                                latent_shape=latent_shape)
            except (InputError, FileNotFoundError) as err:
                problem = err
        if self.dist.max_int(int(problem is not None)):
            raise problem or InputError("evaluation could not be set up on rank 0 (its error is above)")

    def load_best(self, best):
        """The best so far from a checkpoint; dropped, with a line, when evaluation.best_metric
        names another metric now."""
        metric = self.cfg["evaluation"]["best_metric"]
        self.best = best if best and best["metric"] == metric else None
        if best and self.best is None:
            self.log(f"resume: evaluation.best_metric is now {metric} (was "
                     f"{best['metric']}): best.pt is replaced at the next evaluation")

    def evaluate(self, epoch, step, ema, dataset):
        """FID / KID / LPIPS of the EMA networks `ema` (evaluation.num_sources per domain x
        num_outs) on the training latents at `step`; best.pt when best_metric improved."""
        improved, failed = 0, None
        try:  # rank 0 evaluates; a failure there must stop the others too, not leave them in a collective
            results = self.run(epoch, ema, dataset) if self.dist.is_main else None
            if results is not None:
                self.record(epoch, step, results)
                improved = self.note_best(epoch, step, results)
        except Exception as err:
            failed = err
        self.dist.raise_if_any_failed(failed)
        if self.dist.max_int(improved):  # every rank saves (a collective); rank 0 alone knows the value
            self.save_best()
            if self.dist.is_main:
                self.log(f"epoch {epoch}: best {self.best['metric']} {self.best['value']:.4f} so far: best.pt")

    def note_best(self, epoch, step, results):
        """1 when evaluation.best_metric improved on the best so far (kept in self.best), else 0."""
        metric = self.cfg["evaluation"]["best_metric"]
        value, higher = results[metric], metric.startswith("LPIPS")
        if not math.isfinite(value):  # diverged networks: never the best, and never a NaN to compare with
            self.log(f"warning: epoch {epoch}: {metric} is {value}; best.pt is left as it is")
            return 0
        if self.best is None or (value > self.best["value"] if higher else value < self.best["value"]):
            self.best = {"metric": metric, "value": value, "epoch": epoch, "step": step}
            return 1
        return 0

    def run(self, epoch, ema, dataset):
        """The evaluator on the EMA networks, with a progress display; None when a stop signal
        ended it."""
        e = self.cfg["evaluation"]
        real = dataset.by_domain()
        progress, hook = self.stop_request.long_work(f"epoch {epoch}: evaluation")
        try:
            results = self.evaluator({n: ema[n] for n in EMA_NETS}, list(self.cfg["data"]["domains"]), real, None,
                                     latent_space(self.cfg), self.cfg["model"]["latent_dim"],
                                     num_outs=e["num_outs"], max_sources=e["num_sources"], seed=self.cfg["seed"],
                                     real_ids=dataset.content_ids(), progress=hook)
            results.setdefault("protocol", {})["sources"] = e["source_root"] or "the training latents (not held out)"
            return results
        except StopRequested:
            self.log(f"epoch {epoch}: evaluation abandoned (stop requested); the checkpoint is saved next")
            return None
        finally:
            progress.close()

    def record(self, epoch, step, results):
        """One JSON line on stdout and in <checkpoint_dir>/metrics.jsonl, and TensorBoard."""
        line = json_line({"step": step, "epoch": epoch, **results})
        path = os.path.join(self.folder, "metrics.jsonl")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError as err:
            raise write_failure(path, err) or err from None
        self.log(line)
        self.curves.scalars("eval", results, step)
