"""metrics.py: FID / KID against scipy and numpy, LPIPS against its formula, the Inception and
AlexNet loaders (stand-in TorchScript files, random AlexNet weights in torchvision's format, the
offline error) and the StarGAN v2 protocol on tiny random networks and a tiny random VAE."""

import math
import os
import socket
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import linalg

import metrics
from conftest import TINY_MODEL, write_random_alexnet
from latents import SD15
from model import AdaIN, build_models
from runtime import InputError

DOMAINS = ("a", "b", "c")


# ---------------------------------------------------------------------------------------------
# FID and KID


def numpy_fid(real, fake):
    """Heusel et al.'s formula with scipy's sqrtm, as pytorch-fid writes it."""
    real, fake = real.double().numpy(), fake.double().numpy()
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def numpy_kid(real, fake):
    """Unbiased MMD^2 (Binkowski et al.) with k(x, y) = (x.y / d + 1)^3, written out with loops over
    the kernel terms' definitions rather than torchmetrics' matrix sums."""
    x, y = real.double().numpy(), fake.double().numpy()
    m, d = len(x), x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    off = ~np.eye(m, dtype=bool)
    return float(kxx[off].sum() / (m * (m - 1)) + kyy[off].sum() / (m * (m - 1)) - 2 * kxy.sum() / m ** 2)


def test_frechet_distance_matches_scipy():
    g = torch.Generator().manual_seed(1)
    real = torch.randn(40, 12, generator=g)
    fake = torch.randn(50, 12, generator=g) * 1.3 + 0.2
    assert metrics.frechet_distance(real, fake) == pytest.approx(numpy_fid(real, fake), rel=1e-6)


def test_fid_is_zero_on_itself_and_grows_with_a_shift():
    feats = torch.randn(64, 8, generator=torch.Generator().manual_seed(2))
    assert abs(metrics.frechet_distance(feats, feats)) < 1e-6
    fids = [metrics.frechet_distance(feats, feats + shift) for shift in (0.1, 0.5, 2.0)]
    assert 0 < fids[0] < fids[1] < fids[2]
    assert fids[2] == pytest.approx(8 * 2.0 ** 2, rel=1e-6)  # a pure shift adds |mu1 - mu2|^2 only


def test_kid_matches_hand_computation():
    g = torch.Generator().manual_seed(3)
    real = torch.rand(30, 16, generator=g)
    fake = torch.rand(30, 16, generator=g) + 0.1
    # subset_size = n: every subset is the whole set reordered, and MMD ignores the order
    mean, std = metrics.kernel_inception_distance(real, fake, subset_size=30, subsets=5)
    assert mean == pytest.approx(numpy_kid(real, fake), rel=1e-4, abs=1e-7)
    assert std == pytest.approx(0, abs=1e-6)
    # two independent draws of one distribution: near 0 (unbiased, so either sign), far below the shift's
    same = metrics.kernel_inception_distance(real, torch.rand(30, 16, generator=g), subset_size=30, subsets=2)[0]
    assert abs(same) < mean / 10


def test_kid_subsets_are_seeded_and_leave_the_global_rng_alone():
    g = torch.Generator().manual_seed(4)
    real, fake = torch.rand(40, 8, generator=g), torch.rand(50, 8, generator=g)
    state = torch.get_rng_state()
    first = metrics.kernel_inception_distance(real, fake, subset_size=20, subsets=10, seed=7)
    assert first == metrics.kernel_inception_distance(real, fake, subset_size=20, subsets=10, seed=7)
    assert first != metrics.kernel_inception_distance(real, fake, subset_size=20, subsets=10, seed=8)
    assert torch.equal(torch.get_rng_state(), state)


def test_fid_and_kid_need_two_samples_a_side():
    one, many = torch.randn(1, 4), torch.randn(10, 4)
    with pytest.raises(ValueError, match="at least 2"):
        metrics.frechet_distance(many, one)
    with pytest.raises(ValueError, match="at least 2"):
        metrics.kernel_inception_distance(one, many, subset_size=1)
    with pytest.raises(ValueError, match="subset size"):
        metrics.kernel_inception_distance(many, many, subset_size=11)


