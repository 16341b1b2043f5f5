"""A checkpoint written by an earlier version of the code (tests/data/tiny_checkpoint.pt, made at
commit 900d73a with tests/conftest.py's tiny config: domains a, b, c, 16x16 latents, 1 epoch of 2
steps) must keep resuming and translating exactly as it did then. The expected weights after two
more steps and the expected translations were written by that same version
(tests/data/tiny_checkpoint_expected.pt). A change that alters the checkpoint format, the order in
which random numbers are drawn, or the step's arithmetic fails here."""

import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import ROOT, tiny_run_config, write_latent_folders

DATA = os.path.join(ROOT, "tests", "data")
CHECKPOINT = os.path.join(DATA, "tiny_checkpoint.pt")


@pytest.fixture(scope="module")
def expected():
    return torch.load(os.path.join(DATA, "tiny_checkpoint_expected.pt"), weights_only=True)


def assert_states_equal(got, want, what):
    assert got.keys() == want.keys(), what
    for key in want:
        assert torch.equal(got[key], want[key]), f"{what}.{key} differs"


def test_resumes_bitwise(tmp_path, expected):
    import run

    write_latent_folders(tmp_path / "data")
    cfg = tiny_run_config(tmp_path, training={"epochs": 2, "lr": 1e-2, "lr_mapping": 1e-2},
                          visualization={"every_epochs": 100, "vae_path": None})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert run.main(["--config", str(tmp_path / "cfg.yaml"), "--resume", CHECKPOINT]) == 0
    got = torch.load(tmp_path / "out" / "latest.pt", weights_only=True)
    assert got["step"] == expected["step"] == 4
    for group in ("models", "ema"):
        for name, state in expected[group].items():
            assert_states_equal(got[group][name], state, f"{group}.{name}")


@pytest.mark.parametrize("mode", ["latent", "reference"])
def test_translates_the_same(tmp_path, expected, mode):
    data = write_latent_folders(tmp_path / "data")
    sources = [os.path.join(data, "a", f"{k:03d}.pt") for k in range(2)]
    extra = (["--num-styles", "2", "--seed", "3"] if mode == "latent"
             else ["--reference", *[os.path.join(data, "c", f"{k:03d}.pt") for k in range(2)]])
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "translate.py", "--checkpoint", CHECKPOINT, "--source", *sources,
                             "--target-domain", "b", *extra, "--output", str(out), "--device", "cpu"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    want = expected[f"translate_{mode}"]
    assert sorted(p.name for p in out.glob("*.pt")) == sorted(want)
    for name, latent in want.items():
        assert torch.equal(torch.load(out / name, weights_only=True), latent), name
