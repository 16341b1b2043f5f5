"""evaluate.py end to end and evaluation during training, on a tiny checkpoint, the tiny random VAE
(factor 2: 16x16 latents -> 32x32 RGB), stand-in TorchScript Inceptions in both accepted forms and
random AlexNet weights in torchvision's format. The stand-ins emit 16-d features (metrics'
INCEPTION_DIM patched): a 2048-d Frechet distance costs seconds per task on 2 cores."""

import json
import math
import os
import shutil
import socket
import time

import pytest
import torch
import yaml

import evaluate
import metrics
import run
from conftest import tiny_run_config, write_latent_folders, write_random_alexnet
from latents import save_latent
from test_metrics import PlainFormStandIn, StyleGANFormStandIn, script_to

DOMAINS = ["a", "b", "c"]
DIM = 16


@pytest.fixture
def small_inception(monkeypatch):
    monkeypatch.setattr(metrics, "INCEPTION_DIM", DIM)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """{'stylegan2-ada': path, 'plain': path, 'alexnet': path}."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    return {metrics.FORM_STYLEGAN: script_to(folder / "inception-2015-12-05.pt", StyleGANFormStandIn(dim=DIM)),
            metrics.FORM_PLAIN: script_to(folder / "plain_inception.pt", PlainFormStandIn(dim=DIM)),
            "alexnet": str(folder / metrics.ALEXNET_FILE)} if write_random_alexnet(folder / metrics.ALEXNET_FILE) else None


@pytest.fixture
def checkpoint(trained):
    return trained


def evaluate_args(checkpoint, weights, tiny_vae_dir, out, form=metrics.FORM_STYLEGAN, *extra):
    return ["--checkpoint", checkpoint, "--vae", tiny_vae_dir, "--out", str(out), "--num-outs", "2",
            "--max-sources", "2", "--device", "cpu", "--batch-size", "8", "--inception-weights", weights[form],
            "--lpips-weights", weights["alexnet"], *extra]


@pytest.mark.parametrize("form", [metrics.FORM_STYLEGAN, metrics.FORM_PLAIN])
def test_evaluate_writes_every_task_of_both_modes(checkpoint, weights, tiny_vae_dir, tmp_path, small_inception,
                                                  form, capsys):
    assert evaluate.main(evaluate_args(checkpoint[0], weights, tiny_vae_dir, tmp_path / "eval", form)) == 0
    record = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    tasks = [f"{s}2{t}" for t in DOMAINS for s in DOMAINS if s != t]
    assert len(tasks) == 6  # n (n - 1) ordered pairs
    for mode in ("latent", "reference"):
        for metric in ("FID", "KID", "LPIPS"):
            for task in tasks + ["mean"]:
                value = record[f"{metric}_{mode}/{task}"]
                assert isinstance(value, float) and math.isfinite(value), (metric, mode, task)
            mean = sum(record[f"{metric}_{mode}/{t}"] for t in tasks) / len(tasks)
            assert record[f"{metric}_{mode}/mean"] == pytest.approx(mean)
        assert all(record[f"LPIPS_{mode}/{t}"] > 0 for t in tasks)  # different z / references differ
    assert record["KID_subset_size"] == 4  # min(1000, 6 reals, 2 sources x 2 outputs)
    protocol = record["protocol"]  # what the numbers depend on, to tell two runs apart
    assert protocol["step"] == 2 and protocol["epoch"] == 1 and protocol["num_outs"] == 2
    assert protocol["inception"].startswith(os.path.basename(weights[form]) + ":")
    assert protocol["lpips"].startswith(metrics.ALEXNET_FILE + ":") and protocol["vae"].startswith(tiny_vae_dir)
    assert protocol["n_real"] == {"a": 6, "b": 6, "c": 6} and protocol["fakes_per_task"]["a2b"] == 4
    assert protocol["kid_subset_size"] == 4 and len(protocol["kid_std"]) == 12
    assert (protocol["device"], protocol["dtype"], protocol["batch_size"], protocol["seed"]) == (
        "cpu", "torch.float32", 8, 0)
    assert protocol["sources"].startswith("the training latents (not held out")
    assert protocol["checkpoint"] == os.path.abspath(checkpoint[0])
    out = capsys.readouterr().out
    assert "FID_latent" in out and "mean" in out and "metrics.json" in out


def own_checkpoint(checkpoint, tmp_path):
    """A copy of the checkpoint in a folder of its own: its eval_cache/ (beside it) starts empty."""
    own = tmp_path / "run" / "latest.pt"
    os.makedirs(own.parent)
    shutil.copy(checkpoint[0], own)
    return own


def test_evaluate_is_seeded_and_caches_the_real_features(checkpoint, weights, tiny_vae_dir, tmp_path,
                                                         small_inception, monkeypatch):
    decoded = []
    real_decode = metrics.Evaluator.decode

    def counting(self, raw):
        decoded.append(len(raw))
        return real_decode(self, raw)

    monkeypatch.setattr(metrics.Evaluator, "decode", counting)
    own = own_checkpoint(checkpoint, tmp_path)
    args = evaluate_args(str(own), weights, tiny_vae_dir, tmp_path / "one", metrics.FORM_STYLEGAN,
                         "--data-root", checkpoint[1])
    assert evaluate.main(args) == 0
    first_run = sum(decoded)
    decoded.clear()
    assert evaluate.main(evaluate_args(str(own), weights, tiny_vae_dir, tmp_path / "two", metrics.FORM_STYLEGAN,
                                       "--data-root", checkpoint[1])) == 0
    fakes = 2 * 6 * 2 * 2  # modes x tasks x sources x outputs
    assert first_run == fakes + 3 * 6 and sum(decoded) == fakes  # the reals come from eval_cache
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert {k: v for k, v in one.items() if "/" in k} == {k: v for k, v in two.items() if "/" in k}


def test_evaluate_bad_input_names_it(checkpoint, weights, tiny_vae_dir, tmp_path, small_inception, capsys):
    ckpt_path, data = checkpoint
    # a data root without one of the checkpoint's domains
    partial = write_latent_folders(tmp_path / "partial", domains=("a", "b"), files=3)
    assert evaluate.main(evaluate_args(ckpt_path, weights, tiny_vae_dir, tmp_path / "o", metrics.FORM_STYLEGAN,
                                       "--data-root", partial)) == 2
    err = capsys.readouterr().err
    assert os.path.join(partial, "c") in err and "a, b, c" in err
    # a checkpoint without EMA weights
    ckpt = torch.load(ckpt_path, weights_only=True)
    del ckpt["ema"]["style_encoder"]
    no_ema = str(tmp_path / "no_ema.pt")
    torch.save(ckpt, no_ema)
    assert evaluate.main(evaluate_args(no_ema, weights, tiny_vae_dir, tmp_path / "o")) == 2
    assert "no_ema.pt: entry ema.style_encoder: expected an entry here, got nothing (missing)" in capsys.readouterr().err
    # Inception weights of the wrong format
    wrong = str(tmp_path / "wrong.pt")
    torch.save({"weight": torch.zeros(2)}, wrong)
    args = evaluate_args(ckpt_path, weights, tiny_vae_dir, tmp_path / "o")
    args[args.index("--inception-weights") + 1] = wrong
    assert evaluate.main(args) == 2
    assert "wrong.pt" in capsys.readouterr().err
    # no loadable VAE: an error, never the linear preview
    args = evaluate_args(ckpt_path, weights, str(tmp_path / "no_vae"), tmp_path / "o")
    assert evaluate.main(args) == 2
    assert "linear latent preview" in capsys.readouterr().err


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty torch hub cache and download addresses on a loopback port that refuses connections."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    monkeypatch.setattr(metrics, "INCEPTION_URL", f"http://127.0.0.1:{port}/{metrics.INCEPTION_FILE}")
    monkeypatch.setattr(metrics, "ALEXNET_URL", f"http://127.0.0.1:{port}/{metrics.ALEXNET_FILE}")


def training_config(tmp_path, tiny_vae_dir, weights, epochs=2, **evaluation):
    cfg = tiny_run_config(tmp_path, training={"epochs": epochs, "lr": 1e-2, "log_json": True, "log_interval": 100},
                          visualization={"every_epochs": 10, "vae_path": None})
    cfg["evaluation"] = {"every_epochs": 1, "num_sources": 2, "num_outs": 2, "vae_path": tiny_vae_dir,
                         "inception_weights": weights[metrics.FORM_STYLEGAN], "lpips_weights": weights["alexnet"],
                         **evaluation}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_training_evaluates_writes_best_and_resume_keeps_it(tmp_path, tiny_vae_dir, weights, small_inception, capsys):
    write_latent_folders(tmp_path / "data")
    cfg = training_config(tmp_path, tiny_vae_dir, weights)
    assert run.main(["--config", cfg]) == 0
    out = tmp_path / "out"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in lines] == [(1, 2), (2, 4)]
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"step"')]
    assert printed == lines  # the same records, as JSON lines on stdout
    for record in lines:
        assert math.isfinite(record["FID_latent/mean"]) and len([k for k in record if "/" in k]) == 2 * 3 * 7
    best_line = min(lines, key=lambda r: r["FID_latent/mean"])
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["step"] == best_line["step"]
    assert best["best"] == {"metric": "FID_latent/mean", "value": pytest.approx(best_line["FID_latent/mean"], rel=1e-6),
                            "epoch": best_line["epoch"], "step": best_line["step"]}
    assert torch.load(out / "latest.pt", weights_only=True)["best"] == best["best"]
    assert (out / "eval_cache").is_dir()

    assert run.main(["--config", cfg, "--resume", "training.epochs=3"]) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    best_line = min(lines, key=lambda r: r["FID_latent/mean"])  # over all three: the value survived resume
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["step"] == best_line["step"]
    assert best["best"]["value"] == pytest.approx(best_line["FID_latent/mean"], rel=1e-6)


def test_lpips_as_best_metric_means_higher_is_better(tmp_path, tiny_vae_dir, weights, small_inception):
    write_latent_folders(tmp_path / "data")
    assert run.main(["--config", training_config(tmp_path, tiny_vae_dir, weights, best_metric="LPIPS_reference/mean")]) == 0
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    best = max(lines, key=lambda r: r["LPIPS_reference/mean"])
    assert torch.load(tmp_path / "out" / "best.pt", weights_only=True)["step"] == best["step"]


def test_training_without_weights_offline_fails_before_the_first_step(tmp_path, tiny_vae_dir, weights, offline,
                                                                     capsys):
    write_latent_folders(tmp_path / "data")
    cfg = training_config(tmp_path, tiny_vae_dir, weights, inception_weights=None)
    start = time.perf_counter()
    assert run.main(["--config", cfg]) == 2
    assert time.perf_counter() - start < 30
    err = capsys.readouterr().err
    assert "evaluation.every_epochs is set" in err and "evaluation.inception_weights" in err
    assert metrics.INCEPTION_FILE in err
    assert not os.path.exists(tmp_path / "out" / "latest.pt")


def test_unknown_best_metric_is_refused_before_training(tmp_path, tiny_vae_dir, weights, capsys):
    write_latent_folders(tmp_path / "data")
    cfg = training_config(tmp_path, tiny_vae_dir, weights, best_metric="FID_latent/a2zebra")
    assert run.main(["--config", cfg]) == 2
    assert "evaluation.best_metric='FID_latent/a2zebra'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out" / "latest.pt")


# ---------------------------------------------------------------------- numbers a researcher can trust

def test_a_rewritten_data_set_never_reuses_stale_features(checkpoint, weights, tiny_vae_dir, tmp_path,
                                                          small_inception, capsys):
    """The real-feature cache is keyed by the latents' content: files rewritten with other values but
    the same size and modification time (cp -p, rsync -a, tar x) get their features recomputed."""
    root = write_latent_folders(tmp_path / "data")
    own = str(own_checkpoint(checkpoint, tmp_path))
    args = evaluate_args(own, weights, tiny_vae_dir, tmp_path / "one", metrics.FORM_STYLEGAN, "--data-root", root)
    assert evaluate.main(args) == 0
    first = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert all(v.startswith("computed and cached") for v in first["protocol"]["real_features"].values())
    path = os.path.join(root, "b", "000.pt")
    stat = os.stat(path)
    before = torch.load(path, weights_only=True)
    save_latent(before.flip(-1) * 2 + 3, path)  # other values, one size (save_latent's bytes ignore the name)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.path.getsize(path) == stat.st_size and os.stat(path).st_mtime_ns == stat.st_mtime_ns
    capsys.readouterr()
    assert evaluate.main(evaluate_args(own, weights, tiny_vae_dir, tmp_path / "two", metrics.FORM_STYLEGAN,
                                       "--data-root", root)) == 0
    second = json.loads((tmp_path / "two" / "metrics.json").read_text())
    used = second["protocol"]["real_features"]
    assert used["a"].startswith("cached") and used["c"].startswith("cached") and used["b"].startswith("computed")
    assert "real features of b (6 latents): computed and cached" in capsys.readouterr().out
    assert second["FID_latent/a2b"] != first["FID_latent/a2b"] and second["FID_latent/c2a"] == first["FID_latent/c2a"]


def test_mismatched_sizes_and_vaes_are_refused_before_any_work(checkpoint, weights, tiny_vae_dir, tmp_path,
                                                               small_inception, capsys, monkeypatch):
    monkeypatch.setattr(metrics.Evaluator, "decode", lambda *a: pytest.fail("decoding began"))
    small = write_latent_folders(tmp_path / "small", size=8)
    assert evaluate.main(evaluate_args(checkpoint[0], weights, tiny_vae_dir, tmp_path / "o", metrics.FORM_STYLEGAN,
                                       "--data-root", small)) == 2
    assert "holds latents of shape [4, 8, 8]; the checkpoint was trained on [4, 16, 16]" in capsys.readouterr().err
    big = write_latent_folders(tmp_path / "big", size=32)
    assert evaluate.main(evaluate_args(checkpoint[0], weights, tiny_vae_dir, tmp_path / "o", metrics.FORM_STYLEGAN,
                                       "--source-root", big)) == 2
    err = capsys.readouterr().err
    assert "--source-root" in err and "[4, 32, 32]" in err and "[4, 16, 16]" in err
    from diffusers import AutoencoderKL

    wide = AutoencoderKL(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=8, norm_num_groups=8)
    wide.save_pretrained(str(tmp_path / "vae8"))
    assert evaluate.main(evaluate_args(checkpoint[0], weights, str(tmp_path / "vae8"), tmp_path / "o")) == 2
    assert "(channels: VAE " in (err := capsys.readouterr().err) and "vae8' 8 vs checkpoint 4" in err


def test_the_cache_lives_beside_the_checkpoint_wherever_out_is(checkpoint, weights, tiny_vae_dir, tmp_path,
                                                                small_inception):
    """So that evaluate.py reuses what training-time evaluation computed (its <checkpoint_dir>/eval_cache)."""
    out = tmp_path / "results" / "here"
    assert evaluate.main(evaluate_args(checkpoint[0], weights, tiny_vae_dir, out)) == 0
    used = json.loads((out / "metrics.json").read_text())["protocol"]["real_features"]["a"]
    name = used[used.index("(") + 1:-1]
    assert os.path.isfile(os.path.join(os.path.dirname(checkpoint[0]), "eval_cache", name))
    assert not (tmp_path / "results" / "eval_cache").exists() and not (out / "eval_cache").exists()


def test_held_out_sources_are_used_and_said(checkpoint, weights, tiny_vae_dir, tmp_path, small_inception):
    held = write_latent_folders(tmp_path / "val", files=3, seed=7)
    assert evaluate.main(evaluate_args(checkpoint[0], weights, tiny_vae_dir, tmp_path / "o", metrics.FORM_STYLEGAN,
                                       "--source-root", held)) == 0
    protocol = json.loads((tmp_path / "o" / "metrics.json").read_text())["protocol"]
    assert protocol["sources"] == f"held out: {held}" and protocol["n_sources"] == {"a": 2, "b": 2, "c": 2}
    assert protocol["n_real"] == {"a": 6, "b": 6, "c": 6}


def test_fid_and_kid_without_lpips_weights(checkpoint, weights, tiny_vae_dir, tmp_path, small_inception, offline,
                                           capsys):
    """Offline without AlexNet weights: --metrics fid,kid still evaluates (no LPIPS keys), and shows
    its progress."""
    args = evaluate_args(checkpoint[0], weights, tiny_vae_dir, tmp_path / "o", metrics.FORM_STYLEGAN,
                         "--metrics", "fid,kid")
    args[args.index("--lpips-weights"):args.index("--lpips-weights") + 2] = []
    assert evaluate.main(args) == 0
    record = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert not [k for k in record if k.startswith("LPIPS")] and "FID_latent/mean" in record
    assert record["protocol"]["metrics"] == ["FID", "KID"] and record["protocol"]["lpips"] is None
    err = capsys.readouterr().err
    assert "evaluating: 100%" in err and f"{3 * 6 + 2 * 6 * 2 * 2}/{3 * 6 + 2 * 6 * 2 * 2}" in err
    assert evaluate.main(evaluate_args(checkpoint[0], weights, tiny_vae_dir, tmp_path / "o", metrics.FORM_STYLEGAN,
                                       "--metrics", "fid,psnr")) == 2
    assert "--metrics 'fid,psnr': expected one or more of fid, kid, lpips" in capsys.readouterr().err


def test_training_time_evaluation_records_its_protocol_and_held_out_sources(tmp_path, tiny_vae_dir, weights,
                                                                           small_inception, offline):
    """evaluation.source_root and evaluation.metrics (no LPIPS: no AlexNet, which is not here)."""
    write_latent_folders(tmp_path / "data")
    held = write_latent_folders(tmp_path / "val", files=2, seed=3)
    cfg = training_config(tmp_path, tiny_vae_dir, weights, epochs=1, source_root=held, metrics=["FID", "KID"],
                          lpips_weights=None)
    assert run.main(["--config", cfg]) == 0
    line = json.loads((tmp_path / "out" / "metrics.jsonl").read_text())
    assert line["protocol"]["sources"] == held and line["protocol"]["n_sources"] == {"a": 2, "b": 2, "c": 2}
    assert line["protocol"]["metrics"] == ["FID", "KID"] and not [k for k in line if k.startswith("LPIPS")]
    assert line["protocol"]["inception"] and line["protocol"]["warnings"]


def test_preview_decode_evaluates_without_a_vae_and_labels_it(checkpoint, weights, tiny_vae_dir, tmp_path,
                                                              small_inception, offline, capsys):
    """--preview-decode: no VAE (the demo has none), pictures from the linear latent preview; the
    output and metrics.json say preview-decoded, not comparable with published FIDs. The header
    says what one task holds, and the progress counts tasks as well as pictures."""
    args = evaluate_args(checkpoint[0], weights, tiny_vae_dir, tmp_path / "p", metrics.FORM_STYLEGAN, "--preview-decode")
    args[args.index("--vae"):args.index("--vae") + 2] = []
    assert evaluate.main(args) == 0
    protocol = json.loads((tmp_path / "p" / "metrics.json").read_text())["protocol"]
    assert protocol["decode"] == metrics.PREVIEW_DECODE and "not comparable with published FIDs" in metrics.PREVIEW_DECODE
    assert protocol["vae"].startswith("preview-decoded") and metrics.PREVIEW_DECODE in protocol["warnings"]
    captured = capsys.readouterr()
    assert "6 tasks x 2 modes, each 2 sources x 2 outputs = 4 translations" in captured.out
    assert "--preview-decode: preview-decoded" in captured.out
    assert "task 12/12: reference b2c" in captured.err  # the task count goes on when the pictures are done
    # with a VAE as well: which decode is meant? refused
    assert evaluate.main(evaluate_args(checkpoint[0], weights, tiny_vae_dir, tmp_path / "q", metrics.FORM_STYLEGAN,
                                       "--preview-decode")) == 2
    assert "--preview-decode draws pictures without a VAE" in capsys.readouterr().err


def test_preview_decode_offline_without_inception_names_the_flag(checkpoint, weights, tmp_path, offline, capsys):
    args = ["--checkpoint", checkpoint[0], "--out", str(tmp_path / "p"), "--device", "cpu", "--preview-decode",
            "--metrics", "fid"]
    assert evaluate.main(args) == 2
    err = capsys.readouterr().err
    assert metrics.INCEPTION_FILE in err and "--inception-weights" in err
