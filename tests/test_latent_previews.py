"""Pictures in any latent space: the presets' numbers, the linear preview per latent family (and the
generic one for any other width), and the tiny autoencoder (AutoencoderTiny, TAESD) that decodes
grids, translate.py's PNGs and the app's pictures from the full VAE's normalised latents."""

import glob
import os

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import config
import vae as vae_module
from latents import SD15, LatentSpace
from runtime import InputError
from vae import PREVIEW_FACTORS, latent_preview, load_preview_vae, picture_source, preview_family, tiny_input, to_rgb

PRESETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "presets")

# name: (channels, scaling_factor, shift_factor, downsample, VAE, subfolder, tiny autoencoder)
EXPECTED = {
    "sd15": (4, 0.18215, 0.0, 8, "stabilityai/sd-vae-ft-mse", None, "madebyollin/taesd"),
    "sdxl": (4, 0.13025, 0.0, 8, "madebyollin/sdxl-vae-fp16-fix", None, "madebyollin/taesdxl"),
    "sd3": (16, 1.5305, 0.0609, 8, "stabilityai/stable-diffusion-3-medium-diffusers", "vae", "madebyollin/taesd3"),
    "flux1": (16, 0.3611, 0.1159, 8, "black-forest-labs/FLUX.1-dev", "vae", "madebyollin/taef1"),
    "dcae": (32, None, 0.0, 32, "mit-han-lab/dc-ae-f32c32-in-1.0-diffusers", None, None),  # factors: its config's
}
PRESET_FILES = [f"{name}_{px}" for name in EXPECTED for px in (256, 512)]


def test_every_preset_file_is_in_the_table():
    assert sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(PRESETS, "*.yaml"))) == sorted(PRESET_FILES)


@pytest.mark.parametrize("preset", PRESET_FILES)
def test_preset_numbers(preset):
    raw = yaml.safe_load(open(os.path.join(PRESETS, preset + ".yaml")))
    channels, scale, shift, down, vae_path, subfolder, tiny = EXPECTED[preset.split("_")[0]]
    assert raw["model"]["latent_channels"] == channels
    assert raw["training"]["latent_scale"] == scale and raw["training"]["latent_shift"] == shift
    assert raw["training"]["latent_downsample"] == down
    assert raw["visualization"] == {"vae_path": vae_path, "vae_subfolder": subfolder, "preview_vae": tiny}
    side = int(preset.split("_")[1]) // down
    assert side >= 8, "the networks' trunks halve the latent 3 times"


# what the VAE's own config may say where a preset leaves a factor null (DC-AE in-1.0: diffusers'
# current conversion writes 0.3189, its first one wrote none, i.e. AutoencoderDC's default 1.0)
PUBLISHED_FACTORS = {"dcae": [(0.3189, 0.0), (1.0, 0.0)]}


@pytest.mark.parametrize("preset", PRESET_FILES)
def test_preset_loads_and_agrees_with_what_encode_records(preset, tmp_path):
    """The preset through config.load_config, then against a data root whose manifest holds its VAE's
    published config numbers (what encode.py records from that VAE): no contradiction is refused, and
    a null factor takes the manifest's."""
    path = os.path.join(PRESETS, preset + ".yaml")
    channels, scale, shift, down, *_ = EXPECTED[preset.split("_")[0]]
    for scale, shift in PUBLISHED_FACTORS.get(preset.split("_")[0], [(scale, shift)]):
        cfg = config.load_config(path, [f"training.checkpoint_dir={tmp_path}"])
        published = LatentSpace(channels, scale, shift, down)
        assert config.resolve_latent_space(cfg, published, "latent_space.json") == published


def test_a_saved_copy_with_another_scaling_factor_records_it(tmp_path):
    """docs/latent_spaces.md: a VAE saved once with `scaling_factor` overridden (DC-AE at MIT's 0.3189)
    reads back as that space, so encode.py's manifest, the config and the tools agree on it."""
    from diffusers import AutoencoderDC

    from test_latent_spaces import make_dc

    copy = AutoencoderDC.from_pretrained(make_dc(tmp_path / "dc"), scaling_factor=0.3189)
    copy.save_pretrained(str(tmp_path / "dc-0.3189"))
    space = LatentSpace.from_vae(AutoencoderDC.from_pretrained(str(tmp_path / "dc-0.3189")))
    assert space == LatentSpace(8, 0.3189, 0.0, 2)


