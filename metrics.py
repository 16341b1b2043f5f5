"""Evaluation of latent translations as StarGAN v2 reports it (Choi et al., CVPR 2020, metrics/eval.py).

For every ordered pair (source, target) of domains, source != target, and each mode (latent-guided:
z ~ N(0, I) through F; reference-guided: a random target-domain latent through E), every source
latent is translated `num_outs` times by the EMA networks with a fixed seed and decoded to RGB.

- FID (Heusel et al., NeurIPS 2017) and KID (Binkowski et al., ICLR 2018) of the translations
  against the target domain's real latents, decoded by the same VAE (so the VAE's own
  reconstruction error is on both sides), on the 2048-d pool features of the TF-Inception that
  pytorch-fid, clean-fid and StyleGAN2-ADA use. The maths is torchmetrics'.
- LPIPS (Zhang et al., CVPR 2018, AlexNet with the v0.1 linear layers): the mean pairwise distance
  among the `num_outs` outputs of each source, averaged over sources (diversity; higher is more).

The protocol (`evaluate_translations`) takes tensors and networks and returns numbers: it reads no
checkpoint and no data folder (evaluate.py and the trainer pass the latents in), and it translates
as inference.py does. Files enter at two places only: the loaders (`load_inception`, `load_lpips`,
`Evaluator.load`) read weight files from explicit paths or the torch hub cache (downloaded once on a
machine with a network) and open the VAE through vae.py; and the real domains' features are cached
in `cache_dir`.
"""

import functools
import hashlib
import http.client
import importlib.util
import json
import os
import shutil
import sys
import urllib.request
import warnings
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from config import EVAL_METRICS as METRICS
from config import parse_metrics
from inference import mapped_styles, reference_styles, translate_raw
from latents import SD15, content_hash, load_error_reason, load_plain, plain_tensor
from runtime import InputError, atomic_write
from vae import decode, latent_preview, open_vae

MODES = ("latent", "reference")

# The StyleGAN2-ADA TorchScript of the TF-Inception graph (2015-12-05), also what clean-fid downloads.
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + INCEPTION_FILE
INCEPTION_SIZE = 299  # TF-Inception's input resolution
INCEPTION_DIM = 2048  # pool_3 features
FORM_STYLEGAN = "stylegan2-ada"  # net(uint8 [N, 3, H, W] in 0..255, return_features=True), resizes inside
FORM_PLAIN = "plain"  # net(x [N, 3, 299, 299] in [-1, 1]) -> [N, 2048]

# torchvision's ImageNet AlexNet; the name carries the first 8 hex digits of its sha256 (torch hub's rule)
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = "https://download.pytorch.org/models/" + ALEXNET_FILE
ALEXNET_SHA256_PREFIX = "7be5be79"
ALEXNET_CONVS = (0, 3, 6, 8, 10)  # indices of the five convolutions in torchvision's alexnet().features
ALEXNET_CHANNELS = (64, 192, 384, 256, 256)
LPIPS_MIN_SIZE = 32  # AlexNet's stride-4 conv and two 3x3/2 max-pools need about 31 px on a side

DOWNLOAD_TIMEOUT_S = 10  # per socket operation: an offline machine fails fast instead of hanging
KID_MAX_SUBSET = 1000  # StyleGAN2-ADA's max_subset_size
KID_SUBSETS = 100  # StyleGAN2-ADA's num_subsets, torchmetrics' default
PREVIEW_DECODE = ("preview-decoded: the linear latent preview (vae.latent_preview), not a VAE; not comparable with "
                  "published FIDs or VAE-decoded runs")
CACHE_VERSION = 2  # bump when the way real features are computed (or keyed) changes
# FID is biased upward at small sample counts (same-domain FID on real TF-Inception features: 54.4 at
# n=32, 40.6 at n=64, 27.2 at n=150), so below this many samples on a side the bias can exceed the
# differences between models: such FIDs compare only with FIDs of the same counts.
FID_SAMPLE_FLOOR = 1000


# ---------------------------------------------------------------------------------------------
# weight files


def hub_checkpoint(filename):
    """Where torch hub keeps downloaded weights: `torch.hub.get_dir()/checkpoints/<filename>`."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def sha256_file(path, chunk=1 << 20):
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url, dest, sha256_prefix=None):
    """Fetch `url` into `dest` through a temporary file (a broken download never sits at `dest`).

    Every socket operation times out after DOWNLOAD_TIMEOUT_S, so an offline machine gets an error
    in seconds, never a retry loop.
    """
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    # a rename of its own, not runtime.atomic_write: what fails here is mostly the network (refused,
    # timed out, reset), which atomic_write would report as a failed write of `dest`
    partial = f"{dest}.{os.getpid()}.part"
    print(f"downloading {url} -> {dest}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(partial, "wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
        if sha256_prefix and not sha256_file(partial).startswith(sha256_prefix):
            raise ValueError(f"the file downloaded from {url} does not have sha256 {sha256_prefix}...")
        os.replace(partial, dest)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return dest


def resolve_weights(path, filename, url, what, flag, key, sha256_prefix=None):
    """The weight file to load: `path` when given (it must exist), else the torch hub cache copy,
    downloaded once. Failing that, a ValueError that says which file, where to put it and which
    flag / config key names it."""
    if path:
        path = os.path.expanduser(str(path))
        if not os.path.isfile(path):
            raise InputError(f"{what} weights {path!r} (given by {flag} / {key}) do not exist; expected {filename}")
        return path
    cached = hub_checkpoint(filename)
    if os.path.isfile(cached):
        return cached
    try:
        return download(url, cached, sha256_prefix)
    except (OSError, ValueError, http.client.HTTPException) as err:  # URLError and timeouts are OSErrors
        raise InputError(
            f"{what} weights {filename} are not in the torch hub cache ({cached}) and downloading them from "
            f"{url} failed: {err}. On a machine without a network, download {filename} elsewhere and either "
            f"copy it to {cached} or pass its path with {flag} PATH (config key {key})."
        ) from None


# ---------------------------------------------------------------------------------------------
# Inception features


def inception_form(net):
    """Which of the two accepted TorchScript forms `net` is, read from its forward's signature."""
    try:
        names = [arg.name for arg in net.forward.schema.arguments][1:]  # drop `self`
    except AttributeError:
        return None
    if "return_features" in names:
        return FORM_STYLEGAN
    if len(names) == 1:
        return FORM_PLAIN
    return None


