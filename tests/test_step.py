"""One training iteration against an independent re-implementation, plus focused tests of what a
step can silently get wrong while training still "works".

The reference below is written from the papers in plain PyTorch (fp32, non-fused Adam): the D step
of StarGAN v2 (Choi et al., CVPR 2020, Eq. 1, hinge form) with lazy R1 (Mescheder et al. 2018;
StyleGAN2 §4), the G step of Eq. 5 (Eqs. 2-4: style reconstruction, diversity, cycle) on a
latent-guided and a reference-guided path, then the EMA of G, F and E. A wrong sign, a lost weight,
a missing detach or a stray gradient path changes some parameter by a sizeable fraction of one
Adam step, which the comparison resolves; none of these makes a loss non-finite or a test of
shapes fail.
"""

import copy

import pytest
import torch

import trainer as T
from config import latent_space, resolve_config
from conftest import tiny_run_config
from model import build_models

B, H = 4, 16
NETS = ("generator", "mapping_network", "style_encoder", "discriminator")
EMA_NETS = ("generator", "mapping_network", "style_encoder")
# large enough that one Adam step (~lr) dwarfs float32 rounding of the weights (~1e-7)
LR, LR_MAPPING = 1e-3, 5e-4
LOSS = {"w_adv": 1.0, "w_sty": 2.0, "w_ds": 1.0, "w_cyc": 1.5, "w_r1": 0.5, "r1_interval": 2, "ds_decay_steps": 8}


def make_trainer(tmp_path, loss=None, training=None):
    cfg = resolve_config(tiny_run_config(tmp_path, loss={**LOSS, **(loss or {})},
                                         training={"lr": LR, "lr_mapping": LR_MAPPING, **(training or {})}))
    torch.manual_seed(0)
    models = build_models(num_domains=3, **cfg["model"])
    return T.Trainer(cfg, models, "cpu", log=lambda *a, **k: None)


def make_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    raw = lambda: torch.randn(B, 4, H, H, generator=g) * 5  # noqa: E731  raw SD1.5 latents: std ~5
    return {"content": raw(), "target_style": raw(), "target_style_2": raw(),
            "source_style_id": torch.tensor([0, 1, 2, 0]), "target_style_id": torch.tensor([1, 2, 0, 2])}


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def styled_trainer(tmp_path, **kwargs):
    """A trainer whose AdaIN layers already use the style (their fc starts at zero, which makes G
    ignore s, L_ds exactly 0 and no gradient reach F or E through G)."""
    tr = make_trainer(tmp_path, **kwargs)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for block in tr.nets["generator"].blocks:
            for adain in (block.adain1, block.adain2):
                adain.fc.weight.copy_(torch.randn(adain.fc.weight.shape, generator=g) * 0.3)
    for name in EMA_NETS:
        tr.ema[name].load_state_dict(tr.nets[name].state_dict())
    return tr


def step_inputs(tr, batch, seed=123):
    """The trainer's scaled inputs and the z it will draw after torch.manual_seed(seed)."""
    norm = latent_space(tr.cfg).normalize  # SD1.5's: raw * 0.18215
    torch.manual_seed(seed)
    z = torch.randn(2, B, tr.cfg["model"]["latent_dim"])
    return {"x": norm(batch["content"]), "x_ref": norm(batch["target_style"]), "x_ref2": norm(batch["target_style_2"]),
            "y_src": batch["source_style_id"], "y_trg": batch["target_style_id"], "z": z}


# ---------------------------------------------------------------------- the reference iteration