# ---------------------------------------------------------------------- the linear preview

@pytest.mark.parametrize("channels,scale,family", [(4, 0.18215, "SD1.5"), (4, 0.13025, "SDXL"), (4, 0.5, "SD1.5"),
                                                   (16, 1.5305, "SD3"), (16, 0.3611, "FLUX.1"), (16, 1.0, "FLUX.1"),
                                                   (32, 0.3189, None), (3, 1.0, None), (1, 1.0, None)])
def test_preview_family(channels, scale, family):
    found = preview_family(LatentSpace(channels, scale, 0.0, 8))
    assert (found.name if found else None) == family


@pytest.mark.parametrize("channels,down", [(4, 8), (16, 8), (32, 32), (1, 4), (7, 2)])
def test_linear_preview_any_width(channels, down):
    space = LatentSpace(channels, 0.5, 0.1, down)
    z = torch.randn(2, channels, 8, 6, generator=torch.Generator().manual_seed(0)) * 3  # [B, C, H, W]
    rgb = latent_preview(z, space=space, log=lambda line: None)
    assert rgb.shape == (2, 3, 8 * down, 6 * down) and rgb.dtype == torch.float32
    assert torch.isfinite(rgb).all() and rgb.min() >= 0 and rgb.max() <= 1
    constant = latent_preview(torch.zeros(1, channels, 8, 8), space=space, upscale=1, log=lambda line: None)
    assert torch.isfinite(constant).all()  # a flat latent: no division by zero


def test_generic_preview_says_so_once(monkeypatch):
    monkeypatch.setattr(vae_module, "_GENERIC_SAID", set())
    lines = []
    space = LatentSpace(32, 0.3189, 0.0, 32)
    for _ in range(3):
        latent_preview(torch.randn(1, 32, 8, 8), space=space, log=lines.append)
    assert len(lines) == 1 and "32-channel" in lines[0]
    z = torch.randn(1, 32, 8, 8)
    rgb = latent_preview(z, space=space, upscale=1)  # channels 0-2, stretched to [0, 1]
    first = z[:, :3]
    expected = (first - first.min()) / (first.max() - first.min())
    torch.testing.assert_close(rgb, expected)


def test_sd15_preview_is_the_published_formula():
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = ((torch.einsum("bchw,cr->brhw", z, PREVIEW_FACTORS) + 1) / 2).clamp(0, 1)
    assert torch.equal(latent_preview(z, upscale=1), expected)  # SD1.5: bitwise as before
    raw = z / SD15.scaling_factor
    assert torch.equal(to_rgb(raw, None, SD15.scaling_factor), to_rgb(raw, None, SD15))  # a bare scale: SD1.5's


def test_published_bias_applied_for_flux():
    space = LatentSpace(16, 0.3611, 0.1159, 8)
    z = torch.zeros(1, 16, 2, 2)
    rgb = latent_preview(z, space=space, upscale=1)
    bias = preview_family(space).bias
    torch.testing.assert_close(rgb[0, :, 0, 0], ((bias + 1) / 2).clamp(0, 1))


def test_to_rgb_previews_normalised_latents():
    space = LatentSpace(16, 1.5305, 0.0609, 8)
    raw = torch.randn(2, 16, 4, 4)
    assert torch.equal(to_rgb(raw, None, space), latent_preview(space.normalize(raw), space=space))


# ---------------------------------------------------------------------- the tiny autoencoder

