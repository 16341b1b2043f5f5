"""app.py on the CPU: the request handler over a 1-epoch tiny checkpoint and the tiny random VAE
(image in, images out, checked against an independent G / F / E / VAE computation; reference-guided;
every domain at once; bad uploads -> a message), the page without a VAE, the CLI's errors, the real
server on 127.0.0.1 through gradio_client (the page's own API), and headless Chromium pressing the
button.

The browser test saves its screenshot to docs/app.png (shown in docs/app.md) when UPDATE_SCREENSHOT=1 or when
that file is missing, else to the test's temporary folder, so a CI run leaves the tree clean.
"""

import errno
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

import app
from conftest import ROOT, decode_video, write_latent_folders
from vae import decode_raw, encode_raw, load_image, load_vae, to_model_input, to_uint8

gr = app.gr
LATENT = 16  # write_latent_folders' latent size
IMAGE = 32  # the tiny VAE's factor 2 x LATENT: the size uploads are encoded at
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # root, no display, closed network
SCREENSHOT = os.path.join(ROOT, "docs", "app.png")


@pytest.fixture(scope="module")
def translator(trained, tiny_vae_dir):
    return app.Translator(trained[0], vae=tiny_vae_dir, device="cpu", log=print)


@pytest.fixture
def handle(translator, tmp_path):
    return app.make_handler(translator, str(tmp_path / "outputs"), upload_root=str(tmp_path))  # uploads land here


@pytest.fixture(scope="module")
def nets(ema_nets):
    """G, F, E rebuilt independently of app.py, with the checkpoint's EMA weights."""
    return ema_nets