def reference_step(nets, opts, ema, batch, z, cfg, step):
    """One iteration from the papers. `nets`, `opts` (non-fused Adam) and `ema` are updated in place;
    `z` [2, B, L]: z[0] for the D step and the latent path, z[1] the second diversity code.
    Returns the gradients each net stepped with, by parameter name."""
    G, F, E, D = (nets[k] for k in NETS)
    w, t = cfg["loss"], cfg["training"]
    norm = latent_space(cfg).normalize  # the networks see (raw - shift) * scale; SD1.5: raw * 0.18215
    x = norm(batch["content"])  # [B, 4, H, W]
    x_ref, x_ref2 = norm(batch["target_style"]), norm(batch["target_style_2"])
    y_src, y_trg = batch["source_style_id"], batch["target_style_id"]
    decay = w["ds_decay_steps"]
    w_ds = w["w_ds"] * (max(0.0, 1 - step / decay) if decay else 1.0)

    used = {}

    def update(name, grads):
        for (n, p), g in zip(nets[name].named_parameters(), grads):
            p.grad = g
        used[name] = {n: p.grad.clone() for n, p in nets[name].named_parameters()}
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)

    # D step: hinge on the reals against both paths' fakes, made without grad
    with torch.no_grad():
        fakes = [G(x, F(z[0], y_trg)), G(x, E(x_ref, y_trg))]
    x_real = x.clone().requires_grad_(True)
    real = D(x_real, y_src)  # [B, 1, H', W'] patch logits
    d_loss = sum(torch.relu(1 - real).mean() + torch.relu(1 + D(fake, y_trg)).mean() for fake in fakes)
    if step % w["r1_interval"] == 0:  # lazy R1: every r1_interval steps, scaled by the interval
        (grad,) = torch.autograd.grad(real.sum(), x_real, create_graph=True)
        r1 = 0.5 * grad.pow(2).sum(dim=(1, 2, 3)).mean() / real[0].numel()  # per patch logit
        d_loss = d_loss + w["w_r1"] * w["r1_interval"] * r1
    update("discriminator", torch.autograd.grad(d_loss, list(D.parameters())))

    def g_objective(s, s2, s_src):  # Eq. 5 for one path
        fake = G(x, s)
        adv = -D(fake, y_trg).mean()
        sty = (E(fake, y_trg) - s).abs().mean()  # Eq. 2
        ds = (fake - G(x, s2).detach()).abs().mean()  # Eq. 3, maximised
        cyc = (G(fake, s_src) - x).abs().mean()  # Eq. 4, the source's own style
        return w["w_adv"] * adv + w["w_sty"] * sty - w_ds * ds + w["w_cyc"] * cyc

    # G step, reference-guided path: trains G only
    g_params = list(G.parameters())
    with torch.no_grad():
        s_ref, s_ref2, s_src = E(x_ref, y_trg), E(x_ref2, y_trg), E(x, y_src)
    g_ref = torch.autograd.grad(g_objective(s_ref, s_ref2, s_src), g_params)
    # latent-guided path: trains G, F and E
    s_lat, s_lat2 = F(z[0], y_trg), F(z[1], y_trg).detach()
    gfe = g_params + list(F.parameters()) + list(E.parameters())
    g_lat = torch.autograd.grad(g_objective(s_lat, s_lat2, E(x, y_src)), gfe)
    n_g, n_f = len(g_params), len(list(F.parameters()))
    update("generator", [a + b for a, b in zip(g_ref, g_lat[:n_g])])
    update("mapping_network", g_lat[n_g:n_g + n_f])
    update("style_encoder", g_lat[n_g + n_f:])

    # EMA with warm-up
    beta = min(t["ema_beta"], (1 + step) / (10 + step))
    with torch.no_grad():
        for name in EMA_NETS:
            for e, p in zip(ema[name].parameters(), nets[name].parameters()):
                e.copy_(beta * e + (1 - beta) * p)
    return used


def reference_copy(tr):
    """The trainer's nets, EMA and Adam state as independent objects with non-fused Adam."""
    t = tr.cfg["training"]
    nets = {k: copy.deepcopy(tr.nets[k]) for k in NETS}
    ema = {k: copy.deepcopy(tr.ema[k]) for k in EMA_NETS}
    opts = {}
    for k in NETS:
        lr = t["lr_mapping"] if k == "mapping_network" else t["lr"]
        opts[k] = torch.optim.Adam(nets[k].parameters(), lr=lr, betas=(0.0, 0.99), weight_decay=t["weight_decay"],
                                   foreach=False, fused=False)
        for p_ref, p in zip(nets[k].parameters(), tr.nets[k].parameters()):
            opts[k].state[p_ref] = {key: v.detach().clone() for key, v in tr.optimizers[k].state[p].items()}
    return nets, opts, ema


