"""Shared fixtures and helpers: one tiny-config factory (diffusers-style), seeding, the cuda marker and the
one-line refusal check."""

import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# one thread: tiny ops gain nothing from two, and a shared 2-core machine makes two threads crawl
torch.set_num_threads(1)

TINY_MODEL = dict(style_dim=8, latent_dim=4, gen_channels=8, n_res_blocks=2, mapping_hidden_dim=16,
                  mapping_shared_layers=2, style_encoder_channels=8, disc_channels=8)


def tiny_model_config(**overrides):
    """The `model:` section of a tiny config: channels 8-16, fast on a CPU."""
    return {**TINY_MODEL, **overrides}


@pytest.fixture
def tiny_models():
    from model import build_models

    torch.manual_seed(0)
    return build_models(num_domains=3, **tiny_model_config())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def make_tiny_vae(folder):
    """A randomly initialised diffusers AutoencoderKL (downsampling factor 2) saved with
    save_pretrained: exercises the real loading path without weights from the hub."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=8,
                        sample_size=32)
    vae.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory):
    return make_tiny_vae(tmp_path_factory.mktemp("tiny_vae"))


def write_latent_folders(root, domains=("a", "b", "c"), files=6, size=16, seed=0):
    """root/<domain>/<k:03d>.pt raw latents whose mean encodes the domain (domain i ~ 2*i - 2)."""
    from latents import write_latent_folders as write

    g = torch.Generator().manual_seed(seed)
    write(root, {d: torch.randn(files, 4, size, size, generator=g) * 4 + (2 * i - 2) for i, d in enumerate(domains)},
          stem="{index:03d}")
    return str(root)


def one_line_naming(err, path, entry):
    """The one line of a refusal on stderr, which names `path` and `entry`; no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert path in lines[0] and entry in lines[0] and "Traceback" not in err, err
    return lines[0]


def tiny_run_config(tmp_path, **sections):
    """A complete tiny training config dict (fp32, CPU, 2 steps per epoch), sections overridable."""
    cfg = {
        "data": {"root": str(tmp_path / "data"), "domains": ["a", "b", "c"], "samples_per_epoch": 8},
        "model": tiny_model_config(),
        "loss": {"r1_interval": 2},
        "training": {"epochs": 2, "batch_size": 4, "num_workers": 0, "checkpoint_dir": str(tmp_path / "out"),
                     "device": "cpu", "amp_dtype": "fp32", "progress_style": "off", "display_interval": 1,
                     "ema_beta": 0.9},
        "visualization": {"every_epochs": 1, "vae_path": None},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values} if isinstance(values, dict) else values
    return cfg


def write_random_alexnet(path, seed=5):
    """Random AlexNet weights in torchvision's state-dict format (He init, so activations neither
    vanish nor explode), plus a classifier key that the LPIPS loader must ignore. Returns the state."""
    g = torch.Generator().manual_seed(seed)
    shapes = {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3), 8: (256, 384, 3, 3), 10: (256, 256, 3, 3)}
    state = {}
    for i, shape in shapes.items():
        fan_in = shape[1] * shape[2] * shape[3]
        state[f"features.{i}.weight"] = torch.randn(shape, generator=g) * (2 / fan_in) ** 0.5
        state[f"features.{i}.bias"] = torch.randn(shape[0], generator=g) * 0.01
    state["classifier.6.bias"] = torch.zeros(1000)
    torch.save(state, str(path))
    return state


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(checkpoint path, data root) of a 1-epoch tiny run on domains a, b, c (6 latents each, 16x16);
    a high lr so styles visibly matter. Shared by the translate, app and evaluation tests."""
    import yaml

    import run

    tmp = tmp_path_factory.mktemp("run")
    data = write_latent_folders(tmp / "data")
    cfg = tiny_run_config(tmp, training={"epochs": 1, "lr": 1e-2, "lr_mapping": 1e-2})
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert run.main(["--config", str(path)]) == 0
    return os.path.join(cfg["training"]["checkpoint_dir"], "latest.pt"), data


@pytest.fixture(scope="session")
def ema_nets(trained):
    """(config, models) with `trained`'s EMA weights for G, F, E, rebuilt here independently of the
    code under test."""
    from config import model_kwargs, resolve_config
    from model import build_models

    ckpt = torch.load(trained[0], weights_only=True)
    cfg = resolve_config(ckpt["config"])
    models = build_models(**model_kwargs(cfg))
    for name in ("generator", "mapping_network", "style_encoder"):
        models[name].load_state_dict(ckpt["ema"][name])
        models[name].eval()
    return cfg, models


def decode_video(path, fps=None):
    """Every frame of a written video, uint8 [F, H, W, 3], decoded here (not by the writer). A GIF
    stores a run of identical frames once, with their durations summed: it is expanded back to the
    frames each stored one covers at `fps` (GIF times in 10 ms steps)."""
    from PIL import Image, ImageSequence

    if path.endswith(".gif"):
        with Image.open(path) as gif:
            stored = [(np.asarray(f.convert("RGB")), f.info["duration"]) for f in ImageSequence.Iterator(gif)]
        frames, start = [], 0
        for frame, duration in stored:
            frames += [frame] * (round((start + duration) * fps / 1000) - round(start * fps / 1000))
            start += duration
        return np.stack(frames)
    import imageio_ffmpeg

    frames = imageio_ffmpeg.read_frames(path)
    width, height = next(frames)["size"]
    return np.stack([np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in frames])
