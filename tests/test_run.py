"""run.py end to end on the CPU with tiny models: checkpoints, grids, logs, display, resume,
overrides, config errors."""

import json
import os

import pytest
import torch
import yaml

import run
from conftest import tiny_run_config, write_latent_folders


def write_config(tmp_path, name="cfg.yaml", **sections):
    cfg = tiny_run_config(tmp_path, **sections)
    path = tmp_path / name
    path.write_text(json.dumps(cfg) if name.endswith(".json") else yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture
def data(tmp_path):
    return write_latent_folders(tmp_path / "data")


def json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_two_epochs_with_tiny_vae(tmp_path, data, tiny_vae_dir, capsys):
    cfg = write_config(tmp_path, training={"log_json": True, "log_interval": 1},
                       visualization={"every_epochs": 1, "vae_path": tiny_vae_dir})
    assert run.main(["--config", cfg]) == 0
    out_dir = tmp_path / "out"
    assert sorted(os.listdir(out_dir)) == [".run.lock", "config.yaml", "epoch_0001.pt", "epoch_0002.pt", "latest.pt", "vis"]
    ckpt = torch.load(out_dir / "latest.pt", weights_only=True)
    for key in ("epoch", "step", "config", "models", "ema", "optimizers", "scaler", "rng"):
        assert key in ckpt, key
    assert ckpt["epoch"] == 2 and ckpt["step"] == 4
    assert set(ckpt["models"]) == {"generator", "mapping_network", "style_encoder", "discriminator"}
    assert set(ckpt["ema"]) == {"generator", "mapping_network", "style_encoder"}
    assert not any(k.startswith(("_orig_mod.", "module.")) for sd in ckpt["models"].values() for k in sd)
    assert ckpt["config"]["training"]["batch_size"] == 4
    from PIL import Image

    grid = Image.open(out_dir / "vis" / "epoch_0002.png")
    # 7 rows (3 latent-guided, references, 3 reference-guided) of 32px VAE decodes (factor 2)
    assert grid.size[1] >= 7 * 32 and grid.size[0] >= 4 * 32
    captured = capsys.readouterr()
    lines = json_lines(captured.out)
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    for key in ("d_loss", "g_loss", "r1", "w_ds", "lat_adv", "lat_sty", "lat_ds", "lat_cyc", "ref_adv", "ref_sty",
                "ref_ds", "ref_cyc", "epoch"):
        assert key in lines[0], key
    assert "latent preview" not in captured.out  # the VAE loaded


def test_json_lines_follow_log_interval(tmp_path, data, capsys):
    cfg = write_config(tmp_path, training={"log_json": True, "log_interval": 3, "epochs": 3})
    assert run.main(["--config", cfg]) == 0
    assert [r["step"] for r in json_lines(capsys.readouterr().out)] == [3, 6]
    cfg = write_config(tmp_path, training={"log_json": False, "log_interval": 1, "epochs": 1})
    assert run.main(["--config", cfg, "training.checkpoint_dir=" + str(tmp_path / "o2")]) == 0
    assert json_lines(capsys.readouterr().out) == []


def test_percent_mode_refreshes_one_line(tmp_path, data, capsys):
    cfg = write_config(tmp_path, training={"progress_style": "percent", "epochs": 2},
                       visualization={"every_epochs": 5})
    assert run.main(["--config", cfg]) == 0
    out = capsys.readouterr().out
    epoch_lines = [line for line in out.split("\n") if "epoch 1/2" in line]
    assert len(epoch_lines) == 1  # one line per epoch, refreshed with \r
    assert epoch_lines[0].count("\r") >= 2 and "100.0%" in epoch_lines[0] and "d_loss" in epoch_lines[0]


def test_percent_mode_with_json_lines(tmp_path, data, capsys):
    """JSON lines stay parseable lines that begin with { even between percent refreshes."""
    cfg = write_config(tmp_path, training={"progress_style": "percent", "epochs": 1, "log_json": True,
                                           "log_interval": 1}, visualization={"every_epochs": 5})
    assert run.main(["--config", cfg]) == 0
    out = capsys.readouterr().out
    assert [r["step"] for r in json_lines(out)] == [1, 2]
    assert all(line.startswith("{") or "{" not in line for line in out.split("\n"))


def test_resume_continues_step_count(tmp_path, data, capsys):
    cfg = write_config(tmp_path, training={"epochs": 1, "log_json": True, "log_interval": 1})
    assert run.main(["--config", cfg]) == 0
    assert run.main(["--config", cfg, "--resume", "training.epochs=2"]) == 0
    steps = [r["step"] for r in json_lines(capsys.readouterr().out)]
    assert steps == [1, 2, 3, 4]
    ckpt = torch.load(tmp_path / "out" / "latest.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 4


def test_resume_with_other_architecture_names_keys(tmp_path, data, capsys):
    cfg = write_config(tmp_path, training={"epochs": 1})
    assert run.main(["--config", cfg]) == 0
    assert run.main(["--config", cfg, "--resume", "model.gen_channels=16", "training.epochs=2"]) == 2
    assert "model.gen_channels" in capsys.readouterr().err


def test_overrides_and_json_config(tmp_path, data):
    cfg = write_config(tmp_path, name="cfg.json", training={"epochs": 1})
    assert run.main(["--config", cfg, "training.batch_size=2", "training.save_interval=1"]) == 0
    ckpt = torch.load(tmp_path / "out" / "latest.pt", weights_only=True)
    assert ckpt["config"]["training"]["batch_size"] == 2 and ckpt["step"] == 4  # 8 samples / 2
    resolved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert resolved["training"]["batch_size"] == 2


@pytest.mark.parametrize("override, message", [
    ("training.bogus=1", "training.bogus"),
    ("nosection.x=1", "nosection"),
    ("training.progress_style=fancy", "progress_style"),
    ("training.amp_dtype=fp8", "amp_dtype"),
    ("training.batch_size=0", "batch_size"),
    ("training.compile_mode=warp-speed", "compile_mode"),
    ("data.domains=[only]", "data.domains"),
    ("training.lr=fast", "training.lr"),
    ("training.lr=nan", "training.lr"),
    ("training.lr=.inf", "training.lr"),
    ("loss.w_ds=[1]", "loss.w_ds"),
])
def test_bad_config_errors_name_the_key(tmp_path, override, message, capsys):
    cfg = write_config(tmp_path)
    assert run.main(["--config", cfg, override]) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_default_yaml_matches_code_defaults():
    """configs/stargan_v2_latent.yaml documents config.DEFAULTS: every key, same value (the YAML
    names visualization.every_epochs, which the code leaves absent for the eval_interval fallback)."""
    from config import DEFAULTS, flatten, read_config_file

    yaml_keys = dict(flatten(read_config_file(os.path.join(os.path.dirname(run.__file__), "configs",
                                                           "stargan_v2_latent.yaml"))))
    code = dict(flatten(DEFAULTS))
    assert set(yaml_keys) == set(code)
    assert {k for k in code if code[k] != yaml_keys[k]} == {"visualization.every_epochs"}


def test_bare_off_in_yaml_means_off(tmp_path):
    from config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("training:\n  progress_style: off\n")
    assert load_config(str(path))["training"]["progress_style"] == "off"


def test_unknown_key_in_file(tmp_path, capsys):
    cfg = write_config(tmp_path, training={"epochz": 3})
    assert run.main(["--config", cfg]) == 2
    assert "training.epochz" in capsys.readouterr().err


def test_vae_fallback_and_eval_interval(tmp_path, data, capsys):
    """No visualization.every_epochs: training.eval_interval decides; an unloadable VAE falls back
    to the latent preview with one warning, and training goes on."""
    cfg = tiny_run_config(tmp_path, training={"epochs": 2, "eval_interval": 2})
    cfg["visualization"] = {"vae_path": str(tmp_path / "no_such_vae")}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert run.main(["--config", str(path)]) == 0
    assert os.listdir(tmp_path / "out" / "vis") == ["epoch_0002.png"]
    out = capsys.readouterr().out
    assert out.count("linear latent preview") == 1


def test_save_interval_and_keep_checkpoints(tmp_path, data):
    cfg = write_config(tmp_path, training={"epochs": 4, "save_interval": 1, "keep_checkpoints": 2},
                       visualization={"every_epochs": 10})
    assert run.main(["--config", cfg]) == 0
    assert sorted(p for p in os.listdir(tmp_path / "out") if p.endswith(".pt")) == [
        "epoch_0003.pt", "epoch_0004.pt", "latest.pt"]


def test_unwritable_checkpoint_dir_fails_before_training(tmp_path, data, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = write_config(tmp_path, training={"checkpoint_dir": str(blocker / "sub")})
    assert run.main(["--config", cfg]) == 2
    assert "not writable" in capsys.readouterr().err


def test_numeric_strings_for_float_keys(tmp_path):
    """YAML 1.1 reads 1e-4 (no dot) as a string, in files and overrides alike: accepted as a float."""
    from config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("training:\n  lr: 1e-4\n  weight_decay: '0'\nloss:\n  w_r1: 2\n")
    cfg = load_config(str(path), ["training.lr_mapping=1e-6", "loss.w_ds=5E-1"])
    t = cfg["training"]
    assert (t["lr"], t["lr_mapping"], t["weight_decay"]) == (1e-4, 1e-6, 0.0)
    assert (cfg["loss"]["w_r1"], cfg["loss"]["w_ds"]) == (2.0, 0.5)
    assert all(type(v) is float for v in (t["lr"], t["lr_mapping"], t["weight_decay"], cfg["loss"]["w_r1"]))


def test_numeric_string_reaches_the_checkpoint_as_float(tmp_path, data):
    cfg = write_config(tmp_path, training={"epochs": 1})
    assert run.main(["--config", cfg, "training.lr=1e-3"]) == 0
    ckpt = torch.load(tmp_path / "out" / "latest.pt", weights_only=True)
    assert ckpt["config"]["training"]["lr"] == 1e-3 and type(ckpt["config"]["training"]["lr"]) is float
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["training"]["lr"] == 1e-3
    assert ckpt["optimizers"]["generator"]["param_groups"][0]["lr"] == 1e-3


def test_resume_reports_and_applies_the_configs_learning_rates(tmp_path, data, capsys):
    cfg = write_config(tmp_path, training={"epochs": 1, "lr": 1e-4, "weight_decay": 1e-4})
    assert run.main(["--config", cfg]) == 0
    assert run.main(["--config", cfg, "--resume", "training.epochs=2", "training.lr=5e-4",
                     "training.weight_decay=0"]) == 0
    out = capsys.readouterr().out
    assert "resume: generator lr 0.0001 -> 0.0005 (from the config)" in out
    assert "resume: discriminator weight_decay 0.0001 -> 0 (from the config)" in out
    groups = torch.load(tmp_path / "out" / "latest.pt", weights_only=True)["optimizers"]["discriminator"]["param_groups"]
    assert groups[0]["lr"] == 5e-4 and groups[0]["weight_decay"] == 0


def test_zero_step_epoch_is_an_error(tmp_path, capsys):
    """9 files at batch 16 with drop_last: no step would ever run; refuse before writing anything."""
    write_latent_folders(tmp_path / "data", files=3)
    cfg = write_config(tmp_path, data={"samples_per_epoch": None}, training={"batch_size": 16})
    assert run.main(["--config", cfg]) == 2
    err = capsys.readouterr().err
    for part in ("0 steps", "9 latent files", "data.samples_per_epoch=None", "1 process(es)",
                 "training.batch_size=16", "drop_last"):
        assert part in err, (part, err)
    assert not os.path.exists(tmp_path / "out" / "latest.pt")


def test_resuming_a_finished_run_is_not_a_zero_step_error(tmp_path, data, capsys):
    cfg = write_config(tmp_path, training={"epochs": 1})
    assert run.main(["--config", cfg]) == 0
    assert run.main(["--config", cfg, "--resume", "training.batch_size=64"]) == 0
    assert "done: 1 epochs, 2 steps" in capsys.readouterr().out


def test_tensorboard_curves_and_grids(tmp_path, data):
    """training.tensorboard: losses, w_ds and skip counters at display steps, and the grids."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = write_config(tmp_path, training={"epochs": 2, "tensorboard": True, "display_interval": 1})
    assert run.main(["--config", cfg]) == 0
    events = EventAccumulator(str(tmp_path / "out" / "tb"), size_guidance={"scalars": 0, "images": 0}).Reload()
    tags = events.Tags()
    for key in ("d_loss", "g_loss", "r1", "w_ds", "nonfinite_skipped", "oom_skipped"):
        assert f"train/{key}" in tags["scalars"], key
    assert [e.step for e in events.Scalars("train/d_loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Images("grid")] == [1, 2]
