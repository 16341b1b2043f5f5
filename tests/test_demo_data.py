"""The synthetic demo latents: files, determinism, idempotence, preview fidelity, style vs content."""

import os

import pytest
import torch

from demo_data import (MANIFEST_NAME, SHAPE_KINDS, compose_domain_rgb, domain_style, generate_demo_data,
                       rgb_to_scaled_latent)
from latents import SD15_LATENT_SCALE, LatentSpace
from vae import latent_preview

DOMAINS = ["photo", "Hayao", "monet", "cezanne", "vangogh"]


def load_domain(root, domain, n):
    return torch.stack([torch.load(os.path.join(root, domain, f"{domain}_{k:05d}.pt"), weights_only=True)
                        for k in range(n)])  # [n, 4, H, W]


def mtimes(root):
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(root) for f in files}


def test_files_shapes_and_dtype(tmp_path):
    lines = []
    root = generate_demo_data(tmp_path, ["a", "b", "c"], files_per_domain=5, size=16, log=lines.append)
    assert root == str(tmp_path)
    assert len(lines) == 1 and "wrote" in lines[0]
    assert os.path.isfile(tmp_path / MANIFEST_NAME)
    for domain in ["a", "b", "c"]:
        assert sorted(os.listdir(tmp_path / domain)) == [f"{domain}_{k:05d}.pt" for k in range(5)]
        for name in os.listdir(tmp_path / domain):
            latent = torch.load(tmp_path / domain / name, weights_only=True)
            assert type(latent) is torch.Tensor
            assert latent.shape == (4, 16, 16) and latent.dtype == torch.float32
            assert torch.isfinite(latent).all()
            assert latent.untyped_storage().nbytes() == latent.numel() * 4  # not a view of the whole domain


def test_same_arguments_same_bytes(tmp_path):
    args = dict(domains=["x", "y"], files_per_domain=4, size=16, seed=3)
    generate_demo_data(tmp_path / "one", **args, log=lambda _: None)
    generate_demo_data(tmp_path / "two", **args, log=lambda _: None)
    generate_demo_data(tmp_path / "other_seed", **{**args, "seed": 4}, log=lambda _: None)
    for domain in args["domains"]:
        for k in range(4):
            name = f"{domain}/{domain}_{k:05d}.pt"
            assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
            assert (tmp_path / "one" / name).read_bytes() != (tmp_path / "other_seed" / name).read_bytes()


def test_second_call_reuses_and_changed_arguments_regenerate(tmp_path):
    lines = []
    generate_demo_data(tmp_path, ["a", "b"], files_per_domain=6, size=8, log=lines.append)
    before = mtimes(tmp_path)
    generate_demo_data(tmp_path, ["a", "b"], files_per_domain=6, size=8, log=lines.append)
    assert mtimes(tmp_path) == before
    assert "reusing" in lines[-1]

    first = load_domain(tmp_path, "a", 3)
    generate_demo_data(tmp_path, ["a", "b"], files_per_domain=3, size=8, seed=1, log=lines.append)
    assert "wrote" in lines[-1]
    assert sorted(os.listdir(tmp_path / "a")) == [f"a_{k:05d}.pt" for k in range(3)]  # stale files removed
    assert not torch.equal(load_domain(tmp_path, "a", 3), first)


def test_missing_file_regenerates(tmp_path):
    generate_demo_data(tmp_path, ["a", "b"], files_per_domain=3, size=8, log=lambda _: None)
    os.remove(tmp_path / "b" / "b_00001.pt")
    generate_demo_data(tmp_path, ["a", "b"], files_per_domain=3, size=8, log=lambda _: None)
    assert os.path.isfile(tmp_path / "b" / "b_00001.pt")


def test_rejects_fewer_than_two_domains(tmp_path):
    with pytest.raises(ValueError, match="two distinct"):
        generate_demo_data(tmp_path, ["only"], log=lambda _: None)


def test_preview_shows_the_composed_rgb(tmp_path):
    generate_demo_data(tmp_path, DOMAINS, files_per_domain=4, size=32, seed=2, log=lambda _: None)
    for index, domain in enumerate(DOMAINS):
        rgb, _ = compose_domain_rgb(index, 4, size=32, seed=2)  # [4, 3, 32, 32] in [-1, 1]
        raw = load_domain(tmp_path, domain, 4)
        preview = latent_preview(raw * SD15_LATENT_SCALE, upscale=1)  # [4, 3, 32, 32] in [0, 1]
        torch.testing.assert_close(preview, (rgb + 1) / 2, atol=1e-4, rtol=0)


def test_pseudo_inverse_is_exact_on_colours():
    rgb = torch.rand(2, 3, 5, 5) * 2 - 1
    preview = latent_preview(rgb_to_scaled_latent(rgb), upscale=1)
    torch.testing.assert_close(preview, (rgb + 1) / 2, atol=1e-5, rtol=0)