class InceptionFeatures(nn.Module):
    """TF-Inception pool features [N, 2048] float32 of RGB images [N, 3, H, W] in [0, 1], any size.

    Images are first quantised to 8 bits, as the official protocol does by writing PNG files. Then:
    - FORM_STYLEGAN: `net(uint8, return_features=True)`; the network resizes to 299 itself (its
      TF1-compatible bilinear) and scales by (x - 128) / 128.
    - FORM_PLAIN: we scale by (x - 128) / 128, the TF graph's own input scaling (pytorch-fid's
      2x - 1 maps 255 to 1 rather than 0.992), and resize to 299x299 bilinearly with align_corners=False, as
      pytorch-fid and torchmetrics do (for 256 -> 299, an upsampling, antialiasing changes nothing).
    Always float32, whatever autocast is active. `identity` names the weights for caches.
    """

    def __init__(self, net, form, identity="", num_features=INCEPTION_DIM):
        super().__init__()
        if form not in (FORM_STYLEGAN, FORM_PLAIN):
            raise ValueError(f"unknown Inception form {form!r}; expected {FORM_STYLEGAN!r} or {FORM_PLAIN!r}")
        self.net, self.form, self.identity, self.num_features = net, form, identity, num_features
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):  # a feature extractor never leaves eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, images):
        n = images.shape[0]
        # a non-finite picture (a diverged generator) must never become a finite feature: the uint8
        # cast of the StyleGAN2-ADA form turns NaN into 0, a black picture with a plausible FID
        finite = torch.isfinite(images.reshape(n, -1)).all(dim=1)  # [N]
        images = torch.where(finite[:, None, None, None], images, torch.zeros_like(images))  # the net sees pictures
        with torch.autocast(images.device.type, enabled=False):
            levels = (images.float().clamp(0, 1) * 255).round()  # [N, 3, H, W] in 0..255
            if self.form == FORM_STYLEGAN:
                feats = self.net(levels.to(torch.uint8), return_features=True)  # [N, 2048]
            else:
                x = (levels - 128) / 128  # [N, 3, H, W] in [-1, 0.992]
                if tuple(x.shape[-2:]) != (INCEPTION_SIZE, INCEPTION_SIZE):
                    x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
                feats = self.net(x)  # [N, 2048]
        feats = feats.reshape(n, -1).float()
        return torch.where(finite[:, None], feats, torch.full_like(feats, float("nan")))


def load_inception(path=None, device="cpu"):
    """The TF-Inception feature extractor from a TorchScript file, as an `InceptionFeatures`.

    `path`: the StyleGAN2-ADA / clean-fid `inception-2015-12-05.pt`, or a plain TorchScript
    `forward(x)` taking x in [-1, 1] at 299x299 and returning [N, 2048]; the form is read from the
    forward's signature. None: the torch hub cache copy, downloaded once on a machine with a network.
    A missing file, or one in another format, is a ValueError naming it.
    """
    file = resolve_weights(path, INCEPTION_FILE, INCEPTION_URL, "Inception", "--inception-weights",
                           "evaluation.inception_weights")
    expected = (f"expected a TorchScript TF-Inception: {INCEPTION_FILE} (forward(img, return_features=...)) or "
                f"a plain forward(x) with x in [-1, 1] at {INCEPTION_SIZE}x{INCEPTION_SIZE} -> [N, {INCEPTION_DIM}]")
    try:
        with warnings.catch_warnings():  # torch's deprecation notice: the published weights are TorchScript
            warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated", category=DeprecationWarning)
            net = torch.jit.load(file, map_location="cpu")
    except Exception as err:  # torch raises RuntimeError, ValueError, ... for non-TorchScript files
        raise InputError(f"Inception weights {file!r} are not a TorchScript archive ({err.__class__.__name__}); "
                         f"{expected}") from None
    form = inception_form(net)
    if form is None:
        raise InputError(f"Inception weights {file!r}: the TorchScript forward has an unexpected signature; {expected}")
    module = InceptionFeatures(net, form, identity=f"{os.path.basename(file)}:{sha256_file(file)[:16]}").to(device)
    try:  # one small image now, rather than an error after an hour of decoding
        probe = module(torch.full((1, 3, 64, 64), 0.5, device=device))
    except Exception as err:
        raise InputError(f"Inception weights {file!r} failed on a test image ({err}); {expected}") from None
    if tuple(probe.shape) != (1, INCEPTION_DIM) or not torch.isfinite(probe).all():
        raise InputError(f"Inception weights {file!r} return {tuple(probe.shape)} for one image; {expected}")
    return module


# ---------------------------------------------------------------------------------------------
# LPIPS


class AlexNetTrunk(nn.Module):
    """The five-convolution feature trunk of torchvision's `alexnet()`, up to relu5.

    Same layer indices as torchvision's `features` Sequential, so its published state dict
    (`features.{0,3,6,8,10}.weight/bias`) loads as is. Returns the five relu outputs LPIPS uses.
    """

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
        )

    def forward(self, x):
        maps = []
        for layer in self.features:
            x = layer(x)
            if isinstance(layer, nn.ReLU):
                maps.append(x)  # relu1 [N, 64, H/4, W/4] ... relu5 [N, 256, H/16, W/16]
        return maps


