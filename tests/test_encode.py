"""encode.py end to end on the CPU with a tiny random AutoencoderKL (downsampling factor 2)."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from encode import main

SIZE = 32
LATENT_SHAPE = (4, SIZE // 2, SIZE // 2)
# stem -> (width, height, file extension): non-square both ways, lossless and lossy
IMAGES = {"a_wide": (48, 30, "png"), "b_tall": (25, 41, "jpg"), "c_square": (40, 40, "png")}


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=8,
                        sample_size=32)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def vae(vae_dir):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(vae_dir).eval()


def write_images(folder, specs=IMAGES, seed=0):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for stem, (w, h, ext) in specs.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(folder, f"{stem}.{ext}"))
    return str(folder)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("images"))


def encode(image_dir, out_dir, vae_dir, *extra):
    return main(["--input", str(image_dir), "--output", str(out_dir), "--vae", vae_dir, "--size", str(SIZE),
                 "--device", "cpu", "--batch-size", "2", *extra])


def reference_pixels(path, size=SIZE):
    """Independent preprocessing: centre square crop, bicubic resize, [-1, 1], as [1, 3, size, size]."""
    pixels = np.asarray(Image.open(path).convert("RGB"))  # [H, W, 3]
    h, w, _ = pixels.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = Image.fromarray(pixels[top:top + side, left:left + side])
    resized = np.asarray(square.resize((size, size), Image.BICUBIC), dtype=np.float32)
    return torch.from_numpy(resized / 127.5 - 1).permute(2, 0, 1)[None]


def load_latent(path):
    return torch.load(path, weights_only=True) if path.endswith(".pt") else torch.from_numpy(np.load(path))


def test_writes_one_latent_per_image_in_both_formats(image_dir, vae_dir, tmp_path):
    for fmt in ("pt", "npy"):
        out = tmp_path / fmt
        assert encode(image_dir, out, vae_dir, "--format", fmt) == 0
        assert sorted(os.listdir(out)) == sorted(f"{stem}.{fmt}" for stem in IMAGES)
        for stem in IMAGES:
            latent = load_latent(str(out / f"{stem}.{fmt}"))
            assert latent.shape == LATENT_SHAPE and latent.dtype == torch.float32
    pt = torch.load(tmp_path / "pt" / "a_wide.pt", weights_only=True)
    assert torch.equal(pt, torch.from_numpy(np.load(tmp_path / "npy" / "a_wide.npy")))
    # one image's data only, not the storage of the whole batch it was encoded in
    assert pt.untyped_storage().nbytes() == pt.numel() * 4


def test_latent_is_unscaled_posterior_mode_of_cropped_resized_image(image_dir, vae_dir, vae, tmp_path):
    assert encode(image_dir, tmp_path, vae_dir, "--batch-size", "3") == 0
    for stem, (_, _, ext) in IMAGES.items():
        with torch.no_grad():
            expected = vae.encode(reference_pixels(os.path.join(image_dir, f"{stem}.{ext}"))).latent_dist.mode()[0]
        written = torch.load(tmp_path / f"{stem}.pt", weights_only=True)
        torch.testing.assert_close(written, expected, rtol=1e-4, atol=1e-5)


def test_exif_orientation_is_applied_before_cropping(vae_dir, vae, tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (30, 50, 3), dtype=np.uint8)  # stored landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: viewers rotate 90 degrees clockwise
    Image.fromarray(pixels).save(tmp_path / "rotated.png", exif=exif)
    Image.fromarray(np.ascontiguousarray(np.rot90(pixels, k=-1))).save(tmp_path / "upright.png")
    os.makedirs(tmp_path / "in")
    os.replace(tmp_path / "rotated.png", tmp_path / "in" / "rotated.png")
    assert encode(tmp_path / "in", tmp_path / "out", vae_dir) == 0
    with torch.no_grad():
        expected = vae.encode(reference_pixels(str(tmp_path / "upright.png"))).latent_dist.mode()[0]
    torch.testing.assert_close(torch.load(tmp_path / "out" / "rotated.pt", weights_only=True), expected,
                               rtol=1e-4, atol=1e-5)


def test_sample_is_seeded_and_differs_from_mode(image_dir, vae_dir, tmp_path):
    assert encode(image_dir, tmp_path / "mode", vae_dir) == 0
    assert encode(image_dir, tmp_path / "s0", vae_dir, "--sample", "--seed", "0") == 0
    assert encode(image_dir, tmp_path / "s0_again", vae_dir, "--sample", "--seed", "0", "--batch-size", "3",
                  "--workers", "0") == 0
    assert encode(image_dir, tmp_path / "s1", vae_dir, "--sample", "--seed", "1") == 0
    for stem in IMAGES:
        mode, s0, s0_again, s1 = (torch.load(tmp_path / d / f"{stem}.pt", weights_only=True)
                                  for d in ("mode", "s0", "s0_again", "s1"))
        assert not torch.allclose(s0, mode)
        # the same seed gives the same draw whatever the batching (which moves the mean by rounding only)
        torch.testing.assert_close(s0_again, s0, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(s0, s1)


def test_rerun_skips_finished_files_and_redoes_only_missing_ones(image_dir, vae_dir, tmp_path, capsys):
    assert encode(image_dir, tmp_path, vae_dir) == 0
    mtimes = {name: os.stat(tmp_path / name).st_mtime_ns for name in os.listdir(tmp_path)}
    capsys.readouterr()

    assert encode(image_dir, tmp_path, vae_dir) == 0
    assert f"{len(IMAGES)} already encoded" in capsys.readouterr().out
    assert {name: os.stat(tmp_path / name).st_mtime_ns for name in os.listdir(tmp_path)} == mtimes

    os.remove(tmp_path / "b_tall.pt")
    assert encode(image_dir, tmp_path, vae_dir) == 0
    assert f"{len(IMAGES) - 1} already encoded" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == sorted(mtimes)
    for name, mtime in mtimes.items():
        if name != "b_tall.pt":
            assert os.stat(tmp_path / name).st_mtime_ns == mtime
    assert torch.load(tmp_path / "b_tall.pt", weights_only=True).shape == LATENT_SHAPE


def test_broken_image_is_reported_and_the_others_are_encoded(vae_dir, tmp_path, capsys):
    folder = write_images(tmp_path / "in")
    with open(os.path.join(folder, "broken.png"), "wb") as f:
        f.write(b"this is not a png" * 10)
    assert encode(folder, tmp_path / "out", vae_dir) == 1
    assert os.path.join(folder, "broken.png") in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "out")) == sorted(f"{stem}.pt" for stem in IMAGES)  # no temp files left


def test_subfolders_are_mirrored(vae_dir, tmp_path):
    write_images(tmp_path / "in" / "photo", {"p": (36, 20, "png")})
    write_images(tmp_path / "in" / "monet", {"m": (20, 36, "JPG")})
    assert encode(tmp_path / "in", tmp_path / "out", vae_dir) == 0
    assert torch.load(tmp_path / "out" / "photo" / "p.pt", weights_only=True).shape == LATENT_SHAPE
    assert torch.load(tmp_path / "out" / "monet" / "m.pt", weights_only=True).shape == LATENT_SHAPE


def test_size_not_divisible_by_downsampling_factor_is_an_error(image_dir, vae_dir, tmp_path, capsys):
    assert main(["--input", image_dir, "--output", str(tmp_path / "out"), "--vae", vae_dir, "--size", "33",
                 "--device", "cpu"]) == 2
    assert "divisible" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_missing_vae_is_an_error_naming_it(image_dir, tmp_path, capsys):
    missing = str(tmp_path / "no_such_vae")
    assert encode(image_dir, tmp_path / "out", missing) == 2
    assert missing in capsys.readouterr().err


def test_missing_input_folder_and_empty_folder_are_errors(vae_dir, tmp_path, capsys):
    missing = str(tmp_path / "no_such_images")
    assert encode(missing, tmp_path / "out", vae_dir) == 2
    assert missing in capsys.readouterr().err
    os.makedirs(tmp_path / "empty")
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    assert encode(tmp_path / "empty", tmp_path / "out", vae_dir) == 2
    assert "no images" in capsys.readouterr().err


def test_same_stem_with_two_extensions_is_an_error(vae_dir, tmp_path, capsys):
    write_images(tmp_path / "in", {"x": (20, 20, "png")})
    write_images(tmp_path / "in", {"x": (20, 20, "jpg")})
    assert encode(tmp_path / "in", tmp_path / "out", vae_dir) == 2
    err = capsys.readouterr().err
    assert "x.png" in err and "x.jpg" in err
    assert not os.path.exists(tmp_path / "out")


def test_crash_while_writing_leaves_no_partial_file_and_a_rerun_finishes(image_dir, vae_dir, tmp_path, monkeypatch):
    real_save = torch.save

    visible_while_writing = []

    def save_then_crash(obj, f):
        f.write(b"partial")
        visible_while_writing.extend(n for n in os.listdir(tmp_path) if n.endswith(".pt"))
        raise OSError("disk full")  # a kill -9 here would leave the same files behind, minus the cleanup

    monkeypatch.setattr(torch, "save", save_then_crash)
    with pytest.raises(OSError, match="disk full"):
        encode(image_dir, tmp_path, vae_dir)
    assert visible_while_writing == []  # written under a temporary name, renamed when complete
    assert os.listdir(tmp_path) == []  # neither a truncated latent nor a leftover temporary file

    monkeypatch.setattr(torch, "save", real_save)
    assert encode(image_dir, tmp_path, vae_dir) == 0
    assert sorted(os.listdir(tmp_path)) == sorted(f"{stem}.pt" for stem in IMAGES)


def test_non_finite_latent_is_reported_and_not_written(image_dir, vae_dir, tmp_path, monkeypatch, capsys):
    import encode as encode_module

    real_encode_raw = encode_module.encode_raw

    def nan_for_first_of_batch(*args, **kwargs):
        latents = real_encode_raw(*args, **kwargs)
        latents[0, 0, 0, 0] = float("nan")  # as an fp16 overflow would
        return latents

    monkeypatch.setattr(encode_module, "encode_raw", nan_for_first_of_batch)
    assert encode(image_dir, tmp_path, vae_dir, "--batch-size", "3") == 1
    assert "a_wide" in capsys.readouterr().err  # the first image in sorted order
    assert sorted(os.listdir(tmp_path)) == ["b_tall.pt", "c_square.pt"]


def test_images_too_small_to_upscale_are_refused_and_changes_are_reported(vae_dir, tmp_path, capsys):
    """The app's rule: a shorter side under SIZE / 4 is refused (named, the rest encoded, exit 1);
    what encoding changed in the others (upscaled, grayscale, transparency) is reported per kind."""
    folder = write_images(tmp_path / "in", {"tiny": (7, 20, "png"), "small": (16, 20, "png"), "ok": (40, 40, "png")})
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8), "L").save(os.path.join(folder, "grey.png"))
    Image.fromarray(rng.integers(0, 256, (40, 40, 4), dtype=np.uint8), "RGBA").save(os.path.join(folder, "alpha.png"))
    assert encode(folder, tmp_path / "out", vae_dir) == 1
    out, err = capsys.readouterr()
    assert sorted(os.listdir(tmp_path / "out")) == ["alpha.pt", "grey.pt", "ok.pt", "small.pt"]
    assert "tiny.png: the image is 7x20 px, too small" in err and "at least 8 px" in err
    assert "encode.py: 1 image(s) upscaled to 32 px: small.png" in out
    assert "encode.py: 1 image(s) grayscale, used as RGB: grey.png" in out
    assert "encode.py: 1 image(s) transparency dropped: alpha.png" in out
# ---------------------------------------------------------------------- --pack

def load_shard(folder):
    """(row names, rows [N, 4, h, w] as stored) of a packed folder, read by the dataset's reader."""
    from packing import PackedShard

    shard = PackedShard(str(folder))
    return shard.names, torch.from_numpy(np.array(shard.array))