# ---------------------------------------------------------------------------------------------
# LPIPS


@pytest.fixture(scope="module")
def alexnet_weights(tmp_path_factory):
    """Random AlexNet weights in torchvision's state-dict format (He init, so activations neither
    vanish nor explode), plus a classifier key that the loader must ignore."""
    path = tmp_path_factory.mktemp("alexnet") / metrics.ALEXNET_FILE
    return str(path), write_random_alexnet(path)


@pytest.fixture(scope="module")
def lpips(alexnet_weights):
    return metrics.load_lpips(alexnet_weights[0])


def independent_lpips(state, a, b):
    """LPIPS v0.1 written from the paper and torchvision's AlexNet definition with functional ops."""
    import torchmetrics

    lin_path = os.path.join(os.path.dirname(torchmetrics.__file__), "functional", "image", "lpips_models", "alex.pth")
    lins = torch.load(lin_path, map_location="cpu", weights_only=True)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def relus(x):
        x = (2 * x - 1 - shift) / scale
        out = []
        x = F.relu(F.conv2d(x, state["features.0.weight"], state["features.0.bias"], stride=4, padding=2))
        out.append(x)
        x = F.relu(F.conv2d(F.max_pool2d(x, 3, 2), state["features.3.weight"], state["features.3.bias"], padding=2))
        out.append(x)
        x = F.max_pool2d(x, 3, 2)
        for i in (6, 8, 10):
            x = F.relu(F.conv2d(x, state[f"features.{i}.weight"], state[f"features.{i}.bias"], padding=1))
            out.append(x)
        return out

    total = torch.zeros(len(a))
    for k, (fa, fb) in enumerate(zip(relus(a), relus(b))):
        fa = fa / (fa.norm(dim=1, keepdim=True) + 1e-10)
        fb = fb / (fb.norm(dim=1, keepdim=True) + 1e-10)
        w = lins[f"lin{k}.model.1.weight"].view(1, -1, 1, 1)
        total += ((fa - fb) ** 2 * w).sum(dim=1).mean(dim=(1, 2))
    return total


def test_lpips_zero_on_identical_positive_and_symmetric(lpips):
    g = torch.Generator().manual_seed(6)
    a, b = torch.rand(3, 3, 48, 48, generator=g), torch.rand(3, 3, 48, 48, generator=g)
    assert lpips(a, a).shape == (3,)
    assert torch.all(lpips(a, a).abs() < 1e-6)
    d = lpips(a, b)
    assert torch.all(d > 0)
    assert torch.allclose(d, lpips(b, a), atol=1e-6)


def test_lpips_matches_independent_formula(lpips, alexnet_weights):
    g = torch.Generator().manual_seed(7)
    a, b = torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    expected = independent_lpips(alexnet_weights[1], a, b)
    assert torch.allclose(lpips(a, b), expected, rtol=1e-4, atol=1e-6)


def test_mean_pairwise_lpips_is_the_mean_over_pairs(lpips):
    groups = torch.rand(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(8))  # [S, K, 3, H, W]
    pairs = [lpips(groups[:, i], groups[:, j]) for i in range(4) for j in range(i + 1, 4)]
    assert torch.allclose(metrics.mean_pairwise_lpips(lpips, groups), torch.stack(pairs).mean(0), atol=1e-6)


def test_load_lpips_wrong_format_names_the_file(tmp_path):
    path = tmp_path / "not_alexnet.pth"
    torch.save({"features.0.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(ValueError, match="not_alexnet.pth.*features.0.weight"):
        metrics.load_lpips(str(path))
    with pytest.raises(ValueError, match="does_not_exist.pth.*--lpips-weights"):
        metrics.load_lpips(str(tmp_path / "does_not_exist.pth"))


# ---------------------------------------------------------------------------------------------
# Inception loading


class StyleGANFormStandIn(nn.Module):
    """The calling convention of StyleGAN2-ADA's inception-2015-12-05.pt: uint8 in 0..255, any size,
    resized and scaled inside, pool features with return_features=True."""

    def __init__(self, dim: int = 2048):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 5, stride=4)
        self.fc = nn.Linear(8, dim)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert img.dtype == torch.uint8
        x = img.to(torch.float32)
        if img.shape[2] != 299 or img.shape[3] != 299:
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = (x - 128) / 128
        feats = self.fc(F.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1).flatten(1))  # [N, dim]
        return feats if return_features else feats[:, :1008]


