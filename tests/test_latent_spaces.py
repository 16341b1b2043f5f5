"""Latent spaces other than SD1.5's, end to end, with tiny randomly initialised diffusers VAEs saved
to folders (diffusers' own test-sized configs): a 16-channel AutoencoderKL with a shift factor (an
SD3 / FLUX.1-style space), an AutoencoderDC (8 channels here) and an AutoencoderTiny (TAESD's
architecture) as the one VAE. Images are encoded (the data root gets latent_space.json), packed,
trained on, resumed, translated (files, grid, video), evaluated, exported with the decoder and
served by the app; every decoded picture equals decoding the raw output latents with that VAE by
hand. A root or a VAE of another space is refused, naming both numbers; a root without a manifest
trains as SD1.5 and says so once."""

import json
import os
import re

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import encode
import evaluate
import export
import metrics
import pack
import run
import sampling
import split
import train_grid
import translate
import vae as vae_module
from config import resolve_config
from conftest import decode_video, one_line_naming, tiny_run_config, write_latent_folders, write_random_alexnet
from inference import load_networks
from latents import MANIFEST_NAME, SD15, LatentSpace, read_manifest
from model import build_models
from runtime import InputError
from test_metrics import StyleGANFormStandIn, script_to
from trainer import Trainer
from vae import decode_raw, load_vae, to_uint8

DOMAINS = ["a", "b"]
IMAGES = 32  # px; both tiny VAEs halve once: 16x16 latents


def make_kl16(folder):
    """An AutoencoderKL of 16 latent channels with a shift factor, as SD3's and FLUX.1's VAEs."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=16, norm_num_groups=8, sample_size=32,
                  scaling_factor=0.75, shift_factor=0.125).save_pretrained(str(folder))
    return str(folder)


def make_dc(folder):
    """An AutoencoderDC (DC-AE) in diffusers' test size: 8 latent channels, 2x down."""
    from diffusers import AutoencoderDC

    torch.manual_seed(0)
    AutoencoderDC(in_channels=3, latent_channels=8, attention_head_dim=2,
                  encoder_block_types=("ResBlock", "EfficientViTBlock"),
                  decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
                  decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)),
                  decoder_qkv_multiscales=((), (5,)), encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
                  downsample_block_type="conv", upsample_block_type="interpolate", decoder_norm_types="rms_norm",
                  decoder_act_fns="silu", scaling_factor=0.41407).save_pretrained(str(folder))
    return str(folder)


