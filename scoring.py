"""A learning score: train a few hundred steps on synthetic domains whose truth is known, then
measure what the EMA networks' translations do (score.py is its command line).

The domains are the embedded demo's (demo_data.py): every domain draws its content, a label map of
discs, rectangles and triangles, from one distribution and paints it with its own palette and
texture. So for each translation we know the source's label map (what must survive) and the target
domain (what the output must look like). Per guidance mode (latent-guided: a style from z through
F; reference-guided: a style from a target-domain latent through E), with the EMA networks as
translate.py uses them:

- `target_acc`: the share of translations that an independent domain classifier puts in the target
  domain. The classifier is a multinomial logistic regression on per-channel statistics (moments,
  quantiles and neighbour differences: palette and texture), fitted on the domains' real training
  latents and checked on held-out ones; it never sees the GAN. `source_rate`: the share it puts
  in the source domain (an output that kept its source's look).
- `content_r2`: how much of the source's label map (one-hot per pixel) a ridge regression recovers
  from the output's 3x3 neighbourhood: fitted per task (source domain, target domain) on half the
  sources, R^2 on the other half. Real latents give the ceiling (`real_content_r2`).
- `diversity`: mean pairwise L1 among the outputs for one source and target domain under
  different styles (z or references), in scaled latent units: the diversity-sensitive term of
  StarGAN v2 (Choi et al. 2020, Eq. 3) measured on the EMA networks.

Every number is computed at initialisation (the EMA equals the initial weights) and after training.
Deterministic for a seed on the CPU at a fixed thread count: the data, the batches, the z and the
references come from seeded generators, and the fits are full-batch in float64.
"""

import math
import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from config import latent_space, model_kwargs
from demo_data import BASE_STYLES, compose_domain_rgb, rgb_to_scaled_latent
from inference import latent_styles, reference_styles
from model import EMA_NETS, build_models
from runtime import seed_everything
from trainer import Trainer

MODES = ("latent", "reference")
METRICS = ("target_acc", "source_rate", "content_r2", "diversity")
NUM_LABELS = 4  # demo_data's label map: background, disc, rectangle, triangle
DATA_SEED = 0  # the synthetic data set is fixed: seeds vary the initialisation, batches, z and references
CLASSIFIER_DECAY = 1e-3  # L2 on the classifier's weights: the domains are separable, the weights must stay finite
CLASSIFIER_ITERATIONS = 200
RIDGE = 1e-3  # ridge strength per row, on standardised features
LOSS_WINDOW = 0.1  # losses reported: the mean over the last 10% of the steps


# ---------------------------------------------------------------------- the data

@dataclass
class SyntheticDomains:
    """Scaled latents (what the networks see) of `len(names)` synthetic domains, and the label maps
    of the held-out ones, which are the translations' sources and references."""
    names: list
    train: torch.Tensor  # [D, N_train, 4, H, W]
    test: torch.Tensor  # [D, N_test, 4, H, W]
    test_labels: torch.Tensor  # [D, N_test, H, W] long, 0 background, 1-3 shapes


def domain_names(num_domains):
    """demo_data's style names (day, night, ...), numbered when the base styles repeat."""
    names = []
    for i in range(num_domains):
        repeat = i // len(BASE_STYLES)
        names.append(BASE_STYLES[i % len(BASE_STYLES)]["name"] + (str(repeat) if repeat else ""))
    return names


def make_domains(num_domains=3, size=16, train_per_domain=64, test_per_domain=32, seed=DATA_SEED):
    """demo_data's domains 0..D-1 at `size` x `size`, split into training and held-out latents."""
    if test_per_domain < 4 or test_per_domain % 2:
        raise ValueError(f"test_per_domain must be even and at least 4 (ridge fit / held-out halves), "
                         f"got {test_per_domain}")
    latents, labels = [], []
    for index in range(num_domains):
        rgb, label = compose_domain_rgb(index, train_per_domain + test_per_domain, size, seed)  # [n, 3, H, W]
        latents.append(rgb_to_scaled_latent(rgb))  # [n, 4, H, W]
        labels.append(label)
    latents, labels = torch.stack(latents), torch.stack(labels)  # [D, n, 4, H, W], [D, n, H, W]
    return SyntheticDomains(domain_names(num_domains), latents[:, :train_per_domain].contiguous(),
                            latents[:, train_per_domain:].contiguous(), labels[:, train_per_domain:].contiguous())