def zero_gradient_parameters(generator):
    """Conv biases that feed only an instance norm: IN subtracts the per-channel mean, so their
    true gradient is 0 and autograd returns rounding noise (~1e-8 of the other gradients), which
    Adam normalises into a step of up to 10 lr in a random direction. Two correct implementations
    disagree on them."""
    return {f"blocks.{i}.conv1.bias" for i in range(len(generator.blocks))}


@pytest.mark.parametrize("step", [4, 5], ids=["r1_step", "plain_step"])
def test_train_step_matches_reference_iteration(tmp_path, step):
    """Trainer.train_step equals the reference iteration for every parameter of D, G, F, E and of
    the EMA copies, at a step where w_ds is decaying (0 < w_ds < 1) and L_ds is non-zero."""
    tr = styled_trainer(tmp_path)
    for seed in (11, 12, 13):  # Adam gets a history: its update then scales with the gradient
        tr.train_step(make_batch(seed))
    tr.step = step
    nets, opts, ema = reference_copy(tr)
    pairs = [(k, tr.nets[k], nets[k]) for k in NETS] + [(f"ema {k}", tr.ema[k], ema[k]) for k in EMA_NETS]
    before = {label: snapshot(mine) for label, mine, _ in pairs}
    batch = make_batch(2)

    torch.manual_seed(123)  # the trainer draws z = randn(2, B, latent_dim) first thing
    out = tr.train_step(batch)
    torch.manual_seed(123)
    z = torch.randn(2, B, tr.cfg["model"]["latent_dim"])
    grads = reference_step(nets, opts, ema, batch, z, tr.cfg, step)

    assert 0 < out["w_ds"] < LOSS["w_ds"] and out["lat_ds"] > 1e-2 and out["ref_ds"] > 1e-2
    atol = 1e-3 * LR  # a thousandth of one Adam step; float32 rounding of the weights is ~1e-7
    noisy = zero_gradient_parameters(tr.nets["generator"])
    g_grads = grads["generator"]
    assert max(g_grads[n].abs().max() for n in noisy) < 1e-6 * max(g.abs().max() for g in g_grads.values())
    beta = min(tr.cfg["training"]["ema_beta"], (1 + step) / (10 + step))
    for name in noisy:  # bounded by Adam's largest step (beta1 = 0): lr / sqrt(1 - beta2) = 10 lr ...
        start, live = before["generator"][name], tr.nets["generator"].get_parameter(name)
        assert (live - start).abs().max() <= 10 * LR and (nets["generator"].get_parameter(name) - start).abs().max() <= 10 * LR
        # ... and the EMA follows the trainer's own live value
        torch.testing.assert_close(tr.ema["generator"].get_parameter(name),
                                   beta * before["ema generator"][name] + (1 - beta) * live, rtol=0, atol=atol)
    for label, mine, ref in pairs:
        ref_params = dict(ref.named_parameters())
        for name, p in mine.named_parameters():
            if label.endswith("generator") and name in noisy:
                continue
            torch.testing.assert_close(p, ref_params[name], rtol=0, atol=atol, msg=lambda m: f"{label}.{name}: {m}")


# ---------------------------------------------------------------------- focused tests

def test_reported_g_terms_follow_eqs_2_to_5(tmp_path):
    """Every G term the step reports, recomputed from the pre-step G, F, E (the D step moves only D,
    and the G terms see the updated D): catches a cycle that reconstructs with the target style
    instead of the source's own E(x, y_src) (Eq. 4), terms swapped between paths, and a total
    that loses w_ds or the minus sign of the diversity term (Eq. 5) once L_ds is non-zero."""
    tr = styled_trainer(tmp_path, loss={"w_ds": 2.0})
    tr.step = 2  # w_ds decays: 2 * (1 - 2/8)
    G, F, E = (copy.deepcopy(tr.nets[k]) for k in EMA_NETS)
    batch = make_batch(2)
    i = step_inputs(tr, batch)
    torch.manual_seed(123)
    out = tr.train_step(batch)
    D = tr.nets["discriminator"]  # after its own step; the G step does not move it
    x, y_src, y_trg, z = i["x"], i["y_src"], i["y_trg"], i["z"]
    with torch.no_grad():
        styles = {"lat": (F(z[0], y_trg), F(z[1], y_trg)), "ref": (E(i["x_ref"], y_trg), E(i["x_ref2"], y_trg))}
        s_src = E(x, y_src)
        for path, (s1, s2) in styles.items():
            fake = G(x, s1)
            expected = {"adv": -D(fake, y_trg).mean(), "sty": (E(fake, y_trg) - s1).abs().mean(),
                        "ds": (fake - G(x, s2)).abs().mean(), "cyc": (G(fake, s_src) - x).abs().mean()}
            for term, value in expected.items():
                torch.testing.assert_close(out[f"{path}_{term}"], value, rtol=1e-5, atol=1e-7,
                                           msg=lambda m: f"{path}_{term}: {m}")
    w = tr.cfg["loss"]
    assert out["w_ds"] == 1.5 and out["lat_ds"] > 1e-2 and out["ref_ds"] > 1e-2
    total = sum(w["w_adv"] * out[f"{p}_adv"] + w["w_sty"] * out[f"{p}_sty"] - out["w_ds"] * out[f"{p}_ds"]
                + w["w_cyc"] * out[f"{p}_cyc"] for p in ("lat", "ref"))
    torch.testing.assert_close(out["g_loss"], total, rtol=1e-6, atol=1e-7)


