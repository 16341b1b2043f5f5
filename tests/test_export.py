"""export.py: the tiny trained checkpoint exported to ONNX and torch.export (.pt2), read back with
onnxruntime and torch.export.load (not with the code under test) and compared with an independent
eager computation from the checkpoint's EMA networks: both modes, batch 1 and 3, psi 1 and 0.5,
other spatial sizes, a domain subset, the VAE decoder; the metadata; the onnxruntime example of docs/export.md;
--verify refusing a wrong graph; bad input."""

import functools
import json
import os
import re

import numpy as np
import pytest
import torch

import export
import exporting

DOMAINS = ["a", "b", "c"]
SIZE = 16  # the trained fixture's latent size
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_export(ckpt, out, *extra):
    return export.main(["--checkpoint", ckpt, "--output", str(out), *map(str, extra)])


@pytest.fixture(scope="module")
def exported(trained, tiny_vae_dir, tmp_path_factory):
    """Every graph in both formats, with the decoder, verified by export.py itself."""
    out = tmp_path_factory.mktemp("exported")
    assert run_export(trained[0], out, "--verify", "--with-decoder", "--vae", tiny_vae_dir) == 0
    return out


@pytest.fixture(scope="module")
def mean_styles(ema_nets):
    """Each domain's mean style as documented: F over 10000 z of torch.Generator seed 0, averaged. [N, S]"""
    cfg, nets = ema_nets
    z = torch.randn(10000, cfg["model"]["latent_dim"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.stack([nets["mapping_network"](z, torch.full((10000,), d)).mean(0) for d in range(len(DOMAINS))])


@torch.no_grad()
def expected(ema_nets, mean_styles, graph, inputs, ids=(0, 1, 2)):
    """G(x * scale, s) / scale, with s = mean + psi * (F(z, y) - mean) or E(ref * scale, y); exported
    domain id k is checkpoint domain ids[k]."""
    cfg, nets = ema_nets
    scale = cfg["training"]["latent_scale"]
    y = torch.tensor(ids)[inputs["domain"]]
    if graph == "latent_guided":
        s = nets["mapping_network"](inputs["z"], y)
        s = mean_styles[y] + inputs["psi"][:, None] * (s - mean_styles[y])
    else:
        s = nets["style_encoder"](inputs["reference"] * scale, y)
    return nets["generator"](inputs["content"] * scale, s) / scale


def make_inputs(graph, batch, size=(SIZE, SIZE), ref_size=(SIZE, SIZE), psi=1.0, seed=0, num_domains=3):
    g = torch.Generator().manual_seed(seed)
    inputs = {"content": torch.randn(batch, 4, *size, generator=g) * 5,
              "domain": torch.tensor([2, 0, 1, 2][:batch]) % num_domains}
    if graph == "latent_guided":
        inputs.update(z=torch.randn(batch, 4, generator=g), psi=torch.full((batch,), psi))
    else:
        inputs["reference"] = torch.randn(batch, 4, *ref_size, generator=g) * 5
    return inputs


@functools.lru_cache(maxsize=None)
def onnx_session(path):
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@functools.lru_cache(maxsize=None)
def pt2_module(path):
    return torch.export.load(str(path)).module()


def run_onnx(path, inputs):
    return torch.from_numpy(onnx_session(path).run(None, {k: v.numpy() for k, v in inputs.items()})[0])


def run_pt2(path, inputs):
    with torch.no_grad():
        return pt2_module(path)(*inputs.values())


RUNNERS = {"onnx": run_onnx, "pt2": run_pt2}


# ---------------------------------------------------------------------- fast: the modules before export

def test_graph_modules_match_the_networks_with_a_domain_subset(trained, ema_nets, mean_styles):
    """The modules that get exported, eager, serving domains c, a (exported ids 0, 1)."""
    from inference import load_networks

    cfg, nets = load_networks(trained[0], "cpu")
    graphs = exporting.build_graphs(cfg, nets, [2, 0])
    for graph in exporting.GRAPHS:
        for psi in (1.0, 0.5):
            inputs = make_inputs(graph, 3, psi=psi, num_domains=2)
            with torch.no_grad():
                out = graphs[graph](*inputs.values())
            torch.testing.assert_close(out, expected(ema_nets, mean_styles, graph, inputs, ids=(2, 0)),
                                       rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- both formats against eager

@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
@pytest.mark.parametrize("graph", exporting.GRAPHS)
def test_exported_matches_eager(exported, ema_nets, mean_styles, fmt, graph):
    psis = (1.0, 0.5) if graph == "latent_guided" else (1.0,)
    for batch in (1, 3):
        outputs = []
        for psi in psis:
            inputs = make_inputs(graph, batch, psi=psi)
            out = RUNNERS[fmt](exported / f"{graph}.{fmt}", inputs)
            assert out.shape == (batch, 4, SIZE, SIZE) and out.dtype == torch.float32
            torch.testing.assert_close(out, expected(ema_nets, mean_styles, graph, inputs), rtol=1e-4, atol=1e-4)
            outputs.append(out)
        if len(outputs) == 2:  # psi matters: the comparison above could tell a missing truncation
            assert (outputs[0] - outputs[1]).abs().max() > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_batch_and_sizes_are_dynamic(exported, ema_nets, mean_styles, fmt):
    for graph in exporting.GRAPHS:
        inputs = make_inputs(graph, 2, size=(24, 8), ref_size=(16, 40), psi=0.5, seed=1)
        out = RUNNERS[fmt](exported / f"{graph}.{fmt}", inputs)
        assert out.shape == (2, 4, 24, 8)
        torch.testing.assert_close(out, expected(ema_nets, mean_styles, graph, inputs), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_decoder_matches_diffusers(exported, tiny_vae_dir, fmt):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_vae_dir).eval()
    for batch, (h, w) in ((1, (SIZE, SIZE)), (3, (8, 12))):
        latent = torch.randn(batch, 4, h, w, generator=torch.Generator().manual_seed(batch)) * 5
        with torch.no_grad():
            pixels = (vae.decode(latent).sample / 2 + 0.5).clamp(0, 1)  # [B, 3, 2h, 2w]
        out = RUNNERS[fmt](exported / f"decoder.{fmt}", {"latent": latent})
        assert out.shape == (batch, 3, 2 * h, 2 * w)
        torch.testing.assert_close(out, pixels, rtol=1e-4, atol=1e-4)
    if fmt == "pt2":  # the decoder alone: no encoder weights in the file
        assert not [k for k in torch.export.load(str(exported / "decoder.pt2")).state_dict if "encoder" in k]


@pytest.mark.slow
def test_files_carry_their_metadata(exported, trained):
    import onnx

    ckpt = torch.load(trained[0], weights_only=True)
    for graph in exporting.GRAPHS + ("decoder",):
        model = onnx.load(str(exported / f"{graph}.onnx"))
        from_onnx = json.loads({p.key: p.value for p in model.metadata_props}["latent_stargan_v2"])
        extra = {"latent_stargan_v2.json": ""}
        torch.export.load(str(exported / f"{graph}.pt2"), extra_files=extra)
        from_pt2 = json.loads(extra["latent_stargan_v2.json"])
        assert from_onnx == from_pt2
        meta = from_onnx
        assert meta["graph"] == graph and meta["domains"] == DOMAINS and meta["latent_shape"] == [4, SIZE, SIZE]
        assert (meta["style_dim"], meta["latent_dim"], meta["latent_scale"]) == (8, 4, 0.18215)
        assert (meta["step"], meta["epoch"], meta["source"]) == (ckpt["step"], ckpt["epoch"], "latest.pt")
        assert meta["inputs"] == [i.name for i in model.graph.input]
        assert [o.name for o in model.graph.output] == [meta["output"]]
        assert [o.version for o in model.opset_import if o.domain == ""] == [meta["onnx_opset"]] == [20]
        dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        assert dims == ["batch", 4, "height", "width"]
    assert meta["downsample_factor"] == 2


@pytest.mark.slow
def test_readme_onnxruntime_example_runs(exported, tmp_path, monkeypatch):
    """The example of docs/export.md on the exported tiny model, whose domains are a, b, c instead of monet."""
    page = open(os.path.join(ROOT, "docs", "export.md")).read()
    code = next(block for block in re.findall(r"```python\n(.*?)```", page, re.S) if "onnxruntime" in block)
    code = code.replace('"monet"', '"c"')
    os.symlink(exported, tmp_path / "exported")
    np.save(tmp_path / "photo.npy", np.random.default_rng(0).standard_normal((4, SIZE, SIZE), dtype=np.float32))
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "docs/export.md", "exec"), namespace)
    assert namespace["rgb"].shape == (1, 3, 2 * SIZE, 2 * SIZE)  # the tiny VAE upsamples by 2
    assert namespace["translated"].shape == (1, 4, SIZE, SIZE)


# ---------------------------------------------------------------------- flags, --verify and bad input

@pytest.mark.slow
def test_domain_subset_export_pt2(trained, ema_nets, mean_styles, tmp_path, capsys):
    (tmp_path / "decoder.onnx").write_bytes(b"an earlier export's")
    assert run_export(trained[0], tmp_path, "--domains", "c,a", "--format", "pt2", "--verify") == 0
    out, err = capsys.readouterr()
    assert "max abs diff vs eager" in out and "also holds decoder.onnx of an earlier export, kept" in err
    assert sorted(os.listdir(tmp_path)) == ["decoder.onnx", "latent_guided.pt2", "reference_guided.pt2"]
    for graph in exporting.GRAPHS:
        extra = {"latent_stargan_v2.json": ""}
        program = torch.export.load(str(tmp_path / f"{graph}.pt2"), extra_files=extra)
        assert json.loads(extra["latent_stargan_v2.json"])["domains"] == ["c", "a"]
        inputs = make_inputs(graph, 3, psi=0.5, num_domains=2)  # exported ids 0, 1 = checkpoint's c, a
        with torch.no_grad():
            out = program.module()(*inputs.values())
        torch.testing.assert_close(out, expected(ema_nets, mean_styles, graph, inputs, ids=(2, 0)),
                                   rtol=1e-5, atol=1e-5)


def test_verify_refuses_a_graph_that_differs_from_eager(trained, tmp_path, monkeypatch, capsys):
    """A planted bug (the latent scale forgotten on the way out): --verify must catch it against
    the networks themselves, exit 1 and write nothing."""
    def wrong(self, content, domain, z, psi):
        s = torch.lerp(self.mean_styles[domain], self.mapping_network(z, domain), psi[:, None])
        return self.generator(self.space.normalize(content), s)

    monkeypatch.setattr(exporting.LatentGuided, "forward", wrong)
    assert run_export(trained[0], tmp_path / "out", "--format", "pt2", "--verify") == 1
    err = capsys.readouterr().err
    assert "latent_guided.pt2 differs from the eager EMA networks" in err and "nothing was written" in err
    assert os.listdir(tmp_path / "out") == []


def refuse_export(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the export ran before the inputs were checked")

    monkeypatch.setattr(export, "export_program", fail)


def test_bad_input_exits_2_before_any_export(trained, tmp_path, monkeypatch, capsys):
    refuse_export(monkeypatch)
    ckpt = trained[0]
    not_ours = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, not_ours)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cases = [
        ((str(not_ours), tmp_path / "o1"), "weights.pt: not a Latent StarGAN v2 checkpoint"),
        ((str(tmp_path / "missing.pt"), tmp_path / "o2"), "not found"),
        ((ckpt, tmp_path / "o3", "--domains", "a,monet"),
         "unknown --domains 'monet'; the checkpoint's domains are: a, b, c"),
        ((ckpt, tmp_path / "o4", "--domains", "a,a"), "distinct domain names"),
        ((ckpt, blocker), "exists and is not a folder"),
        ((ckpt, blocker / "sub"), "is not writable"),
        ((ckpt, tmp_path / "o5", "--with-decoder"), "--with-decoder needs a VAE: pass --vae"),
        ((ckpt, tmp_path / "o6", "--with-decoder", "--vae", tmp_path / "no_vae"), "could not be loaded"),
    ]
    for args, message in cases:
        assert run_export(*args) == 2, message
        err = capsys.readouterr().err
        assert err.startswith("export.py: error: ") and message in err, err


@pytest.mark.parametrize("flags", [["--seed", "-1"], ["--seed", str(2 ** 63)], ["--tolerance", "0"],
                                   ["--tolerance", "nan"], ["--vae", "x"], ["--format", "tflite"]])
def test_bad_flags_exit_2(flags, capsys):
    with pytest.raises(SystemExit) as e:
        export.parse_args(["--checkpoint", "x.pt", *flags])
    assert e.value.code == 2