def make_tiny(folder, channels=4):
    """An AutoencoderTiny (TAESD's architecture): 4 channels (as the one VAE) or `channels` (a
    preview decoder of another space, as TAESD3 / TAEF1 are 16), its config's factor 1.0."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                    num_decoder_blocks=(1, 1), latent_channels=channels).save_pretrained(str(folder))
    return str(folder)


MAKERS = {"kl16": make_kl16, "dc": make_dc, "tiny": make_tiny}
CLASSES = {"kl16": "AutoencoderKL", "dc": "AutoencoderDC", "tiny": "AutoencoderTiny"}
EXPECTED = {"kl16": LatentSpace(16, 0.75, 0.125, 2), "dc": LatentSpace(8, 0.41407, 0.0, 2),
            "tiny": LatentSpace(4, 1.0, 0.0, 2)}


def write_images(root, count=4):
    rng = np.random.default_rng(0)
    for d in DOMAINS:
        os.makedirs(root / d, exist_ok=True)
        for k in range(count):
            Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(root / d / f"{k:02d}.png")
    return root


def write_config(tmp, data_root, name="cfg.yaml", **training):
    cfg = tiny_run_config(tmp, data={"root": str(data_root), "domains": DOMAINS, "samples_per_epoch": 4},
                          training={"epochs": 1, "batch_size": 2, **training})
    path = tmp / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path), cfg


@pytest.fixture(scope="module", params=list(MAKERS))
def pipeline(request, tmp_path_factory):
    """(kind, vae folder, packed data root, checkpoint) after encode -> pack -> train 1 epoch -> resume to 2."""
    kind = request.param
    tmp = tmp_path_factory.mktemp(kind)
    vae_dir = MAKERS[kind](tmp / "vae")
    images = write_images(tmp / "images")
    data = tmp / "latents"
    assert encode.main(["--input", str(images), "--output", str(data), "--vae", vae_dir, "--size", str(IMAGES),
                        "--batch-size", "4", "--device", "cpu"]) == 0
    assert pack.main([str(data), str(tmp / "packed")]) == 0
    path, cfg = write_config(tmp, tmp / "packed")
    assert run.main(["--config", path]) == 0
    assert run.main(["--config", path, "training.epochs=2", "--resume"]) == 0
    return kind, vae_dir, tmp, os.path.join(cfg["training"]["checkpoint_dir"], "latest.pt")


def test_encode_records_the_vae_and_pack_copies_it(pipeline):
    kind, vae_dir, tmp, _ = pipeline
    space, record = read_manifest(tmp / "latents")
    assert space == EXPECTED[kind] == LatentSpace.from_vae(load_vae(vae_dir))
    assert record["vae_class"] == CLASSES[kind]
    assert record["image_size"] == IMAGES and len(record["vae_config_sha256"]) == 64
    assert read_manifest(tmp / "packed") == (space, record)
    assert split.main(["--input", str(tmp / "latents"), "--output", str(tmp / "split"), "--val-fraction", "0.25"]) == 0
    assert read_manifest(tmp / "split" / "train") == read_manifest(tmp / "split" / "val") == (space, record)
    latent = torch.load(tmp / "latents" / "a" / "00.pt", weights_only=True)
    assert latent.shape == (space.channels, IMAGES // 2, IMAGES // 2)


def test_training_records_the_space_in_config_and_checkpoint(pipeline):
    kind, _, tmp, ckpt = pipeline
    saved = yaml.safe_load(open(os.path.join(os.path.dirname(ckpt), "config.yaml")))
    cfg = torch.load(ckpt, weights_only=True)["config"]
    space = EXPECTED[kind]
    for c in (saved, cfg):
        assert (c["model"]["latent_channels"], c["training"]["latent_scale"], c["training"]["latent_shift"],
                c["training"]["latent_downsample"]) == (space.channels, space.scaling_factor, space.shift_factor,
                                                        space.downsample)
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2
    # the data root's manifest, whole: which VAE encoded the latents this model learned
    assert torch.load(ckpt, weights_only=True)["latent_space"] == read_manifest(tmp / "packed")[1]


def test_translate_files_grid_and_video_decode_the_raw_outputs(pipeline, tmp_path):
    kind, vae_dir, tmp, ckpt = pipeline
    vae, source = load_vae(vae_dir), tmp / "latents" / "a"
    out = tmp_path / "files"
    assert translate.main(["--checkpoint", ckpt, "--source", str(source), "--target-domain", "b", "--output",
                           str(out), "--num-styles", "2", "--vae", vae_dir, "--device", "cpu"]) == 0
    raw = torch.load(out / "00_to_b_1.pt", weights_only=True)
    space = EXPECTED[kind]
    assert raw.shape == (space.channels, 16, 16)
    # by hand: G sees (raw - shift) * scale, its output goes back as out / scale + shift (style 1: z row 1, seed 0)
    cfg, nets = load_networks(ckpt, "cpu")
    x = torch.load(source / "00.pt", weights_only=True)[None]
    z = torch.randn(2, cfg["model"]["latent_dim"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        s = nets["mapping_network"](z, torch.full((2,), 1))[1:]
        expected = nets["generator"]((x - space.shift_factor) * space.scaling_factor, s) / space.scaling_factor \
            + space.shift_factor
    torch.testing.assert_close(raw, expected[0], rtol=1e-4, atol=1e-4)
    png = np.asarray(Image.open(out / "00_to_b_1.png"))
    assert np.abs(png.astype(int) - to_uint8(decode_raw(vae, raw[None]))[0]).max() <= 1
    assert translate.main(["--checkpoint", ckpt, "--source", str(source), "--reference", str(tmp / "latents" / "b"),
                           "--target-domain", "b", "--grid", "--output", str(tmp_path / "grid"), "--vae", vae_dir,
                           "--device", "cpu"]) == 0
    assert Image.open(tmp_path / "grid" / "grid.png").size[0] >= 5 * IMAGES
    video = tmp_path / "v.gif"
    assert translate.main(["--checkpoint", ckpt, "--source", str(source / "00.pt"), "--target-domain", "b",
                           "--num-styles", "2", "--video", "latent", str(video), "--vae", vae_dir, "--device", "cpu",
                           "--frames-per-transition", "2"]) == 0
    assert decode_video(str(video), fps=15).shape[-1] == 3


def test_evaluate_and_export_with_the_decoder(pipeline, tmp_path, monkeypatch):
    kind, vae_dir, tmp, ckpt = pipeline
    monkeypatch.setattr(metrics, "INCEPTION_DIM", 16)
    torch.manual_seed(0)
    inception = script_to(tmp_path / "inception-2015-12-05.pt", StyleGANFormStandIn(dim=16))
    write_random_alexnet(tmp_path / metrics.ALEXNET_FILE)
    decodes, features = [], metrics.latent_features

    def spy(latents, decode, *args, **kwargs):  # the evaluator's decode, reals' and fakes' alike
        decodes.append((latents[:2].clone(), decode))
        return features(latents, decode, *args, **kwargs)

    monkeypatch.setattr(metrics, "latent_features", spy)
    assert evaluate.main(["--checkpoint", ckpt, "--vae", vae_dir, "--out", str(tmp_path / "eval"), "--num-outs", "2",
                          "--max-sources", "2", "--device", "cpu", "--batch-size", "8", "--data-root",
                          str(tmp / "latents"), "--inception-weights", inception, "--lpips-weights",
                          str(tmp_path / metrics.ALEXNET_FILE)]) == 0
    results = json.load(open(tmp_path / "eval" / "metrics.json"))
    assert "FID_latent/mean" in json.dumps(results) and decodes
    vae = load_vae(vae_dir)
    for raw, decode in decodes:  # Inception sees diffusers' decode of the raw latents
        torch.testing.assert_close(decode(raw).float(), decode_by_hand(vae, raw, EXPECTED[kind]), rtol=0, atol=1e-5)
    out = tmp_path / "export"
    assert export.main(["--checkpoint", ckpt, "--output", str(out), "--format", "pt2", "--with-decoder",
                        "--vae", vae_dir, "--verify"]) == 0
    assert torch.export.load(str(out / "latent_guided.pt2")) is not None
    # the exported decoder takes raw latents: its pictures are diffusers' decode of them by hand
    from exporting import pt2_runner

    decoder, meta = pt2_runner(str(out / "decoder.pt2"))
    raw = torch.load(tmp / "latents" / "a" / "00.pt", weights_only=True)[None]
    torch.testing.assert_close(decoder(raw), decode_by_hand(load_vae(vae_dir), raw, EXPECTED[kind]), rtol=0,
                               atol=1e-4)


def test_app_serves_the_space(pipeline, tmp_path):
    import app

    kind, vae_dir, tmp, ckpt = pipeline
    translator = app.Translator(ckpt, vae=vae_dir, device="cpu", log=lambda line: None)
    assert translator.space == EXPECTED[kind] and translator.image_size == IMAGES
    assert f"↔ {EXPECTED[kind].channels}x16x16 latents" in app.header_markdown(translator)
    handle = app.make_handler(translator, str(tmp_path / "outputs"), upload_root=str(tmp_path))
    photo = tmp_path / "photo.png"
    photo.write_bytes((tmp / "images" / "a" / "00.png").read_bytes())
    gallery, latents_pt, _, _ = handle(app.UPLOAD, str(photo), None, "b", app.LATENT_GUIDED, 1, 0, 1.0, app.DATA, None,
                                       None)
    raw = torch.load(latents_pt, weights_only=True)["latents"]
    assert raw.shape[-3] == EXPECTED[kind].channels
    png = np.asarray(Image.open(gallery["value"][0][0]))
    decoded = to_uint8(decode_raw(load_vae(vae_dir), raw.reshape(1, *raw.shape[-3:])))[0]
    assert np.abs(png.astype(int) - decoded).max() <= 1


def test_another_space_is_refused_naming_both_numbers(pipeline, tmp_path, tiny_vae_dir, capsys):
    kind, vae_dir, tmp, ckpt = pipeline
    space = EXPECTED[kind]
    path, _ = write_config(tmp_path, tmp / "packed", latent_scale=0.18215)
    assert run.main(["--config", path]) == 2
    manifest = str(tmp / "packed" / MANIFEST_NAME)
    one_line_naming(capsys.readouterr().err, manifest, f"scaling_factor: config 0.18215 vs {manifest} "
                                                       f"{space.scaling_factor:g}")
    # tools: a VAE of another space (the 4-channel SD1.5-style tiny VAE)
    assert translate.main(["--checkpoint", ckpt, "--source", str(tmp / "latents" / "a"), "--target-domain", "b",
                           "--output", str(tmp_path / "o"), "--num-styles", "1", "--vae", tiny_vae_dir,
                           "--device", "cpu"]) == 2
    other = LatentSpace.from_vae(load_vae(tiny_vae_dir))
    first = other.differences(space, f"VAE {tiny_vae_dir!r}", "checkpoint")[0]  # "key: VAE ... a vs checkpoint b"
    one_line_naming(capsys.readouterr().err, tiny_vae_dir, first)
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path / "e"), "--format", "pt2", "--with-decoder",
                        "--vae", tiny_vae_dir]) == 2
    one_line_naming(capsys.readouterr().err, tiny_vae_dir, first)
    # evaluate.py: before the data is read (a --data-root that does not exist is not reached)
    assert evaluate.main(["--checkpoint", ckpt, "--vae", tiny_vae_dir, "--out", str(tmp_path / "eval"), "--device",
                          "cpu", "--data-root", str(tmp_path / "missing")]) == 2
    one_line_naming(capsys.readouterr().err, tiny_vae_dir, first)
    assert not os.path.exists(tmp_path / "eval" / "metrics.json")
    import app

    with pytest.raises(InputError, match=re.escape(first)):
        app.Translator(ckpt, vae=tiny_vae_dir, device="cpu", log=lambda line: None)
    # encoding another VAE's latents into the same root
    assert encode.main(["--input", str(tmp / "images"), "--output", str(tmp / "latents"), "--vae", tiny_vae_dir,
                        "--size", str(IMAGES), "--device", "cpu"]) == 2
    assert "encode into another data root" in capsys.readouterr().err


def test_sd15_data_without_a_manifest_trains_and_says_so_once(tmp_path, capsys):
    data = write_latent_folders(tmp_path / "data", domains=DOMAINS, files=4)
    path, cfg = write_config(tmp_path, data)
    assert run.main(["--config", path]) == 0
    out = capsys.readouterr().out
    assert out.count(f"has no {MANIFEST_NAME}") == 1 and "SD1.5's is assumed" in out
    saved = torch.load(os.path.join(cfg["training"]["checkpoint_dir"], "latest.pt"), weights_only=True)["config"]
    assert (saved["model"]["latent_channels"], saved["training"]["latent_scale"]) == (4, SD15.scaling_factor)


@pytest.mark.parametrize("record, key", [
    ({"version": 1, "channels": 0, "scaling_factor": 1.0, "shift_factor": 0.0, "downsample": 8}, "channels"),
    ({"version": 1, "channels": 4, "scaling_factor": -1.0, "shift_factor": 0.0, "downsample": 8}, "scaling_factor"),
    ({"version": 1, "channels": 4, "scaling_factor": 1.0, "shift_factor": "x", "downsample": 8}, "shift_factor"),
    ({"version": 1, "channels": 4, "scaling_factor": 1.0, "shift_factor": 0.0}, "downsample"),
    ({"version": 1, "channels": 4, "scaling_factor": 1.0, "shift_factor": 0.0, "downsample": 8, "extra": 1}, "extra"),
    ([1, 2], None),
])
def test_a_bad_manifest_is_one_line_naming_file_and_key(tmp_path, capsys, record, key):
    data = write_latent_folders(tmp_path / "data", domains=DOMAINS, files=4)
    (tmp_path / "data" / MANIFEST_NAME).write_text(json.dumps(record))
    path, _ = write_config(tmp_path, data)
    assert run.main(["--config", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    line = [x for x in err if MANIFEST_NAME in x]
    assert line and (key is None or repr(key) in line[0])


def test_from_vae_reads_the_diffusers_configs(tmp_path, tiny_vae_dir):
    assert LatentSpace.from_vae(load_vae(tiny_vae_dir)) == LatentSpace(4, 0.18215, 0.0, 2)
    assert LatentSpace.from_vae(load_vae(make_kl16(tmp_path / "kl"))) == EXPECTED["kl16"]
    z = torch.randn(2, 16, 4, 4)
    torch.testing.assert_close(EXPECTED["kl16"].normalize(EXPECTED["kl16"].denormalize(z)), z)
    raw = torch.randn(2, 4, 4, 4) * 5
    assert torch.equal(SD15.normalize(raw), raw * 0.18215) and torch.equal(SD15.denormalize(raw), raw / 0.18215)


def test_resume_refuses_another_space_and_old_checkpoints_are_sd15(tmp_path):
    from config import latent_space, resolve_config
    from runtime import InputError

    old = resolve_config(tiny_run_config(tmp_path, training={"latent_scale": 0.18215}))  # keys of today absent: null
    assert latent_space(old) == SD15
    new = resolve_config(tiny_run_config(tmp_path, model={"latent_channels": 4},
                                         training={"latent_scale": 1.5305, "latent_shift": 0.0609}))
    run.check_architecture(old, resolve_config(tiny_run_config(tmp_path, model={"latent_channels": 4})), "x.pt")
    with pytest.raises(InputError, match=r"scaling_factor: checkpoint 0.18215 vs config 1.5305; shift_factor: "
                                         r"checkpoint 0 vs config 0.0609"):
        run.check_architecture(old, new, "x.pt")


def test_a_data_root_of_another_space_is_refused_by_every_tool(pipeline, tmp_path, capsys):
    """Latents whose root's manifest names another scaling factor (same shape: only the manifest
    can tell) are refused by translate.py, evaluate.py and the app, naming both numbers."""
    import shutil

    import app

    kind, vae_dir, tmp, ckpt = pipeline
    other = tmp_path / "other"
    shutil.copytree(tmp / "latents", other)
    record = json.loads((other / MANIFEST_NAME).read_text())
    record["scaling_factor"] = 2 * record["scaling_factor"]
    (other / MANIFEST_NAME).write_text(json.dumps(record))
    manifest, factor = str(other / MANIFEST_NAME), EXPECTED[kind].scaling_factor
    expected = f"scaling_factor: data ({manifest}) {2 * factor:g} vs checkpoint {factor:g}"
    assert translate.main(["--checkpoint", ckpt, "--source", str(other / "a"), "--target-domain", "b", "--output",
                           str(tmp_path / "o"), "--num-styles", "1", "--device", "cpu"]) == 2
    one_line_naming(capsys.readouterr().err, manifest, expected)
    assert not os.path.exists(tmp_path / "o")
    assert evaluate.main(["--checkpoint", ckpt, "--vae", vae_dir, "--out", str(tmp_path / "eval"), "--device", "cpu",
                          "--data-root", str(other)]) == 2
    one_line_naming(capsys.readouterr().err, manifest, expected)
    state = torch.load(ckpt, weights_only=True)
    state["config"]["data"]["root"] = str(other)
    torch.save(state, tmp_path / "moved.pt")
    with pytest.raises(InputError, match=re.escape(expected)):
        app.Translator(str(tmp_path / "moved.pt"), vae=vae_dir, device="cpu", log=lambda line: None)


def decode_by_hand(vae, raw, space):
    """Pictures of raw latents straight from diffusers: decode(raw) for a full VAE; an AutoencoderTiny
    decodes the normalised latents (over its config's own factor); [-1, 1] -> [0, 1]."""
    z = raw.float()
    if type(vae).__name__ == "AutoencoderTiny":
        z = (z - space.shift_factor) * space.scaling_factor / vae.config.scaling_factor
    with torch.no_grad():
        return (vae.decode(z).sample / 2 + 0.5).clamp(0, 1)


def spy_pictures(monkeypatch):
    """Every to_rgb call of translate.py (files, grid), the video frames and the training grid:
    [(where, raw, vae, space, rgb)]."""
    calls = []

    def spy(where):
        def to_rgb(raw, vae, space, *args, **kwargs):
            rgb = vae_module.to_rgb(raw, vae, space, *args, **kwargs)
            calls.append((where, raw.clone(), vae, space, rgb))
            return rgb
        return to_rgb

    for module in (translate, sampling, train_grid):
        monkeypatch.setattr(module, "to_rgb", spy(module.__name__))
    return calls


def test_grids_videos_and_training_grids_decode_the_raw_latents(pipeline, tmp_path, monkeypatch):
    """translate.py's grid (sampling.py's; its sources are the files themselves), files and video,
    and the training grid with visualization.vae_path: every picture is decode_by_hand of the raw
    latents it shows."""
    kind, vae_dir, tmp, ckpt = pipeline
    space, source = EXPECTED[kind], tmp / "latents" / "a"
    calls = spy_pictures(monkeypatch)
    assert translate.main(["--checkpoint", ckpt, "--source", str(source), "--reference", str(tmp / "latents" / "b"),
                           "--target-domain", "b", "--grid", "--output", str(tmp_path / "grid"), "--vae", vae_dir,
                           "--device", "cpu"]) == 0
    files = sorted(os.listdir(source))
    sources = torch.stack([torch.load(source / f, weights_only=True) for f in files if f.endswith(".pt")])
    assert any(c[1].shape == sources.shape and torch.equal(c[1], sources) for c in calls)  # the source column
    assert translate.main(["--checkpoint", ckpt, "--source", str(source), "--target-domain", "b", "--output",
                           str(tmp_path / "files"), "--num-styles", "1", "--vae", vae_dir, "--device", "cpu"]) == 0
    assert translate.main(["--checkpoint", ckpt, "--source", str(source / "00.pt"), "--target-domain", "b",
                           "--num-styles", "2", "--video", "latent", str(tmp_path / "v.gif"), "--vae", vae_dir,
                           "--device", "cpu", "--frames-per-transition", "2"]) == 0
    path, cfg = write_config(tmp_path, tmp / "packed", name="grid.yaml")
    cfg["visualization"]["vae_path"] = vae_dir
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(cfg))
    assert run.main(["--config", path]) == 0
    assert os.path.isfile(os.path.join(cfg["training"]["checkpoint_dir"], "vis", "epoch_0001.png"))
    assert {c[0] for c in calls} == {"translate", "sampling", "train_grid"}
    for where, raw, vae, used_space, rgb in calls:
        assert vae is not None and used_space == space, where
        torch.testing.assert_close(rgb, decode_by_hand(vae, raw, space), rtol=0, atol=1e-5, msg=where)