def save_photo(path, size=(44, 30), mode="RGB", seed=0):
    """A random non-square picture (the app must centre-crop it)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA")
    (image.convert("RGB") if mode == "P" else image).convert(mode).save(path)
    return str(path)


def request(handle, **kw):
    """Call the page's handler with the page's defaults, overridden by keyword."""
    args = dict(source_mode=app.UPLOAD, source_image=None, source_latent=None, target="c",
                style_mode=app.LATENT_GUIDED, num_styles=1, seed=0, psi=1.0, reference_mode=app.DATA,
                reference_image=None, reference_latent=None)
    args.update(kw)
    gallery, latents_pt, source_png, status = handle(*args.values())
    return gallery, torch.load(latents_pt, weights_only=True), source_png, status


def expected_image_latent(vae_dir, path):
    """The source as encode.py would write it: centre crop, resize to IMAGE, posterior mode."""
    return encode_raw(load_vae(vae_dir), to_model_input([load_image(path, IMAGE)]))  # [1, 4, 16, 16]


# ---------------------------------------------------------------------- the request handler

def test_image_in_images_out(handle, translator, nets, tiny_vae_dir, tmp_path, monkeypatch):
    cfg, models = nets
    photo = save_photo(tmp_path / "holiday photo.png")
    for loader in ("load_networks", "open_vae_for"):  # a reload per request would fail here
        monkeypatch.setattr(app, loader, None)
    gallery, saved, source_png, status = request(handle, source_image=photo, target="b", num_styles=3, seed=7)

    paths, captions = zip(*gallery["value"])
    assert [os.path.basename(p) for p in paths] == [f"holiday_photo_to_b_{k}.png" for k in range(3)]
    assert captions == ("b · style 0", "b · style 1", "b · style 2") and gallery["columns"] == 3
    latents = saved["latents"]
    assert latents.shape == (3, 4, LATENT, LATENT) and latents.dtype == torch.float32
    assert saved["names"] == [f"holiday_photo_to_b_{k}" for k in range(3)]
    # independent: G(encode(photo) * scale, F(z_k, b)) / scale, z from the documented generator
    scale = cfg["training"]["latent_scale"]
    x = expected_image_latent(tiny_vae_dir, photo)
    z = torch.randn(3, cfg["model"]["latent_dim"], generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        s = models["mapping_network"](z, torch.full((3,), 1))  # [3, S]
        expected = models["generator"](x.expand(3, -1, -1, -1) * scale, s) / scale  # [3, 4, h, w]
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-4)
    assert (latents[0] - latents[1]).abs().mean() > 1e-3  # the styles differ
    # each PNG is the VAE decode of its latent
    decoded = to_uint8(decode_raw(translator.vae, latents))  # [3, 32, 32, 3]
    for path, pixels in zip(paths, decoded):
        png = Image.open(path)
        assert png.format == "PNG" and png.mode == "RGB" and png.size == (IMAGE, IMAGE)
        assert np.abs(np.asarray(png).astype(int) - pixels.astype(int)).max() <= 1
    assert Image.open(source_png).size == (IMAGE, IMAGE)
    assert status.startswith("3 output(s) on cpu in ") and "ms per image" in status and "VAE decode" in status
    assert "source 44x30" in status and "seed 7, psi 1" in status


def test_reference_guided_from_the_data(handle, trained, nets):
    cfg, models = nets
    _, data = trained
    ref = "b/001.pt"
    gallery, saved, _, status = request(handle, source_mode=app.DATA, source_latent="a/000.pt", target="c",
                                        style_mode=app.REFERENCE_GUIDED, reference_mode=app.DATA, reference_latent=ref)
    assert [c for _, c in gallery["value"]] == ["c · reference"]
    assert saved["names"] == ["a_000_to_c_ref"]
    scale = cfg["training"]["latent_scale"]
    x = torch.load(os.path.join(data, "a", "000.pt"), weights_only=True)[None]
    r = torch.load(os.path.join(data, "b", "001.pt"), weights_only=True)[None]
    with torch.no_grad():
        s_ref = models["style_encoder"](r * scale, torch.full((1,), 2))
        expected = models["generator"](x * scale, s_ref) / scale
    torch.testing.assert_close(saved["latents"], expected, rtol=1e-4, atol=1e-4)
    assert "reference `b/001.pt`" in status


def test_reference_image_with_every_domain_gives_one_row(handle, nets, tiny_vae_dir, tmp_path):
    cfg, models = nets
    photo, ref = save_photo(tmp_path / "p.png"), save_photo(tmp_path / "r.jpg", (40, 52), seed=1)
    gallery, saved, _, _ = request(handle, source_image=photo, target=app.ALL_DOMAINS,
                                   style_mode=app.REFERENCE_GUIDED, reference_mode=app.UPLOAD, reference_image=ref)
    assert [c for _, c in gallery["value"]] == ["a · reference", "b · reference", "c · reference"]
    assert gallery["columns"] == 3
    scale = cfg["training"]["latent_scale"]
    x, r = expected_image_latent(tiny_vae_dir, photo), expected_image_latent(tiny_vae_dir, ref)
    with torch.no_grad():
        s_ref = models["style_encoder"](r.expand(3, -1, -1, -1) * scale, torch.arange(3))  # E(ref, d) per domain
        expected = models["generator"](x.expand(3, -1, -1, -1) * scale, s_ref) / scale
    torch.testing.assert_close(saved["latents"], expected, rtol=1e-4, atol=1e-4)


def test_every_domain_latent_guided_rows_are_styles(handle, trained, nets):
    cfg, models = nets
    _, data = trained
    gallery, saved, _, _ = request(handle, source_mode=app.DATA, source_latent="c/002.pt", target=app.ALL_DOMAINS,
                                   num_styles=2, seed=3, psi=0.5)
    assert [c for _, c in gallery["value"]] == [f"{d} · style {k}" for k in range(2) for d in "abc"]
    assert gallery["columns"] == 3 and saved["latents"].shape == (6, 4, LATENT, LATENT)
    # row k, column d: style k of domain d (the same z_k in every domain), pulled toward d's mean style
    d, scale, latent_dim = 1, cfg["training"]["latent_scale"], cfg["model"]["latent_dim"]
    z = torch.randn(2, latent_dim, generator=torch.Generator().manual_seed(3))
    z_many = torch.randn(10000, latent_dim, generator=torch.Generator().manual_seed(0))
    x = torch.load(os.path.join(data, "c", "002.pt"), weights_only=True)[None]
    with torch.no_grad():
        s = models["mapping_network"](z, torch.full((2,), d))  # [2, S]
        s_mean = models["mapping_network"](z_many, torch.full((10000,), d)).mean(0, keepdim=True)  # [1, S]
        expected = models["generator"](x.expand(2, -1, -1, -1) * scale, s_mean + 0.5 * (s - s_mean)) / scale
    torch.testing.assert_close(saved["latents"][[d, 3 + d]], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("upload, message", [
    ("text", "not an image that can be read"),
    ("tiny", "too small"),
    (None, "upload one first"),
])
def test_bad_uploads_are_a_message(handle, tmp_path, upload, message):
    path = None
    if upload == "text":
        path = tmp_path / "notes.png"
        path.write_text("this is not a picture")
    elif upload == "tiny":
        path = save_photo(tmp_path / "icon.png", (4, 6))
    with pytest.raises(gr.Error) as err:
        request(handle, source_image=path and str(path))
    assert message in err.value.message and "Traceback" not in err.value.message


@pytest.mark.parametrize("mode, note", [("L", "grayscale, used as RGB"), ("LA", "transparency dropped"),
                                        ("RGBA", "transparency dropped"), ("P", None)])
def test_grayscale_alpha_and_palette_uploads_work(handle, tmp_path, mode, note):
    photo = save_photo(tmp_path / "x.png", mode=mode)
    gallery, saved, _, status = request(handle, source_image=photo)
    assert len(gallery["value"]) == 1 and torch.isfinite(saved["latents"]).all()
    assert note is None or note in status


@pytest.mark.parametrize("kw, message", [
    (dict(target="zebra"), "a, b, c"),
    (dict(num_styles=0), "number of styles 0"),
    (dict(num_styles=app.MAX_STYLES + 1), "expected 1 to"),
    (dict(psi=1.5), "psi 1.5"),
    (dict(psi=10 ** 400), "psi <an int of 1329 bits>: expected a number from 0 to 1"),
    (dict(seed=-1), "seed -1"),
    (dict(seed="x"), "must be integers"),
    (dict(source_mode=app.DATA, source_latent="a/nope.pt"), "no source latent 'a/nope.pt'"),
    (dict(style_mode="other"), "style mode 'other'"),
])
def test_bad_requests_are_a_message(handle, tmp_path, kw, message):
    with pytest.raises(gr.Error) as err:
        request(handle, **{"source_image": save_photo(tmp_path / "x.png"), **kw})
    assert message in err.value.message


def test_an_unexpected_failure_is_one_line_not_a_trace(handle, translator, tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(translator, "styles", broken)
    with pytest.raises(gr.Error) as err:
        request(handle, source_image=save_photo(tmp_path / "x.png"))
    assert err.value.message.startswith("internal error (RuntimeError)") and "\n" not in err.value.message
    assert "boom" not in err.value.message  # an exception's text may name server paths: the log only
    assert "Traceback" in capsys.readouterr().err  # the details go to the server's log


def test_without_a_vae_the_page_works_on_latents(trained, tmp_path):
    without = app.Translator(trained[0], vae=None, device="cpu", log=lambda line: None)  # vae_path is null
    assert without.vae is None and len(without.examples) == 3 * app.EXAMPLES_PER_DOMAIN
    assert "No VAE loaded" in app.header_markdown(without) and "linear latent preview" in app.header_markdown(without)
    handle = app.make_handler(without, str(tmp_path / "outputs"), upload_root=str(tmp_path))
    gallery, saved, _, status = request(handle, source_mode=app.DATA, source_latent="a/001.pt", num_styles=2)
    assert Image.open(gallery["value"][0][0]).size == (LATENT * 8, LATENT * 8)  # the preview's upscale
    assert "linear latent preview" in status
    with pytest.raises(gr.Error, match="no VAE is loaded"):
        request(handle, source_image=save_photo(tmp_path / "x.png"))
    page = app.build_page(without, str(tmp_path / "outputs"))
    radios = [b for b in page.blocks.values() if isinstance(b, gr.Radio) and b.label == "Source"]
    assert [value for _, value in radios[0].choices] == [app.DATA]  # no upload choice without a VAE


def test_uploads_are_taken_only_from_the_upload_folder(translator, tmp_path):
    """The handler's own check (the server test above drives it over HTTP): outside the folder, a
    folder, a missing file, a symlink out of it and a NUL byte all get the same message."""
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    inside = save_photo(uploads / "ok.png")
    outside = save_photo(tmp_path.parent / f"{tmp_path.name}-outside.png")
    os.symlink(outside, uploads / "link.png")
    handler = app.make_handler(translator, str(tmp_path / "outputs"), upload_root=str(uploads))
    gallery, _, _, _ = request(handler, source_image={"path": inside})
    assert len(gallery["value"]) == 1
    messages = set()
    for path in (outside, str(uploads / "link.png"), str(uploads), str(uploads / "nope.png"),
                 str(uploads / ".." / os.path.basename(outside)), "/etc/hostname", "ok.png\0", 42):
        with pytest.raises(gr.Error) as err:
            request(handler, source_image={"path": path})
        messages.add(err.value.message)
    assert messages == {"the source image is not a file uploaded to this page; upload it again"}
    with pytest.raises(gr.Error, match="reference image is not a file uploaded"):
        request(handler, source_image={"path": inside}, style_mode=app.REFERENCE_GUIDED, reference_mode=app.UPLOAD,
                reference_image={"path": outside})


def test_big_uploads_are_refused_by_size_and_decoded_reduced(handle, translator, tmp_path, monkeypatch):
    """A picture beyond MAX_IMAGE_PIXELS is refused from its header, naming the limit; a large JPEG is
    decoded at a reduced scale (the decoder's draft), close to the full decode."""
    monkeypatch.setattr(app, "MAX_IMAGE_PIXELS", 100 * 100)
    with pytest.raises(gr.Error, match=r"120x100 px .* more than the 0 megapixels"):
        request(handle, source_image=save_photo(tmp_path / "big.png", (120, 100)))
    monkeypatch.undo()
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8), np.ones((64, 64, 1), np.uint8))
    Image.fromarray(smooth).save(tmp_path / "large.jpg", quality=95)  # 2048x1536
    opened = []
    real_open = Image.open

    def spy(*args, **kwargs):
        image = real_open(*args, **kwargs)
        opened.append(image)
        return image

    monkeypatch.setattr(Image, "open", spy)
    reduced = load_image(str(tmp_path / "large.jpg"), IMAGE)
    monkeypatch.undo()
    assert opened[-1].size[0] < 2048  # the JPEG decoder worked at 1/2 .. 1/8 scale
    with Image.open(tmp_path / "large.jpg") as full:  # an independent full-size decode, crop and resize
        full = full.convert("RGB").crop((256, 0, 1792, 1536)).resize((IMAGE, IMAGE), Image.BICUBIC)
    assert np.abs(reduced.astype(int) - np.asarray(full).astype(int)).mean() < 3


