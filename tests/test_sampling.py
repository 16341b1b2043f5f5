"""StarGAN v2's sample mode (sampling.py, translate.py --grid / --video) on the CPU: the easing and
the slide against the official code's formulas written out here, the schedule, and the written
videos decoded back (FFV1 .mkv exactly, H.264 .mp4 and .gif to their tolerance) against G, E, F run
independently with the checkpoint's EMA weights; the grid's cells against per-pair translations."""

import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

import sampling
from conftest import decode_video
from latents import SD15
from translate import main
from vae import image_grid, latent_preview, to_uint8

LATENT = 16  # write_latent_folders' latent size
PIXELS = LATENT * 8  # the latent preview's upscale
MARGIN = PIXELS // 8  # the official's 32 px gap at 256 px
DOMAINS = ["a", "b", "c"]


# ---------------------------------------------------------------------- independent references

def official_alphas():
    """core/utils.py get_alphas(), as the official code writes it."""
    return [0] + [torch.sigmoid(torch.tensor(t)).item() for t in np.arange(-5, 5, 0.2)] + [1] * 10


def official_slide(prev, nxt, alpha, margin):
    """core/utils.py slide() on [3, H, W] pictures in [0, 1] (black where the official's -1 is)."""
    c, h, w = prev.shape
    canvas = torch.zeros(c, 2 * h, w + margin)
    merged = torch.cat([prev, nxt], dim=1)  # [3, 2H, W]
    top = int(h * (1 - alpha))
    canvas[:, top:2 * h, :w] = merged[:, :2 * h - top, :]
    return canvas


def preview(raw, scale):
    """Raw latents [B, 4, h, w] -> uint8 pictures [B, H, W, 3] (the linear preview)."""
    return to_uint8(latent_preview(raw * scale))


def row(pictures):
    """[B, H, W, 3] -> [H, B*W, 3], side by side."""
    return np.concatenate(list(pictures), axis=1)


def translations(nets, sources, style, scale):
    """G(x * scale, s) / scale for every source with one style [S]: [N, 4, h, w] raw."""
    with torch.no_grad():
        return nets["generator"](sources * scale, style.expand(sources.shape[0], -1)) / scale


def ref_styles(nets, refs, domain, scale):
    with torch.no_grad():
        return nets["style_encoder"](refs * scale, torch.full((refs.shape[0],), domain))  # [M, S]


def latent_keys(cfg, nets, domain, k, seed, psi):
    """Style k of `domain` as translate.py documents it, truncated toward the mean of F over 10000 z."""
    dim = cfg["model"]["latent_dim"]
    with torch.no_grad():
        z = torch.randn(k, dim, generator=torch.Generator().manual_seed(seed))
        s = nets["mapping_network"](z, torch.full((k,), domain))
        z_many = torch.randn(10000, dim, generator=torch.Generator().manual_seed(0))
        mean = nets["mapping_network"](z_many, torch.full((10000,), domain)).mean(0, keepdim=True)
    return mean + psi * (s - mean)  # [K, S]


def load(data, *names):
    return torch.stack([torch.load(os.path.join(data, name), weights_only=True) for name in names])


def translate(ckpt, *args):
    return main(["--checkpoint", ckpt, "--device", "cpu", *map(str, args)])


def assert_close_u8(actual, expected, tol=1):
    assert actual.shape == expected.shape
    assert np.abs(actual.astype(int) - expected.astype(int)).max() <= tol


# ---------------------------------------------------------------------- easing, schedule, slide

def test_easing_is_the_officials():
    alphas = sampling.ease_alphas()  # the defaults: 61 frames, 10 held
    assert len(alphas) == 61 == sampling.FRAMES_PER_TRANSITION
    torch.testing.assert_close(alphas, torch.tensor(official_alphas(), dtype=torch.float64), rtol=0, atol=1e-12)
    assert alphas[26] == 0.5  # t = 0: the midpoint style, exactly
    short = sampling.ease_alphas(9, 2)  # 1 + 6 eased + 2 held
    assert short[0] == 0 and short[4] == 0.5 and (short[-2:] == 1).all() and short[-3] < 1 and (short.diff() >= 0).all()
    with pytest.raises(ValueError):
        sampling.ease_alphas(3, 2)  # no eased frame left