def test_reported_d_terms_follow_the_hinge_and_r1(tmp_path):
    """d_adv and r1 recomputed on the pre-step nets: the hinge form of Eq. 1 summed over both paths,
    E[max(0, 1 - D(x, y_src))] + E[max(0, 1 + D(fake, y_trg))], and R1 on the reals per patch logit.
    Catches reals and fakes swapped in the hinge, or the fakes judged by the source domain's head."""
    tr = styled_trainer(tmp_path)
    tr.step = 4  # an R1 step (r1_interval 2)
    G, F, E, D = (copy.deepcopy(tr.nets[k]) for k in NETS)
    batch = make_batch(2)
    i = step_inputs(tr, batch)
    torch.manual_seed(123)
    out = tr.train_step(batch)
    x, y_src, y_trg, z = i["x"], i["y_src"], i["y_trg"], i["z"]
    x_real = x.clone().requires_grad_(True)
    real = D(x_real, y_src)  # [B, 1, H', W']
    (grad,) = torch.autograd.grad(real.sum(), x_real)
    with torch.no_grad():
        fakes = [G(x, F(z[0], y_trg)), G(x, E(i["x_ref"], y_trg))]
        d_adv = sum(torch.relu(1 - real).mean() + torch.relu(1 + D(fake, y_trg)).mean() for fake in fakes)
    torch.testing.assert_close(out["d_adv"], d_adv, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out["r1"], 0.5 * grad.pow(2).sum(dim=(1, 2, 3)).mean() / real[0].numel(),
                               rtol=1e-5, atol=1e-9)


def test_diversity_gradient_reaches_g_through_the_first_fake_only(tmp_path):
    """With only L_ds weighted, G's output bias b gets d(-w_ds * L_ds)/db = -w_ds * sum(sign(fake_1 -
    fake_2)) / numel per channel and path (Eq. 3, maximised). That needs the second fake detached, as
    in the official code: b shifts both fakes alike, so through both fakes its gradient is exactly 0.
    Catches the second fake left with grad, the term's sign flipped and w_ds ignored."""
    tr = styled_trainer(tmp_path, loss={"w_adv": 0.0, "w_sty": 0.0, "w_cyc": 0.0, "w_ds": 2.0})
    tr.step = 2  # w_ds = 2 * (1 - 2/8) = 1.5
    bias = tr.nets["generator"].conv_out.bias
    seen = []
    bias.register_hook(lambda g: seen.append(g.clone()))  # raw gradients, before Adam's weight decay
    G, F, E = (copy.deepcopy(tr.nets[k]) for k in EMA_NETS)
    batch = make_batch(2)
    i = step_inputs(tr, batch)
    torch.manual_seed(123)
    out = tr.train_step(batch)
    x, y_trg, z = i["x"], i["y_trg"], i["z"]
    with torch.no_grad():
        pairs = [(G(x, F(z[0], y_trg)), G(x, F(z[1], y_trg))), (G(x, E(i["x_ref"], y_trg)), G(x, E(i["x_ref2"], y_trg)))]
    expected = -out["w_ds"] * sum((a - b).sign().sum(dim=(0, 2, 3)) / a.numel() for a, b in pairs)
    assert len(seen) == 2  # one backward per path
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(seen[0] + seen[1], expected, rtol=1e-5, atol=1e-8)