def batches(train, batch_size, space, generator):
    """Endless training batches as the dataset draws them: source domain uniform, target uniform
    among the others, files uniform within each. Raw latents (the Trainer scales them)."""
    num_domains, n = train.shape[:2]
    raw = space.denormalize(train)
    while True:
        src = torch.randint(num_domains, (batch_size,), generator=generator)  # [B]
        trg = (src + torch.randint(1, num_domains, (batch_size,), generator=generator)) % num_domains
        content, ref, ref2 = torch.randint(n, (3, batch_size), generator=generator)
        yield {"content": raw[src, content], "target_style": raw[trg, ref], "target_style_2": raw[trg, ref2],
               "source_style_id": src, "target_style_id": trg}  # [B, 4, H, W] and ids [B]


# ---------------------------------------------------------------------- the domain classifier

def style_features(x):
    """[N, C, H, W] -> [N, 9C] float64: per channel the mean, std, 10/50/90% quantiles (palette) and
    mean |difference| to the neighbour 1 and 2 pixels down and right (texture: stripes of period 2
    differ at lag 1, not at lag 2; grain differs at both)."""
    x = x.double()
    flat = x.flatten(2)  # [N, C, HW]
    q = torch.quantile(flat, torch.tensor([0.1, 0.5, 0.9], dtype=x.dtype), dim=2)  # [3, N, C]
    diffs = [(x[:, :, k:] - x[:, :, :-k]).abs().mean((2, 3)) for k in (1, 2)]  # down, [N, C] each
    diffs += [(x[..., k:] - x[..., :-k]).abs().mean((2, 3)) for k in (1, 2)]  # right
    return torch.cat([flat.mean(2), flat.std(2), *q, *diffs], dim=1)  # [N, 9C]