class PlainFormStandIn(nn.Module):
    """A plain TorchScript forward(x): x in [-1, 1] at 299x299 -> [N, dim]."""

    def __init__(self, dim: int = 2048):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 5, stride=4)
        self.fc = nn.Linear(8, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[2] == 299 and x.shape[3] == 299
        # (levels - 128) / 128 lies in [-1, 0.992]; bilinear upsampling may round a hair outside
        assert bool(x.min() >= -1 - 1e-5) and bool(x.max() <= 1 + 1e-5)
        return self.fc(F.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1).flatten(1))


class TwoInputs(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + y


def script_to(path, module):
    torch.jit.save(torch.jit.script(module), str(path))
    return str(path)


def test_load_inception_accepts_both_forms_and_agrees(tmp_path):
    torch.manual_seed(0)
    stylegan = StyleGANFormStandIn()
    plain = PlainFormStandIn()
    plain.load_state_dict(stylegan.state_dict())  # the same network in the two calling conventions
    a = metrics.load_inception(script_to(tmp_path / "inception-2015-12-05.pt", stylegan))
    b = metrics.load_inception(script_to(tmp_path / "plain.pt", plain))
    assert (a.form, b.form) == (metrics.FORM_STYLEGAN, metrics.FORM_PLAIN)
    assert a.identity.startswith("inception-2015-12-05.pt:") and a.identity != b.identity
    images = torch.rand(3, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # features stay float32 under autocast
        fa, fb = a(images), b(images)
    assert fa.shape == (3, 2048) and fa.dtype == torch.float32 and fb.dtype == torch.float32
    assert torch.allclose(fa, fb, atol=1e-5)  # same scaling and (here) the same resize
    assert not a.training and not a.train().training
    # torchmetrics takes the module as its feature extractor as is: num_features spares its dummy
    # forward, and neither torch-fidelity nor torchvision is needed
    from torchmetrics.image.fid import FrechetInceptionDistance

    small = metrics.InceptionFeatures(torch.jit.script(PlainFormStandIn(dim=16)), metrics.FORM_PLAIN, num_features=16)
    fid = FrechetInceptionDistance(feature=small)  # 16-d: a 2048-d FID costs seconds on 2 cores
    fid.update(images, real=True)
    fid.update(images.flip(-1), real=False)  # [0, 1] float images straight in
    assert math.isfinite(float(fid.compute()))


def test_load_inception_wrong_format_names_the_file(tmp_path):
    state_dict = tmp_path / "state_dict.pt"
    torch.save({"weight": torch.zeros(2)}, state_dict)
    with pytest.raises(ValueError, match="state_dict.pt.*TorchScript"):
        metrics.load_inception(str(state_dict))
    with pytest.raises(ValueError, match="two_inputs.pt.*signature"):
        metrics.load_inception(script_to(tmp_path / "two_inputs.pt", TwoInputs()))
    with pytest.raises(ValueError, match=r"small.pt.*\(1, 16\)"):
        metrics.load_inception(script_to(tmp_path / "small.pt", PlainFormStandIn(dim=16)))
    with pytest.raises(ValueError, match="missing.pt.*--inception-weights"):
        metrics.load_inception(str(tmp_path / "missing.pt"))


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty torch hub dir and download URLs on loopback that fail: one port refuses
    connections, the other accepts them and never answers (a black hole, where only the timeout
    ends the wait)."""
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setattr(metrics, "DOWNLOAD_TIMEOUT_S", 1)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused_port = closed.getsockname()[1]
    closed.close()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    monkeypatch.setattr(metrics, "INCEPTION_URL", f"http://127.0.0.1:{silent.getsockname()[1]}/{metrics.INCEPTION_FILE}")
    monkeypatch.setattr(metrics, "ALEXNET_URL", f"http://127.0.0.1:{refused_port}/{metrics.ALEXNET_FILE}")
    yield hub
    silent.close()


def test_no_weights_offline_is_a_fast_clear_error(offline_hub):
    start = time.perf_counter()
    with pytest.raises(ValueError) as err:
        metrics.load_inception()
    message = str(err.value)
    for part in (metrics.INCEPTION_FILE, "--inception-weights", "evaluation.inception_weights",
                 str(offline_hub / "checkpoints" / metrics.INCEPTION_FILE)):
        assert part in message
    with pytest.raises(ValueError, match=r"alexnet-owt-7be5be79.pth.*--lpips-weights.*evaluation.lpips_weights"):
        metrics.load_lpips()
    assert time.perf_counter() - start < 5
    assert not [p for p in offline_hub.rglob("*") if p.is_file()]  # no partial download left behind


def test_weights_in_the_hub_cache_are_used_without_a_network(offline_hub, alexnet_weights):
    target = offline_hub / "checkpoints" / metrics.ALEXNET_FILE
    target.parent.mkdir(parents=True)
    target.write_bytes(open(alexnet_weights[0], "rb").read())
    assert isinstance(metrics.load_lpips(), metrics.LPIPS)


# ---------------------------------------------------------------------------------------------
# the protocol


@pytest.fixture(scope="module")
def tiny_decode(tmp_path_factory):
    """The tiny random diffusers VAE (factor 2: 16x16 latents -> 32x32 RGB), counting decoded latents."""
    from conftest import make_tiny_vae
    from vae import load_vae

    vae = load_vae(make_tiny_vae(tmp_path_factory.mktemp("vae")))

    def decode(raw):
        decode.count += len(raw)
        return (vae.decode(raw.to(vae.dtype)).sample.float() / 2 + 0.5).clamp(0, 1)  # [n, 3, 32, 32]
    decode.count = 0
    return decode


def protocol_inputs(lpips, tiny_decode):
    torch.manual_seed(0)
    nets = build_models(num_domains=len(DOMAINS), **TINY_MODEL)
    for module in nets["generator"].modules():  # AdaIN starts at IN(x), blind to the style: give it a say
        if isinstance(module, AdaIN):
            nn.init.normal_(module.fc.weight, std=0.5)
    g = torch.Generator().manual_seed(9)
    real = {d: torch.randn(4, 4, 16, 16, generator=g) * 3 + i for i, d in enumerate(DOMAINS)}
    net = torch.jit.script(PlainFormStandIn(dim=16))  # 16-d features keep the test's FIDs cheap
    inception = metrics.InceptionFeatures(net, metrics.FORM_PLAIN, identity="stand-in-16", num_features=16)
    return dict(generator=nets["generator"], mapping_network=nets["mapping_network"],
                style_encoder=nets["style_encoder"], domains=DOMAINS, real=real, sources=real, decode=tiny_decode,
                inception=inception, lpips=lpips, space=SD15, latent_dim=TINY_MODEL["latent_dim"],
                num_outs=3, max_sources=3, batch_size=8, vae_id="tiny-random-vae")


def test_evaluate_translations_protocol(lpips, tiny_decode, tmp_path):
    inputs = protocol_inputs(lpips, tiny_decode)
    rng_state = torch.get_rng_state()
    tiny_decode.count = 0
    first = metrics.evaluate_translations(**inputs, seed=0, cache_dir=str(tmp_path))
    fakes = 2 * 6 * 3 * 3  # modes x tasks x sources x outputs
    assert tiny_decode.count == 3 * 4 + fakes  # every real latent decoded once, then the fakes
    n = len(DOMAINS)
    for metric in metrics.METRICS:
        for mode in metrics.MODES:
            tasks = [k for k in first if k.startswith(f"{metric}_{mode}/") and not k.endswith("/mean")]
            assert len(tasks) == n * (n - 1)
            assert f"{metric}_{mode}/mean" in first
            assert first[f"{metric}_{mode}/mean"] == pytest.approx(np.mean([first[k] for k in tasks]))
    assert {"FID_latent/a2b", "KID_reference/c2a", "LPIPS_latent/b2c"} <= set(first)
    protocol = first.pop("protocol")
    assert set(first) == set(metrics.metric_keys(DOMAINS)) | {"KID_subset_size"}
    assert first["KID_subset_size"] == 4  # min(1000, 4 real, 3 sources x 3 outputs)
    assert all(math.isfinite(v) for v in first.values())
    # what the numbers depend on
    assert protocol["n_real"] == {"a": 4, "b": 4, "c": 4} and protocol["n_sources"] == {"a": 3, "b": 3, "c": 3}
    assert protocol["fakes_per_task"]["a2b"] == 9 and protocol["kid_subset_size"] == 4
    assert set(protocol["kid_std"]) == {f"{m}/{t}" for m in metrics.MODES for t in ("b2a", "c2a", "a2b", "c2b",
                                                                                      "a2c", "b2c")}
    assert all(v >= 0 for v in protocol["kid_std"].values()) and protocol["nonfinite_outputs"] == {}
    assert (protocol["inception"], protocol["vae"], protocol["seed"], protocol["batch_size"]) == (
        "stand-in-16", "tiny-random-vae", 0, 8)
    assert protocol["real_features"]["a"].startswith("computed and cached (inception_real_")
    assert protocol["warnings"] and "below the 1000 per side" in protocol["warnings"][0]
    assert all(first[k] > 0 for k in first if k.startswith("LPIPS"))
    assert torch.equal(torch.get_rng_state(), rng_state)

    tiny_decode.count = 0
    second = metrics.evaluate_translations(**inputs, seed=0, cache_dir=str(tmp_path))
    assert tiny_decode.count == fakes  # the real domains' features came from the cache
    assert second.pop("protocol")["real_features"]["a"].startswith("cached (inception_real_")
    assert second == first  # same seed, same numbers (and the cached reals equal the computed ones)

    other = metrics.evaluate_translations(**inputs, seed=1, modes=("latent",))
    assert set(other) == {k for k in first if "_reference/" not in k} | {"protocol"}
    assert other["LPIPS_latent/a2b"] != first["LPIPS_latent/a2b"]

    table = metrics.format_table(first).splitlines()
    assert table[0].split() == ["task"] + [f"{m}_{mode}" for mode in metrics.MODES for m in metrics.METRICS]
    assert [line.split()[0] for line in table[1:8]] == ["b2a", "c2a", "a2b", "c2b", "a2c", "b2c", "mean"]
    assert table[-1] == "KID subset size: 4"


def test_evaluation_reports_progress_per_batch_and_can_be_stopped(lpips, tiny_decode, tmp_path):
    """progress(n, total) after every batch: the counts add up to the total (reals, then every
    translation; cached reals count as done at once), and an exception from it stops the work."""
    inputs = protocol_inputs(lpips, tiny_decode)
    calls = []
    metrics.evaluate_translations(**inputs, seed=0, cache_dir=str(tmp_path), progress=lambda n, t: calls.append((n, t)))
    total = 3 * 4 + 2 * 6 * 3 * 3  # reals + modes x tasks x sources x outputs
    assert {t for _, t in calls} == {total} and sum(n for n, _ in calls) == total and len(calls) > 6
    calls.clear()
    metrics.evaluate_translations(**inputs, seed=0, cache_dir=str(tmp_path), progress=lambda n, t: calls.append((n, t)))
    assert sum(n for n, _ in calls) == total  # the cached reals too

    class Stop(Exception):
        pass

    def stop_after_three(n, t, seen=[]):
        seen.append(n)
        if len(seen) == 3:
            raise Stop
    tiny_decode.count = 0
    with pytest.raises(Stop):
        metrics.evaluate_translations(**inputs, seed=0, progress=stop_after_three)
    assert tiny_decode.count < 3 * 4 + 9  # nothing decoded after the third batch's


def test_evaluate_translations_rejects_too_few_samples(lpips, tiny_decode):
    inputs = protocol_inputs(lpips, tiny_decode)
    inputs["real"] = {**inputs["real"], "b": inputs["real"]["b"][:1]}
    with pytest.raises(ValueError, match="'b' has 1 real"):
        metrics.evaluate_translations(**inputs)
    inputs["real"] = {d: v for d, v in inputs["real"].items() if d != "c"}
    with pytest.raises(ValueError, match=r"no real latents for domain\(s\) \['c'\]"):
        metrics.evaluate_translations(**inputs)


def test_networks_see_scaled_latents_and_decode_gets_raw_ones(lpips, tiny_decode):
    """With G(x, s) = x every fake is its source: the decode must receive the raw source latents
    (outputs / latent_scale), E scaled latents of the target domain, F z ~ N(0, I) of latent_dim,
    and LPIPS among a source's identical outputs is 0."""
    inputs = protocol_inputs(lpips, tiny_decode)
    scale, real = inputs["space"].scaling_factor, inputs["real"]
    seen = {"decoded": [], "refs": [], "z": []}

    def identity_generator(x, s):
        return x

    def mapping_network(z, y):
        seen["z"].append(z)
        return torch.zeros(len(z), TINY_MODEL["style_dim"])

    def style_encoder(x, y):
        seen["refs"].append((x, y))
        return torch.zeros(len(x), TINY_MODEL["style_dim"])

    def decode(raw):
        seen["decoded"].append(raw.clone())
        return tiny_decode(raw)

    inputs.update(generator=identity_generator, mapping_network=mapping_network, style_encoder=style_encoder,
                  decode=decode, domains=("a", "b"), real={d: real[d] for d in "ab"}, max_sources=2, num_outs=3)
    results = metrics.evaluate_translations(**inputs)
    fakes = seen["decoded"][1]  # order: the reals of target a, then the fakes of b2a (a chunk of 2 x 3)
    assert torch.allclose(fakes, real["b"][:2].repeat_interleave(3, dim=0), atol=1e-5)
    assert results["LPIPS_latent/a2b"] == 0 and results["LPIPS_reference/b2a"] == 0
    assert all(z.shape[1] == TINY_MODEL["latent_dim"] for z in seen["z"])
    for refs, y in seen["refs"]:
        target = "ab"[int(y[0])]
        assert bool((y == y[0]).all())
        # every reference is a latent of the target domain, scaled
        assert all(any(torch.allclose(r / scale, t, atol=1e-5) for t in real[target]) for r in refs)


def test_evaluator_loads_everything_or_says_what_is_missing(tmp_path, tiny_vae_dir, alexnet_weights, lpips,
                                                            tiny_decode):
    inception_file = script_to(tmp_path / "inception.pt", StyleGANFormStandIn())
    why = "evaluation.every_epochs is set: "
    evaluator = metrics.Evaluator.load(tiny_vae_dir, None, inception_file, alexnet_weights[0], "cpu", what=why)
    assert evaluator.vae_id.startswith(tiny_vae_dir + "||")
    images = evaluator.decode(torch.randn(2, 4, 16, 16))
    assert images.shape == (2, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    with pytest.raises(InputError, match="^evaluation.every_epochs is set: .*no_vae_here.*linear latent preview"):
        metrics.Evaluator.load(str(tmp_path / "no_vae_here"), None, inception_file, alexnet_weights[0], "cpu", what=why)
    with pytest.raises(InputError, match="^evaluation.every_epochs is set: .*missing.pt.*--inception-weights"):
        metrics.Evaluator.load(tiny_vae_dir, None, str(tmp_path / "missing.pt"), alexnet_weights[0], "cpu", what=why)

    # calling it runs the protocol on a dict of EMA networks (a 16-d stand-in Inception keeps FID cheap)
    inputs = protocol_inputs(lpips, tiny_decode)
    small = metrics.Evaluator(evaluator.vae, evaluator.vae_id, inputs["inception"], lpips, "cpu", batch_size=8)
    nets = {k: inputs[k] for k in ("generator", "mapping_network", "style_encoder")}
    results = small(nets, DOMAINS, inputs["real"], inputs["real"], inputs["space"], inputs["latent_dim"],
                    num_outs=2, max_sources=2, modes=("latent",))
    assert set(results) == set(metrics.metric_keys(DOMAINS, modes=("latent",))) | {"KID_subset_size", "protocol"}
    assert metrics.metric_keys(DOMAINS)[:3] == ["FID_latent/mean", "KID_latent/mean", "LPIPS_latent/mean"]


def test_plain_stand_in_takes_bilinear_rounding():
    """Upsampling a picture holding -1 gives -1.0000001 on one thread: the stand-in must not fail CI
    by rounding."""
    torch.manual_seed(0)
    levels = (torch.rand(2, 3, 32, 32) * 255).round()
    levels[0, 0] = 0  # a black channel: exactly -1 after scaling
    x = F.interpolate((levels - 128) / 128, size=(299, 299), mode="bilinear", align_corners=False)
    assert x.min() < -1  # the rounding this test is about
    torch.jit.script(PlainFormStandIn(dim=4))(x)


@pytest.mark.parametrize("form", [metrics.FORM_STYLEGAN, metrics.FORM_PLAIN])
def test_non_finite_pictures_never_get_finite_features(form):
    """The StyleGAN2-ADA form casts to uint8, which turns NaN into 0 (a black picture with plausible
    features): a non-finite picture gets NaN features in either form."""
    torch.manual_seed(0)
    net = torch.jit.script(StyleGANFormStandIn(dim=8) if form == metrics.FORM_STYLEGAN else PlainFormStandIn(dim=8))
    inception = metrics.InceptionFeatures(net, form, num_features=8)
    images = torch.rand(3, 3, 32, 32)
    images[1, 0, 5, 5] = float("nan")
    images[2, 2, 0, 0] = float("inf")
    feats = inception(images)
    assert torch.isfinite(feats[0]).all() and torch.isnan(feats[1:]).all()


def test_a_diverged_generator_makes_every_metric_of_its_tasks_nan(lpips, tiny_decode):
    """A generator whose outputs are NaN for one target domain: that target's tasks report NaN for
    FID, KID and LPIPS (and so do the means), the others stay finite, and the protocol says how many
    outputs were not finite."""
    inputs = protocol_inputs(lpips, tiny_decode)
    generator = inputs["generator"]
    MARK = 1e4  # the style F and E give domain c here; the generator diverges on it

    class MarkDomainC(nn.Module):  # wraps F or E
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, z_or_x, y):
            s = self.net(z_or_x, y)  # [B, S]
            return torch.where((y == 2)[:, None], torch.full_like(s, MARK), s)

    class NaNOnMarked(nn.Module):
        def forward(self, x, s):
            out = generator(x, s)  # [B, 4, h, w]
            return torch.where((s[:, :1] == MARK)[:, :, None, None], torch.full_like(out, float("nan")), out)

    inputs.update(generator=NaNOnMarked(), mapping_network=MarkDomainC(inputs["mapping_network"]),
                  style_encoder=MarkDomainC(inputs["style_encoder"]))
    results = metrics.evaluate_translations(**inputs, seed=0)
    protocol = results.pop("protocol")
    del results["KID_subset_size"]
    for key, value in results.items():
        task = key.split("/")[1]
        assert math.isnan(value) if task in ("a2c", "b2c", "mean") else math.isfinite(value), key
    assert protocol["nonfinite_outputs"] == {f"{m}/{t}": 9 for m in metrics.MODES for t in ("a2c", "b2c")}


def test_references_of_one_source_are_drawn_without_replacement():
    rng = torch.Generator().manual_seed(0)
    draws = metrics.reference_draws(200, 4, 4, rng)  # as many outputs as references: each once
    assert draws.shape == (200, 4) and all(sorted(row.tolist()) == [0, 1, 2, 3] for row in draws)
    draws = metrics.reference_draws(50, 10, 4, rng)  # more outputs than references: each round uses every one
    assert all(sorted(row[:8].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3] for row in draws)
    draws = metrics.reference_draws(50, 3, 100, rng)
    assert all(len(set(row.tolist())) == 3 for row in draws) and draws.max() < 100