def unit_normalize(feat, eps=1e-10):
    """Each position's channel vector to unit length (LPIPS' normalize_tensor, eps as in v0.1)."""
    return feat / (feat.square().sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """LPIPS v0.1 with AlexNet (Zhang et al., CVPR 2018): `forward(a, b)` on RGB [N, 3, H, W] in
    [0, 1] returns [N] distances.

    d(a, b) = sum_l mean_hw( w_l . (f_l(a) - f_l(b))^2 ), f_l the unit-normalised relu_l maps of
    AlexNet on the input scaled to [-1, 1] and shifted/scaled by the ScalingLayer. Always float32.
    """

    def __init__(self):
        super().__init__()
        self.trunk = AlexNetTrunk()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in ALEXNET_CHANNELS)
        # ScalingLayer: ImageNet mean/std expressed for inputs in [-1, 1]
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def features(self, images):
        """[N, 3, H, W] in [0, 1] -> five unit-normalised maps [N, C_l, H_l, W_l], float32."""
        if min(images.shape[-2:]) < LPIPS_MIN_SIZE:
            raise InputError(f"LPIPS needs images of at least {LPIPS_MIN_SIZE}x{LPIPS_MIN_SIZE}, got {tuple(images.shape)}")
        with torch.autocast(images.device.type, enabled=False):
            x = (images.float() * 2 - 1 - self.shift) / self.scale  # [N, 3, H, W]
            return [unit_normalize(m) for m in self.trunk(x)]

    def distance(self, feats_a, feats_b):
        """Distances [N] between two lists of `features` maps."""
        with torch.autocast(feats_a[0].device.type, enabled=False):
            return sum(lin((fa - fb).square()).mean(dim=(1, 2, 3))  # [N]
                       for fa, fb, lin in zip(feats_a, feats_b, self.lins))

    @torch.no_grad()
    def forward(self, a, b):
        return self.distance(self.features(a), self.features(b))


def torchmetrics_lpips_linear_layers():
    """Path of the 6 KB LPIPS v0.1 AlexNet linear layers that ship inside torchmetrics (located
    without importing its LPIPS module, which wants torchvision)."""
    spec = importlib.util.find_spec("torchmetrics")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("LPIPS needs the torchmetrics package (pip install torchmetrics), which ships its "
                         "v0.1 linear layers")
    path = os.path.join(list(spec.submodule_search_locations)[0], "functional", "image", "lpips_models", "alex.pth")
    if not os.path.isfile(path):
        raise InputError(f"the LPIPS v0.1 linear layers are missing from the installed torchmetrics ({path})")
    return path


def weights_problem(state, expected):
    """What makes `state` unfit to load as `expected` ({name: shape}, None in a shape: any size above
    0), None when nothing: every name a dense CPU tensor (not meta, nested or sparse: they hold no
    data to check) of its shape, a floating dtype, finite values."""
    if not isinstance(state, dict):
        return f"a {type(state).__name__}, not a dict of tensors"
    for name, shape in expected.items():
        value = state.get(name)
        if not plain_tensor(value):
            return f"{name} is {'missing' if value is None else 'not a dense CPU tensor'}"
        fits = value.dim() == len(shape) and all(n == s if s is not None else n > 0 for n, s in zip(value.shape, shape))
        if not fits or not value.is_floating_point():
            return f"{name} is {value.dtype} {list(value.shape)}, expected floating {list(shape)}"
        if not bool(torch.isfinite(value).all()):
            return f"{name} holds non-finite values"
    return None


def load_lpips(path=None, device="cpu"):
    """LPIPS (AlexNet, v0.1 linear layers) in eval mode on `device`.

    `path`: torchvision's AlexNet state dict (`alexnet-owt-7be5be79.pth`); None: the torch hub cache
    copy, downloaded once on a machine with a network. The linear layers come from torchmetrics.
    """
    file = resolve_weights(path, ALEXNET_FILE, ALEXNET_URL, "LPIPS AlexNet", "--lpips-weights",
                           "evaluation.lpips_weights", ALEXNET_SHA256_PREFIX)
    expected = (f"expected torchvision's AlexNet state dict ({ALEXNET_FILE}) with "
                + ", ".join(f"features.{i}.weight/bias" for i in ALEXNET_CONVS))
    try:
        state = load_plain(file)
    except Exception as err:
        raise InputError(f"LPIPS weights {file!r} cannot be read as a state dict ({load_error_reason(err)}); "
                         f"{expected}") from None
    model = LPIPS()
    trunk_state = model.trunk.state_dict()
    problem = weights_problem(state, {k: tuple(v.shape) for k, v in trunk_state.items()})
    if problem:
        raise InputError(f"LPIPS weights {file!r} are not in the expected format ({problem}); {expected}")
    model.trunk.load_state_dict({k: state[k] for k in trunk_state})
    lins = torch.load(torchmetrics_lpips_linear_layers(), map_location="cpu", weights_only=True)
    for k, lin in enumerate(model.lins):
        lin.weight.copy_(lins[f"lin{k}.model.1.weight"])  # [1, C_l, 1, 1]
    model.identity = f"{os.path.basename(file)}:{sha256_file(file)[:16]}+lpips-v0.1-alex"
    return model.to(device)


@torch.no_grad()
def mean_pairwise_lpips(lpips, groups):
    """[S, K, 3, H, W] -> [S]: per group, the mean LPIPS over its K(K-1)/2 pairs (StarGAN v2's
    diversity LPIPS). Each image goes through AlexNet once, not once per pair."""
    s, k = groups.shape[:2]
    if k < 2:
        raise InputError(f"LPIPS diversity needs at least 2 outputs per source, got {k}")
    feats = [f.view(s, k, *f.shape[1:]) for f in lpips.features(groups.flatten(0, 1))]  # [S, K, C_l, H_l, W_l]
    i, j = torch.triu_indices(k, k, 1, device=groups.device)  # the P = K(K-1)/2 pairs
    dist = lpips.distance([f[:, i].flatten(0, 1) for f in feats], [f[:, j].flatten(0, 1) for f in feats])  # [S*P]
    return dist.view(s, -1).mean(dim=1)  # [S]