def test_example_latents_with_undecodable_names_are_left_out(trained, tmp_path):
    """A data file name that is not UTF-8 cannot be sent to the page (the server's /config answered
    500): such files are not offered, the rest are, and the page's config serialises."""
    import orjson

    root = write_latent_folders(tmp_path / "data", domains=("a", "b", "c"), files=2)
    odd = os.path.join(os.fsencode(root), b"a", b"!\xff.pt")  # sorts first
    with open(os.path.join(root, "a", "000.pt"), "rb") as f, open(odd, "wb") as g:
        g.write(f.read())
    ckpt = torch.load(trained[0], weights_only=True)
    ckpt["config"]["data"]["root"] = root
    path = tmp_path / "ckpt.pt"
    torch.save(ckpt, path)
    translator = app.Translator(str(path), vae=None, device="cpu", log=lambda line: None)
    assert sorted(translator.examples) == ["a/000.pt", "a/001.pt", "b/000.pt", "b/001.pt", "c/000.pt", "c/001.pt"]
    page = app.build_page(translator, str(tmp_path / "outputs"))
    orjson.dumps(page.get_config_file())  # what Gradio's /config sends
    assert str(tmp_path) not in app.header_markdown(translator)  # the file name only


@pytest.mark.cuda
@pytest.mark.parametrize("amp_dtype", ["fp32", "bf16"])
def test_cuda_matches_the_cpu(trained, translator, tiny_vae_dir, tmp_path, amp_dtype):
    on_gpu = app.Translator(trained[0], vae=tiny_vae_dir, device="cuda", log=print)
    on_gpu.amp_dtype = app.autocast_dtype(amp_dtype, on_gpu.device)  # the tiny run trained in fp32; bf16 as a real config has it
    photo = save_photo(tmp_path / "x.png")
    kw = dict(source_image=photo, target=app.ALL_DOMAINS, num_styles=2, seed=1)
    cpu, gpu = translator.translate(**kw), on_gpu.translate(**kw)
    assert gpu["status"].startswith("6 output(s) on cuda") and gpu["latents"].device.type == "cpu"
    # a sanity bound, not a precision claim: TF32 (fp32 path) and bf16 each round every layer
    error = (gpu["latents"] - cpu["latents"]).abs().mean() / cpu["latents"].abs().mean()
    assert error < (2e-2 if amp_dtype == "fp32" else 1e-1)


