"""Config values and checkpoints across versions of the code.

- Every value is checked by the type of its default before anything is created: a mapping where a
  number or a list belongs, a seed out of range, are one line naming the key (real processes).
- A model option may be a bool or a float: it is validated by its default's type, not as a width.
- A checkpoint written before a key existed resumes, translates and exports with that key's default;
  a key the code does not know is refused where it matters (model: always; anything: on resume).
"""

import os
import subprocess
import sys

import pytest
import torch
import yaml

import checkpoint
import config
import inference
import model
import run
import translate
from conftest import ROOT, tiny_run_config, write_latent_folders

CHECKPOINT = os.path.join(ROOT, "tests", "data", "tiny_checkpoint.pt")


@pytest.fixture
def data_and_config(tmp_path):
    write_latent_folders(tmp_path / "data")
    cfg = tiny_run_config(tmp_path, training={"epochs": 2, "lr": 1e-2, "lr_mapping": 1e-2},
                          visualization={"every_epochs": 100, "vae_path": None})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return tmp_path, str(path)


@pytest.mark.parametrize("override,key", [
    ("training.batch_size={a: 1}", "training.batch_size"),
    ("data.domains={a: 1}", "data.domains"),
    ("model.gen_channels=[8, 8]", "model.gen_channels"),
    ("seed=-1", "seed"),
    ("seed=18446744073709551616", "seed"),
])
def test_values_of_the_wrong_kind_are_one_line_before_anything_is_created(data_and_config, override, key):
    tmp_path, cfg = data_and_config
    result = subprocess.run([sys.executable, "run.py", "--config", cfg, override], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"'{key}'" in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()  # nothing claimed: no folder, no lock, no config.yaml


@pytest.fixture
def new_model_options(monkeypatch):
    """This code gains two model options after the committed checkpoint was written: a bool and a
    float, both off by default (the networks built as before)."""
    monkeypatch.setitem(config.DEFAULTS["model"], "rocket", False)
    monkeypatch.setitem(config.DEFAULTS["model"], "rocket_ratio", 0.5)
    monkeypatch.setattr(config, "DEFAULTS_FLAT", dict(config.flatten(config.DEFAULTS)))

    def ignoring_options(build):
        def wrapper(*args, rocket=False, rocket_ratio=0.5, **kwargs):
            return build(*args, **kwargs)
        return wrapper

    for module in (config, checkpoint, run, inference):
        for name in ("build_models", "expected_state"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, ignoring_options(getattr(model, name)))


def test_bool_and_float_model_options_validate_by_their_type(new_model_options):
    cfg = config.load_config(None, ["model.rocket=true", "model.rocket_ratio=0.25"])
    assert cfg["model"]["rocket"] is True and cfg["model"]["rocket_ratio"] == 0.25
    with pytest.raises(config.InputError, match="'model.rocket' must be bool"):
        config.load_config(None, ["model.rocket=3"])
    with pytest.raises(config.InputError, match="'model.rocket_ratio' must be a number"):
        config.load_config(None, ["model.rocket_ratio=abc"])
    with pytest.raises(config.InputError, match="'model.gen_channels' = 0: expected a positive int"):
        config.load_config(None, ["model.gen_channels=0"])


def test_a_checkpoint_older_than_a_model_key_resumes_and_translates(new_model_options, data_and_config, tmp_path):
    tmp_path, cfg = data_and_config
    assert "rocket" not in torch.load(CHECKPOINT, weights_only=True)["config"]["model"]
    assert run.main(["--config", cfg, "--resume", CHECKPOINT]) == 0
    assert torch.load(tmp_path / "out" / "latest.pt", weights_only=True)["config"]["model"]["rocket"] is False
    source = os.path.join(tmp_path, "data", "a", "000.pt")
    assert translate.main(["--checkpoint", CHECKPOINT, "--source", source, "--target-domain", "b", "--num-styles", "1",
                           "--output", str(tmp_path / "translated"), "--device", "cpu"]) == 0
    assert (tmp_path / "translated" / "000_to_b_0.pt").exists()


def test_a_checkpoint_older_than_other_keys_loads_with_their_defaults(tmp_path):
    ckpt = torch.load(CHECKPOINT, weights_only=True)
    del ckpt["config"]["data"]["hflip"], ckpt["config"]["training"]["cpu_threads"], ckpt["config"]["loss"]["w_adv"]
    path = str(tmp_path / "old.pt")
    torch.save(ckpt, path)
    loaded = checkpoint.load_checkpoint(path, resume=True)
    assert loaded["config"]["data"]["hflip"] is False and loaded["config"]["loss"]["w_adv"] == 1.0
    assert loaded["config"]["training"]["cpu_threads"] is None


@pytest.mark.parametrize("key", ["loss.w_rocket", "training.rocket"])
def test_an_unknown_key_outside_the_model_matters_to_resume_only(data_and_config, tmp_path, key, capsys):
    tmp_path, cfg = data_and_config
    ckpt = torch.load(CHECKPOINT, weights_only=True)
    section, name = key.split(".")
    ckpt["config"][section][name] = 1.0
    path = str(tmp_path / "newer.pt")
    torch.save(ckpt, path)
    assert run.main(["--config", cfg, "--resume", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"unknown config key '{key}'" in err[0] and path in err[0]
    source = os.path.join(tmp_path, "data", "a", "000.pt")
    assert translate.main(["--checkpoint", path, "--source", source, "--target-domain", "b", "--num-styles", "1",
                           "--output", str(tmp_path / "translated"), "--device", "cpu"]) == 0


def test_an_unknown_model_key_is_refused_everywhere(tmp_path):
    ckpt = torch.load(CHECKPOINT, weights_only=True)
    ckpt["config"]["model"]["rocket"] = True
    path = str(tmp_path / "newer.pt")
    torch.save(ckpt, path)
    for resume in (False, True):
        with pytest.raises(checkpoint.CheckpointError, match="unknown config key 'model.rocket'"):
            checkpoint.load_checkpoint(path, resume=resume)
