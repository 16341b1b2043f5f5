"""StarGAN v2 losses: pure functions, tensors in, scalar tensor out, no model calls."""

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