# ---------------------------------------------------------------------------------------------
# FID and KID on features (torchmetrics' maths)


class PrecomputedFeatures(nn.Module):
    """Identity 'feature extractor', so torchmetrics' FID / KID take features computed (and cached)
    elsewhere; `num_features` spares FID its dummy forward."""

    def __init__(self, num_features):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features):
        return features


def check_feature_pair(real_feats, fake_feats, what):
    """Two [N, D] feature sets of one D, at least 2 samples each (a covariance needs 2), or a ValueError."""
    if real_feats.dim() != 2 or fake_feats.dim() != 2 or real_feats.shape[1] != fake_feats.shape[1]:
        raise InputError(f"{what} needs two [N, D] feature sets of the same D, got {tuple(real_feats.shape)} "
                         f"and {tuple(fake_feats.shape)}")
    if min(len(real_feats), len(fake_feats)) < 2:
        raise InputError(f"{what} needs at least 2 samples on each side, got {len(real_feats)} real and "
                         f"{len(fake_feats)} fake")


def frechet_distance(real_feats, fake_feats):
    """FID (Heusel et al., 2017) between two feature sets [N, D], [M, D]: the Frechet distance of
    the Gaussians fitted to them, by torchmetrics' FrechetInceptionDistance (float64 statistics)."""
    from torchmetrics.image.fid import FrechetInceptionDistance  # on first use: its import takes about a second

    check_feature_pair(real_feats, fake_feats, "FID")
    # sync_on_compute off: these are one process's features (under torchrun rank 0 evaluates alone, and
    # torchmetrics' default gather would wait for ranks that never call it)
    fid = FrechetInceptionDistance(feature=PrecomputedFeatures(real_feats.shape[1]),
                                   sync_on_compute=False).to(real_feats.device)
    fid.update(real_feats.double(), real=True)  # float64 in: the result is not rounded to float32
    fid.update(fake_feats.to(real_feats.device).double(), real=False)
    return float(fid.compute())


def kernel_inception_distance(real_feats, fake_feats, subset_size, subsets=KID_SUBSETS, seed=0):
    """KID (Binkowski et al., 2018) between two feature sets: the unbiased MMD^2 with the cubic
    polynomial kernel (x.y / D + 1)^3, averaged over `subsets` random subsets of `subset_size` on
    each side, by torchmetrics' KernelInceptionDistance. Returns (mean, std).

    The subsets are drawn from a generator seeded by `seed`; the global RNG is left as it was.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    check_feature_pair(real_feats, fake_feats, "KID")
    if not 2 <= subset_size <= min(len(real_feats), len(fake_feats)):
        raise InputError(f"KID subset size must be in [2, {min(len(real_feats), len(fake_feats))}] for "
                         f"{len(real_feats)} real and {len(fake_feats)} fake samples, got {subset_size}")
    with warnings.catch_warnings():  # its note that features are kept in memory: that is the point here
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=PrecomputedFeatures(real_feats.shape[1]), subsets=subsets,
                                      subset_size=int(subset_size), sync_on_compute=False)
    kid.update(real_feats, real=True)
    kid.update(fake_feats.to(real_feats.device), real=False)
    with torch.random.fork_rng(devices=[]):  # compute() draws its subsets with the global CPU RNG
        torch.manual_seed(seed)
        mean, std = kid.compute()
    return float(mean), float(std)


# ---------------------------------------------------------------------------------------------
# the protocol


def autocast_context(device, amp_dtype):
    """torch.autocast on `device`'s type with `amp_dtype`; nothing for None or float32."""
    if amp_dtype is None or amp_dtype == torch.float32:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=amp_dtype)


def in_batches(fn, x, batch_size):
    """fn over `x` in chunks of `batch_size` along dim 0, concatenated."""
    return torch.cat([fn(chunk) for chunk in x.split(batch_size)])


@torch.no_grad()
def latent_features(latents, decode, inception, batch_size=32, device="cpu", amp_dtype=None, on_batch=None):
    """Raw latents [N, C, h, w] -> decode -> Inception features [N, D] float32 on `device`.
    `on_batch(n)` after each batch (progress; it may raise to stop the work)."""
    def features(chunk):
        with autocast_context(device, amp_dtype):
            images = decode(chunk.to(device))  # [b, 3, H, W] in [0, 1]
        feats = inception(images.to(device).float())  # [b, D]
        if on_batch is not None:
            on_batch(len(chunk))
        return feats
    return in_batches(features, latents, batch_size)


def read_cached_features(path, key, count):
    """(features [count, D] float32, None) from a cache file written for `key`, or (None, why it is
    refused): read as any user file (`load_plain`), then checked as weights are."""
    try:
        saved = load_plain(path)
    except Exception as err:
        return None, load_error_reason(err)
    if not isinstance(saved, dict) or saved.get("key") != key:
        return None, "it was not written for these latents, VAE and Inception"
    problem = weights_problem(saved, {"features": (count, None)})
    return (None, problem) if problem else (saved["features"].float(), None)