@pytest.mark.parametrize("space", [LatentSpace(4, 0.13025, 0.0, 8), LatentSpace(16, 1.5305, 0.0609, 8),
                                   LatentSpace(16, 0.3611, 0.1159, 8)], ids=["sdxl", "sd3", "flux1"])
def test_demo_data_of_other_spaces_previews_as_its_rgb(tmp_path, space):
    """SDXL's, SD3's and FLUX.1's demo latents: their own preview factors and bias show the RGB."""
    generate_demo_data(tmp_path, DOMAINS, files_per_domain=2, size=16, seed=1, space=space, log=lambda _: None)
    rgb, _ = compose_domain_rgb(0, 2, size=16, seed=1)
    raw = load_domain(tmp_path, DOMAINS[0], 2)
    preview = latent_preview(space.normalize(raw), space=space, upscale=1)
    torch.testing.assert_close(preview, (rgb + 1) / 2, atol=1e-4, rtol=0)


def test_latents_in_a_realistic_range(tmp_path):
    generate_demo_data(tmp_path, DOMAINS, files_per_domain=16, log=lambda _: None)
    raw = torch.cat([load_domain(tmp_path, d, 16) for d in DOMAINS])
    scaled = raw * SD15_LATENT_SCALE
    assert 0.5 < scaled.std() < 1.5  # SD1.5 scaled latents have std ~1 (raw ~5.5)
    assert scaled.abs().max() < 6


def test_domains_separable_by_channel_statistics(tmp_path):
    n_train, n_test = 24, 24
    generate_demo_data(tmp_path, DOMAINS, files_per_domain=n_train + n_test, log=lambda _: None)
    features = []
    for domain in DOMAINS:
        raw = load_domain(tmp_path, domain, n_train + n_test)
        features.append(torch.cat([raw.mean(dim=(2, 3)), raw.std(dim=(2, 3))], dim=1))  # [n, 8]
    features = torch.stack(features)  # [D, n, 8]
    centroids = features[:, :n_train].mean(dim=1)  # [D, 8]
    held_out = features[:, n_train:].reshape(-1, 8)
    truth = torch.arange(len(DOMAINS)).repeat_interleave(n_test)
    predicted = torch.cdist(held_out, centroids).argmin(dim=1)
    assert (predicted == truth).float().mean() > 0.95


def test_content_distribution_shared_across_domains():
    n = 400
    stats = []
    for index in range(len(DOMAINS)):
        _, labels = compose_domain_rgb(index, n, size=32, seed=0)  # [n, 32, 32]
        kinds = torch.stack([(labels == k + 1).float().mean(dim=(1, 2)) for k in range(len(SHAPE_KINDS))])
        stats.append(torch.cat([(labels > 0).float().mean(dim=(1, 2)).mean()[None], kinds.mean(dim=1)]))
    stats = torch.stack(stats)  # [D, 1 + kinds]: shape coverage, then coverage per kind
    assert (stats[:, 0] > 0.1).all() and (stats[:, 0] < 0.6).all()
    assert (stats.max(dim=0).values - stats.min(dim=0).values < 0.04).all(), stats
    # different samples per domain, not one layout copied
    _, labels_0 = compose_domain_rgb(0, 8, size=32, seed=0)
    _, labels_1 = compose_domain_rgb(1, 8, size=32, seed=0)
    assert not torch.equal(labels_0, labels_1)


def test_every_shape_kind_stands_out_from_the_background():
    for index in range(8):  # beyond the six base styles too
        rgb, labels = compose_domain_rgb(index, 64, size=32, seed=0)  # [n, 3, H, W], [n, H, W]
        pixels = rgb.permute(1, 0, 2, 3)  # [3, n, H, W]
        background = pixels[:, labels == 0].mean(dim=1)  # [3]
        for k in range(len(SHAPE_KINDS)):
            shape = pixels[:, labels == k + 1].mean(dim=1)
            assert (shape - background).norm() > 0.4, (index, SHAPE_KINDS[k], shape, background)


def test_domain_styles_differ_beyond_six():
    palettes = torch.stack([torch.as_tensor(domain_style(i)["colors"]) for i in range(12)])  # [12, 4, 3]
    distances = torch.cdist(palettes.flatten(1), palettes.flatten(1))
    off_diagonal = distances[~torch.eye(12, dtype=torch.bool)]
    assert off_diagonal.min() > 0.3
    # the seed gives a nearby variant of the same style, never another style
    variant = (torch.as_tensor(domain_style(3, seed=1)["colors"]) - palettes[3]).abs().max()
    assert 0 < variant < 0.1
