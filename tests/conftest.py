"""Shared fixtures: one tiny-config factory (diffusers-style), seeding, and the cuda marker."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(min(2, torch.get_num_threads()))

TINY_MODEL = dict(style_dim=8, latent_dim=4, gen_channels=8, n_res_blocks=2, mapping_hidden_dim=16,
                  mapping_shared_layers=2, style_encoder_channels=8, disc_channels=8)


def tiny_model_config(**overrides):
    """The `model:` section of a tiny config: channels 8-16, fast on a CPU."""
    return {**TINY_MODEL, **overrides}


@pytest.fixture
def tiny_models():
    from model import build_models

    torch.manual_seed(0)
    return build_models(num_domains=3, **tiny_model_config())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