def cached_real_features(domain, latents, compute, cache_dir, key):
    """Real-domain features from `cache_dir` when a file with this exact `key` (which names the
    latents by a hash of their content) is there, else `compute()` and store them (atomically), so
    a re-evaluation decodes only the fakes. A cached file that is unreadable or fails the checks is
    recomputed and replaced, never trusted nor fatal. Returns (features, what happened: "cached",
    "computed and cached (FILE)", with a warning saying why when a file there was refused, or
    "computed (no cache)")."""
    if not cache_dir:
        return compute(), "computed (no cache)"
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = os.path.join(cache_dir, f"inception_real_{name}.pt")
    refused = None
    if os.path.isfile(path):
        found, refused = read_cached_features(path, key, len(latents))
        if found is not None:
            return found, f"cached ({os.path.basename(path)})"
    feats = compute()
    atomic_write(path, lambda f: torch.save({"key": key, "domain": domain, "features": feats.cpu()}, f))
    note = f"; warning: the cached file was refused and is replaced: {refused}" if refused else ""
    return feats, f"computed and cached ({os.path.basename(path)}){note}"


def task_generator(seed, mode, src_idx, trg_idx):
    """A CPU generator for one (mode, source, target) task: the draws of a task do not depend on
    which other tasks, modes or devices run, and the global RNG is never touched."""
    state = np.random.SeedSequence([seed, MODES.index(mode), src_idx, trg_idx]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@torch.no_grad()
def translate_task(generator, mapping_network, style_encoder, content_raw, trg_idx, mode, refs_raw, decode,
                   inception, lpips, space, latent_dim, num_outs, rng, batch_size, device, amp_dtype,
                   on_batch=None):
    """One task: every source latent translated `num_outs` times. Returns fake features
    [N*num_outs, D], per-source LPIPS diversity [N] and the number of outputs that are not finite
    (latent or picture). `on_batch(n)` after each chunk of n outputs."""
    n, k = len(content_raw), num_outs
    if mode == "latent":
        codes = torch.randn(n, k, latent_dim, generator=rng)  # [N, K, L]
    else:
        codes = reference_draws(n, k, len(refs_raw), rng)  # [N, K] reference indices
    per_chunk = max(1, batch_size // k)  # sources per chunk: a chunk holds all K outputs of each

    def decoded(chunk):
        with autocast_context(device, amp_dtype):
            return decode(chunk).to(device).float()  # [b, 3, H, W] in [0, 1]

    feats, diversity, nonfinite = [], [], 0
    for start in range(0, n, per_chunk):
        content = content_raw[start:start + per_chunk].to(device)  # [S, C, h, w] raw
        s = len(content)
        with autocast_context(device, amp_dtype):  # styles [S*K, S_dim], in one batch
            if mode == "latent":
                style = mapped_styles(mapping_network, codes[start:start + s].flatten(0, 1), trg_idx, device)
            else:
                refs = refs_raw[codes[start:start + s].flatten().to(refs_raw.device)]  # [S*K, C, h, w]
                style = reference_styles(style_encoder, refs, trg_idx, space, len(refs), device)
            content = content.repeat_interleave(k, dim=0)  # [S*K, C, h, w], a source's outputs adjacent
            fake = translate_raw(generator, content, style, space, device)  # [S*K, C, h, w] raw
        images = in_batches(decoded, fake, batch_size)  # [S*K, 3, H, W]
        bad = ~(torch.isfinite(fake.flatten(1)).all(1) & torch.isfinite(images.flatten(1)).all(1))  # [S*K]
        nonfinite += int(bad.sum())
        if inception is not None:  # None: FID and KID not asked for
            feats.append(in_batches(inception, images, batch_size))  # [S*K, D]
        if lpips is not None:  # None: LPIPS not asked for
            diversity.append(mean_pairwise_lpips(lpips, images.view(s, k, *images.shape[1:])))  # [S]
        if on_batch is not None:
            on_batch(s * k)
    return (torch.cat(feats) if feats else None), (torch.cat(diversity) if diversity else None), nonfinite


def reference_draws(n, k, pool, rng):
    """[n, k] reference indices into a pool of `pool` latents: the k references of one source are
    drawn without replacement (two equal references would give an LPIPS of 0 and pull the diversity
    down), with every index used once per round when k > pool."""
    rounds = -(-k // pool)
    return torch.cat([torch.rand(n, pool, generator=rng).argsort(dim=1) for _ in range(rounds)], dim=1)[:, :k]


@torch.no_grad()
def evaluate_translations(generator, mapping_network, style_encoder, domains, real, sources, decode, inception,
                          lpips, space, latent_dim, num_outs=10, seed=0, max_sources=None, batch_size=32,
                          device="cpu", amp_dtype=None, cache_dir=None, vae_id=None, real_ids=None, modes=MODES,
                          kid_subsets=KID_SUBSETS, log=None, progress=None, metrics=METRICS):
    """The StarGAN v2 evaluation protocol on given (EMA) networks; returns {key: float}.

    generator G(x, s), mapping_network F(z, y), style_encoder E(x, y) see scaled latents
    (space.normalize(raw)); domain i of `domains` is branch i. `real` {domain: raw latents [N, C, h, w]}:
    the target sets FID/KID compare with. `sources` {domain: raw latents}: the sources, and the
    reference pool of the reference-guided mode (may be `real`). `decode`: raw latents [n, C, h, w]
    -> RGB [n, 3, H, W] in [0, 1], applied to reals and fakes alike. Per source, at most
    `max_sources` latents (the first ones), each translated `num_outs` times. Random draws come from
    `seed` alone (same numbers twice; the global RNG is untouched). `batch_size` images per decode /
    feature batch; `amp_dtype` (e.g. torch.bfloat16) autocasts the networks and the decode, while
    features and LPIPS stay float32. `cache_dir` keeps the real domains' features, keyed by a hash
    of the latents' content (`real_ids[domain]` when the caller has it already, else computed), `vae_id`,
    the Inception identity and the dtype. `log`: an optional callable for progress lines;
    `progress(n, total)`: called after each batch of n images (reals decoded, or cached, and translations) out of
    `total`; it may raise to stop there; its `note(text)`, if any, hears which task runs. `metrics`: which of
    FID, KID and LPIPS to compute (`inception` may be None without FID and KID, `lpips` without LPIPS).

    Keys, as the official code writes them: `FID_latent/photo2Hayao`, `KID_latent/...`,
    `LPIPS_latent/...`, `FID_latent/mean`, ... for each mode and metric; `KID_subset_size`
    (min(1000, smallest real set, fewest fakes per task), one size for every task so all KIDs
    compare); and `protocol`, what the numbers depend on: sample counts (reals per domain, sources,
    fakes per task), KID's subset size, subsets and per-task standard deviation, the Inception,
    LPIPS and VAE identities, device, dtype, batch size, seed, where each domain's real features
    came from, non-finite outputs per task (their metrics are NaN) and sample-count warnings.
    """
    domains = [str(d) for d in domains]
    metrics, n_real, n_sources = check_protocol_inputs(domains, real, sources, modes, metrics, num_outs, max_sources,
                                                       cache_dir, vae_id)
    subset_size = min(KID_MAX_SUBSET, min(n_real.values()), min(n_sources.values()) * num_outs)
    protocol = protocol_record(domains, metrics, modes, num_outs, n_real, n_sources, subset_size, kid_subsets, seed,
                               batch_size, device, amp_dtype, inception, lpips, vae_id)
    log = log or (lambda line: None)
    for warning in protocol["warnings"]:
        log(f"warning: {warning}")
    reals_needed = sum(n_real.values()) if {"FID", "KID"} & set(metrics) else 0
    total = reals_needed + len(modes) * sum(n_sources[s] * num_outs * (len(domains) - 1) for s in domains)
    on_batch = (lambda n: progress(n, total)) if progress is not None else None
    real_features = real_feature_source(real, real_ids, decode, inception, batch_size, device, amp_dtype, on_batch,
                                        cache_dir, vae_id, protocol["real_features"], log)

    def translate(mode, src_idx, trg_idx):  # one task: (fake features, LPIPS diversity, non-finite outputs)
        src, trg = domains[src_idx], domains[trg_idx]
        return translate_task(generator, mapping_network, style_encoder, sources[src][:n_sources[src]], trg_idx, mode,
                              sources[trg], decode, inception, lpips, space, latent_dim, num_outs,
                              task_generator(seed, mode, src_idx, trg_idx), batch_size, device, amp_dtype, on_batch)

    results, note, n = {}, getattr(progress, "note", None), len(domains) * (len(domains) - 1)  # n: tasks per mode
    for i, mode in enumerate(modes):
        results.update(evaluate_mode(mode, domains, metrics, translate, real_features, subset_size, kid_subsets, seed,
                                     protocol, log, note, (i * n, len(modes) * n)))
    if "KID" in metrics:
        results["KID_subset_size"] = subset_size
    results["protocol"] = protocol
    return results


def check_protocol_inputs(domains, real, sources, modes, metrics, num_outs, max_sources, cache_dir, vae_id):
    """`evaluate_translations`' arguments checked before any work: (the metrics asked for, in the
    table's order; {domain: real latents}; {domain: sources used}), or an InputError saying what is wrong."""
    for name, sets in (("real", real), ("sources", sources)):
        missing = [d for d in domains if d not in sets]
        if missing:
            raise InputError(f"evaluation: no {name} latents for domain(s) {missing} (domains: {domains})")
        for d in domains:
            if sets[d].dim() != 4:
                raise InputError(f"evaluation: {name} latents of domain {d!r} must be [N, C, h, w], "
                                 f"got {tuple(sets[d].shape)}")
    shapes = {(name, d): list(sets[d].shape[1:]) for name, sets in (("real", real), ("source", sources)) for d in domains}
    if len({tuple(s) for s in shapes.values()}) > 1:  # a FID of 512 px fakes against 256 px reals means little
        listing = ", ".join(f"{name} {d} {s}" for (name, d), s in shapes.items())
        raise InputError(f"evaluation: real and source latents must share one shape, got {listing}")
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise InputError(f"evaluation modes must be among {MODES}, got {list(modes)}")
    metrics = [m for m in METRICS if m in metrics]  # in the table's order
    if not metrics:
        raise InputError(f"evaluation metrics must be among {', '.join(METRICS)}")
    if len(domains) < 2:
        raise InputError(f"evaluation needs at least two domains, got {domains}")
    if num_outs < 2:
        raise InputError(f"num_outs must be at least 2 (LPIPS is the mean distance between a source's outputs), "
                         f"got {num_outs}")
    if cache_dir and not vae_id:
        raise InputError("a real-feature cache_dir needs a vae_id: features of another VAE must never be reused")
    n_sources = {d: len(sources[d]) if max_sources is None else min(int(max_sources), len(sources[d])) for d in domains}
    n_real = {d: len(real[d]) for d in domains}
    for d in domains:
        if n_real[d] < 2 or n_sources[d] < 1:
            raise InputError(f"evaluation needs at least 2 samples on each side: domain {d!r} has {n_real[d]} real "
                             f"latents and {n_sources[d]} source latents x {num_outs} outputs")
    return metrics, n_real, n_sources


def protocol_record(domains, metrics, modes, num_outs, n_real, n_sources, subset_size, kid_subsets, seed, batch_size,
                    device, amp_dtype, inception, lpips, vae_id):
    """The `protocol` entry of the results: what the numbers depend on. `kid_std`, `nonfinite_outputs`
    and `real_features` are filled in as the tasks run."""
    return {"domains": domains, "metrics": list(metrics), "modes": list(modes), "num_outs": num_outs,
            "n_real": n_real, "n_sources": n_sources,
            "fakes_per_task": {f"{s}2{t}": n_sources[s] * num_outs for t in domains for s in domains if s != t},
            "kid_subset_size": subset_size, "kid_subsets": kid_subsets, "kid_std": {}, "nonfinite_outputs": {},
            "seed": seed, "batch_size": batch_size, "device": str(device), "dtype": str(amp_dtype or torch.float32),
            "inception": getattr(inception, "identity", None), "lpips": getattr(lpips, "identity", None),
            "vae": vae_id, "real_features": {}, "warnings": sample_count_warnings(n_real, n_sources, num_outs)}


def real_feature_source(real, real_ids, decode, inception, batch_size, device, amp_dtype, on_batch, cache_dir, vae_id,
                        sources_of, log):
    """domain -> its real latents' Inception features [N, D] on `device`, computed once (or read from
    the cache, keyed by the content hash, VAE, Inception and dtype); `sources_of[domain]` records
    where they came from."""
    feats = {}

    def real_features(d):
        if d not in feats:
            key = {"version": CACHE_VERSION, "real": (real_ids or {}).get(d) or content_hash(real[d]),
                   "vae": str(vae_id), "inception": getattr(inception, "identity", type(inception).__name__),
                   "dtype": str(amp_dtype or torch.float32)}
            compute = functools.partial(latent_features, real[d], decode, inception, batch_size, device, amp_dtype,
                                        on_batch)
            found, how = cached_real_features(d, real[d], compute, cache_dir, key)
            feats[d] = found.to(device)
            sources_of[d] = how
            log(f"real features of {d} ({len(real[d])} latents): {how}")
            if how.startswith("cached") and on_batch is not None:  # counted as done
                on_batch(len(real[d]))
        return feats[d]

    return real_features


def evaluate_mode(mode, domains, metrics, translate, real_features, subset_size, kid_subsets, seed, protocol, log,
                  note=None, tasks=(0, 0)):
    """Every task of one mode, in the official order (targets outer, sources inner): {key: value}
    for each task and the mean of each metric; the protocol's per-task records filled in. `note(text)`
    hears which task runs and what it does; `tasks`: (tasks before this mode's, all tasks)."""
    note = note or (lambda text: None)
    per_metric = {m: {} for m in metrics}
    for trg_idx, trg in enumerate(domains):
        target_feats = real_features(trg) if {"FID", "KID"} & set(metrics) else None
        for src_idx, src in enumerate(domains):
            if src == trg:
                continue
            task = f"{src}2{trg}"
            k = tasks[0] + len(per_metric[metrics[0]]) + 1
            note(f"task {k}/{tasks[1]}: {mode} {task}, translating")
            fake_feats, diversity, nonfinite = translate(mode, src_idx, trg_idx)
            note(f"task {k}/{tasks[1]}: {mode} {task}, {'/'.join(metrics)}")
            values = task_metrics(metrics, target_feats, fake_feats, diversity, nonfinite, subset_size, kid_subsets,
                                  seed)
            for metric in metrics:
                per_metric[metric][task] = values[metric]
            if "KID" in metrics:
                protocol["kid_std"][f"{mode}/{task}"] = values["KID_std"]
            if nonfinite:
                protocol["nonfinite_outputs"][f"{mode}/{task}"] = nonfinite
                log(f"warning: {mode} {task}: {nonfinite} of {protocol['fakes_per_task'][task]} translations are not "
                    "finite (a diverged generator): every metric of this task is NaN")
            log(f"{mode} {task}: " + "  ".join(f"{m} {per_metric[m][task]:.4f}" for m in metrics))
    results = {}
    for metric in metrics:
        for task, value in per_metric[metric].items():
            results[f"{metric}_{mode}/{task}"] = value
        results[f"{metric}_{mode}/mean"] = float(np.mean(list(per_metric[metric].values())))
    return results


def task_metrics(metrics, real_feats, fake_feats, diversity, nonfinite, subset_size, kid_subsets, seed):
    """{FID, KID, KID_std, LPIPS} of one task (those of `metrics`); all NaN when any output of the
    task is not finite, whatever a metric's own arithmetic would make of it."""
    if nonfinite:
        return dict.fromkeys(("FID", "KID", "KID_std", "LPIPS"), float("nan"))
    values = {}
    if "FID" in metrics:
        values["FID"] = frechet_distance(real_feats, fake_feats)
    if "KID" in metrics:
        values["KID"], values["KID_std"] = kernel_inception_distance(real_feats, fake_feats, subset_size, kid_subsets,
                                                                     seed)
    if "LPIPS" in metrics:
        values["LPIPS"] = float(diversity.mean())
    return values


def sample_count_warnings(n_real, n_sources, num_outs, floor=FID_SAMPLE_FLOOR):
    """Warnings for sample counts below FID_SAMPLE_FLOOR on either side of a task."""
    fewest_fakes = min(n_sources.values()) * num_outs
    fewest_reals = min(n_real.values())
    if min(fewest_fakes, fewest_reals) >= floor:
        return []
    return [f"FID and KID from as few as {fewest_fakes} translations per task against {fewest_reals} real latents, "
            f"below the {floor} per side under which FID's small-sample bias can exceed the differences between "
            "models: compare these only with results of the same counts (docs/evaluation.md)"]


def metric_keys(domains, modes=MODES, metrics=METRICS):
    """Every metric key `evaluate_translations` returns for these domains: the means first
    (`FID_latent/mean`, ...), then each task (`FID_latent/photo2Hayao`, ...)."""
    domains = [str(d) for d in domains]
    metrics = [m for m in METRICS if m in metrics]
    tasks = [f"{src}2{trg}" for trg in domains for src in domains if src != trg]
    means = [f"{metric}_{mode}/mean" for mode in modes for metric in metrics]
    return means + [f"{metric}_{mode}/{task}" for mode in modes for metric in metrics for task in tasks]


def vae_identity(vae, path, subfolder=None):
    """Names a VAE's decoding for caches: its path and a hash of the weights decode uses."""
    digest = hashlib.sha256()
    for part in (p for p in (getattr(vae, "post_quant_conv", None), vae.decoder) if p is not None):  # DC-AE: none
        for name, tensor in part.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"{path}|{subfolder or ''}|{digest.hexdigest()[:16]}"


class Evaluator:
    """The protocol's fixed parts, loaded once: the VAE decode, Inception (for FID and KID), LPIPS,
    device, dtype, batch size, the real-feature cache, the metrics asked for and, for training-time
    evaluation, held-out sources. Calling it evaluates a set of EMA networks."""

    def __init__(self, vae, vae_id, inception, lpips, device, amp_dtype=None, batch_size=32, cache_dir=None,
                 metrics=METRICS, held_out=None, source_root=None, preview_space=None):
        self.vae, self.vae_id, self.inception, self.lpips = vae, vae_id, inception, lpips
        self.preview_space = preview_space  # vae None: the linear preview of the normalised latents
        self.device, self.amp_dtype, self.batch_size, self.cache_dir = torch.device(device), amp_dtype, batch_size, cache_dir
        self.metrics, self.held_out, self.source_root = list(metrics), held_out, source_root

    @classmethod
    def load(cls, vae_path, vae_subfolder, inception_weights, lpips_weights, device, amp_dtype=None, batch_size=32,
             cache_dir=None, what="", metrics=METRICS, space=None, preview=False):
        """Load the VAE (a diffusers AutoencoderKL or AutoencoderDC, checked against the latent `space`;
        the linear preview only when `preview`: its numbers mean something else, PREVIEW_DECODE), and
        Inception and LPIPS for the `metrics` that need them (without LPIPS, no AlexNet: it cannot be
        had offline). Any missing or wrong file is an InputError that starts with `what` (e.g. which
        setting asked for evaluation)."""
        metrics = parse_metrics(metrics)
        if preview:
            vae = vae_id = None
        elif not vae_path:
            raise InputError(f"{what}evaluation decodes reals and fakes with the SD VAE, and none is set: pass --vae, or "
                             "set evaluation.vae_path (or visualization.vae_path), to a local diffusers AutoencoderKL "
                             "folder or a hub id; the linear latent preview only with evaluate.py --preview-decode (not "
                             "comparable with published FIDs)")
        else:
            vae = open_vae(vae_path, vae_subfolder, device, what=what, space=space,
                           hint=". Evaluation decodes reals and fakes with the SD VAE: set evaluation.vae_path (or "
                                "visualization.vae_path) / --vae to a local diffusers AutoencoderKL folder or a hub "
                                "id; the linear latent preview only with evaluate.py --preview-decode")
            vae_id = vae_identity(vae, vae_path, vae_subfolder)
        try:
            inception = load_inception(inception_weights, device) if {"FID", "KID"} & set(metrics) else None
            lpips = load_lpips(lpips_weights, device) if "LPIPS" in metrics else None
        except InputError as err:
            raise InputError(f"{what}{err}") from None
        if preview:
            space = SD15 if space is None else space
            vae_id = f"{PREVIEW_DECODE} x{space.scaling_factor:g}" + (f" -{space.shift_factor:g}" if space.shift_factor
                                                                      else "")
        return cls(vae, vae_id, inception, lpips, device, amp_dtype, batch_size, cache_dir, metrics,
                   preview_space=space if preview else None)

    @torch.no_grad()
    def decode(self, raw):
        """Raw latents [n, C, h, w] -> RGB [n, 3, H, W] in [0, 1] on the device."""
        if self.vae is None:
            space = self.preview_space
            return latent_preview(space.normalize(raw.float()), space=space).to(self.device)
        return decode(self.vae, raw)

    def __call__(self, nets, domains, real, sources=None, space=None, latent_dim=None, num_outs=10,
                 max_sources=None, seed=0, real_ids=None, modes=MODES, log=None, progress=None):
        """`evaluate_translations` with `nets` = {generator, mapping_network, style_encoder} (EMA).
        `sources` None: the held-out sources when loaded, else `real` itself."""
        if sources is None:
            sources = self.held_out if self.held_out is not None else real
        return evaluate_translations(
            nets["generator"], nets["mapping_network"], nets["style_encoder"], domains, real, sources, self.decode,
            self.inception, self.lpips, space, latent_dim, num_outs=num_outs, seed=seed,
            max_sources=max_sources, batch_size=self.batch_size, device=self.device, amp_dtype=self.amp_dtype,
            cache_dir=self.cache_dir, vae_id=self.vae_id, real_ids=real_ids, modes=modes, log=log, progress=progress,
            metrics=self.metrics)


def format_table(results):
    """A plain-text table of `evaluate_translations` results: one row per task plus the means, one
    column per metric and mode, and the KID subset size."""
    columns, tasks = [], []
    for key in results:
        if "/" not in key:
            continue
        column, task = key.split("/", 1)
        if column not in columns:
            columns.append(column)
        if task not in tasks:
            tasks.append(task)
    tasks = [t for t in tasks if t != "mean"] + (["mean"] if "mean" in tasks else [])
    width = max([len("task")] + [len(t) for t in tasks])
    lines = ["  ".join([f"{'task':<{width}}"] + [f"{c:>{max(len(c), 10)}}" for c in columns])]
    for task in tasks:
        cells = []
        for c in columns:
            value = results.get(f"{c}/{task}")
            text = "-" if value is None else (f"{value:.5f}" if c.startswith("KID") else f"{value:.4f}")
            cells.append(f"{text:>{max(len(c), 10)}}")
        lines.append("  ".join([f"{task:<{width}}"] + cells))
    if "KID_subset_size" in results:
        lines.append(f"KID subset size: {results['KID_subset_size']}")
    return "\n".join(lines)
