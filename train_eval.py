"""Evaluation during training: the evaluator built from a training config and its data folders."""

from dataset import MultiDomainLatentDataset
from metrics import Evaluator, metric_keys
from runtime import InputError


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
        held = MultiDomainLatentDataset(e["source_root"], domains, preload_to_gpu=False, device="cpu",
                                        log=lambda *a: None)
        if latent_shape is not None and tuple(held.shape) != tuple(latent_shape):
            raise InputError(f"evaluation.source_root {e['source_root']!r} holds latents of shape "
                             f"{list(held.shape)}; the training latents are {list(latent_shape)}")
        held_out = held.by_domain()
    evaluator = Evaluator.load(e["vae_path"] or v["vae_path"], None if e["vae_path"] else v["vae_subfolder"],
                         e["inception_weights"], e["lpips_weights"], device, amp_dtype=amp_dtype,
                         batch_size=cfg["training"]["batch_size"], cache_dir=cache_dir, what=what,
                         metrics=e["metrics"])
    evaluator.held_out, evaluator.source_root = held_out, e["source_root"]
    return evaluator