# ---------------------------------------------------------------------- style interpolation

@pytest.fixture
def interpolation(translator, tmp_path):
    return app.make_interpolation_handlers(translator, str(tmp_path / "outputs"), upload_root=str(tmp_path))


def interpolation_widgets(**kw):
    """The interpolation section's widgets with the page's defaults, overridden by keyword."""
    args = dict(source_mode=app.DATA, source_image=None, source_latent="a/000.pt", target="c",
                endpoint_mode=app.SEEDS, seed_a=0, seed_b=1, psi=1.0, reference_a_mode=app.DATA,
                reference_a_image=None, reference_a_latent="b/000.pt", reference_b_mode=app.DATA,
                reference_b_image=None, reference_b_latent="c/001.pt")
    args.update(kw)
    return list(args.values())


def test_the_slider_draws_the_source_in_the_blended_style(interpolation, handle, translator, trained, nets):
    cfg, models = nets
    _, data = trained
    draw, _ = interpolation
    scale = cfg["training"]["latent_scale"]
    x = torch.load(os.path.join(data, "a", "000.pt"), weights_only=True)[None]
    with torch.no_grad():  # style 0 of seeds 3 and 8 in domain c, each as the Translate button draws it
        s = torch.cat([models["mapping_network"](torch.randn(1, cfg["model"]["latent_dim"],
                                                             generator=torch.Generator().manual_seed(seed)),
                                                 torch.full((1,), 2)) for seed in (3, 8)])
    for alpha, style in ((0.0, s[0]), (0.5, (s[0] + s[1]) / 2), (1.0, s[1])):
        pixels, status = draw(*interpolation_widgets(seed_a=3, seed_b=8), alpha)
        with torch.no_grad():
            expected = to_uint8(decode_raw(translator.vae, models["generator"](x * scale, style[None]) / scale))[0]
        assert pixels.shape == (IMAGE, IMAGE, 3) and np.abs(pixels.astype(int) - expected.astype(int)).max() <= 1
        assert status.startswith(f"alpha {alpha:g} in c") and "seed 3 → seed 8, psi 1" in status
    # alpha 0 is exactly what Translate gives for seed 3's style 0
    gallery, _, _, _ = request(handle, source_mode=app.DATA, source_latent="a/000.pt", num_styles=1, seed=3)
    at_zero, _ = draw(*interpolation_widgets(seed_a=3, seed_b=8), 0.0)
    assert np.abs(np.asarray(Image.open(gallery["value"][0][0])).astype(int) - at_zero.astype(int)).max() <= 1


