"""train_skips.step_all_or_none: the all-or-none, sync-free skip of a GAN phase, and the private torch
details it relies on (GradScaler's per-optimizer found-inf record, fused Adam's `found_inf`
attribute, torch._foreach_norm). If a torch release changes one of them, these tests fail loudly
instead of training silently stepping through non-finite updates (or never stepping at all)."""

import pytest
import torch

from train_backend import fused_adam_supported
from train_skips import step_all_or_none


def two_nets(grad=1.0):
    """Two one-layer 'networks' with their own Adam, and grads set to `grad`."""
    torch.manual_seed(0)
    nets = [torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)]
    for net in nets:
        for p in net.parameters():
            p.grad = torch.full_like(p, grad)
    return nets


def weights(nets):
    return [p.detach().clone() for net in nets for p in net.parameters()]


def moved(before, nets):
    return [not torch.equal(a, b) for a, b in zip(before, weights(nets))]


def params(nets):
    return [p for net in nets for p in net.parameters()]


def test_torch_private_details_exist():
    """The three private details, checked by name against the installed torch."""
    assert hasattr(torch, "_foreach_norm")
    grads = [torch.tensor([3.0, 4.0]), torch.tensor([[1.0, 0.0], [0.0, 0.0]])]
    assert [t.item() for t in torch._foreach_norm(grads)] == [5.0, 1.0]
    nets = two_nets()
    opt = torch.optim.Adam(nets[0].parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    loss = nets[0](torch.ones(1, 3)).sum()
    opt.zero_grad()
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    record = scaler._per_optimizer_states[id(opt)]["found_inf_per_device"]
    assert record and all(torch.is_tensor(v) and v.numel() == 1 for v in record.values())


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("vote", [0.0, 1.0])
def test_all_or_none_without_scaler(fused, vote):
    """fused: Adam's found_inf attribute skips inside the kernel; else one host read of the flag."""
    if fused and not fused_adam_supported("cpu"):
        pytest.skip("this torch has no fused Adam on the CPU")
    nets = two_nets()
    opts = [torch.optim.Adam(net.parameters(), lr=0.1, fused=fused or None) for net in nets]
    before = weights(nets)
    skip = step_all_or_none(opts, torch.amp.GradScaler("cpu", enabled=False), params(nets), torch.tensor(vote), fused)
    assert skip.item() == vote
    assert moved(before, nets) == [vote == 0] * len(before)


@pytest.mark.parametrize("fused", [True, False])
def test_finite_but_absurd_gradient_skips_every_optimizer(fused):
    """1e30 is finite element by element; the float32 total norm overflows to inf and votes."""
    if fused and not fused_adam_supported("cpu"):
        pytest.skip("this torch has no fused Adam on the CPU")
    nets = two_nets()
    nets[1].weight.grad.fill_(1e30)
    opts = [torch.optim.Adam(net.parameters(), lr=0.1, fused=fused or None) for net in nets]
    before = weights(nets)
    skip = step_all_or_none(opts, torch.amp.GradScaler("cpu", enabled=False), params(nets), torch.tensor(0.0), fused)
    assert skip.item() == 1 and not any(moved(before, nets))


@pytest.mark.parametrize("vote", [0.0, 1.0])
def test_all_or_none_with_grad_scaler(vote):
    """fp16: the phase's flag overrides every optimizer's own found-inf record, so a vote from
    elsewhere (another rank, the objective) skips them all and the scale backs off; no vote, and
    both step with the scale kept."""
    nets = two_nets()
    opts = [torch.optim.Adam(net.parameters(), lr=0.1) for net in nets]
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=True)
    loss = sum(net(torch.ones(1, net.in_features)).sum() for net in nets)
    scaler.scale(loss).backward()
    before = weights(nets)
    skip = step_all_or_none(opts, scaler, params(nets), torch.tensor(vote), fused=False)
    assert skip.item() == vote
    assert moved(before, nets) == [vote == 0] * len(before)
    assert scaler.get_scale() == (512.0 if vote else 1024.0)


def test_grad_scaler_overflow_in_one_optimizer_skips_both():
    """An inf gradient in one network's grads (found by unscale_) must stop the other one too."""
    nets = two_nets()
    opts = [torch.optim.Adam(net.parameters(), lr=0.1) for net in nets]
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=True)
    scaler.scale(sum(net(torch.ones(1, net.in_features)).sum() for net in nets)).backward()
    nets[0].bias.grad[0] = float("inf")
    before = weights(nets)
    skip = step_all_or_none(opts, scaler, params(nets), torch.tensor(0.0), fused=False)
    assert skip.item() == 1 and not any(moved(before, nets))
