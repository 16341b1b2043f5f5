"""The G step's terms come from one declaration (loss.G_TERMS): a term added there trains, logs and
resumes; a term whose weight is 0 is neither computed nor logged nor shown."""

import json

import pytest
import torch
import yaml

import config
import loss as L
import run
import trainer as T
from conftest import tiny_run_config, write_latent_folders
from model import build_models

B, H = 4, 16


def identity_term(nets, p):
    """A toy term: G with the source's own style keeps x, |G(x, s_src) - x| (the `lat_id` kind)."""
    calls.append(p.s_src.shape)
    return L.cycle_consistency_loss(nets["generator"](p.x, p.s_src).float(), p.x)


calls = []


@pytest.fixture
def with_identity_term(monkeypatch):
    """Declare the toy term as a researcher would: one line in G_TERMS and its weight key."""
    monkeypatch.setattr(L, "G_TERMS", L.G_TERMS + (L.Term("id", "w_id", identity_term),))
    monkeypatch.setitem(config.DEFAULTS["loss"], "w_id", 1.0)
    monkeypatch.setitem(config.DEFAULTS_FLAT, "loss.w_id", 1.0)  # flattened at import, before the patch
    calls.clear()


def make_trainer(tmp_path, **loss):
    cfg = config.resolve_config(tiny_run_config(tmp_path, loss={"r1_interval": 2, **loss}))
    torch.manual_seed(0)
    return T.Trainer(cfg, build_models(num_domains=3, **cfg["model"]), "cpu", log=lambda *a, **k: None)


def make_batch():
    g = torch.Generator().manual_seed(1)
    raw = lambda: torch.randn(B, 4, H, H, generator=g) * 5  # noqa: E731
    return {"content": raw(), "target_style": raw(), "target_style_2": raw(),
            "source_style_id": torch.tensor([0, 1, 2, 0]), "target_style_id": torch.tensor([1, 2, 0, 2])}


def g_grads(tr):
    torch.manual_seed(7)
    b = tr.prepare_batch(make_batch())
    z1, z2 = torch.randn(2, B, tr.latent_dim)
    tr.g_backward(b, z1, z2, 1.0)
    return [p.grad.clone() for p in tr.nets["generator"].parameters()]


def json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_declared_term_changes_the_gradients_and_weight_zero_skips_it(tmp_path, with_identity_term):
    on = make_trainer(tmp_path, w_id=1.0)
    grads_on = g_grads(on)
    assert len(calls) == 2  # once per path
    calls.clear()
    grads_off = g_grads(make_trainer(tmp_path, w_id=0.0))
    assert calls == []  # weight 0: not computed
    assert any(not torch.equal(a, b) for a, b in zip(grads_on, grads_off))
    out = on.train_step(make_batch())
    assert "lat_id" in out and "ref_id" in out and out["lat_id"] > 0
    assert "lat_id" in L.loss_keys(on.cfg["loss"])


def test_declared_term_logs_and_resumes(tmp_path, with_identity_term, capsys):
    write_latent_folders(tmp_path / "data")
    cfg = tiny_run_config(tmp_path, training={"epochs": 1, "log_json": True, "log_interval": 1})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert run.main(["--config", str(tmp_path / "cfg.yaml")]) == 0
    assert run.main(["--config", str(tmp_path / "cfg.yaml"), "--resume", "training.epochs=2"]) == 0
    lines = json_lines(capsys.readouterr().out)
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert all(r["lat_id"] > 0 and r["ref_id"] > 0 for r in lines)
    ckpt = torch.load(tmp_path / "out" / "latest.pt", weights_only=True)
    assert ckpt["config"]["loss"]["w_id"] == 1.0 and ckpt["step"] == 4


def test_weight_zero_terms_are_not_computed_logged_or_shown(tmp_path, monkeypatch, capsys):
    called = []
    real_cycle, real_r1 = L.cycle_consistency_loss, L.r1_penalty
    monkeypatch.setattr(L, "cycle_consistency_loss", lambda *a: called.append("cyc") or real_cycle(*a))
    monkeypatch.setattr(L, "r1_penalty", lambda *a: called.append("r1") or real_r1(*a))
    write_latent_folders(tmp_path / "data")
    cfg = tiny_run_config(tmp_path, loss={"w_cyc": 0.0, "w_r1": 0.0},
                          training={"epochs": 1, "log_json": True, "log_interval": 1, "progress_style": "percent"})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert run.main(["--config", str(tmp_path / "cfg.yaml")]) == 0
    assert called == []
    out = capsys.readouterr().out
    lines = json_lines(out)
    assert len(lines) == 2 and all("lat_sty" in r and "d_loss" in r for r in lines)
    assert not any(k in r for r in lines for k in ("lat_cyc", "ref_cyc", "r1"))
    shown = [line for line in out.splitlines() if line.startswith("\repoch") or line.startswith("epoch")]
    assert shown and "lat_sty" in out and "lat_cyc" not in out and " r1 " not in out