def test_the_video_between_two_references(interpolation, translator, trained, nets):
    cfg, models = nets
    _, data = trained
    _, make_video = interpolation
    path, status = make_video(*interpolation_widgets(endpoint_mode=app.REFERENCES), 13, 10, "gif")
    assert os.path.basename(path) == "a_000_to_c_refA-refB.gif"
    frames = decode_video(path, fps=10).astype(float)
    assert len(frames) == 13 + 2  # 13 from A to B, then 2 held (the official's 10 in 61)
    assert status.startswith("15 frames (13 from A to B, 2 more held at the end) at 10 fps")
    assert frames[0].shape == (2 * IMAGE, IMAGE + IMAGE // 8 + IMAGE, 3)  # the reference column, then the source
    scale = cfg["training"]["latent_scale"]
    load = lambda *p: torch.load(os.path.join(data, *p), weights_only=True)[None]  # noqa: E731
    x, refs = load("a", "000.pt"), torch.cat([load("b", "000.pt"), load("c", "001.pt")])
    with torch.no_grad():
        s = models["style_encoder"](refs * scale, torch.full((2,), 2))
        fakes = [to_uint8(decode_raw(translator.vae, models["generator"](x * scale, s[k:k + 1]) / scale))[0]
                 for k in range(2)]
    for f, k in ((0, 0), (-1, 1)):
        errors = [np.abs(frames[f][IMAGE:, -IMAGE:] - fake).mean() for fake in fakes]
        assert errors[k] < 8 and np.argmin(errors) == k, errors  # a GIF palette per frame
    assert np.abs(frames[-1][IMAGE:, :IMAGE] - to_uint8(decode_raw(translator.vae, refs[1:]))[0]).mean() < 8


def test_an_mp4_video_for_download(interpolation, trained):
    _, make_video = interpolation
    path, status = make_video(*interpolation_widgets(seed_a=2, seed_b=5), 7, 15, "mp4")
    assert path.endswith("a_000_to_c_seed2-seed5.mp4") and status.startswith("8 frames")
    import imageio_ffmpeg

    frames = imageio_ffmpeg.read_frames(path)
    assert next(frames)["size"] == (IMAGE, 2 * IMAGE) and len(list(frames)) == 7 + 1


@pytest.mark.parametrize("kw, extra, message", [
    (dict(target=app.ALL_DOMAINS), (0.5,), "interpolation runs in one target domain"),
    (dict(), (1.5,), "alpha 1.5: expected 0"),
    (dict(), ("nan",), "alpha nan"),
    (dict(seed_b=-1), (0.5,), "seed -1"),
    (dict(psi=2), (0.5,), "psi 2"),
    (dict(psi=10 ** 400), (0.5,), "psi <an int of 1329 bits>: expected a number from 0 to 1"),
    (dict(endpoint_mode="other"), (0.5,), "interpolate between 'other'"),
    (dict(endpoint_mode=app.REFERENCES, reference_b_latent="c/nope.pt"), (0.5,), "no reference B latent"),
    (dict(), (2, 15, "mp4"), "frames per transition 2"),
    (dict(), (61, 0, "mp4"), "fps 0"),
    (dict(), (61, 15, "avi"), "video format 'avi'"),
])
def test_bad_interpolation_requests_are_a_message(interpolation, tmp_path, kw, extra, message):
    handler = interpolation[0] if len(extra) == 1 else interpolation[1]
    with pytest.raises(gr.Error) as err:
        handler(*interpolation_widgets(**kw), *extra)
    assert message in err.value.message and str(tmp_path) not in err.value.message


# ---------------------------------------------------------------------- command line

def test_cli_errors_exit_2(trained, tmp_path, capsys):
    assert app.main(["--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "app.py: error: checkpoint" in capsys.readouterr().err
    fake = tmp_path / "fake.pt"
    torch.save({"generator": torch.zeros(3)}, fake)
    assert app.main(["--checkpoint", str(fake), "--device", "cpu"]) == 2
    assert "not a Latent StarGAN v2 checkpoint" in capsys.readouterr().err
    assert app.main(["--checkpoint", trained[0], "--port", "0"]) == 2
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert app.main(["--checkpoint", trained[0], "--device", "cpu", "--port", str(port)]) == 2
        assert f"--port {port} is in use on 127.0.0.1 by another program" in capsys.readouterr().err
    assert app.main(["--checkpoint", trained[0], "--device", "cpu", "--host", "10.254.254.254"]) == 2
    assert "--host '10.254.254.254' is not an address of this machine" in capsys.readouterr().err
    assert app.main(["--checkpoint", trained[0], "--device", "cpu", "--host", "no-such-host.invalid"]) == 2
    assert "--host 'no-such-host.invalid' is not a name or address this machine can resolve" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert app.main(["--checkpoint", trained[0], "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize("host, name", [("::1", "[::1]"), ("[::1]", "[::1]"), ("::", "[::]"),
                                        ("fe80::1%eth0", "[fe80::1%eth0]"), ("127.0.0.1", "127.0.0.1"),
                                        ("0.0.0.0", "0.0.0.0"), ("localhost", "localhost")])
def test_an_ipv6_host_reaches_gradio_in_brackets(host, name):
    """Gradio writes `http://{server_name}:{port}/` for its start-up request: a bare `::1` made that
    an invalid URL (a traceback after the model had loaded)."""
    assert app.server_name(host) == name


def test_an_ipv6_host_without_ipv6_is_refused_in_one_line(monkeypatch):
    """A kernel with IPv6 off refuses the socket itself (EAFNOSUPPORT), before any bind."""
    real = socket.socket

    def no_ipv6(family=socket.AF_INET, *args, **kwargs):
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT))
        return real(family, *args, **kwargs)

    monkeypatch.setattr(app.socket, "socket", no_ipv6)
    with pytest.raises(app.InputError) as err:
        app.check_address("::1", 7860)
    assert str(err.value).startswith("--host '::1' is an IPv6 address and this machine cannot open an IPv6 socket")
    assert "\n" not in str(err.value)


def test_the_training_path_does_not_import_gradio():
    code = "import sys, run, trainer, translate, encode, inference, vae; sys.exit('gradio' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


# ---------------------------------------------------------------------- the real server

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_addresses(port):
    """Local IPv4/IPv6 addresses in LISTEN state on `port`, from /proc/net/tcp*."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:
                    found.append(address)
    return found


@pytest.fixture
def server(trained, tiny_vae_dir, tmp_path):
    """`python app.py` on 127.0.0.1 and a free port, in its own process; stopped after the test."""
    port = free_port()
    log = open(tmp_path / "server.log", "w+")
    os.makedirs(tmp_path / "tmp")
    env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp_path / "gradio"), "TMPDIR": str(tmp_path / "tmp")}
    run_dir = os.path.dirname(os.path.dirname(trained[0]))  # the page names the checkpoint as given: out/latest.pt
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "app.py"), "--checkpoint",
                             os.path.relpath(trained[0], run_dir), "--vae", tiny_vae_dir, "--device", "cpu",
                             "--port", str(port)], cwd=run_dir, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"app.py exited with {proc.returncode}:\n{log.read()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("app.py did not serve within 90 s")
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/", port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode == 0, "SIGTERM stops the server as Ctrl-C does"
    assert listening_addresses(port) == []  # stopped: nothing listens on its port any more
    assert os.listdir(tmp_path / "tmp") == []  # and its outputs folder is gone


@pytest.mark.slow
def test_sighup_of_a_closed_terminal_stops_the_server_cleanly(trained, tmp_path):
    """The app's terminal goes away (its pty master closed, every write to it fails) and SIGHUP
    arrives: the server stops as after Ctrl-C, exit code 0, its outputs folder removed."""
    port = free_port()
    os.makedirs(tmp_path / "tmp")
    master, terminal = os.openpty()
    env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp_path / "gradio"), "TMPDIR": str(tmp_path / "tmp")}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "app.py"), "--checkpoint", trained[0], "--device",
                             "cpu", "--port", str(port)], stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal,
                            env=env)
    os.close(terminal)
    try:
        deadline, shown = time.monotonic() + 90, b""
        while b"Running on local URL" not in shown:  # Gradio's line once it serves, before it blocks
            assert proc.poll() is None and time.monotonic() < deadline, f"app.py did not serve within 90 s: {shown}"
            if select.select([master], [], [], 0.5)[0]:  # never block past the deadline
                shown += os.read(master, 65536)
        time.sleep(1)
        os.close(master)  # the terminal hangs up
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert listening_addresses(port) == [] and os.listdir(tmp_path / "tmp") == []


@pytest.mark.slow
def test_server_round_trip_through_gradio_client(server, tmp_path):
    from gradio_client import Client, handle_file

    url, port = server
    assert listening_addresses(port) == ["0100007F"]  # 127.0.0.1 only, in /proc's byte order
    client = Client(url, verbose=False, analytics_enabled=False, download_files=str(tmp_path / "downloads"))
    gallery, latents_pt, source_png, status = client.predict(
        app.UPLOAD, handle_file(save_photo(tmp_path / "cat.png")), None, app.ALL_DOMAINS, app.LATENT_GUIDED,
        2, 5, 1.0, app.DATA, None, None, api_name="/translate")
    # the gallery comes as an update: its items, and the columns that make each domain a column
    assert gallery["columns"] == 3
    assert [item["caption"] for item in gallery["value"]] == [f"{d} · style {k}" for k in range(2) for d in "abc"]
    assert all(Image.open(item["image"]).size == (IMAGE, IMAGE) for item in gallery["value"])
    assert torch.load(latents_pt, weights_only=True)["latents"].shape == (6, 4, LATENT, LATENT)
    assert os.path.isfile(source_png) and status.startswith("6 output(s) on cpu")
    # a bad upload comes back as the handler's message
    bad = tmp_path / "bad.png"
    bad.write_text("not a picture")
    with pytest.raises(Exception, match="not an image that can be read"):
        client.predict(app.UPLOAD, handle_file(str(bad)), None, "a", app.LATENT_GUIDED, 1, 0, 1.0, app.DATA,
                       None, None, api_name="/translate")
    # an API caller naming a file on the server (a plain {"path": ...}, no upload) gets one message,
    # whatever the path: an image outside the upload folder is never translated, and the answer never
    # tells whether a path exists
    outside = save_photo(tmp_path / "private.png")
    link = tmp_path / "gradio" / "link.png"
    os.symlink(outside, link)  # inside the upload folder, pointing out of it
    answers = set()
    for path in (outside, str(link), "/etc/hostname", str(tmp_path), str(tmp_path / "missing.png"),
                 str(tmp_path / "gradio" / ".." / "private.png"), "relative.png"):
        with pytest.raises(Exception) as err:
            client.predict(app.UPLOAD, {"path": path}, None, "a", app.LATENT_GUIDED, 1, 0, 1.0, app.DATA,
                           None, None, api_name="/translate")
        answers.add(str(err.value))
    assert answers == {"the source image is not a file uploaded to this page; upload it again"}
    # the page itself names no server path
    page = client.view_api(print_info=False, return_format="str") or ""
    assert str(tmp_path) not in page
    # the interpolation slider and the video, through their own endpoints
    widgets = (app.DATA, None, "a/000.pt", "c", app.REFERENCES, 0, 1, 1.0, app.DATA, None, "b/000.pt", app.DATA, None,
               "c/001.pt")
    blended, status = client.predict(*widgets, 0.25, api_name="/interpolate")
    assert Image.open(blended).size == (IMAGE, IMAGE) and status.startswith("alpha 0.25 in c")
    video, status = client.predict(*widgets, 5, 15, "gif", api_name="/interpolation_video")
    assert len(decode_video(video, fps=15)) == 5 + 1 and status.startswith("6 frames")
    with pytest.raises(Exception, match="the reference A image is not a file uploaded to this page"):
        client.predict(*widgets[:8], app.UPLOAD, {"path": outside}, None, *widgets[11:], 0.5, api_name="/interpolate")


def ipv6_loopback():
    """Whether ::1 can be bound here (containers and CI runners often have IPv6 off)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_an_ipv6_host_is_served_or_refused_in_one_line(trained, tmp_path):
    """`app.py --host ::1`, the real process: where this machine has ::1 the page is served there and
    SIGTERM stops it (exit 0); where it has not, one line names --host, before the model loads."""
    port = free_port()
    env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp_path / "gradio"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "app.py"), "--checkpoint", trained[0], "--device",
                             "cpu", "--host", "::1", "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        if not ipv6_loopback():
            out, err = proc.communicate(timeout=90)
            assert proc.returncode == 2, err
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("app.py: error: --host '::1' "), err
            assert "loaded" not in out  # refused before the model loads
            return
        out = []
        for line in proc.stdout:  # Gradio's last line of launch(): the server is up and waits
            out.append(line)
            if "To create a public link" in line:
                break
        assert f"Running on local URL:  http://[::1]:{port}\n" in "".join(out), "".join(out)
        with urllib.request.urlopen(f"http://[::1]:{port}/", timeout=30) as page:
            assert page.status == 200
        proc.terminate()
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0 and "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def playwright_api():
    """Playwright, to drive Debian's Chromium; skip, saying why, where there is no browser (before
    the server fixture starts anything)."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no browser: {CHROMIUM} is missing (apt-get install chromium; .ci/run does)")
    return pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements-app.txt)")


@pytest.mark.slow
def test_browser_uploads_translates_and_shows_the_gallery(playwright_api, server, tmp_path):
    url, _ = server
    photo = tmp_path / "photo.png"
    # a picture with shapes, so the screenshot shows a recognisable source
    canvas = np.full((120, 160, 3), (120, 170, 220), np.uint8)
    canvas[60:, :] = (90, 140, 60)
    canvas[25:70, 50:95] = (230, 200, 60)
    Image.fromarray(canvas).save(photo)
    update = os.environ.get("UPDATE_SCREENSHOT") == "1" or not os.path.exists(SCREENSHOT)
    shot = SCREENSHOT if update else str(tmp_path / "app.png")
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            requested = []
            page.on("request", lambda r: requested.append(r.url))
            page.goto(url, timeout=60_000)
            page.locator("#source-image input[type=file]").set_input_files(str(photo))
            page.locator("#source-image img").first.wait_for(timeout=30_000)  # the upload's preview
            page.locator("#translate-button").click()
            page.locator("#results img").nth(3).wait_for(timeout=60_000)  # 4 styles by default
            assert page.locator("#results img").count() >= 4
            assert "c · style 3" in page.locator("#results").inner_text()
            assert "output(s) on cpu" in page.locator("#status").inner_text()
            page.wait_for_timeout(500)  # let images finish painting
            page.screenshot(path=shot, full_page=True)
        finally:
            browser.close()
    outside = [u for u in requested if not u.startswith((url, "data:", "blob:"))]
    assert outside == [], "the page loads nothing from outside this server (fonts, scripts, analytics)"
    assert Image.open(shot).size[0] == 1280