def counting_encodes(monkeypatch):
    """Counts the images that go through the VAE."""
    import encode as encode_module

    counted, real = [], encode_module.encode_raw

    def count(vae, images, *args, **kwargs):
        counted.append(len(images))
        return real(vae, images, *args, **kwargs)

    monkeypatch.setattr(encode_module, "encode_raw", count)
    return counted


def test_pack_writes_one_shard_per_folder_with_the_per_file_latents(vae_dir, tmp_path):
    write_images(tmp_path / "in" / "x")
    write_images(tmp_path / "in" / "x" / "y", {"d_deep": (33, 35, "png")}, seed=1)
    one = ("--batch-size", "1")  # the same computation per image in both layouts
    assert encode(tmp_path / "in", tmp_path / "files", vae_dir, *one) == 0
    assert encode(tmp_path / "in", tmp_path / "f16", vae_dir, "--pack", *one) == 0
    assert encode(tmp_path / "in", tmp_path / "f32", vae_dir, "--pack", "--pack-dtype", "float32", *one) == 0
    assert sorted(os.listdir(tmp_path / "f16" / "x")) == ["index.json", "latents.npy", "y"]
    for sub, stems in (("x", IMAGES), ("x/y", {"d_deep": None})):
        names, f16 = load_shard(tmp_path / "f16" / sub)
        _, f32 = load_shard(tmp_path / "f32" / sub)
        assert names == sorted(n for n in os.listdir(tmp_path / "in" / sub) if "." in n)
        assert [os.path.splitext(n)[0] for n in names] == sorted(stems)
        assert f16.dtype == torch.float16 and f32.dtype == torch.float32 and f16.shape[1:] == LATENT_SHAPE
        for row, name in enumerate(names):
            per_file = torch.load(tmp_path / "files" / sub / f"{os.path.splitext(name)[0]}.pt", weights_only=True)
            assert torch.equal(f32[row], per_file) and torch.equal(f16[row], per_file.half()), name


