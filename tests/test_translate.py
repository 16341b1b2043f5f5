"""translate.py end to end on the CPU: a checkpoint from a 1-epoch tiny run, latent- and
reference-guided outputs checked against an independent G(x * scale, s) / scale, errors, and the tiny
AutoencoderKL (downsampling factor 2) for PNG decodes and image sources."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from translate import main
from vae import decode_raw, encode_raw, latent_preview, load_image, load_vae, to_model_input, to_uint8

LATENT = 16  # write_latent_folders' latent size
DOMAINS = ["a", "b", "c"]




def translate(ckpt, source, out, *extra, domain="c"):
    return main(["--checkpoint", ckpt, "--source", str(source), "--target-domain", domain, "--output", str(out),
                 "--device", "cpu", *map(str, extra)])


def outputs(out, stem, k, domain="c"):
    return torch.load(os.path.join(out, f"{stem}_to_{domain}_{k}.pt"), weights_only=True)


def listing(out, suffix):
    return sorted(f for f in os.listdir(out) if f.endswith(suffix))


def test_latent_guided_counts_shapes_and_independent_computation(trained, ema_nets, tmp_path):
    ckpt, data = trained
    cfg, nets = ema_nets
    source, out = os.path.join(data, "a"), tmp_path / "out"
    assert translate(ckpt, source, out, "--num-styles", 3, "--seed", 7, "--batch-size", 4) == 0
    stems = sorted(os.path.splitext(f)[0] for f in os.listdir(source))
    assert listing(out, ".pt") == sorted(f"{s}_to_c_{k}.pt" for s in stems for k in range(3))
    assert listing(out, ".png") == sorted([f"{s}_to_c_{k}.png" for s in stems for k in range(3)] + ["sheet.png"])
    # independent: style k = F(z_k, c) with z from the documented generator, same for every source
    scale = cfg["training"]["latent_scale"]
    z = torch.randn(3, cfg["model"]["latent_dim"], generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        s = nets["mapping_network"](z, torch.full((3,), 2))  # [3, S]
        for stem in stems:
            x = torch.load(os.path.join(source, f"{stem}.pt"), weights_only=True)[None]  # [1, 4, h, w] raw
            expected = nets["generator"](x.expand(3, -1, -1, -1) * scale, s) / scale  # [3, 4, h, w]
            for k in range(3):
                written = outputs(out, stem, k)
                assert written.dtype == torch.float32 and written.shape == (4, LATENT, LATENT)
                torch.testing.assert_close(written, expected[k], rtol=1e-4, atol=1e-4)
    # no VAE anywhere: linear preview PNGs of the scaled latent (8x upscale), sheet of 6 rows x (1 + 3) columns
    png = np.asarray(Image.open(out / f"{stems[0]}_to_c_1.png"))
    assert png.shape == (LATENT * 8, LATENT * 8, 3)
    assert np.abs(png.astype(int) - to_uint8(latent_preview(outputs(out, stems[0], 1)[None] * scale))[0]).max() <= 1
    sheet = Image.open(out / "sheet.png")
    assert sheet.size[0] >= 4 * LATENT * 8 and sheet.size[1] >= 6 * LATENT * 8


def test_styles_differ_and_seed_reproduces(trained, tmp_path):
    ckpt, data = trained
    source = os.path.join(data, "a", "000.pt")
    for name, seed in (("one", 0), ("two", 0), ("three", 1)):
        assert translate(ckpt, source, tmp_path / name, "--num-styles", 2, "--seed", seed) == 0
    one = [outputs(tmp_path / "one", "000", k) for k in range(2)]
    assert (one[0] - one[1]).abs().mean() > 1e-2  # different styles, different outputs
    for k in range(2):
        assert torch.equal(one[k], outputs(tmp_path / "two", "000", k))  # same seed, same outputs
    assert (one[0] - outputs(tmp_path / "three", "000", 0)).abs().mean() > 1e-2  # another seed, another style


def test_psi_zero_collapses_to_the_mean_style(trained, ema_nets, tmp_path):
    ckpt, data = trained
    cfg, nets = ema_nets
    source = os.path.join(data, "a", "000.pt")
    assert translate(ckpt, source, tmp_path / "psi0", "--num-styles", 3, "--psi", 0) == 0
    assert translate(ckpt, source, tmp_path / "psi1", "--num-styles", 3, "--psi", 1) == 0
    psi0 = [outputs(tmp_path / "psi0", "000", k) for k in range(3)]
    for k in (1, 2):
        torch.testing.assert_close(psi0[k], psi0[0], rtol=0, atol=1e-6)
    # and that single output is G with the domain's mean style
    scale = cfg["training"]["latent_scale"]
    with torch.no_grad():
        z = torch.randn(10000, cfg["model"]["latent_dim"], generator=torch.Generator().manual_seed(0))
        s_mean = nets["mapping_network"](z, torch.full((10000,), 2)).mean(0, keepdim=True)
        x = torch.load(source, weights_only=True)[None] * scale
        torch.testing.assert_close(psi0[0], (nets["generator"](x, s_mean) / scale)[0], rtol=1e-4, atol=1e-4)
    assert (psi0[0] - outputs(tmp_path / "psi1", "000", 0)).abs().mean() > 1e-3


def test_reference_folder_gives_every_source_one_output_per_reference(trained, ema_nets, tmp_path):
    """The documented rule: N sources x M references -> N*M outputs, `_k` = the k-th reference by name."""
    ckpt, data = trained
    cfg, nets = ema_nets
    sources, refs = tmp_path / "sources", tmp_path / "refs"
    os.makedirs(sources)
    os.makedirs(refs)
    latents = {f"s{i}": torch.load(os.path.join(data, "a", f"00{i}.pt"), weights_only=True) for i in range(3)}
    for stem, x in latents.items():
        torch.save(x, sources / f"{stem}.pt")
    ref_files = {"r_late": os.path.join(data, "c", "004.pt"), "r_early": os.path.join(data, "b", "001.pt")}
    for stem, path in ref_files.items():
        np.save(refs / f"{stem}.npy", torch.load(path, weights_only=True).numpy())  # .npy references too
    out = tmp_path / "out"
    assert translate(ckpt, sources, out, "--reference", refs, "--batch-size", 4) == 0
    assert listing(out, ".pt") == sorted(f"s{i}_to_c_{k}.pt" for i in range(3) for k in range(2))
    scale = cfg["training"]["latent_scale"]
    ordered = [torch.load(ref_files[name], weights_only=True) for name in ("r_early", "r_late")]  # name order
    with torch.no_grad():
        s_ref = nets["style_encoder"](torch.stack(ordered) * scale, torch.full((2,), 2))  # [2, S]
        for stem, x in latents.items():
            for k in range(2):
                expected = nets["generator"](x[None] * scale, s_ref[k:k + 1])[0] / scale
                torch.testing.assert_close(outputs(out, stem, k), expected, rtol=1e-4, atol=1e-4)
    assert (outputs(out, "s0", 0) - outputs(out, "s0", 1)).abs().mean() > 1e-2
    assert os.path.isfile(out / "sheet.png")


def test_unknown_domain_lists_the_checkpoints_domains(trained, tmp_path, capsys):
    ckpt, data = trained
    assert translate(ckpt, os.path.join(data, "a"), tmp_path / "out", "--num-styles", 1, domain="zebra") == 2
    err = capsys.readouterr().err
    assert "'zebra'" in err and "a, b, c" in err
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("content", ["tensor", "dict", "garbage"])
def test_a_file_that_is_not_a_checkpoint_is_an_error(trained, tmp_path, capsys, content):
    _, data = trained
    fake = tmp_path / "fake.pt"
    if content == "tensor":
        torch.save(torch.zeros(3), fake)
    elif content == "dict":
        torch.save({"generator": torch.zeros(3)}, fake)
    else:
        fake.write_bytes(b"\x00 not a checkpoint at all \xff" * 10)
    assert translate(str(fake), os.path.join(data, "a"), tmp_path / "out", "--num-styles", 1) == 2
    assert "not a Latent StarGAN v2 checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("mode", [[], ["--num-styles", 2, "--reference", "x"], ["--reference", "x", "--psi", 0.5]])
def test_style_mode_arguments(trained, tmp_path, capsys, mode):
    ckpt, data = trained
    assert translate(ckpt, os.path.join(data, "a"), tmp_path / "out", *mode) == 2
    assert "--reference" in capsys.readouterr().err


def test_missing_source_and_wrong_shape_are_errors(trained, tmp_path, capsys):
    ckpt, _ = trained
    assert translate(ckpt, tmp_path / "nowhere", tmp_path / "out", "--num-styles", 1) == 2
    assert "nowhere" in capsys.readouterr().err
    bad = tmp_path / "three_channels.pt"
    torch.save(torch.zeros(3, LATENT, LATENT), bad)
    assert translate(ckpt, bad, tmp_path / "out", "--num-styles", 1) == 2
    err = capsys.readouterr().err
    assert "three_channels.pt" in err and "[3, 16, 16]" in err
    assert not os.path.exists(tmp_path / "out")


def test_tiny_vae_decodes_pngs_and_encodes_image_sources(trained, ema_nets, tiny_vae_dir, tmp_path, capsys):
    ckpt, data = trained
    cfg, nets = ema_nets
    sources = tmp_path / "sources"
    os.makedirs(sources)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 44, 3), dtype=np.uint8)).save(sources / "wide.png")
    Image.fromarray(rng.integers(0, 256, (41, 25, 3), dtype=np.uint8)).save(sources / "tall.jpg")
    torch.save(torch.load(os.path.join(data, "b", "000.pt"), weights_only=True), sources / "latent.pt")
    out = tmp_path / "out"
    assert translate(ckpt, sources, out, "--num-styles", 2, "--vae", tiny_vae_dir) == 0
    assert "latent preview" not in capsys.readouterr().err
    assert len(listing(out, ".pt")) == 6 and len(listing(out, ".png")) == 7
    vae = load_vae(tiny_vae_dir)
    for name in listing(out, ".png"):
        if name != "sheet.png":  # VAE decodes of the raw output: latent size x the tiny VAE's factor 2
            png = np.asarray(Image.open(out / name))
            assert png.shape == (LATENT * 2, LATENT * 2, 3)
            decoded = to_uint8(decode_raw(vae, outputs(out, name[:-len("_to_c_0.png")], name[-5])[None]))[0]
            assert np.abs(png.astype(int) - decoded).max() <= 1
    # images: centre crop, resized to 32 px (latent 16, the training size), posterior mode
    scale = cfg["training"]["latent_scale"]
    z = torch.randn(2, cfg["model"]["latent_dim"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        s = nets["mapping_network"](z, torch.full((2,), 2))
        for stem, ext in (("wide", "png"), ("tall", "jpg")):
            x = encode_raw(vae, to_model_input([load_image(str(sources / f"{stem}.{ext}"), LATENT * 2)]))
            expected = nets["generator"](x.expand(2, -1, -1, -1) * scale, s) / scale
            for k in range(2):
                torch.testing.assert_close(outputs(out, stem, k), expected[k], rtol=1e-4, atol=1e-4)


def test_image_sources_without_a_vae_are_an_error(trained, tmp_path, capsys):
    ckpt, _ = trained
    image = tmp_path / "photo.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    assert translate(ckpt, image, tmp_path / "out", "--num-styles", 1) == 2
    assert "need a VAE" in capsys.readouterr().err


def test_image_size_comes_from_the_checkpoint_alone(trained, tiny_vae_dir, tmp_path):
    """With data.root gone (another machine), images are still sized by the checkpoint's latent_shape."""
    ckpt, _ = trained
    state = torch.load(ckpt, weights_only=True)
    assert state["latent_shape"] == [4, LATENT, LATENT]
    state["config"]["data"]["root"] = str(tmp_path / "moved_away")
    moved = tmp_path / "moved.pt"
    torch.save(state, moved)
    sources = tmp_path / "sources"
    os.makedirs(sources)
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(sources / "x.png")
    out = tmp_path / "out"
    assert translate(str(moved), sources, out, "--num-styles", 1, "--vae", tiny_vae_dir) == 0
    assert outputs(out, "x", 0).shape == (4, LATENT, LATENT)


def test_outputs_of_an_earlier_run_are_kept_with_a_warning(trained, tmp_path, capsys):
    ckpt, data = trained
    out = tmp_path / "out"
    source = os.path.join(data, "a", "000.pt")
    assert translate(ckpt, source, out, "--num-styles", 3) == 0
    capsys.readouterr()
    assert translate(ckpt, source, out, "--num-styles", 1) == 0
    assert "already holds 2 output latent(s)" in capsys.readouterr().err
    assert len(listing(out, ".pt")) == 3
