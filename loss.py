"""StarGAN v2 losses: pure functions, tensors in, scalar tensor out, no model calls. Then G_TERMS,
the one declaration of the G step's terms (name, weight key, function): the trainer computes, weights,
sums and logs each from it, calling the networks it passes in."""

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F


def d_hinge_loss(real_logits, fake_logits):
    """Hinge loss for D (Lim & Ye 2017; SAGAN): mean over batch and patches."""
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def g_adversarial_loss(fake_logits):
    """Hinge loss for G: raise D's score on the fakes."""
    return -fake_logits.mean()


def style_reconstruction_loss(pred_style, target_style):
    """L_sty = E|s - E(G(x, s))| (StarGAN v2, Eq. 2)."""
    return (pred_style - target_style).abs().mean()


def diversity_sensitive_loss(fake_1, fake_2):
    """L_ds = E|G(x, s1) - G(x, s2)| (Eq. 3): a distance the trainer *subtracts* (maximised)."""
    return (fake_1 - fake_2).abs().mean()


def cycle_consistency_loss(reconstructed, original):
    """L_cyc = E|x - G(G(x, s), s_hat)| (Eq. 4)."""
    return (reconstructed - original).abs().mean()


def r1_penalty(real_logits, real_inputs):
    """R1 (Mescheder et al. 2018): 0.5 * E_b ||d sum(D(x)) / dx||^2 / P.

    P = patch logits per sample. The hinge loss averages over patches while the gradient of the
    summed logits adds every patch's gradient, so without `/ P` the penalty grows with the number
    of patches and, at w_r1 = 1, flattens a PatchGAN D until it stops learning (seen on a small
    latent run: D loss stuck at the chance value of the two hinge terms). `create_graph=True`
    makes the penalty differentiable so it trains D. The square and sum run in float32, outside
    autocast.
    """
    (grad,) = torch.autograd.grad(real_logits.sum(), real_inputs, create_graph=True)  # [B, C, H, W]
    num_patches = real_logits[0].numel()
    with torch.autocast(real_inputs.device.type, enabled=False):
        sq_norm = grad.float().pow(2).flatten(1).sum(dim=1)  # [B]
        return 0.5 * sq_norm.mean() / num_patches


class Term(NamedTuple):
    """One G loss term, declared once: G_TERMS alone makes it computed, weighted, logged (`lat_<name>`,
    `ref_<name>`) and resumed. A term whose weight `cfg["loss"][weight]` is 0 is neither computed nor
    logged. `fn(nets, p)`: its scalar from one path `p` (x, y_trg, s_trg, s_trg2, s_src and
    fake = G(x, s_trg)), called under autocast; `sign` -1: a distance the step maximises."""
    name: str
    weight: str
    fn: Callable
    sign: int = 1


def diversity_term(nets, p):
    with torch.no_grad():
        fake2 = nets["generator"](p.x, p.s_trg2)  # the second fake is detached, as in the official code
    return diversity_sensitive_loss(p.fake.float(), fake2.float())


# StarGAN v2 Eq. 5, summed in this order; a new term: a line here and its weight key in config.DEFAULTS["loss"]
G_TERMS = (
    Term("adv", "w_adv", lambda nets, p: g_adversarial_loss(nets["discriminator"](p.fake, p.y_trg).float())),
    Term("sty", "w_sty", lambda nets, p: style_reconstruction_loss(  # Eq. 2
        nets["style_encoder"](p.fake, p.y_trg).float(), p.s_trg.float())),
    Term("ds", "w_ds", diversity_term, sign=-1),  # Eq. 3; its weight decays with the step (w_ds_at)
    Term("cyc", "w_cyc", lambda nets, p: cycle_consistency_loss(  # Eq. 4, s_src = E(x, y_src)
        nets["generator"](p.fake, p.s_src).float(), p.x)),
)


def loss_keys(w):
    """The logged losses under the loss config `w`: no key for a term of weight 0 (nor r1 at w_r1 = 0)."""
    g_keys = [f"{path}_{term.name}" for path in ("lat", "ref") for term in G_TERMS if w[term.weight]]
    return ("d_loss", "d_adv", *(("r1",) if w["w_r1"] else ()), "g_loss", *g_keys)