def test_pack_reuses_rows_by_name_and_resumes(vae_dir, tmp_path, monkeypatch, capsys):
    images, out = tmp_path / "in", tmp_path / "out"
    write_images(images)
    assert encode(images, out, vae_dir, "--pack") == 0
    names, rows = load_shard(out)
    array_bytes = (out / "latents.npy").read_bytes()

    counted = counting_encodes(monkeypatch)
    assert encode(images, out, vae_dir, "--pack") == 0  # nothing new: nothing encoded or written
    assert counted == [] and (out / "latents.npy").read_bytes() == array_bytes

    write_images(images, {"b2_new": (36, 36, "png")}, seed=1)  # sorts between b_tall and c_square
    os.remove(images / "a_wide.png")
    assert encode(images, out, vae_dir, "--pack") == 0
    assert counted == [1]
    new_names, new_rows = load_shard(out)
    assert new_names == ["b2_new.png", "b_tall.jpg", "c_square.png"]
    for name in ("b_tall.jpg", "c_square.png"):
        assert torch.equal(new_rows[new_names.index(name)], rows[names.index(name)])

    # interrupted after the first batch of a fresh folder: the rerun encodes only the rest
    import packing

    real_append, appended = packing.PackWriter.append, []

    def append_then_stop(writer, latents, batch):
        if appended:
            raise KeyboardInterrupt
        appended.append(batch)
        real_append(writer, latents, batch)

    monkeypatch.setattr(packing.PackWriter, "append", append_then_stop)
    counted.clear()
    assert encode(images, tmp_path / "again", vae_dir, "--pack", "--batch-size", "2") == 130  # Ctrl-C: no traceback
    assert not os.path.exists(tmp_path / "again" / "latents.npy")
    monkeypatch.setattr(packing.PackWriter, "append", real_append)
    counted.clear()
    assert encode(images, tmp_path / "again", vae_dir, "--pack", "--batch-size", "2") == 0
    assert counted == [1] and "2 already in packed shards" in capsys.readouterr().out
    assert load_shard(tmp_path / "again")[0] == new_names