def test_a_tiny_preview_decoder_draws_the_training_grid(pipeline, tmp_path, monkeypatch, capsys):
    """visualization.preview_vae: an AutoencoderTiny of the space's width draws the training grid from
    the normalised latents; one of another width is refused before the run claims its folder, as is
    a visualization.vae_path of another space."""
    kind, vae_dir, tmp, ckpt = pipeline
    space = EXPECTED[kind]
    tiny = make_tiny(tmp_path / "taesd", channels=space.channels)
    path, cfg = write_config(tmp_path, tmp / "packed", name="tiny.yaml")
    cfg["visualization"]["preview_vae"] = tiny
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    calls = spy_pictures(monkeypatch)
    assert run.main(["--config", path]) == 0
    (where, raw, vae, _, rgb), = calls
    assert where == "train_grid" and type(vae).__name__ == "AutoencoderTiny"
    torch.testing.assert_close(rgb, decode_by_hand(vae, raw, space), rtol=0, atol=1e-5)
    capsys.readouterr()
    wrong = make_tiny(tmp_path / "taesd-wide", channels=space.channels + 4)
    for key, value, what in (("preview_vae", wrong, "channels: visualization.preview_vae"),
                             ("vae_path", make_tiny(tmp_path / "taesd-other", channels=space.channels + 4),
                              "channels: visualization.vae_path")):
        cfg["visualization"].update({"preview_vae": None, "vae_path": None, key: value})
        cfg["training"]["checkpoint_dir"] = str(tmp_path / f"refused-{key}")
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
        assert run.main(["--config", str(tmp_path / "bad.yaml")]) == 2
        one_line_naming(capsys.readouterr().err, value, what)
        assert not os.path.exists(tmp_path / f"refused-{key}")


