"""Unit tests of the training step: R1 schedule, which path trains what, w_ds decay,
EMA, OOM and non-finite skips, fp16 with GradScaler."""

import math

import pytest
import torch

import checkpoint
import loss as L
import runtime
import train_backend
import trainer as T
from config import resolve_config
from conftest import tiny_run_config
from model import build_models
from train_skips import NonFiniteError

B, H = 4, 16


def make_trainer(tmp_path, **sections):
    cfg = resolve_config(tiny_run_config(tmp_path, **sections))
    torch.manual_seed(0)
    models = build_models(num_domains=3, **cfg["model"])
    return T.Trainer(cfg, models, "cpu", log=lambda *a, **k: None)


def make_batch(scale=1.0):
    g = torch.Generator().manual_seed(1)
    return {"content": torch.randn(B, 4, H, H, generator=g) * 5 * scale,
            "target_style": torch.randn(B, 4, H, H, generator=g) * 5 * scale,
            "target_style_2": torch.randn(B, 4, H, H, generator=g) * 5 * scale,
            "source_style_id": torch.tensor([0, 1, 2, 0]), "target_style_id": torch.tensor([1, 2, 0, 2])}


def params(module):
    return [p.detach().clone() for p in module.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_step_returns_device_scalars(tmp_path):
    tr = make_trainer(tmp_path)
    out = tr.train_step(make_batch())
    for key in L.loss_keys(tr.cfg["loss"]):
        assert torch.is_tensor(out[key]) and out[key].dim() == 0 and torch.isfinite(out[key]), key
    assert tr.step == 1


def test_r1_exactly_on_interval_steps(tmp_path, monkeypatch):
    calls = []
    real_r1 = L.r1_penalty

    def counting(logits, x):
        calls.append(tr.step)
        return real_r1(logits, x)

    monkeypatch.setattr(T.L, "r1_penalty", counting)
    tr = make_trainer(tmp_path, loss={"r1_interval": 3})
    for _ in range(7):
        tr.train_step(make_batch())
    assert calls == [0, 3, 6]


def test_r1_term_is_scaled_by_interval(tmp_path, monkeypatch):
    """Lazy R1 (StyleGAN2): the back-propagated objective carries w_r1 * r1_interval * r1 on R1 steps
    and none on the others; the shown d_loss is the per-step average d_adv + w_r1 * r1 on every step."""
    monkeypatch.setattr(T.L, "r1_penalty", lambda logits, x: (logits * 0).sum() + 0.25)
    tr = make_trainer(tmp_path, loss={"r1_interval": 4, "w_r1": 2.0})
    out = tr.train_step(make_batch())  # step 0: an R1 step
    torch.testing.assert_close(out["d_objective"] - out["d_adv"], torch.tensor(0.25 * 2.0 * 4))
    torch.testing.assert_close(out["d_loss"] - out["d_adv"], torch.tensor(0.25 * 2.0))
    out = tr.train_step(make_batch())  # step 1: no R1
    torch.testing.assert_close(out["d_objective"], out["d_adv"])
    torch.testing.assert_close(out["d_loss"] - out["d_adv"], torch.tensor(0.25 * 2.0))


def test_r1_objective_trains_d_with_the_interval_scale(tmp_path, monkeypatch):
    """The R1 term reaches D's gradient scaled by r1_interval: compare D's gradient with a run whose
    R1 is the same constant-gradient term at interval 1 and weight w_r1 * r1_interval."""
    grads = {}
    for interval, w_r1 in ((4, 1.0), (1, 4.0)):
        tr = make_trainer(tmp_path, loss={"r1_interval": interval, "w_r1": w_r1})
        b = tr.prepare_batch(make_batch())
        tr.d_backward(b, torch.randn(B, 4))  # forward and backward only: the grads stay
        grads[interval] = [p.grad.clone() for p in tr.nets["discriminator"].parameters()]
    for a, b in zip(grads[4], grads[1]):
        torch.testing.assert_close(a, b)


def test_stale_r1_never_skips_a_step(tmp_path):
    """A non-finite R1 from an earlier step is only shown: a plain step still updates D."""
    tr = make_trainer(tmp_path, loss={"r1_interval": 4})
    tr.step = 1  # not an R1 step
    tr.last_r1 = torch.tensor(float("nan"))
    before = params(tr.nets["discriminator"])
    out = tr.train_step(make_batch())
    assert torch.isnan(out["d_loss"]) and torch.isfinite(out["d_objective"])
    assert tr.skips.nonfinite_total.item() == 0
    assert not same(before, params(tr.nets["discriminator"]))


def test_resume_takes_lr_and_weight_decay_from_the_config(tmp_path):
    """load_state_dict restores the optimizers' saved param_groups; the config must win."""
    tr = make_trainer(tmp_path, training={"lr": 1e-4, "lr_mapping": 1e-6, "weight_decay": 1e-4})
    tr.train_step(make_batch())
    state = tr.state_dict(epoch=1)
    logged = []
    tr2 = make_trainer(tmp_path, training={"lr": 5e-4, "lr_mapping": 2e-6, "weight_decay": 0.0})
    tr2._log = logged.append
    tr2.load_state_dict(state)
    for name, opt in tr2.optimizers.items():
        for group in opt.param_groups:
            assert group["lr"] == (2e-6 if name == "mapping_network" else 5e-4), name
            assert group["weight_decay"] == 0.0, name
    assert "resume: generator lr 0.0001 -> 0.0005 (from the config)" in logged
    assert "resume: mapping_network lr 1e-06 -> 2e-06 (from the config)" in logged
    assert sum("weight_decay 0.0001 -> 0" in line for line in logged) == 4


def test_reference_path_trains_g_only(tmp_path, monkeypatch):
    """Zero the latent path's loss: then only the reference path trains, and F and E must not move."""
    tr = make_trainer(tmp_path, training={"weight_decay": 0.0})
    real_path = tr.g_path_losses
    calls = []

    def only_reference(*args):
        out = real_path(*args)
        calls.append(1)
        if len(calls) == 2:  # the second path of the G step is the latent-guided one
            out["total"] = out["total"] * 0
        return out

    monkeypatch.setattr(tr, "g_path_losses", only_reference)
    before = {k: params(tr.nets[k]) for k in T.NETS}
    b = tr.prepare_batch(make_batch())
    tr.update("g", lambda: tr.g_backward(b, *torch.randn(2, B, 4), 1.0))
    assert not same(before["generator"], params(tr.nets["generator"]))
    assert same(before["mapping_network"], params(tr.nets["mapping_network"]))
    assert same(before["style_encoder"], params(tr.nets["style_encoder"]))
    assert same(before["discriminator"], params(tr.nets["discriminator"]))


def test_latent_path_trains_g_f_e(tmp_path):
    tr = make_trainer(tmp_path)
    before = {k: params(tr.nets[k]) for k in T.NETS}
    b = tr.prepare_batch(make_batch())
    tr.update("g", lambda: tr.g_backward(b, *torch.randn(2, B, 4), 1.0))
    for k in T.EMA_NETS:
        assert not same(before[k], params(tr.nets[k])), k
    assert same(before["discriminator"], params(tr.nets["discriminator"]))


def test_d_step_trains_d_only(tmp_path):
    tr = make_trainer(tmp_path)
    before = {k: params(tr.nets[k]) for k in T.NETS}
    b = tr.prepare_batch(make_batch())
    tr.update("d", lambda: tr.d_backward(b, torch.randn(B, 4)))
    assert not same(before["discriminator"], params(tr.nets["discriminator"]))
    for k in T.EMA_NETS:
        assert same(before[k], params(tr.nets[k])), k


def test_g_loss_formula(tmp_path):
    """L_G per path = w_adv*adv + w_sty*sty - w_ds*ds + w_cyc*cyc, summed over both paths."""
    w = {"w_adv": 0.5, "w_sty": 2.0, "w_ds": 3.0, "w_cyc": 4.0, "ds_decay_steps": 0}
    tr = make_trainer(tmp_path, loss=w)
    out = tr.train_step(make_batch())
    expected = sum(w["w_adv"] * out[f"{p}_adv"] + w["w_sty"] * out[f"{p}_sty"] - w["w_ds"] * out[f"{p}_ds"]
                   + w["w_cyc"] * out[f"{p}_cyc"] for p in ("lat", "ref"))
    torch.testing.assert_close(out["g_loss"], expected)
    assert out["lat_ds"] == 0  # AdaIN starts as plain IN: G ignores the style at init
    for _ in range(2):
        out = tr.train_step(make_batch())
    assert out["lat_ds"] > 0  # once AdaIN's fc moves, two z give two different fakes


def test_w_ds_decays_linearly_with_global_step(tmp_path):
    tr = make_trainer(tmp_path, loss={"w_ds": 2.0, "ds_decay_steps": 100})
    assert [tr.w_ds_at(s) for s in (0, 25, 50, 100, 150)] == [2.0, 1.5, 1.0, 0.0, 0.0]
    tr.step = 50
    assert tr.train_step(make_batch())["w_ds"] == 1.0
    assert make_trainer(tmp_path, loss={"ds_decay_steps": 0}).w_ds_at(10 ** 6) == 1.0


def test_ema_update(tmp_path):
    tr = make_trainer(tmp_path, training={"ema_beta": 0.5})
    tr.step = 20  # warm-up (1 + 20) / (10 + 20) = 0.7 > 0.5, so beta = 0.5
    ema_before = params(tr.ema["generator"])
    tr.train_step(make_batch())
    live = params(tr.nets["generator"])
    for e0, p, e1 in zip(ema_before, live, params(tr.ema["generator"])):
        torch.testing.assert_close(e1, 0.5 * e0 + 0.5 * p)


def test_ema_warmup_and_zero_beta(tmp_path):
    # lr_mapping 1e-2 moves F by ~1e-2 per step: a beta off by 0.01 misses the tolerance 100-fold
    tr = make_trainer(tmp_path, training={"ema_beta": 0.999, "lr_mapping": 1e-2})
    ema_before = params(tr.ema["mapping_network"])
    tr.train_step(make_batch())  # step 0: beta = 1 / 10
    for e0, p, e1 in zip(ema_before, params(tr.nets["mapping_network"]), params(tr.ema["mapping_network"])):
        torch.testing.assert_close(e1, 0.1 * e0 + 0.9 * p, rtol=0, atol=1e-6)
    tr0 = make_trainer(tmp_path, training={"ema_beta": 0.0})
    tr0.train_step(make_batch())
    assert same(params(tr0.ema["generator"]), params(tr0.nets["generator"]))


class OOMOnce(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.raised = inner, False

    def forward(self, *args):
        if not self.raised:
            self.raised = True
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(*args)


def test_oom_skips_and_goes_on(tmp_path):
    tr = make_trainer(tmp_path)
    tr.call["generator"] = OOMOnce(tr.nets["generator"])
    d_before = params(tr.nets["discriminator"])
    tr.train_step(make_batch())  # OOM in the D step: D's update is skipped
    assert tr.oom_skipped == 1
    assert same(d_before, params(tr.nets["discriminator"]))
    assert all(p.grad is None for k in T.NETS for p in tr.nets[k].parameters())
    tr.train_step(make_batch())
    assert not same(d_before, params(tr.nets["discriminator"]))
    assert tr.step == 2


@pytest.mark.parametrize("at_step", [0, 2])
def test_fp16_oom_skips_and_goes_on(tmp_path, at_step):
    tr = make_trainer(tmp_path, training={"amp_dtype": "fp16"})
    for _ in range(at_step):
        tr.train_step(make_batch())
    tr.call["generator"] = OOMOnce(tr.nets["generator"])
    d_before = params(tr.nets["discriminator"])
    tr.train_step(make_batch())
    assert tr.oom_skipped == 1 and same(d_before, params(tr.nets["discriminator"]))
    out = tr.train_step(make_batch())
    assert torch.isfinite(out["d_loss"]) and not same(d_before, params(tr.nets["discriminator"]))


def test_nonfinite_batch_is_skipped_and_counted(tmp_path):
    tr = make_trainer(tmp_path)
    before = {k: params(tr.nets[k]) for k in T.NETS}
    tr.train_step(make_batch(scale=1e30))  # finite but absurd data
    assert tr.skips.nonfinite_total.item() == 1
    for k in T.NETS:
        assert same(before[k], params(tr.nets[k])), k
        assert all(torch.isfinite(p).all() for p in tr.nets[k].parameters())
    tr.train_step(make_batch())
    assert tr.skips.nonfinite_total.item() == 1 and tr.skips.nonfinite_run.item() == 0
    assert not same(before["generator"], params(tr.nets["generator"]))


def test_consecutive_nonfinite_limit(tmp_path):
    tr = make_trainer(tmp_path, training={"max_nonfinite_steps": 3})
    nan_batch = make_batch()
    nan_batch["content"][0, 0, 0, 0] = float("nan")
    for _ in range(2):
        tr.train_step(nan_batch)
    tr.skips.check(tr.step)  # 2 < 3: fine
    for _ in range(3):
        tr.train_step(nan_batch)
    with pytest.raises(NonFiniteError, match="max_nonfinite_steps=3"):
        tr.skips.check(tr.step)


def test_fp16_with_grad_scaler(tmp_path):
    tr = make_trainer(tmp_path, training={"amp_dtype": "fp16"})
    assert tr.scalers["d"].is_enabled() and tr.scalers["g"].is_enabled()
    before = params(tr.nets["generator"])
    for _ in range(3):
        out = tr.train_step(make_batch())
    assert torch.isfinite(out["g_loss"]) and torch.isfinite(out["d_loss"])
    assert not same(before, params(tr.nets["generator"]))


def test_bf16_step(tmp_path):
    tr = make_trainer(tmp_path, training={"amp_dtype": "bf16"})
    out = tr.train_step(make_batch())
    assert all(torch.isfinite(out[k]) for k in L.loss_keys(tr.cfg["loss"]))


def test_compile_failure_falls_back_to_eager(tmp_path, monkeypatch):
    tr = make_trainer(tmp_path)

    class Broken(torch.nn.Module):
        def forward(self, *args):
            raise RuntimeError("Inductor exploded")

    tr.call["discriminator"] = Broken()
    tr._compile_unverified.add("discriminator")
    with pytest.warns(UserWarning, match="falling back to eager"):
        out = tr.train_step(make_batch())
    assert tr.call["discriminator"] is tr.nets["discriminator"]
    assert torch.isfinite(out["d_loss"])


def test_compile_failure_in_g_phase_does_not_step_d_twice(tmp_path):
    tr = make_trainer(tmp_path)
    eager_d = tr.nets["discriminator"]

    class FailsOnGPhase(torch.nn.Module):  # D sees 3B samples in the D step, B in the G step
        def forward(self, x, y):
            if x.shape[0] == B:
                raise RuntimeError("Inductor exploded in the G step")
            return eager_d(x, y)

    tr.call["discriminator"] = FailsOnGPhase()
    tr._compile_unverified.add("discriminator")
    with pytest.warns(UserWarning, match="falling back to eager"):
        tr.train_step(make_batch())
    assert tr.step == 1
    steps = [s["step"].item() for s in tr.optimizers["discriminator"].state.values()]
    assert steps and all(v == 1 for v in steps)


def test_compile_options_translate_mode_and_cudagraphs():
    opts = train_backend.compile_options("reduce-overhead", False)
    assert opts["triton.cudagraphs"] is False
    assert train_backend.compile_options("default", True) == {"triton.cudagraphs": True}
    assert train_backend.compile_options("max-autotune", False)["triton.cudagraphs"] is False


def test_state_dict_round_trip_is_exact(tmp_path):
    tr = make_trainer(tmp_path)
    tr.train_step(make_batch())
    path = checkpoint.atomic_save(tr.state_dict(epoch=1), str(tmp_path / "c.pt"))
    ckpt = checkpoint.load_checkpoint(path)
    tr2 = make_trainer(tmp_path)
    tr2.load_state_dict(ckpt)
    torch.manual_seed(5)
    a = tr.train_step(make_batch())
    torch.manual_seed(5)
    b = tr2.train_step(make_batch())
    torch.testing.assert_close(a["g_loss"], b["g_loss"])
    assert same(params(tr.nets["generator"]), params(tr2.nets["generator"]))


def test_atomic_save_failure_keeps_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "latest.pt")
    checkpoint.atomic_save({"a": torch.ones(2)}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(runtime.torch, "save", broken_save)
    with pytest.raises(OSError):
        checkpoint.atomic_save({"a": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt"]


class _Payload:
    """Unpickling this calls open(marker, "w"): it creates `marker` if the pickle ever runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_load_checkpoint_never_runs_pickled_code(tmp_path):
    """A checkpoint is a plain dict of tensors, numbers and strings: load_checkpoint refuses anything
    else (torch.load with weights_only=True) instead of running it. The hostile file is otherwise a
    valid checkpoint, so a full unpickle would load it without complaint, having run the payload."""
    control = tmp_path / "control_marker"
    torch.load(_save(tmp_path / "control.pt", {"x": _Payload(control)}), weights_only=False)["x"].close()
    assert control.exists()  # the payload really runs when fully unpickled

    marker = tmp_path / "pwned_marker"
    state = make_trainer(tmp_path).state_dict(epoch=1)
    path = _save(tmp_path / "latest.pt", {**state, "notes": _Payload(marker)})
    with pytest.raises(ValueError, match="it holds a pickled io.open, which is refused"):
        checkpoint.load_checkpoint(path)
    assert not marker.exists()


def _save(path, obj):
    torch.save(obj, path)
    return str(path)


def test_a_nonfinite_metric_never_becomes_the_best(tmp_path):
    """A NaN first evaluation (diverged EMA) must not freeze best.pt: comparisons with NaN are False."""
    from types import SimpleNamespace

    tr = make_trainer(tmp_path, evaluation={"every_epochs": 1})
    values = iter([float("nan"), 5.0, 7.0, 4.0])
    tr.evaluation.evaluator = lambda *args, **kwargs: {"FID_latent/mean": next(values)}
    data = SimpleNamespace(by_domain=lambda: {}, content_ids=lambda: {})
    best = tmp_path / "out" / "best.pt"
    tr.evaluation.evaluate(1, tr.step, tr.ema, data)
    assert tr.evaluation.best is None and not best.exists()
    for epoch, expected in ((2, 5.0), (3, 5.0), (4, 4.0)):
        tr.epoch = tr.step = epoch  # one step per epoch, as a checkpoint must be consistent
        tr.evaluation.evaluate(epoch, tr.step, tr.ema, data)
        assert tr.evaluation.best["value"] == expected
        assert torch.load(best, weights_only=True)["best"]["value"] == expected


def test_a_skipped_r1_step_keeps_the_last_finite_r1(tmp_path, monkeypatch):
    """An R1 penalty that overflows skips its step; the logged and saved R1 stays the last finite
    one, so the next checkpoint (an epoch's end, a Ctrl-C) is never refused for a NaN counter."""
    tr = make_trainer(tmp_path, loss={"r1_interval": 1})
    tr.train_step(make_batch())
    finite_r1 = float(tr.last_r1)
    assert math.isfinite(finite_r1) and finite_r1 > 0
    real_r1 = T.L.r1_penalty
    monkeypatch.setattr(T.L, "r1_penalty", lambda logits, x: real_r1(logits, x) * float("inf"))  # overflows
    tr.train_step(make_batch())  # skipped as non-finite
    assert float(tr.skips.nonfinite_total) == 1 and float(tr.last_r1) == finite_r1
    tr.latent_shape = (4, H, H)
    tr.save_checkpoint(str(tmp_path / "latest.pt"))  # not refused
    assert torch.load(tmp_path / "latest.pt", weights_only=True)["counters"]["last_r1"] == pytest.approx(finite_r1)