class DomainClassifier:
    """Multinomial logistic regression on `style_features`, fitted on real latents only."""

    def __init__(self, real):
        """`real`: [D, N, C, H, W] latents of each domain."""
        num_domains, n = real.shape[:2]
        features = style_features(real.flatten(0, 1))  # [D*N, F]
        labels = torch.arange(num_domains).repeat_interleave(n)
        self.mean, self.std = features.mean(0), features.std(0).clamp_min(1e-8)
        x = (features - self.mean) / self.std
        self.weight = torch.zeros(x.shape[1], num_domains, dtype=x.dtype, requires_grad=True)
        self.bias = torch.zeros(num_domains, dtype=x.dtype, requires_grad=True)
        opt = torch.optim.LBFGS([self.weight, self.bias], max_iter=CLASSIFIER_ITERATIONS,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(x @ self.weight + self.bias, labels) + CLASSIFIER_DECAY * self.weight.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        self.weight, self.bias = self.weight.detach(), self.bias.detach()

    def predict(self, x):
        """[N, C, H, W] -> predicted domain ids [N]."""
        return (((style_features(x) - self.mean) / self.std) @ self.weight + self.bias).argmax(1)

    def accuracy(self, real):
        """Share of `real` [D, N, C, H, W] put in its own domain."""
        num_domains, n = real.shape[:2]
        truth = torch.arange(num_domains).repeat_interleave(n)
        return (self.predict(real.flatten(0, 1)) == truth).double().mean().item()


# ---------------------------------------------------------------------- content and diversity

def neighbourhood_features(x):
    """[N, C, H, W] -> [N*H*W, 9C]: each pixel's 3x3 neighbourhood (zero padded), float64."""
    cols = F.unfold(x.double(), 3, padding=1)  # [N, 9C, HW]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def content_r2(outputs, labels):
    """R^2 of the source label maps decoded linearly from the outputs.

    `outputs` [S, K, C, H, W] (K outputs per source), `labels` [S, H, W]. Ridge regression from
    `neighbourhood_features` to the one-hot label, fitted on the even sources, R^2 (summed over the
    label classes) on the odd ones: 1 is perfect, 0 is no better than the class frequencies.
    """
    k = outputs.shape[1]
    target = F.one_hot(labels, NUM_LABELS).double()  # [S, H, W, L]
    halves = []
    for part in (slice(0, None, 2), slice(1, None, 2)):
        x = neighbourhood_features(outputs[part].flatten(0, 1))  # [S/2*K*H*W, F]
        y = target[part].repeat_interleave(k, 0).reshape(-1, NUM_LABELS)  # [S/2*K*H*W, L]
        halves.append((x, y))
    (x_fit, y_fit), (x_held, y_held) = halves
    mean, std = x_fit.mean(0), x_fit.std(0).clamp_min(1e-8)
    x_fit, x_held = (x_fit - mean) / std, (x_held - mean) / std
    y_mean = y_fit.mean(0)
    gram = x_fit.T @ x_fit + RIDGE * len(x_fit) * torch.eye(x_fit.shape[1], dtype=x_fit.dtype)
    weight = torch.linalg.solve(gram, x_fit.T @ (y_fit - y_mean))  # [F, L]
    residual = y_held - (x_held @ weight + y_mean)
    return 1.0 - (residual.square().sum() / (y_held - y_held.mean(0)).square().sum()).item()


def diversity(outputs):
    """Mean over sources and over pairs of styles of mean |o_k - o_l|; `outputs` [S, K, C, H, W]
    (NaN for K = 1: no pair)."""
    k = outputs.shape[1]
    if k < 2:
        return math.nan
    pairs = [(a, b) for a in range(k) for b in range(a + 1, k)]
    return torch.stack([(outputs[:, a] - outputs[:, b]).abs().mean() for a, b in pairs]).mean().item()


def score_tasks(tasks, data, classifier):
    """Metrics of one mode's translations. `tasks`: {(source id, target id): outputs [S, K, C, H, W]
    scaled, source s being data.test[source id][s]}. Non-finite outputs (a diverged model) give NaN."""
    if not all(torch.isfinite(out).all() for out in tasks.values()):
        return {m: math.nan for m in METRICS}
    hits, kept, r2s, spreads = [], [], [], []
    for (src, trg), out in tasks.items():
        predicted = classifier.predict(out.flatten(0, 1))  # [S*K]
        hits.append((predicted == trg).double().mean())
        kept.append((predicted == src).double().mean())
        r2s.append(content_r2(out, data.test_labels[src]))
        spreads.append(diversity(out))
    return {"target_acc": torch.stack(hits).mean().item(), "source_rate": torch.stack(kept).mean().item(),
            "content_r2": statistics.fmean(r2s), "diversity": statistics.fmean(spreads)}


def reference_points(data, classifier):
    """What the metrics read on known cases: the classifier on held-out real latents, the content
    R^2 of the real latents themselves (the ceiling), and a translation that returns its source
    unchanged (target accuracy 0: the classifier recognises the source's domain)."""
    num_domains = len(data.names)
    identity = {(i, j): data.test[i][:, None] for i in range(num_domains) for j in range(num_domains) if i != j}
    unchanged = score_tasks(identity, data, classifier)
    return {"chance": 1.0 / num_domains,
            "classifier_train_acc": classifier.accuracy(data.train),
            "classifier_heldout_acc": classifier.accuracy(data.test),
            "real_content_r2": statistics.fmean(content_r2(data.test[d][:, None], data.test_labels[d])
                                                for d in range(num_domains)),
            "unchanged_target_acc": unchanged["target_acc"]}


# ---------------------------------------------------------------------- translations

@torch.no_grad()
def translate_tasks(nets, data, mode, num_outs, space, latent_dim, seed, device="cpu", batch_size=256):
    """Every held-out source of every domain translated to every other domain with `num_outs`
    styles of the target domain: z drawn with `seed` (latent-guided) or `num_outs` held-out latents
    of the target domain picked with `seed` (reference-guided). Scaled outputs, as `score_tasks` takes."""
    G, F_map, E = (nets[n] for n in EMA_NETS)
    num_domains, n_test = data.test.shape[:2]
    pick = torch.randperm(n_test, generator=torch.Generator().manual_seed(seed))[:num_outs]
    tasks = {}
    for trg in range(num_domains):
        if mode == "latent":
            styles = latent_styles(F_map, trg, num_outs, latent_dim, seed=seed, device=device)  # [K, S]
        else:
            styles = reference_styles(E, space.denormalize(data.test[trg, pick]), trg, space, device=device)
        for src in range(num_domains):
            if src == trg:
                continue
            x = data.test[src].repeat_interleave(num_outs, 0)  # [S*K, 4, H, W]: source s for each style
            s = styles.repeat(n_test, 1)  # [S*K, S_dim]
            out = torch.cat([G(xb.to(device), sb) for xb, sb in zip(x.split(batch_size), s.split(batch_size))])
            tasks[(src, trg)] = out.float().cpu().view(n_test, num_outs, *x.shape[1:])  # [S, K, 4, H, W]
    return tasks


def score_networks(nets, data, classifier, num_outs, space, latent_dim, seed, device="cpu"):
    """{"lat_target_acc": ..., "ref_diversity": ...}: both modes' metrics for these networks."""
    out = {}
    for mode in MODES:
        tasks = translate_tasks(nets, data, mode, num_outs, space, latent_dim, seed, device)
        out.update({f"{mode[:3]}_{k}": v for k, v in score_tasks(tasks, data, classifier).items()})
    return out


# ---------------------------------------------------------------------- one seed

def run_seed(cfg, data, classifier, steps, seed, num_outs=4, device="cpu", eval_every=None, log=print):
    """Build the networks (seeded), score them, train `steps` Trainer steps, score the EMA networks.

    Returns {"seed", "init", "final", "curve" ({step: scores} every `eval_every` steps), "losses"
    (mean over the last 10% of steps), "nonfinite_skipped", "train_s", "eval_s", "steps_per_s"}.
    Scoring uses its own generators, never the global one, so it leaves the training unchanged.
    """
    seed_everything(seed)
    models = build_models(**model_kwargs(cfg, len(data.names)))
    trainer = Trainer(cfg, models, device, log=log)
    space, latent_dim = latent_space(cfg), cfg["model"]["latent_dim"]

    def score():
        start = time.perf_counter()
        result = score_networks(trainer.ema, data, classifier, num_outs, space, latent_dim, seed, device)
        return result, time.perf_counter() - start

    init, eval_s = score()
    curve, sums, window = {}, {}, max(1, round(steps * LOSS_WINDOW))
    feed = batches(data.train, cfg["training"]["batch_size"], space, torch.Generator().manual_seed(seed))
    train_s = 0.0
    for step in range(1, steps + 1):
        start = time.perf_counter()
        losses = trainer.train_step(next(feed))
        train_s += time.perf_counter() - start
        if step > steps - window:
            for key in ("d_loss", "g_loss", "lat_ds", "ref_ds"):
                sums[key] = sums.get(key, 0.0) + float(losses[key])
        if eval_every and step % eval_every == 0 and step < steps:
            curve[step], spent = score()
            eval_s += spent
    final, spent = score()
    return {"seed": seed, "init": init, "final": final, "curve": curve,
            "losses": {k: v / window for k, v in sums.items()},
            "nonfinite_skipped": int(trainer.skips.nonfinite_total.item()),
            "train_s": train_s, "eval_s": eval_s + spent, "steps_per_s": steps / max(train_s, 1e-9)}


# ---------------------------------------------------------------------- over seeds

def mean_std(values):
    """(mean, sample std over seeds; 0 for one seed); NaN when any value is NaN."""
    values = list(values)
    if any(math.isnan(v) for v in values):
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs):
    """{"init": {metric: [mean, std]}, "final": ..., "curve": {step: {...}}, "losses": ...} over the seeds."""
    out = {}
    for part in ("init", "final", "losses"):
        out[part] = {k: list(mean_std(r[part][k] for r in runs)) for k in runs[0][part]}
    out["curve"] = {step: {k: list(mean_std(r["curve"][step][k] for r in runs)) for k in scores}
                    for step, scores in runs[0]["curve"].items()}
    for key in ("train_s", "steps_per_s"):
        out[key] = list(mean_std(r[key] for r in runs))
    return out


