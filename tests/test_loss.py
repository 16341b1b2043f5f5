"""loss.py against independent computations.

The trainer hands every loss float32 tensors (`.float()` on logits and outputs), and under CPU
autocast the elementwise ops here keep float32 anyway, so the hinge and L1 losses are tested in
float32 only. R1 is where precision matters: its inputs' gradient may be bfloat16 (a bf16 D), and
the square and sum must still run in float32."""

import pytest
import torch

import loss as L
from model import Discriminator


def test_d_hinge_loss():
    real, fake = torch.tensor([[2.0, 0.5], [-1.0, 0.0]]), torch.tensor([[-3.0, 0.5], [1.0, -0.5]])
    # by hand: max(0, 1 - real) = [0, .5, 2, 1] -> mean .875; max(0, 1 + fake) = [0, 1.5, 2, .5] -> 1.0
    out = L.d_hinge_loss(real, fake)
    assert out.dim() == 0
    assert out.item() == pytest.approx(1.875)


def test_g_adversarial_loss():
    out = L.g_adversarial_loss(torch.tensor([1.0, -3.0, 0.5, 0.5]))
    assert out.item() == pytest.approx(0.25)


@pytest.mark.parametrize("fn", [L.style_reconstruction_loss, L.diversity_sensitive_loss, L.cycle_consistency_loss])
def test_l1_losses(fn):
    a, b = torch.randn(3, 4, 5, 6), torch.randn(3, 4, 5, 6)
    expected = sum(abs(x - y) for x, y in zip(a.flatten().tolist(), b.flatten().tolist())) / a.numel()
    out = fn(a, b)
    assert out.dim() == 0
    assert out.item() == pytest.approx(expected, rel=1e-5)


def test_diversity_loss_is_a_positive_distance():
    a = torch.zeros(2, 4, 3, 3)
    assert L.diversity_sensitive_loss(a, a + 2).item() == pytest.approx(2.0)
    assert L.diversity_sensitive_loss(a, a).item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_r1_patch_logits_analytic(dtype):
    """logits[b, 0, h, w] = sum_c w_c x[b, c, h, w]: d sum(logits)/dx = w everywhere, so
    ||grad||^2 = H*W*||w||^2 per sample and R1 = 0.5 * H*W*||w||^2 / P with P = H*W patches.

    In bfloat16 the gradient is still exactly w, but ||w||^2 = 5.390625 needs 9 significant bits
    where bfloat16 has 8: only a float32 square and sum gives the exact float32 result."""
    w = torch.tensor([0.5, -1.0, 2.0, 0.375], dtype=dtype)
    x = torch.randn(3, 4, 5, 6).to(dtype).requires_grad_(True)
    logits = (x * w.view(1, 4, 1, 1)).sum(dim=1, keepdim=True)  # [B, 1, H, W]
    r1 = L.r1_penalty(logits, x)
    assert r1.dtype == torch.float32
    assert r1.item() == pytest.approx(0.5 * 5.390625, rel=1e-6)


def test_r1_image_level_analytic():
    """logits[b] = sum x^2: grad = 2x, R1 = 0.5 * mean_b sum 4 x^2 (P = 1)."""
    x = torch.randn(4, 4, 3, 3, requires_grad=True)
    logits = x.pow(2).sum(dim=(1, 2, 3)).view(4, 1)
    expected = 0.5 * (4 * x.detach() ** 2).sum(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(L.r1_penalty(logits, x), expected)


def test_r1_divides_by_patch_count():
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    one_patch = x.sum(dim=(1, 2, 3)).view(2, 1)  # grad 1 everywhere, P = 1
    patches = x.sum(dim=1, keepdim=True)  # [2, 1, 8, 8]: grad 1 everywhere, P = 64
    assert L.r1_penalty(one_patch, x).item() == pytest.approx(0.5 * 256)
    assert L.r1_penalty(patches, x).item() == pytest.approx(0.5 * 256 / 64)


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16_autocast"])
def test_r1_backward_reaches_discriminator(amp):
    """R1's double backward trains D, also through convolutions that CPU autocast runs in bfloat16."""
    D = Discriminator(num_domains=3, channels=8)
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        logits = D(x, torch.tensor([0, 2]))
        r1 = L.r1_penalty(logits, x)
    assert logits.dtype == (torch.bfloat16 if amp else torch.float32) and r1.dtype == torch.float32
    r1.backward()
    grads = [p.grad for p in D.parameters() if p.grad is not None]
    assert len(grads) > 0 and any(g.abs().sum() > 0 for g in grads)
    assert D.trunk[0].weight.grad is not None and D.trunk[0].weight.grad.abs().sum() > 0


def test_r1_matches_finite_differences_of_gradient_norm():
    """Independent check on a real D: the gradient from autograd.grad vs central differences."""
    torch.manual_seed(0)
    D = Discriminator(num_domains=2, channels=8).double()
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1])
    r1 = L.r1_penalty(D(x, y), x)
    eps, grad_fd = 1e-6, torch.zeros_like(x)
    flat = x.detach().clone().view(-1)
    for i in range(flat.numel()):
        hi, lo = flat.clone(), flat.clone()
        hi[i] += eps
        lo[i] -= eps
        grad_fd.view(-1)[i] = (D(hi.view_as(x), y).sum() - D(lo.view_as(x), y).sum()) / (2 * eps)
    patches = D(x, y)[0].numel()
    expected = 0.5 * grad_fd.pow(2).sum() / patches
    assert r1.item() == pytest.approx(expected.item(), rel=1e-5)