def make_tiny_autoencoder(folder, channels=16, scaling_factor=1.0):
    """A randomly initialised diffusers AutoencoderTiny (two blocks: x2 upsampling), saved to `folder`."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    tiny = AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                           num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=channels,
                           scaling_factor=scaling_factor)
    tiny.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_autoencoder(tmp_path_factory.mktemp("taesd3"))


@pytest.fixture(scope="module")
def tiny_sd15_dir(tmp_path_factory):
    return make_tiny_autoencoder(tmp_path_factory.mktemp("taesd"), channels=4)


def test_tiny_decode_equals_decoding_the_normalised_latents_by_hand(tiny_dir):
    from diffusers import AutoencoderTiny

    space = LatentSpace(16, 1.5305, 0.0609, 8)
    tiny = load_preview_vae(tiny_dir, space, "cpu", log=pytest.fail)
    assert picture_source(tiny) == "tiny autoencoder decode"
    raw = torch.randn(3, 16, 4, 4, generator=torch.Generator().manual_seed(2)) * 2 + 0.06  # [B, 16, h, w]
    rgb = to_rgb(raw, tiny, space, batch_size=2)
    by_hand = AutoencoderTiny.from_pretrained(tiny_dir).eval()
    with torch.no_grad():
        expected = by_hand.decode((raw - 0.0609) * 1.5305).sample  # TAESD takes the normalised latents
    expected = (expected / 2 + 0.5).clamp(0, 1)
    assert rgb.shape == (3, 3, 8, 8)  # two decoder blocks: one x2 upsampling
    torch.testing.assert_close(rgb, expected, rtol=0, atol=1e-6)


def test_tiny_input_divides_by_the_tiny_ones_own_factor(tmp_path):
    space = LatentSpace(4, 0.13025, 0.0, 8)
    tiny = load_preview_vae(make_tiny_autoencoder(tmp_path / "t", 4, 2.0), space, "cpu", log=pytest.fail)
    raw = torch.randn(1, 4, 2, 2)
    torch.testing.assert_close(tiny_input(tiny, space, raw), raw * 0.13025 / 2.0)


def test_tiny_of_another_width_is_refused_and_a_missing_one_warns(tiny_dir, tmp_path):
    with pytest.raises(InputError, match="16-channel latents; this model's latents have 4"):
        load_preview_vae(tiny_dir, SD15, "cpu", log=pytest.fail)
    lines = []
    assert load_preview_vae(str(tmp_path / "missing"), SD15, "cpu", log=lines.append) is None
    assert len(lines) == 1 and "visualization.preview_vae" in lines[0]
    assert load_preview_vae(None, SD15, "cpu", log=pytest.fail) is None


def test_translate_preview_vae_draws_the_pngs(trained, tiny_sd15_dir, tmp_path, capsys):
    """translate.py --preview-vae: the PNGs are AutoencoderTiny decodes of the outputs' normalised latents."""
    from diffusers import AutoencoderTiny

    from translate import main

    ckpt, data = trained
    out = tmp_path / "out"
    assert main(["--checkpoint", ckpt, "--source", os.path.join(data, "a"), "--target-domain", "c", "--output",
                 str(out), "--num-styles", "1", "--device", "cpu", "--preview-vae", tiny_sd15_dir]) == 0
    assert "tiny autoencoder decode" in capsys.readouterr().out
    scale = torch.load(ckpt, weights_only=True)["config"]["training"]["latent_scale"]
    latent = torch.load(out / "000_to_c_0.pt", weights_only=True)  # [4, h, w] raw
    with torch.no_grad():
        decoded = AutoencoderTiny.from_pretrained(tiny_sd15_dir).eval().decode(latent[None] * scale).sample
    expected = (decoded / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).mul(255).round().numpy()
    png = np.asarray(Image.open(out / "000_to_c_0.png")).astype(float)
    assert png.shape == expected.shape and np.abs(png - expected).max() <= 1


def test_app_preview_vae_draws_the_gallery(trained, tiny_sd15_dir, tmp_path):
    """app.py --preview-vae: the page's pictures are AutoencoderTiny decodes of the outputs' normalised
    latents (no full VAE here: the data's example latents are the source) and its header says so."""
    from diffusers import AutoencoderTiny

    import app

    ckpt, _ = trained
    translator = app.Translator(ckpt, device="cpu", log=lambda line: None, preview_vae=tiny_sd15_dir)
    assert "tiny autoencoder decode" in app.header_markdown(translator)
    handle = app.make_handler(translator, str(tmp_path / "outputs"), upload_root=str(tmp_path))
    example = sorted(translator.examples)[0]
    gallery, latents_pt, _, status = handle(app.DATA, None, example, "c", app.LATENT_GUIDED, 1, 0, 1.0, app.DATA,
                                            None, None)
    assert "tiny autoencoder decode" in status
    raw = torch.load(latents_pt, weights_only=True)["latents"]
    raw = raw.reshape(-1, *raw.shape[-3:])[:1]  # the first output: [1, 4, h, w]
    scale = torch.load(ckpt, weights_only=True)["config"]["training"]["latent_scale"]
    with torch.no_grad():
        decoded = AutoencoderTiny.from_pretrained(tiny_sd15_dir).eval().decode(raw * scale).sample
    expected = (decoded / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).mul(255).round().numpy()
    png = np.asarray(Image.open(gallery["value"][0][0])).astype(float)
    assert png.shape == expected.shape and np.abs(png - expected).max() <= 1