def test_schedule_glides_within_segments_cuts_between_and_holds_the_end():
    prev, nxt, alpha = sampling.interpolation_schedule([3, 2], frames_per_transition=5, hold_frames=1)
    eased = sampling.ease_alphas(5, 1).tolist()
    # keys 0 1 2 | 3 4: transitions 0->1, 1->2, then a cut to 3->4; then the last frame once more
    expected = [(0, 1, a) for a in eased] + [(1, 2, a) for a in eased] + [(3, 4, a) for a in eased] + [(3, 4, 1.0)]
    assert list(zip(prev.tolist(), nxt.tolist(), alpha.tolist())) == expected
    assert sampling.num_frames([3, 2], 5, 1) == len(expected) == 3 * 5 + 1
    assert [sampling.default_hold(t) for t in (61, 13, 3)] == [10, 2, 0]  # the official's 10 in 61
    with pytest.raises(ValueError):
        sampling.interpolation_schedule([3, 1], 5, 1)


def test_slide_is_the_officials():
    g = torch.Generator().manual_seed(0)
    prev, nxt = torch.rand(4, 3, 8, 6, generator=g), torch.rand(4, 3, 8, 6, generator=g)
    alphas = torch.tensor([0.0, 0.3, 0.5, 1.0], dtype=torch.float64)
    column = sampling.slide(prev, nxt, alphas, margin=2)
    for f, a in enumerate(alphas.tolist()):
        torch.testing.assert_close(column[f], official_slide(prev[f], nxt[f], a, 2), rtol=0, atol=0)
    # alpha 0: the current reference beside the translations (lower half), nothing above it
    assert torch.equal(column[0, :, 8:, :6], prev[0]) and (column[0, :, :8] == 0).all()


# ---------------------------------------------------------------------- frames, in memory

def test_frames_are_sources_over_translations_with_the_sliding_reference(trained, ema_nets):
    ckpt, data = trained
    cfg, nets = ema_nets
    scale = cfg["training"]["latent_scale"]
    sources, refs = load(data, "a/000.pt", "a/001.pt"), load(data, "c/000.pt", "b/002.pt", "c/003.pt")
    keys = ref_styles(nets, refs, 2, scale)  # [3, S]
    schedule = sampling.interpolation_schedule([3], frames_per_transition=7, hold_frames=2)
    chunks = list(sampling.video_frames(nets["generator"], sources, keys, schedule, SD15, key_latents=refs,
                                        batch_size=4))
    frames = np.concatenate(chunks)
    assert len(chunks) > 1 and frames.shape == (2 * 7 + 2, 2 * PIXELS, PIXELS + MARGIN + 2 * PIXELS, 3)
    top, ref_rgb = row(preview(sources, scale)), latent_preview(refs * scale)
    prev, nxt, alpha = schedule
    for f in range(len(frames)):  # every frame, independently
        style = keys[prev[f]] + alpha[f].item() * (keys[nxt[f]] - keys[prev[f]])
        column = to_uint8(official_slide(ref_rgb[prev[f]], ref_rgb[nxt[f]], alpha[f].item(), MARGIN)[None])[0]
        body = np.concatenate([top, row(preview(translations(nets, sources, style, scale), scale))], axis=0)
        assert_close_u8(frames[f], np.concatenate([column, body], axis=1))


@pytest.mark.cuda
def test_cuda_frames_match_the_cpu(trained, ema_nets):
    """The same frames on the GPU (styles, unique, generator there; pictures gathered on the CPU)."""
    import copy

    _, data = trained
    cfg, nets = ema_nets
    scale = cfg["training"]["latent_scale"]
    sources, refs = load(data, "a/000.pt", "b/001.pt"), load(data, "c/000.pt", "c/002.pt")
    schedule = sampling.interpolation_schedule([2], frames_per_transition=7, hold_frames=2)
    frames = {}
    for device in ("cpu", "cuda"):
        generator = copy.deepcopy(nets["generator"]).to(device)
        keys = ref_styles(nets, refs, 2, scale).to(device)
        frames[device] = np.concatenate(list(sampling.video_frames(generator, sources, keys, schedule, SD15,
                                                                   key_latents=refs, batch_size=4, device=device)))
    assert frames["cuda"].shape == frames["cpu"].shape
    assert np.abs(frames["cuda"].astype(int) - frames["cpu"].astype(int)).mean() < 1  # TF32 convolutions


# ---------------------------------------------------------------------- written videos, decoded back

