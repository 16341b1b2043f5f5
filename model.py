"""Latent StarGAN v2 networks, on a diffusers VAE's latents [B, C, H, W] (C = 4 for SD1.5).

G, F, E and D follow StarGAN v2 (Choi et al., CVPR 2020, core/model.py), adapted to latent space:
G never changes the spatial size, E ends in global average pooling and D is a PatchGAN, so no
module assumes 32x32. Every output for sample i depends on sample i alone (no BatchNorm), and only
G normalises: E and D see the raw per-channel statistics that carry much of a latent's style.
"""

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

LATENT_CHANNELS = 4  # SD1.5 VAE latent channels: what G, E and D take and G returns


def init_weights(module, leaky_slope=0.2):
    """He (Kaiming) init for every conv and linear under `module`, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and not m.weight.is_meta:  # meta: a shape-only build
            nn.init.kaiming_normal_(m.weight, a=leaky_slope, nonlinearity="leaky_relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def select_branch(out, y):
    """out [B, N, ...], y [B] long -> out[i, y[i]]: one batched gather, no per-sample Python."""
    return out[torch.arange(out.shape[0], device=out.device), y]


class AdaIN(nn.Module):
    """Adaptive instance norm: (1 + gamma) * IN(x) + beta with gamma, beta = fc(s).

    fc starts at zero, so a fresh AdaIN is exactly IN(x) and the style enters gradually.
    """

    def __init__(self, num_features, style_dim):
        super().__init__()
        self.norm = nn.InstanceNorm2d(num_features, affine=False)
        self.fc = nn.Linear(style_dim, num_features * 2)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x, s):
        h = self.fc(s)[:, :, None, None]  # [B, 2C, 1, 1]
        gamma, beta = h.chunk(2, dim=1)  # [B, C, 1, 1] each
        return (1 + gamma) * self.norm(x) + beta  # [B, C, H, W]


class AdaINResBlock(nn.Module):
    """x + conv2(act(adain2(conv1(act(adain1(x, s))), s))), 3x3 convs, LeakyReLU(0.2).

    `residual_scale` multiplies the sum; 1.0 (the default) is the plain formula above, the official
    code uses 1/sqrt(2) to keep the variance constant through deep stacks.
    """

    def __init__(self, channels, style_dim, residual_scale=1.0):
        super().__init__()
        self.adain1 = AdaIN(channels, style_dim)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.adain2 = AdaIN(channels, style_dim)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.LeakyReLU(0.2)
        self.residual_scale = residual_scale

    def forward(self, x, s):
        h = self.conv1(self.act(self.adain1(x, s)))  # [B, C, H, W]
        h = self.conv2(self.act(self.adain2(h, s)))  # [B, C, H, W]
        return (x + h) * self.residual_scale if self.residual_scale != 1.0 else x + h


class Generator(nn.Module):
    """G(x, s): conv in to `channels`, `n_res_blocks` AdaIN residual blocks, conv out to 4.

    No spatial down/upsampling: a 32x32 latent is already 8x smaller than the image, so the whole
    network runs at the latent's resolution and any H, W works. The output head has no norm, so
    the last AdaIN's per-channel shift (much of a latent's palette) reaches the output.
    """

    def __init__(self, in_channels=LATENT_CHANNELS, channels=256, n_res_blocks=6, style_dim=64):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.blocks = nn.ModuleList(AdaINResBlock(channels, style_dim) for _ in range(n_res_blocks))
        self.act = nn.LeakyReLU(0.2)
        self.conv_out = nn.Conv2d(channels, in_channels, 3, padding=1)
        init_weights(self)
        for block in self.blocks:  # init_weights re-initialised the AdaIN fc: zero it again
            for adain in (block.adain1, block.adain2):
                nn.init.zeros_(adain.fc.weight)
                nn.init.zeros_(adain.fc.bias)

    def forward(self, x, s):
        h = self.conv_in(x)  # [B, C, H, W]
        for block in self.blocks:
            h = block(h, s)  # [B, C, H, W]
        return self.conv_out(self.act(h))  # [B, latent_channels, H, W]


class MappingNetwork(nn.Module):
    """F(z, y): shared MLP, then one MLP branch per domain; sample i takes branch y[i].

    As in the official code, every branch runs on the whole batch and the right one is gathered:
    the MLP is tiny, and one gather beats per-sample indexing.
    """

    def __init__(self, latent_dim=16, style_dim=64, num_domains=5, hidden_dim=512, n_shared_layers=4):
        super().__init__()
        layers = [nn.Linear(latent_dim, hidden_dim), nn.ReLU()]
        for _ in range(n_shared_layers - 1):
            layers += [nn.Linear(hidden_dim, hidden_dim), nn.ReLU()]
        self.shared = nn.Sequential(*layers)
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Linear(hidden_dim, hidden_dim), nn.ReLU(),
                nn.Linear(hidden_dim, hidden_dim), nn.ReLU(),
                nn.Linear(hidden_dim, hidden_dim), nn.ReLU(),
                nn.Linear(hidden_dim, style_dim),
            )
            for _ in range(num_domains)
        )
        init_weights(self, leaky_slope=0.0)

    def forward(self, z, y):
        h = self.shared(z)  # [B, hidden]
        out = torch.stack([branch(h) for branch in self.branches], dim=1)  # [B, N, S]
        return select_branch(out, y)  # [B, S]


class DownBlock(nn.Module):
    """Pre-activation residual block without normalisation, halving H and W (avg pool).

    StarGAN v2's ResBlk(normalize=False, downsample=True), shared by E and D; the 1/sqrt(2) keeps
    the variance of shortcut + residual at unit scale.
    """

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.act = nn.LeakyReLU(0.2)
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1, bias=False) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x):
        skip = F.avg_pool2d(self.shortcut(x), 2)  # [B, C_out, H/2, W/2]
        h = self.conv1(self.act(x))  # [B, C_in, H, W]
        h = F.avg_pool2d(h, 2)  # [B, C_in, H/2, W/2]
        h = self.conv2(self.act(h))  # [B, C_out, H/2, W/2]
        return (skip + h) * (2 ** -0.5)


N_DOWN = 3  # DownBlocks in E's and D's trunks: a 32x32 latent becomes 4x4
MIN_LATENT_SIZE = 2 ** N_DOWN  # the smallest H and W the trunks take: each DownBlock halves (floor)


def conv_trunk(in_channels, channels, n_down=N_DOWN):
    """conv in, then `n_down` DownBlocks (channels -> 2*channels at the second): /2**n_down."""
    dims = [channels] + [channels * 2] * n_down
    dims[1] = channels
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, padding=1),
        *(DownBlock(dims[i], dims[i + 1]) for i in range(n_down)),
        nn.LeakyReLU(0.2),
    )


class StyleEncoder(nn.Module):
    """E(x, y): light conv trunk (no norm), global average pool, one linear branch per domain."""

    def __init__(self, in_channels=LATENT_CHANNELS, style_dim=64, num_domains=5, channels=128):
        super().__init__()
        self.trunk = conv_trunk(in_channels, channels)
        # N per-domain linear heads stored as one Linear(2C, N*S): the same maths, one matmul
        self.heads = nn.Linear(channels * 2, num_domains * style_dim)
        self.num_domains, self.style_dim = num_domains, style_dim
        init_weights(self)

    def forward(self, x, y):
        h = self.trunk(x).mean(dim=(2, 3))  # [B, 2C] global average pool
        out = self.heads(h).view(-1, self.num_domains, self.style_dim)  # [B, N, S]
        return select_branch(out, y)  # [B, S]


class Discriminator(nn.Module):
    """D(x, y): PatchGAN, no norm. The trunk emits [B, N, H/8, W/8] logits, one channel per domain;
    forward gathers channel y[i], giving [B, 1, H/8, W/8] (4x4 at 32x32)."""

    def __init__(self, in_channels=LATENT_CHANNELS, num_domains=5, channels=128):
        super().__init__()
        self.trunk = conv_trunk(in_channels, channels)
        self.head = nn.Conv2d(channels * 2, num_domains, 1)
        init_weights(self)

    def all_logits(self, x):
        return self.head(self.trunk(x))  # [B, N, H', W']

    def forward(self, x, y):
        logits = self.all_logits(x)  # [B, N, H', W']
        index = y.view(-1, 1, 1, 1).expand(-1, 1, *logits.shape[2:])  # [B, 1, H', W']
        return logits.gather(1, index)  # [B, 1, H', W']


NETS = ("generator", "mapping_network", "style_encoder", "discriminator")  # checkpoint keys
EMA_NETS = NETS[:3]  # the networks with an EMA copy: what translation uses


def build_models(num_domains, style_dim=64, latent_dim=16, gen_channels=256, n_res_blocks=6,
                 mapping_hidden_dim=512, mapping_shared_layers=4, style_encoder_channels=128,
                 disc_channels=128, latent_channels=None):
    """The four networks from the `model:` config section, keyed as in checkpoints (NETS).
    `latent_channels`: the VAE's (None: SD1.5's LATENT_CHANNELS, as checkpoints that predate the key)."""
    channels = latent_channels or LATENT_CHANNELS
    return {
        "generator": Generator(channels, gen_channels, n_res_blocks, style_dim),
        "mapping_network": MappingNetwork(latent_dim, style_dim, num_domains, mapping_hidden_dim,
                                          mapping_shared_layers),
        "style_encoder": StyleEncoder(channels, style_dim, num_domains, style_encoder_channels),
        "discriminator": Discriminator(channels, num_domains, disc_channels),
    }


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


@functools.lru_cache(maxsize=8)
def expected_state(num_domains, **model_kwargs):
    """What checkpoints of `build_models(num_domains, **model_kwargs)` hold, without allocating a
    weight (the networks are built on the meta device): {net: {state key: (shape, dtype)}}, and
    {net: [parameter shapes in `parameters()` order]} (the optimizers' state indices). Cached: a
    checkpoint's validation asks twice (its config's size, then its tensors); read it, never change it."""
    with torch.device("meta"):
        models = build_models(num_domains, **model_kwargs)
    states = {name: {k: (tuple(v.shape), v.dtype) for k, v in m.state_dict().items()} for name, m in models.items()}
    params = {name: [tuple(p.shape) for p in m.parameters()] for name, m in models.items()}
    return states, params