def test_a_root_without_a_manifest_needs_every_number_of_another_space(tmp_path, capsys):
    """No latent_space.json and a config of another space than SD1.5's with a factor left null (the
    DC-AE presets leave latent_scale to the manifest): SD1.5's 0.18215 would be wrong, so the run
    is refused naming the keys; with every number set it trains."""
    data = write_latent_folders(tmp_path / "data", domains=DOMAINS, files=4)
    path, cfg = write_config(tmp_path, data)
    cfg["model"]["latent_channels"] = 4
    cfg["training"].update(latent_downsample=32, latent_scale=None, latent_shift=0.0)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert run.main(["--config", path]) == 2
    line = one_line_naming(capsys.readouterr().err, os.path.join(data, MANIFEST_NAME), "training.latent_scale")
    assert "training.latent_downsample 32" in line and not os.path.exists(cfg["training"]["checkpoint_dir"])
    assert run.main(["--config", path, "training.latent_scale=0.3189"]) == 0
    assert "(the config's latent keys)" in capsys.readouterr().out


def test_the_trainer_feeds_the_networks_shifted_and_scaled_latents(tmp_path):
    """The step's inputs are (raw - shift) * scale, per channel count and factors of the config."""
    cfg = resolve_config(tiny_run_config(tmp_path, model={"latent_channels": 16},
                                         training={"latent_scale": 0.75, "latent_shift": 0.125}))
    trainer = Trainer(cfg, build_models(num_domains=3, **cfg["model"]), "cpu", log=lambda *a, **k: None)
    g = torch.Generator().manual_seed(0)
    raw = {k: torch.randn(2, 16, 8, 8, generator=g) * 3 for k in ("content", "target_style", "target_style_2")}
    batch = trainer.prepare_batch({**raw, "source_style_id": torch.tensor([0, 1]), "target_style_id": torch.tensor([1, 2])})
    for key, name in (("x", "content"), ("x_ref", "target_style"), ("x_ref2", "target_style_2")):
        torch.testing.assert_close(batch[key], (raw[name] - 0.125) * 0.75, rtol=0, atol=0)
    out = trainer.train_step({**raw, "source_style_id": torch.tensor([0, 1]), "target_style_id": torch.tensor([1, 2])})
    assert torch.isfinite(torch.stack([v for k, v in out.items() if k != "w_ds"])).all()