def test_video_ref_mkv_is_exact(trained, ema_nets, tmp_path, capsys):
    """Lossless FFV1: first frame = the plain translations with reference 0's style, the transition's
    midpoint = the midpoint style, last frame = the last reference's style."""
    ckpt, data = trained
    cfg, nets = ema_nets
    scale = cfg["training"]["latent_scale"]
    refs_dir = tmp_path / "refs"
    os.makedirs(refs_dir)
    for name, path in (("r0", "c/001.pt"), ("r1", "b/004.pt"), ("r2", "c/005.pt")):
        torch.save(torch.load(os.path.join(data, path), weights_only=True), refs_dir / f"{name}.pt")
    video = str(tmp_path / "ref.mkv")
    assert translate(ckpt, "--source", os.path.join(data, "a", "002.pt"), os.path.join(data, "b", "003.pt"),
                     "--target-domain", "c", "--reference", refs_dir, "--video", "ref", video,
                     "--frames-per-transition", 9, "--hold-frames", 2, "--fps", 12, "--batch-size", 5) == 0
    out = capsys.readouterr()
    assert "20 frames at 12 fps" in out.out and "frame" in out.err  # the progress bar, on stderr
    frames = decode_video(video)
    assert len(frames) == 2 * 9 + 2  # 3 references: 2 transitions, then the end's hold
    sources = load(data, "a/002.pt", "b/003.pt")
    refs = load(refs_dir, "r0.pt", "r1.pt", "r2.pt")
    keys = ref_styles(nets, refs, 2, scale)
    top = row(preview(sources, scale))
    ref_pictures = preview(refs, scale)
    x0 = PIXELS + MARGIN  # the row starts after the reference column

    def expect_row(frame, style):
        assert_close_u8(frame[:PIXELS, x0:], top)
        assert_close_u8(frame[PIXELS:, x0:], row(preview(translations(nets, sources, style, scale), scale)))

    expect_row(frames[0], keys[0])
    expect_row(frames[1 + 3], (keys[0] + keys[1]) / 2)  # 6 eased frames: the 4th is t = 0
    expect_row(frames[-1], keys[2])
    assert_close_u8(frames[0][PIXELS:, :PIXELS], ref_pictures[0])  # reference 0 beside the translations
    assert (frames[0][:PIXELS, :PIXELS] == 0).all()
    assert_close_u8(frames[-1][:PIXELS, :PIXELS], ref_pictures[1])  # slid up, the last one beside the row
    assert_close_u8(frames[-1][PIXELS:, :PIXELS], ref_pictures[2])


def test_video_latent_over_two_domains_mkv_cuts_between_them(trained, ema_nets, tmp_path):
    ckpt, data = trained
    cfg, nets = ema_nets
    scale = cfg["training"]["latent_scale"]
    video = str(tmp_path / "latent.mkv")
    assert translate(ckpt, "--source", os.path.join(data, "a", "000.pt"), "--target-domain", "b", "c",
                     "--num-styles", 3, "--seed", 4, "--psi", 0.7, "--video", "latent", video,
                     "--frames-per-transition", 5, "--hold-frames", 0) == 0
    frames = decode_video(video)
    assert len(frames) == 2 * (3 - 1) * 5 + 0
    assert frames.shape[1:] == (2 * PIXELS, PIXELS, 3)  # no reference column
    source = load(data, "a/000.pt")
    keys = {d: latent_keys(cfg, nets, d, 3, seed=4, psi=0.7) for d in (1, 2)}

    def expect(frame, style):
        assert_close_u8(frame, np.concatenate([preview(source, scale)[0],
                                               preview(translations(nets, source, style, scale), scale)[0]]))

    expect(frames[0], keys[1][0])  # domain b, style 0
    expect(frames[1 + 2], (keys[1][0] + keys[1][1]) / 2)  # 4 eased frames: the 3rd is t = 0
    expect(frames[9], keys[1][2])  # b's last transition ends on its style 2 (no hold)
    expect(frames[10], keys[2][0])  # then a cut: domain c, style 0
    expect(frames[-1], keys[2][2])


def test_video_mp4_to_the_codecs_tolerance(trained, ema_nets, tmp_path):
    ckpt, data = trained
    cfg, nets = ema_nets
    scale = cfg["training"]["latent_scale"]
    video = str(tmp_path / "ref.mp4")
    refs = [os.path.join(data, "a", "002.pt"), os.path.join(data, "c", "004.pt")]  # far apart: distinct styles
    assert translate(ckpt, "--source", os.path.join(data, "a"), "--target-domain", "c", "--reference", *refs,
                     "--video", "ref", video, "--frames-per-transition", 7, "--hold-frames", 2) == 0
    frames = decode_video(video).astype(float)
    assert frames.shape == (7 + 2, 2 * PIXELS, PIXELS + MARGIN + 6 * PIXELS, 3)
    sources = load(data, *(f"a/{i:03d}.pt" for i in range(6)))
    keys = ref_styles(nets, load(data, "a/002.pt", "c/004.pt"), 2, scale)
    x0 = PIXELS + MARGIN
    rows = [row(preview(translations(nets, sources, s, scale), scale)).astype(float)
            for s in (keys[0], (keys[0] + keys[1]) / 2, keys[1])]  # first, middle, last
    for f, expected in ((0, 0), (1 + 2, 1), (-1, 2)):
        errors = [np.abs(frames[f][PIXELS:, x0:] - r).mean() for r in rows]
        assert errors[expected] < 3, errors  # H.264 at CRF 18 (yuv420p): a few levels of 255 on average
        assert np.argmin(errors) == expected, errors  # and nearest to its own style of the three
    assert np.abs(frames[0][:PIXELS, x0:] - row(preview(sources, scale))).mean() < 3


