"""What a new user meets in the first hour: offline hubs, silent long work, one-line warnings,
messages that say what to do."""

import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml

import dataset
import evaluate
import vae
from conftest import ROOT, tiny_run_config, write_latent_folders


@pytest.fixture
def closed_hub(monkeypatch):
    """The Hugging Face endpoint on a loopback port that refuses connections (no network)."""
    from huggingface_hub import constants

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return port


def test_an_unreachable_hub_is_named_in_seconds(closed_hub):
    """A hub id that is not cached, without a network: an error that says the hub cannot be
    reached and the model is not cached, and how to pass a local folder (it once waited a minute
    and then said "does not appear to have a file named config.json")."""
    start = time.perf_counter()
    with pytest.raises(ValueError) as err:
        vae.load_vae("latent-stargan-tests/no-such-vae")
    message = str(err.value)
    assert time.perf_counter() - start < 15
    assert "cannot be reached from here" in message and "is not in its local cache" in message
    assert "--vae PATH" in message and "config.json" not in message


def test_behind_a_proxy_the_hub_is_left_to_huggingface_hub(closed_hub, monkeypatch):
    """A raw connection cannot tell whether a proxy reaches the hub: with one set, no probe."""
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    vae.check_hub_reachable("latent-stargan-tests/no-such-vae")  # no error: huggingface_hub decides


def test_hf_hub_offline_is_said_too(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="not in the local Hugging Face cache .* and HF_HUB_OFFLINE is set"):
        vae.load_vae("latent-stargan-tests/no-such-vae")


def test_training_goes_on_with_the_preview_when_the_hub_is_unreachable(tmp_path, closed_hub, capsys):
    import run

    write_latent_folders(tmp_path / "data")
    cfg = tiny_run_config(tmp_path, training={"epochs": 1},
                          visualization={"every_epochs": 1, "vae_path": "latent-stargan-tests/no-such-vae"})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert run.main(["--config", str(tmp_path / "cfg.yaml")]) == 0
    out = capsys.readouterr().out
    assert "cannot be reached from here" in out and "linear latent preview instead" in out


def test_the_cpu_fallback_warning_is_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the fallback needs a machine without CUDA")
    write_latent_folders(tmp_path / "data")
    cfg = tiny_run_config(tmp_path, training={"epochs": 1, "device": "cuda"})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "run.py", "--config", str(tmp_path / "cfg.yaml")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "CUDA is not available" in line]
    assert lines == ["warning: training.device='cuda' but CUDA is not available: running on the CPU"]
    assert "warnings.warn" not in proc.stderr and "UserWarning" not in proc.stderr


def test_evaluation_without_any_vae_says_how_to_give_one(trained, tmp_path, capsys):
    """Not "None could not be loaded"."""
    assert evaluate.main(["--checkpoint", trained[0], "--device", "cpu", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "and none is set: pass --vae, or set evaluation.vae_path" in err and "None" not in err


def test_loading_the_inception_prints_no_deprecation_notice(tmp_path):
    """torch.jit.load is deprecated in torch 2.13, but the published Inception weights are TorchScript:
    every evaluation printed torch's notice."""
    from test_metrics import PlainFormStandIn, script_to

    path = script_to(tmp_path / "inception.pt", PlainFormStandIn(dim=2048))
    code = f"import sys; sys.path.insert(0, {ROOT!r}); import metrics; metrics.load_inception({path!r})"
    proc = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "deprecated" not in proc.stderr


def test_loading_many_latent_files_shows_progress(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dataset, "PROGRESS_FILES", 10)
    root = write_latent_folders(tmp_path / "data", files=6)
    dataset.MultiDomainLatentDataset(root, ["a", "b", "c"], preload_to_gpu=False, device="cpu", log=lambda *a: None)
    err = capsys.readouterr().err
    assert "loading latents" in err and "/18" in err
    dataset.MultiDomainLatentDataset(root, ["a", "b", "c"], preload_to_gpu=False, device="cpu", log=lambda *a: None,
                                     progress=False)  # other ranks under torchrun: quiet
    assert "loading latents" not in capsys.readouterr().err
    monkeypatch.setattr(dataset, "PROGRESS_FILES", 100)
    dataset.MultiDomainLatentDataset(root, ["a", "b", "c"], preload_to_gpu=False, device="cpu", log=lambda *a: None)
    assert "loading latents" not in capsys.readouterr().err  # a small folder loads in an instant


def test_data_and_app_share_one_image_rule(tmp_path):
    """encode.py and the app apply vae.inspect_image: the same refusals and the same notes."""
    from PIL import Image

    Image.new("RGB", (30, 70)).save(tmp_path / "small.png")
    Image.new("LA", (300, 300)).save(tmp_path / "grey_alpha.png")
    with pytest.raises(ValueError, match="30x70 px, too small: it is encoded at 256x256 px, so its shorter side "
                                         "needs at least 64 px"):
        vae.inspect_image(str(tmp_path / "small.png"), 256)
    info = vae.inspect_image(str(tmp_path / "grey_alpha.png"), 512)
    assert (info.width, info.height) == (300, 300)
    assert info.notes == ["grayscale, used as RGB", "transparency dropped", "upscaled to 512 px"]
    with pytest.raises(ValueError, match="300x300 px .* more than the 0 megapixels accepted"):
        vae.inspect_image(str(tmp_path / "grey_alpha.png"), 256, max_pixels=1000)
    Image.new("RGB", (300, 300)).save(tmp_path / "tiff.png", format="TIFF")  # a format no tool offers
    with pytest.raises(ValueError, match="not an image that can be read .* expected a PNG, JPEG, WebP or BMP"):
        vae.inspect_image(str(tmp_path / "tiff.png"), 256)
    with pytest.raises(Exception):
        vae.load_image(str(tmp_path / "tiff.png"), 256)


def test_translate_shows_progress_over_its_outputs(trained, tmp_path, capsys):
    import translate

    assert translate.main(["--checkpoint", trained[0], "--source", os.path.join(trained[1], "a"), "--target-domain",
                           "b", "--num-styles", "2", "--output", str(tmp_path / "out"), "--batch-size", "4"]) == 0
    err = capsys.readouterr().err
    assert "translating" in err and "12/12" in err