def load_average():
    """The 1-minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


# ---------------------------------------------------------------------- the report

ROWS = (("target_acc", "target acc"), ("source_rate", "source kept"), ("content_r2", "content R^2"),
        ("diversity", "diversity"))


def cell(pair, digits=3):
    mean, std = pair
    return "nan" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_table(summary, reference, steps, header):
    """The readable report: one row per mode and metric, at init and after `steps` steps, then the
    reference points and the time."""
    lines = [header, f"{'':10} {'':12} {'at init':>15}  {f'after {steps} steps':>15}"]
    for mode in MODES:
        for key, label in ROWS:
            name = f"{mode[:3]}_{key}"
            lines.append(f"{mode if key == 'target_acc' else '':10} {label:12} {cell(summary['init'][name]):>15}  "
                         f"{cell(summary['final'][name]):>15}")
    for step, scores in summary["curve"].items():
        lines.append(f"at step {step}: " + ", ".join(f"{k} {cell(scores[k], 2)}" for k in
                                                     ("lat_target_acc", "ref_target_acc", "lat_content_r2",
                                                      "ref_content_r2")))
    losses = summary["losses"]
    lines.append("losses over the last 10% of steps: " + ", ".join(f"{k} {cell(v, 2)}" for k, v in losses.items()))
    lines.append(f"reference: classifier held-out acc {reference['classifier_heldout_acc']:.3f} (train "
                 f"{reference['classifier_train_acc']:.3f}, chance {reference['chance']:.3f}); content R^2 of real "
                 f"latents {reference['real_content_r2']:.3f}; an unchanged source scores target acc "
                 f"{reference['unchanged_target_acc']:.3f}")
    return "\n".join(lines)