def test_video_gif_frame_count_pace_and_endpoints(trained, ema_nets, tmp_path):
    ckpt, data = trained
    cfg, nets = ema_nets
    scale = cfg["training"]["latent_scale"]
    video = str(tmp_path / "latent.gif")
    assert translate(ckpt, "--source", os.path.join(data, "b", "001.pt"), "--target-domain", "a",
                     "--num-styles", 2, "--video", "latent", video, "--frames-per-transition", 6,
                     "--hold-frames", 3, "--fps", 10, "--cell-size", 32) == 0
    frames = decode_video(video, fps=10).astype(float)
    assert frames.shape == (6 + 3, 64, 32, 3)  # --cell-size: 32 px pictures
    with Image.open(video) as gif:
        assert gif.info["duration"] == 100 and gif.info["loop"] == 0  # 10 fps, looping
    source = load(data, "b/001.pt")
    keys = latent_keys(cfg, nets, 0, 2, seed=0, psi=1.0)
    shrink = lambda raw: to_uint8(sampling.fit(latent_preview(raw * scale), (32, 32)))[0].astype(float)  # noqa: E731
    expected = [np.concatenate([shrink(source), shrink(translations(nets, source, s, scale))]) for s in keys]
    for f, k in ((0, 0), (-1, 1)):
        errors = [np.abs(frames[f] - e).mean() for e in expected]
        assert errors[k] < 8, errors  # one palette of 256 colours (median cut) per frame of ~500 colours
        assert np.argmin(errors) == k, errors


# ---------------------------------------------------------------------- the reference grid

def test_reference_grid_cells_are_the_per_pair_translations(trained, ema_nets, tmp_path):
    ckpt, data = trained
    cfg, nets = ema_nets
    scale = cfg["training"]["latent_scale"]
    sources, refs = load(data, "a/000.pt", "b/001.pt", "a/003.pt"), load(data, "c/000.pt", "c/002.pt")
    cells, rows = sampling.reference_grid(nets["generator"], nets["style_encoder"], sources, refs, 2, SD15,
                                          batch_size=4)
    assert rows == 4 and cells.shape == (4 * 3, 3, PIXELS, PIXELS)
    cells = cells.view(4, 3, 3, PIXELS, PIXELS)
    assert (cells[0, 0] == 1).all()  # the blank (white) corner
    torch.testing.assert_close(cells[0, 1:], latent_preview(refs * scale))  # header: the references
    torch.testing.assert_close(cells[1:, 0], latent_preview(sources * scale))  # first column: the sources
    styles = ref_styles(nets, refs, 2, scale)
    for i in range(3):
        for k in range(2):
            expected = latent_preview(translations(nets, sources[i:i + 1], styles[k], scale) * scale)[0]
            torch.testing.assert_close(cells[1 + i, 1 + k], expected, rtol=0, atol=1e-4)


def test_translate_grid_writes_the_labelled_picture_only(trained, ema_nets, tmp_path):
    ckpt, data = trained
    cfg, nets = ema_nets
    scale = cfg["training"]["latent_scale"]
    out = tmp_path / "out"
    assert translate(ckpt, "--source", os.path.join(data, "a", "001.pt"), os.path.join(data, "b", "002.pt"),
                     "--target-domain", "c", "--reference", os.path.join(data, "c", "003.pt"),
                     os.path.join(data, "c", "005.pt"), "--grid", "--output", out) == 0
    assert os.listdir(out) == ["grid.png"]  # no per-output files
    sources, refs = load(data, "a/001.pt", "b/002.pt"), load(data, "c/003.pt", "c/005.pt")
    styles = ref_styles(nets, refs, 2, scale)
    cells = [torch.ones(3, PIXELS, PIXELS), *latent_preview(refs * scale)]
    for i in range(2):
        cells += [latent_preview(sources[i:i + 1] * scale)[0]]
        cells += [latent_preview(translations(nets, sources[i:i + 1], styles[k], scale) * scale)[0] for k in range(2)]
    expected = np.asarray(image_grid(torch.stack(cells), 3, row_labels=["references", "001", "002"],
                                     col_labels=["source", "003", "005"]))
    assert_close_u8(np.asarray(Image.open(out / "grid.png")), expected)