def test_g_losses_train_f_and_e_through_adain(tmp_path):
    """F and E learn what G needs through AdaIN's style input: with L_sty off, F's only gradient is
    through G(x, F(z, y)) and E's through the cycle's G(fake, E(x, y_src)). A detached style in AdaIN
    leaves them only the style loss, where the existing "F and E move" checks still pass."""
    tr = styled_trainer(tmp_path, loss={"w_sty": 0.0})
    grads = {name: [] for name in ("mapping_network", "style_encoder")}
    for name, seen in grads.items():
        for p in tr.nets[name].parameters():
            p.register_hook(lambda g, seen=seen: seen.append(g.abs().sum()))
    tr.train_step(make_batch(2))
    for name, seen in grads.items():
        assert seen and sum(seen) > 1e-3, f"{name} got no gradient from G's losses"


@pytest.mark.parametrize("step", [0, 4, 50, 200])
def test_ema_beta_is_exact_for_g_f_and_e(tmp_path, step):
    """EMA of G, F and E with beta_t = min(ema_beta, (1 + step) / (10 + step)): 0.1, 5/14, 51/60, then
    ema_beta = 0.9. lr 1e-2 moves every net by far more than the tolerance, so a wrong warm-up, no
    warm-up, or an EMA that skips F or E shows as a wrong beta."""
    tr = make_trainer(tmp_path, training={"lr": 1e-2, "lr_mapping": 1e-2, "ema_beta": 0.9})
    tr.step = step
    ema_before = {k: snapshot(tr.ema[k]) for k in EMA_NETS}
    live_before = {k: snapshot(tr.nets[k]) for k in EMA_NETS}
    tr.train_step(make_batch(2))
    beta = min(0.9, (1 + step) / (10 + step))
    for k in EMA_NETS:
        live, ema = snapshot(tr.nets[k]), snapshot(tr.ema[k])
        moved = max((live[n] - live_before[k][n]).abs().max().item() for n in live)
        assert moved > 1e-3, k
        # the beta that explains the update best (least squares over every weight)
        lag = torch.cat([(ema_before[k][n] - live[n]).flatten() for n in live])
        now = torch.cat([(ema[n] - live[n]).flatten() for n in live])
        beta_fit = ((now * lag).sum() / (lag * lag).sum()).item()
        assert beta_fit == pytest.approx(beta, abs=1e-4), f"{k}: EMA beta {beta_fit:.5f}, expected {beta:.5f}"
        for n in live:
            torch.testing.assert_close(ema[n], beta * ema_before[k][n] + (1 - beta) * live[n], rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_loss_with_finite_gradients_skips_the_g_step(tmp_path, bad):
    """A non-finite second reference makes the detached fake_2, hence L_ds and the G loss, non-finite
    while every gradient stays finite: L_ds reaches G through fake_1 only, and d|a - b|/da =
    sign(a - b) is 0 where a - b is NaN. Only the loss's own finiteness vote sees it (as it would a
    second fake that alone overflows in fp16): the G step is skipped and counted, while D, which
    never sees that reference, steps."""
    tr = styled_trainer(tmp_path)
    grads = []
    for name in EMA_NETS:
        for p in tr.nets[name].parameters():
            p.register_hook(lambda g: grads.append(torch.isfinite(g).all()))
    before = {k: snapshot(tr.nets[k]) for k in NETS}
    batch = make_batch(2)
    batch["target_style_2"][1, 2, 3, 4] = bad
    out = tr.train_step(batch)
    assert not torch.isfinite(out["ref_ds"]) and not torch.isfinite(out["g_loss"])
    assert grads and all(grads)  # the gradient-norm vote alone would let this step through
    assert tr.skips.nonfinite_total.item() == 1
    for k in EMA_NETS:
        after = snapshot(tr.nets[k])
        assert all(torch.equal(after[n], before[k][n]) for n in after), f"{k} stepped on a non-finite loss"
    d_after = snapshot(tr.nets["discriminator"])
    assert not all(torch.equal(d_after[n], before["discriminator"][n]) for n in d_after)
