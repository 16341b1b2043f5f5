"""model.py against the paper's architecture: shapes, AdaIN maths, per-sample independence, branch selection."""

import pytest
import torch
import torch.nn as nn

from conftest import tiny_model_config
from model import (AdaIN, AdaINResBlock, Discriminator, Generator, MappingNetwork, StyleEncoder, build_models,
                   count_parameters)

S, L, N = 8, 4, 3


@pytest.fixture(params=[(32, 32), (16, 24)], ids=["32x32", "16x24"])
def size(request):
    return request.param


def nets():
    return build_models(num_domains=N, **tiny_model_config())


def test_shapes(size):
    h, w = size
    m = nets()
    x, y = torch.randn(3, 4, h, w), torch.tensor([0, 2, 1])
    s = m["mapping_network"](torch.randn(3, L), y)
    assert s.shape == (3, S)
    assert m["generator"](x, s).shape == (3, 4, h, w)
    assert m["style_encoder"](x, y).shape == (3, S)
    assert m["discriminator"](x, y).shape == (3, 1, h // 8, w // 8)
    assert m["discriminator"].all_logits(x).shape == (3, N, h // 8, w // 8)


def test_defaults_construct_and_chain():
    G, F, E, D = Generator(), MappingNetwork(), StyleEncoder(), Discriminator()
    x, y = torch.randn(2, 4, 32, 32), torch.tensor([0, 4])
    s = F(torch.randn(2, 16), y)
    assert s.shape == (2, 64)
    assert G(x, s).shape == (2, 4, 32, 32)
    assert E(x, y).shape == (2, 64)
    assert D(x, y).shape == (2, 1, 4, 4)


def test_adain_is_instance_norm_at_init():
    adain = AdaIN(6, S)
    x, s = torch.randn(2, 6, 5, 7) * 3 + 1, torch.randn(2, S)
    mean, var = x.mean(dim=(2, 3), keepdim=True), x.var(dim=(2, 3), keepdim=True, unbiased=False)
    torch.testing.assert_close(adain(x, s), (x - mean) / torch.sqrt(var + 1e-5))


def test_adain_formula_with_nonzero_fc():
    adain = AdaIN(6, S)
    nn.init.normal_(adain.fc.weight)
    nn.init.normal_(adain.fc.bias)
    x, s = torch.randn(2, 6, 5, 7), torch.randn(2, S)
    h = s @ adain.fc.weight.T + adain.fc.bias  # [B, 2C], computed by hand
    gamma, beta = h[:, :6, None, None], h[:, 6:, None, None]
    normed = nn.functional.instance_norm(x)
    torch.testing.assert_close(adain(x, s), (1 + gamma) * normed + beta)


def test_adain_resblock_formula():
    block = AdaINResBlock(6, S)
    for adain in (block.adain1, block.adain2):
        nn.init.normal_(adain.fc.weight, std=0.1)
    x, s = torch.randn(2, 6, 8, 8), torch.randn(2, S)
    act = nn.functional.leaky_relu
    expected = x + block.conv2(act(block.adain2(block.conv1(act(block.adain1(x, s), 0.2)), s), 0.2))
    torch.testing.assert_close(block(x, s), expected)


def test_generator_adain_starts_at_zero():
    G = Generator(channels=8, n_res_blocks=2, style_dim=S)
    for m in G.modules():
        if isinstance(m, AdaIN):
            assert m.fc.weight.abs().sum() == 0 and m.fc.bias.abs().sum() == 0


@pytest.mark.parametrize("name", ["generator", "style_encoder", "discriminator"])
def test_per_sample_independence(name):
    """Output i depends on input i alone: changing sample 1 leaves sample 0 untouched."""
    m = nets()[name]
    x, y, s = torch.randn(2, 4, 16, 16), torch.tensor([0, 1]), torch.randn(2, S)
    call = (lambda x: m(x, s)) if name == "generator" else (lambda x: m(x, y))
    out = call(x)
    x2 = x.clone()
    x2[1] = torch.randn(4, 16, 16) * 10
    out2 = call(x2)
    torch.testing.assert_close(out[0], out2[0])
    assert not torch.allclose(out[1], out2[1])


@pytest.mark.parametrize("name", ["mapping_network", "style_encoder"])
def test_branch_selection(name):
    """Sample i in a batch equals sample i alone, and its domain picks its branch."""
    m = nets()[name]
    inp = torch.randn(4, L) if name == "mapping_network" else torch.randn(4, 4, 16, 16)
    y = torch.tensor([2, 0, 1, 2])
    out = m(inp, y)
    for i in range(4):
        torch.testing.assert_close(out[i:i + 1], m(inp[i:i + 1], y[i:i + 1]))
    other = m(inp, (y + 1) % N)
    assert not torch.allclose(out, other)  # a different domain is a different branch


def test_discriminator_gathers_domain_channel():
    D = nets()["discriminator"]
    x, y = torch.randn(3, 4, 16, 16), torch.tensor([2, 0, 1])
    all_logits = D.all_logits(x)
    out = D(x, y)
    for i in range(3):
        torch.testing.assert_close(out[i, 0], all_logits[i, y[i]])


def test_no_batchnorm_and_no_norm_in_e_d():
    m = nets()
    for name in ("style_encoder", "discriminator"):
        assert not any(isinstance(mod, (nn.BatchNorm2d, nn.InstanceNorm2d, nn.GroupNorm, nn.LayerNorm))
                       for mod in m[name].modules()), name
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in m["generator"].modules())


def test_backward_reaches_every_parameter():
    m = nets()
    x, y = torch.randn(2, 4, 16, 16), torch.tensor([0, 1])
    s = m["mapping_network"](torch.randn(2, L), y) + m["style_encoder"](x, y)
    fake = m["generator"](x, s)
    m["discriminator"](fake, y).mean().backward()
    for name in ("generator", "discriminator"):
        assert all(p.grad is not None for p in m[name].parameters()), name


def test_bf16_autocast():
    m = nets()
    x, y = torch.randn(2, 4, 16, 16), torch.tensor([0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = m["mapping_network"](torch.randn(2, L), y)
        fake = m["generator"](x, s)
        logits = m["discriminator"](fake, y)
        style = m["style_encoder"](fake, y)
    assert fake.shape == x.shape and logits.shape == (2, 1, 2, 2) and style.shape == (2, S)
    assert torch.isfinite(fake.float()).all() and torch.isfinite(logits.float()).all()


def test_state_dict_round_trip(tmp_path):
    m = nets()
    path = tmp_path / "g.pt"
    torch.save(m["generator"].state_dict(), path)
    G = Generator(4, 8, 2, S)
    G.load_state_dict(torch.load(path, weights_only=True))
    x, s = torch.randn(1, 4, 16, 16), torch.randn(1, S)
    torch.testing.assert_close(G(x, s), m["generator"](x, s))


def test_default_parameter_counts():
    """The README's parameter table (default sizes, 5 domains)."""
    counts = {k: count_parameters(v) for k, v in build_models(num_domains=5).items()}
    assert counts == {"generator": 7_499_012, "mapping_network": 4_900_672,
                      "style_encoder": 2_037_824, "discriminator": 1_956_869}