# ---------------------------------------------------------------------- errors

@pytest.mark.parametrize("extra, message", [
    (["--num-styles", 2, "--grid", "--output", "o"], "--grid needs --reference"),
    (["--reference", "R", "--grid"], "--grid needs --reference (its header row) and --output"),
    (["--reference", "R"], "give --output"),
    (["--num-styles", 2, "--video", "ref", "v.mp4"], "--video ref interpolates between references"),
    (["--num-styles", 1, "--video", "latent", "v.mp4"], "K >= 2"),
    (["--num-styles", 2, "--video", "zoom", "v.mp4"], "--video mode 'zoom'"),
    (["--num-styles", 2, "--video", "latent", "v.avi"], "ending in .mp4, .mkv, .gif"),
    (["--num-styles", 2, "--video", "latent", "v.gif", "--frames-per-transition", 3, "--hold-frames", 2],
     "--frames-per-transition 3 must be at least --hold-frames 2 + 2"),
    (["--num-styles", 2, "--video", "latent", "v.gif", "--fps", 0], "--fps: 0: expected a number from 0.1 to 240"),
    (["--num-styles", 2, "--video", "latent", "v.gif", "--psi", "nan"], "--psi nan"),
    (["--num-styles", 2, "--video", "latent", "v.gif", "--psi", 1.5], "--psi 1.5"),
    (["--num-styles", 2, "--video", "latent", "v.gif", "--seed", -1], "--seed -1"),
    (["--num-styles", 2, "--video", "latent", "v.gif", "--seed", 2 ** 63], "2**63 - 1"),
    (["--num-styles", 2, "--output", "o", "--target-domain", "b", "c"], "several --target-domain"),
    (["--num-styles", 2, "--video", "latent", "v.gif", "--cell-size", 0], "--cell-size: 0: expected an integer from 1 to 2048"),
])
def test_bad_flags_exit_2_with_a_message(trained, tmp_path, capsys, extra, message):
    ckpt, data = trained
    extra = [str(tmp_path / e) if e in ("o", "v.mp4", "v.gif", "v.avi") else e for e in extra]
    extra = [os.path.join(data, "c") if e == "R" else e for e in extra]
    domains = [] if "--target-domain" in extra else ["--target-domain", "c"]
    assert translate(ckpt, "--source", os.path.join(data, "a", "000.pt"), *domains, *extra) == 2
    assert message in capsys.readouterr().err
    assert os.listdir(tmp_path) == []  # nothing written


def test_input_counts_are_checked_before_any_work(trained, tmp_path, capsys):
    ckpt, data = trained
    video = str(tmp_path / "v.gif")
    assert translate(ckpt, "--source", os.path.join(data, "a"), "--target-domain", "c",
                     "--reference", os.path.join(data, "c", "000.pt"), "--video", "ref", video) == 2
    assert "--reference gives 1: give at least 2" in capsys.readouterr().err
    many = [os.path.join(data, d) for d in DOMAINS]  # 18 sources
    assert translate(ckpt, "--source", *many, "--target-domain", "c", "--num-styles", 2, "--video", "latent",
                     video) == 2
    assert "at most 16 sources" in capsys.readouterr().err
    assert translate(ckpt, "--source", *many, "--target-domain", "c", "--num-styles", 2, "--output",
                     tmp_path / "out") == 2  # per-output files named by stem: a/000.pt and b/000.pt clash
    assert "share a file name stem" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_mp4_without_imageio_ffmpeg_names_the_pip_command(trained, tmp_path, capsys, monkeypatch):
    ckpt, data = trained
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import fails as if not installed
    assert translate(ckpt, "--source", os.path.join(data, "a", "000.pt"), "--target-domain", "c",
                     "--num-styles", 2, "--video", "latent", tmp_path / "v.mp4") == 2
    assert "pip install imageio-ffmpeg" in capsys.readouterr().err
    assert translate(ckpt, "--source", os.path.join(data, "a", "000.pt"), "--target-domain", "c",
                     "--num-styles", 2, "--video", "latent", tmp_path / "v.gif", "--frames-per-transition", 13) == 0
    assert len(decode_video(str(tmp_path / "v.gif"), fps=15)) == 13 + 2  # a GIF needs only Pillow; the hold: 10 in 61
    with Image.open(tmp_path / "v.gif") as gif:  # 15 fps in 10 ms steps: 60 and 70 ms, 1 s in all
        assert sum(frame.info["duration"] for frame in ImageSequence.Iterator(gif)) == 1000