def test_pack_leaves_out_broken_images_and_adds_them_once_fixed(vae_dir, tmp_path, monkeypatch, capsys):
    folder = write_images(tmp_path / "in")
    with open(os.path.join(folder, "b1_broken.png"), "wb") as f:
        f.write(b"this is not a png" * 10)
    assert encode(folder, tmp_path / "out", vae_dir, "--pack") == 1
    assert os.path.join(folder, "b1_broken.png") in capsys.readouterr().err
    assert load_shard(tmp_path / "out")[0] == sorted(f"{s}.{e}" for s, (_, _, e) in IMAGES.items())
    os.remove(os.path.join(folder, "b1_broken.png"))
    write_images(folder, {"b1_broken": (30, 30, "png")})
    counted = counting_encodes(monkeypatch)
    assert encode(folder, tmp_path / "out", vae_dir, "--pack") == 0
    assert counted == [1] and load_shard(tmp_path / "out")[0][1] == "b1_broken.png"


def test_pack_refuses_format_and_values_beyond_float16(image_dir, vae_dir, tmp_path, monkeypatch, capsys):
    assert encode(image_dir, tmp_path / "out", vae_dir, "--pack", "--format", "npy") == 2
    assert "--format" in capsys.readouterr().err
    import encode as encode_module

    real = encode_module.encode_raw
    monkeypatch.setattr(encode_module, "encode_raw", lambda *a, **k: real(*a, **k) * 1e5)  # beyond 65504
    assert encode(image_dir, tmp_path / "out", vae_dir, "--pack") == 1
    assert "--pack-dtype float32" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out" / "latents.npy")
