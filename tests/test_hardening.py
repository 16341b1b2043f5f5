"""Hostile and unlucky input, tool by tool: tampered checkpoints (a generated set of broken ones
against run.py --resume, translate.py, evaluate.py, app.py and export.py: each exits 2 with one line naming
the file and the entry, never a signal, a traceback or NaN outputs), two runs on one folder, killed
saves, failed writes, and arguments out of range."""

import copy
import io
import math
import os
import resource
import signal
import struct
import subprocess
import sys
import time
import zipfile

import pytest
import torch
import yaml

import app
import checkpoint
import evaluate
import export
import folder_lock
import run
import runtime
import translate
from conftest import ROOT, one_line_naming, tiny_run_config, write_latent_folders
from latents import SD15


def parent(ckpt, keys):
    """(the container holding keys[-1], keys[-1]) for a key path such as ("models", "generator", "conv_in.weight")."""
    for key in keys[:-1]:
        ckpt = ckpt[key]
    return ckpt, keys[-1]


def drop(*keys):
    def mutate(ckpt):
        node, key = parent(ckpt, keys)
        del node[key]
    return mutate


def put(keys, value):
    keys = keys if isinstance(keys, tuple) else (keys,)

    def mutate(ckpt):
        node, key = parent(ckpt, keys)
        node[key] = value() if callable(value) else value
    return mutate


def scale(keys, factor):
    def mutate(ckpt):
        node, key = parent(ckpt, keys)
        node[key].mul_(factor)
    return mutate


def with_config(key, value):
    def mutate(ckpt):
        section, name = key.split(".")
        ckpt["config"][section][name] = value
    return mutate


def with_domains(names):
    def mutate(ckpt):
        ckpt["config"]["data"]["domains"] = list(names)
        ckpt["domains"] = list(names)
    return mutate


def shared_with_itself(depth):
    """[x, x] of [x, x] ... `depth` levels: a few bytes in a pickle (its memo), 2**depth leaves in a repr."""
    value = [1]
    for _ in range(depth):
        value = [value, value]
    return value


DEEP = "<deep list>"  # written as a list nested 20000 deep (pickle cannot write one, a hostile file can)
G0 = ("models", "generator", "conv_in.weight")  # [8, 4, 3, 3] in the tiny model
EXP_AVG = ("optimizers", "generator", "state", 0, "exp_avg")
GROUP = ("optimizers", "generator", "param_groups", 0)


def entry(keys):
    return "entry " + ".".join(map(str, keys))


# (id, mutation, what the one-line error must name)
SD15_RECORD = {"version": 1, **SD15.to_dict(), "vae_source": "stabilityai/sd-vae-ft-mse"}  # a manifest
BROKEN = [
    *[(f"missing {key}", drop(key), f"entry {key}") for key in checkpoint.CHECKPOINT_KEYS],
    ("extra entry", put("surprise", 1), "entry surprise"),
    ("live weight wrong shape", put(G0, lambda: torch.zeros(3, 4, 3, 3)), entry(G0)),
    ("live weight float64", put(G0, lambda: torch.zeros(8, 4, 3, 3, dtype=torch.float64)), entry(G0)),
    ("live weight NaN", scale(G0, float("nan")), f"{entry(G0)}: expected finite values"),
    ("live weight a string", put(G0, "weights"), entry(G0)),
    ("live net missing", drop("models", "discriminator"), "entry models.discriminator"),
    ("unknown weight", put(("models", "generator", "extra.weight"), lambda: torch.zeros(1)),
     "entry models.generator.extra.weight"),
    ("EMA NaN", scale(("ema", "generator", "conv_out.weight"), float("nan")), "entry ema.generator.conv_out.weight"),
    ("EMA inf", scale(("ema", "mapping_network", "shared.0.weight"), float("inf")),
     "entry ema.mapping_network.shared.0.weight"),
    ("EMA wrong shape", put(("ema", "style_encoder", "heads.weight"), lambda: torch.zeros(2, 2)),
     "entry ema.style_encoder.heads.weight"),
    ("EMA net missing", drop("ema", "style_encoder"), "entry ema.style_encoder"),
    ("exp_avg wrong shape", put(EXP_AVG, lambda: torch.zeros(12)), entry(EXP_AVG)),
    ("exp_avg NaN", scale(EXP_AVG, float("nan")), entry(EXP_AVG)),
    ("exp_avg_sq negative", scale(("optimizers", "generator", "state", 1, "exp_avg_sq"), -1.0),
     "entry optimizers.generator.state.1.exp_avg_sq: expected non-negative"),
    ("Adam step NaN", put(("optimizers", "discriminator", "state", 0, "step"), lambda: torch.tensor(float("nan"))),
     "entry optimizers.discriminator.state.0.step"),
    ("Adam state of param 999", put(("optimizers", "generator", "state", 999),
                                    lambda: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(1),
                                             "exp_avg_sq": torch.zeros(1)}), "entry optimizers.generator.state"),
    ("Adam state missing moment", drop("optimizers", "generator", "state", 0, "exp_avg_sq"),
     "entry optimizers.generator.state.0.exp_avg_sq"),
    ("param_groups params", put(GROUP + ("params",), [0, 1]), entry(GROUP + ("params",))),
    ("lr a string", put(GROUP + ("lr",), "fast"), entry(GROUP + ("lr",))),
    ("beta 1.5", put(GROUP + ("betas",), (1.5, 0.99)), entry(GROUP + ("betas", 0))),
    ("maximize", put(GROUP + ("maximize",), True), entry(GROUP + ("maximize",))),
    ("fused 'yes'", put(GROUP + ("fused",), "yes"), entry(GROUP + ("fused",))),
    ("scaler NaN", put(("scaler", "d"), {"scale": float("nan"), "growth_factor": 2.0, "backoff_factor": 0.5,
                                         "growth_interval": 2000, "_growth_tracker": 0}), "entry scaler.d.scale"),
    ("step -5", put("step", -5), "entry step"),
    ("step 2**70", put("step", 2 ** 70), "entry step"),
    ("position huge", put("position", 10 ** 15), "entry position"),
    ("position beyond step", put("position", 50), "entry step"),
    ("epoch a string", put("epoch", "1"), "entry epoch"),
    ("epoch True", put("epoch", True), "entry epoch"),
    ("skips beyond steps", put(("counters", "nonfinite_total"), 1e9), "entry counters.nonfinite_total"),
    ("OOM count negative", put(("counters", "oom_skipped"), -1), "entry counters.oom_skipped"),
    ("last_r1 NaN", put(("counters", "last_r1"), float("nan")), "entry counters.last_r1"),
    ("counter missing", drop("counters", "last_r1"), "entry counters.last_r1"),
    ("gen_channels 200000", with_config("model.gen_channels", 200000), "model.gen_channels"),
    ("huge model", lambda c: c["config"]["model"].update(gen_channels=4096, n_res_blocks=64), "parameters in all"),
    ("domain ../x", with_domains(["a", "../x", "c"]), "'../x' is not a plain folder name"),
    ("domain with NUL", with_domains(["a", "b\x00", "c"]), "control characters"),
    ("domain '..'", with_domains(["a", "..", "c"]), "'..' is not a plain folder name"),
    ("domains disagree", put("domains", ["x", "y", "z"]), "entry domains"),
    ("unknown model key", with_config("model.rocket", 1), "rocket"),
    ("batch_size a mapping", with_config("training.batch_size", {"a": 1}), "training.batch_size"),
    ("batch_size shared 40 deep", with_config("training.batch_size", shared_with_itself(40)), "training.batch_size"),
    ("domains a mapping", lambda c: c["config"]["data"].update(domains={"a": 1}), "data.domains"),
    ("seed negative", lambda c: c["config"].update(seed=-1), "'seed'"),
    ("seed 2**64", lambda c: c["config"].update(seed=2 ** 64), "'seed'"),
    ("config a list", put("config", [1, 2]), "entry config"),
    ("samples_per_epoch 1e12", with_config("data.samples_per_epoch", 10 ** 12), "data.samples_per_epoch"),
    ("latent_shape 0x0", put("latent_shape", [4, 0, 0]), "entry latent_shape"),
    ("latent_shape 4x4", put("latent_shape", [4, 4, 4]), "entry latent_shape"),
    ("latent_shape a string", put("latent_shape", "big"), "entry latent_shape"),
    ("torch RNG truncated", put(("rng", "torch"), lambda: torch.zeros(10, dtype=torch.uint8)), "entry rng.torch"),
    ("python RNG short", put(("rng", "python", "state"), [1, 2, 3]), "entry rng.python.state"),
    ("numpy RNG pos", put(("rng", "numpy", "pos"), 1000), "entry rng.numpy.pos"),
    ("CUDA RNG garbage", put(("rng", "cuda"), ["x"]), "entry rng.cuda.0"),
    ("best NaN", put("best", {"metric": "FID_latent/mean", "value": float("nan"), "epoch": 1, "step": 2}),
     "entry best.value"),
    ("best from the future", put("best", {"metric": "FID_latent/mean", "value": 1.0, "epoch": 9, "step": 2}),
     "entry best.epoch"),
    ("rng_per_rank garbage", put("rng_per_rank", ["state"]), "entry rng_per_rank.0"),
    ("not a dict", lambda c: c.clear(), "not a Latent StarGAN v2 checkpoint"),
    # views: a zero-stride moment once passed every check and crashed the fused Adam step (SIGSEGV),
    # and zero-stride weights let a 35 KB file demand gigabytes
    ("exp_avg zero-stride view", put(EXP_AVG, lambda: torch.zeros(1).expand(8, 4, 3, 3)),
     f"{entry(EXP_AVG)}: expected a float32 tensor of shape [8, 4, 3, 3] (the generator's parameter 0), contiguous, "
     "with storage of its own"),
    ("weight a transposed view", put(("ema", "mapping_network", "shared.2.weight"), lambda: torch.randn(16, 16).t()),
     "entry ema.mapping_network.shared.2.weight"),
    ("weight a slice of a bigger storage", put(G0, lambda: torch.randn(100, 4, 3, 3)[:8]), entry(G0)),
    ("int beyond any float", put(("counters", "last_r1"), 10 ** 400), "entry counters.last_r1"),
    ("deeply nested", put("latent_shape", DEEP), "latent_shape"),
    ("latent_scale 1e300", with_config("training.latent_scale", 1e300), "training.latent_scale"),
    ("weight on the meta device", lambda c: c["models"]["generator"].update(
        {"conv_in.weight": torch.empty_like(c["models"]["generator"]["conv_in.weight"], device="meta")}), entry(G0)),
    ("weight a nested tensor", put(G0, lambda: torch.nested.nested_tensor([torch.zeros(4, 3, 3)] * 8)), entry(G0)),
    ("two Adam moments one tensor", lambda c: c["optimizers"]["generator"]["state"][0].update(
        exp_avg_sq=c["optimizers"]["generator"]["state"][0]["exp_avg"]), "storage of optimizers.generator.state.0"),
    ("every Adam step one tensor", lambda c: [s.update(step=c["optimizers"]["discriminator"]["state"][0]["step"])
                                             for s in c["optimizers"]["discriminator"]["state"].values()],
     "the storage of optimizers.discriminator.state.0.step"),
    ("compressed records", lambda c: None, "is compressed"),
    ("latent_space of another VAE", put("latent_space", {**SD15_RECORD, "scaling_factor": 0.13025}),
     "entry latent_space: expected the manifest of the config's latent space, got scaling_factor: manifest 0.13025"),
    ("latent_space unknown key", put("latent_space", {**SD15_RECORD, "rocket": 1}), "entry latent_space: unknown key"),
    ("latent_space not a dict", put("latent_space", [4, 0.18215]), "entry latent_space must hold a JSON object"),
]




def write_checkpoint(ckpt, path, compress=False):
    """torch.save, with the string DEEP replaced in the pickle by a list nested 20000 deep; its
    records deflated when `compress` (a small file that would inflate inside torch.load)."""
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    archive = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    marker = b"X" + struct.pack("<I", len(DEEP)) + DEEP.encode()  # BINUNICODE
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        for name in archive.namelist():
            data = archive.read(name)
            if name.endswith("data.pkl"):
                data = data.replace(marker, b"]" * 20000 + b"a" * 19999)  # EMPTY_LIST x n, APPEND x n-1
            out.writestr(name, data, zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED)


@pytest.fixture(scope="module")
def broken_dir(trained, tmp_path_factory):
    """Every BROKEN checkpoint written once: {id: path}."""
    folder = tmp_path_factory.mktemp("broken")
    good = torch.load(trained[0], weights_only=True)
    checkpoint.validate_checkpoint(good, trained[0])  # the unbroken one passes
    paths = {}
    for k, (name, mutate, _) in enumerate(BROKEN):
        ckpt = copy.deepcopy(good)
        mutate(ckpt)
        paths[name] = str(folder / f"broken_{k:02d}.pt")
        write_checkpoint(ckpt, paths[name], compress=name == "compressed records")
    return paths


@pytest.fixture(scope="module")
def resume_config(trained, tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume")
    cfg = tiny_run_config(folder, data={"root": trained[1], "domains": ["a", "b", "c"], "samples_per_epoch": 8},
                          training={"epochs": 3})
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize("name, mutate, entry", BROKEN, ids=[b[0] for b in BROKEN])
def test_every_tool_refuses_a_broken_checkpoint_in_one_line(name, mutate, entry, broken_dir, resume_config, trained,
                                                            tmp_path, capsys, monkeypatch):
    path = broken_dir[name]
    monkeypatch.setattr(app, "launch", lambda *a, **k: pytest.fail("app.py served a broken checkpoint"))
    out = tmp_path / "translated"
    calls = {
        "run.py": lambda: run.main(["--config", resume_config, "--resume", path]),
        "translate.py": lambda: translate.main(["--checkpoint", path, "--source", os.path.join(trained[1], "a"),
                                                "--target-domain", "b", "--num-styles", "1", "--output", str(out)]),
        "evaluate.py": lambda: evaluate.main(["--checkpoint", path, "--device", "cpu", "--out", str(tmp_path / "ev")]),
        "app.py": lambda: app.main(["--checkpoint", path, "--device", "cpu"]),
        "export.py": lambda: export.main(["--checkpoint", path, "--output", str(tmp_path / "exported")]),
    }
    for prog, call in calls.items():
        assert call() == 2, prog
        line = one_line_naming(capsys.readouterr().err, path, entry)
        assert line.startswith(f"{prog}: error: ")
    assert not any(os.path.exists(tmp_path / name) for name in ("translated", "ev", "exported"))  # nothing made


def test_a_tampered_optimizer_state_never_reaches_the_fused_step(broken_dir, resume_config):
    """In a process of its own: an exp_avg of the wrong shape once killed --resume with SIGSEGV in
    the fused Adam kernel; now it is exit 2 and one line before anything is built."""
    path = broken_dir["exp_avg wrong shape"]
    proc = subprocess.run([sys.executable, "run.py", "--config", resume_config, "--resume", path], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    one_line_naming(proc.stderr, path, entry(EXP_AVG))


def test_nan_ema_weights_never_become_nan_outputs(broken_dir, trained, tmp_path):
    path = broken_dir["EMA NaN"]
    proc = subprocess.run([sys.executable, "translate.py", "--checkpoint", path, "--source",
                           os.path.join(trained[1], "a"), "--target-domain", "b", "--num-styles", "2", "--output",
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and not (tmp_path / "out").exists()
    one_line_naming(proc.stderr, path, "entry ema.generator.conv_out.weight: expected finite values")


def test_finite_weights_that_overflow_never_become_nan_outputs(trained, tmp_path, capsys):
    """Weights can be finite and still overflow (a diverged or tampered model): translate.py refuses
    to write non-finite latents."""
    ckpt = torch.load(trained[0], weights_only=True)
    for key, value in ckpt["ema"]["generator"].items():
        if key.endswith("weight"):
            value.mul_(1e18)
    path = str(tmp_path / "overflowing.pt")
    torch.save(ckpt, path)
    assert translate.main(["--checkpoint", path, "--source", os.path.join(trained[1], "a"), "--target-domain", "b",
                           "--num-styles", "1", "--output", str(tmp_path / "out")]) == 2
    assert "non-finite outputs (NaN or inf) for 6 of 6 translations" in capsys.readouterr().err
    assert not [f for f in os.listdir(tmp_path / "out") if f.endswith(".pt")] if (tmp_path / "out").exists() else True


def test_a_crafted_domain_never_writes_outside_the_output(trained, tmp_path, capsys):
    """Domain names become path components: '../x' in a checkpoint once made translate.py create
    folders outside --output."""
    ckpt = torch.load(trained[0], weights_only=True)
    ckpt["config"]["data"]["domains"] = ckpt["domains"] = ["a", "b", "../../escaped"]
    path = str(tmp_path / "crafted.pt")
    torch.save(ckpt, path)
    assert translate.main(["--checkpoint", path, "--source", os.path.join(trained[1], "a"), "--target-domain",
                           "../../escaped", "--num-styles", "1", "--output", str(tmp_path / "a" / "b" / "out")]) == 2
    assert "'../../escaped' is not a plain folder name" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["crafted.pt"]


# ---------------------------------------------------------------------- one run per folder

def write_run_config(tmp_path, name, **training):
    root = tmp_path / "data"
    if not root.exists():
        write_latent_folders(root)
    cfg = tiny_run_config(tmp_path, training={"checkpoint_dir": str(tmp_path / "out"), **training})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_a_second_run_on_a_busy_folder_is_refused_naming_the_holder(tmp_path, capsys):
    cfg = write_run_config(tmp_path, "cfg", epochs=1)
    os.makedirs(tmp_path / "out")
    with folder_lock.FolderLock(str(tmp_path / "out")).acquire():
        assert run.main(["--config", cfg]) == 2
        err = capsys.readouterr().err
        assert f"training.checkpoint_dir '{tmp_path / 'out'}' is in use by another training run" in err
        assert f"pid {os.getpid()} on " in err
        assert os.listdir(tmp_path / "out") == [".run.lock"]  # nothing of the refused run
    assert run.main(["--config", cfg]) == 0  # released: the folder is free again
    assert run.main(["--config", cfg, "--resume", "training.epochs=2"]) == 0  # and again after a run


def test_a_killed_run_leaves_no_stale_lock(tmp_path):
    """Two real processes: while one trains, a second is refused at once; after kill -9 of the first
    (no cleanup of any kind) a third takes the folder."""
    cfg = write_run_config(tmp_path, "cfg", epochs=1000, log_json=True, log_interval=1)
    first = subprocess.Popen([sys.executable, "-u", "run.py", "--config", cfg], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        for line in first.stdout:  # training is under way: it holds the lock
            if line.startswith('{"step": 2,'):
                break
        start = time.monotonic()
        second = subprocess.run([sys.executable, "run.py", "--config", cfg], cwd=ROOT, capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 2 and "is in use by another training run" in second.stderr
        assert f"pid {first.pid} on " in second.stderr and time.monotonic() - start < 60
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    third = subprocess.run([sys.executable, "run.py", "--config", cfg, "--resume", "training.epochs=2"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-2000:]


def test_a_killed_runs_forked_workers_do_not_keep_its_lock(tmp_path):
    """flock belongs to the open file, which fork shares: DataLoader workers of a run killed with
    -9 would hold the folder until they noticed. Forked children close the inherited lock."""
    code = (f"import os, sys, time\nsys.path.insert(0, {ROOT!r})\nimport folder_lock\n"
            f"folder_lock.FolderLock({str(tmp_path)!r}).acquire()\npid = os.fork()\n"
            "if pid == 0:\n    time.sleep(60)\n    os._exit(0)\nprint(pid, flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    worker = int(proc.stdout.readline())
    try:
        with pytest.raises(runtime.InputError, match="in use by another training run"):
            folder_lock.FolderLock(str(tmp_path)).acquire()
        proc.kill()
        proc.wait()
        assert runtime.pid_alive(worker)  # the forked worker lives on...
        folder_lock.FolderLock(str(tmp_path)).acquire().release()  # ...and the folder is free
    finally:
        proc.kill()
        os.kill(worker, signal.SIGKILL)


def test_orphaned_temporaries_of_dead_processes_are_removed_at_start(tmp_path, capsys):
    cfg = write_run_config(tmp_path, "cfg", epochs=1)
    out = tmp_path / "out"
    os.makedirs(out)
    dead = next(pid for pid in range(runtime.PID_MAX, 1, -1) if not runtime.pid_alive(pid))  # no such process
    orphan = out / f".latest.pt.{dead}.tmp"
    orphan.write_bytes(b"x" * 1000)
    live = out / f".latest.pt.{os.getppid()}.tmp"  # a live process's file (our parent's pid) is never touched
    live.write_bytes(b"y")
    other = out / "notes.tmp"
    other.write_bytes(b"z")
    huge = out / ".latest.pt.99999999999999999999.tmp"  # no PID is that large: not ours, and no crash
    huge.write_bytes(b"w")
    assert run.main(["--config", cfg]) == 0
    assert not orphan.exists() and live.exists() and other.exists() and huge.exists()
    assert f"removed {orphan} (0.0 MB): a temporary file of an interrupted save" in capsys.readouterr().out


def test_a_run_that_fails_at_once_leaves_no_empty_folder(tmp_path, capsys):
    cfg = write_run_config(tmp_path, "cfg", epochs=1)
    with open(cfg) as f:
        text = f.read().replace(str(tmp_path / "data"), str(tmp_path / "nowhere"))
    with open(cfg, "w") as f:
        f.write(text)
    assert run.main(["--config", cfg]) == 2
    assert "domain folder not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- failed writes

def limited_writes(limit_bytes):
    """preexec_fn: files of this process may not grow beyond `limit_bytes` (a write fails with
    EFBIG, as on a full disk; SIGXFSZ ignored so the write returns the error)."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return apply


def test_a_failed_checkpoint_write_is_one_message_and_the_last_one_is_intact(tmp_path):
    cfg = write_run_config(tmp_path, "cfg", epochs=1)
    assert subprocess.run([sys.executable, "run.py", "--config", cfg], cwd=ROOT, capture_output=True,
                          timeout=300).returncode == 0
    latest = tmp_path / "out" / "latest.pt"
    before = latest.read_bytes()
    limit = len(before) // 2  # config.yaml and the grid fit, a checkpoint does not
    proc = subprocess.run([sys.executable, "run.py", "--config", cfg, "--resume", "training.epochs=3"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, preexec_fn=limited_writes(limit))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "inline_container" not in proc.stderr
    message = proc.stderr.strip().splitlines()
    assert message[0].startswith(f"run.py: error: cannot write {tmp_path / 'out' / 'epoch_0002.pt'} (File too large")
    assert f"The last good checkpoint, {latest} (epoch 1, step 2), is intact." in message[0]
    assert message[1] == f"resume with: python run.py --config {cfg} training.epochs=3 --resume"
    assert latest.read_bytes() == before  # intact
    assert [f for f in os.listdir(tmp_path / "out") if f.endswith(".tmp")] == []


def test_write_errors_name_the_file_and_the_reason(tmp_path):
    def full(f):
        raise OSError(28, "No space left on device")

    with pytest.raises(runtime.WriteError, match=r"cannot write .*x\.pt \(No space left on device: the disk is full\)"):
        runtime.atomic_write(str(tmp_path / "x.pt"), full)
    with pytest.raises(runtime.WriteError, match=r"y\.pt \(File too large"):  # found below torch's RuntimeError
        runtime.atomic_write(str(tmp_path / "y.pt"), raise_chained)
    assert os.listdir(tmp_path) == []  # no temporary file left behind
    with pytest.raises(ValueError):  # a bug is not a write failure: it keeps its type and traceback
        runtime.atomic_write(str(tmp_path / "z.pt"), lambda f: int("x"))


def raise_chained(f):
    """What torch.save raises when the file write under it fails."""
    try:
        raise OSError(27, "File too large")
    except OSError as err:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos") from err


# ---------------------------------------------------------------------- arguments and data

@pytest.mark.parametrize("extra, message", [
    (["--psi", "nan"], "--psi nan: expected a number from 0"),
    (["--psi", "1.5"], "--psi 1.5"),
    (["--seed", str(2 ** 64)], f"--seed {2 ** 64}"),
    (["--seed", "-1"], "--seed -1"),
])
def test_translate_checks_its_arguments_before_any_work(trained, tmp_path, capsys, extra, message):
    code = translate.main(["--checkpoint", trained[0], "--source", os.path.join(trained[1], "a"), "--target-domain",
                           "b", "--num-styles", "1", "--output", str(tmp_path / "out"), *extra])
    assert code == 2 and message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_evaluate_checks_its_arguments_before_any_work(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evaluate.Evaluator, "load", lambda *a, **k: pytest.fail("evaluation started"))
    assert evaluate.main(["--checkpoint", trained[0], "--seed", "-1"]) == 2
    assert "--seed -1" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert evaluate.main(["--checkpoint", trained[0], "--device", "cpu", "--out", str(blocker / "sub")]) == 2
    assert f"--out '{blocker / 'sub'}' is not writable" in capsys.readouterr().err


@pytest.mark.parametrize("size", [0, 4, 7])
def test_latents_too_small_for_the_networks_are_refused_naming_the_minimum(trained, tmp_path, capsys, size):
    source = tmp_path / "small.pt"
    torch.save(torch.zeros(4, size, size), source)
    assert translate.main(["--checkpoint", trained[0], "--source", str(source), "--target-domain", "b",
                           "--num-styles", "1", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"has shape [4, {size}, {size}]: a latent's H and W must be from 8" in err
    root = write_latent_folders(tmp_path / "data", size=16)
    torch.save(torch.zeros(4, size, size), os.path.join(root, "b", "002.pt"))
    cfg = tiny_run_config(tmp_path)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert run.main(["--config", str(path)]) == 2
    assert "002.pt has shape" in capsys.readouterr().err


def test_outlier_latents_are_reported_by_translate_and_evaluate(trained, tmp_path, capsys):
    source = tmp_path / "scaled_twice.pt"
    torch.save(torch.full((4, 16, 16), 5e3), source)
    assert translate.main(["--checkpoint", trained[0], "--source", str(source), "--target-domain", "b",
                           "--num-styles", "1", "--output", str(tmp_path / "out")]) == 2
    assert f"{source}: max |value| 5e+03" in capsys.readouterr().err
    root = write_latent_folders(tmp_path / "data")
    bad = os.path.join(root, "c", "001.pt")
    torch.save(torch.full((4, 16, 16), -2e4), bad)
    assert evaluate.main(["--checkpoint", trained[0], "--device", "cpu", "--data-root", root,
                          "--out", str(tmp_path / "ev")]) == 2
    assert f"{bad}: max |value| 2e+04" in capsys.readouterr().err


def run_on_bad_data(tmp_path, first):
    """A run on data holding `first` as a/000 or a/001 (another shape), a garbage b/002.pt and a
    dict c/003.pt: refused (exit 2)."""
    root = write_latent_folders(tmp_path / "data", size=16)
    name, latent = first
    torch.save(latent, os.path.join(root, "a", name))
    (tmp_path / "data" / "b" / "002.pt").write_bytes(b"garbage")
    torch.save({"not": "a tensor"}, os.path.join(root, "c", "003.pt"))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_run_config(tmp_path)))
    assert run.main(["--config", str(path)]) == 2


def test_every_bad_data_file_is_listed_at_once(tmp_path, capsys):
    run_on_bad_data(tmp_path, ("001.pt", torch.zeros(4, 8, 8)))  # another shape
    err = capsys.readouterr().err
    assert "3 latent file(s) under" in err
    for name in ("a/001.pt has shape [4, 8, 8]; expected [4, 16, 16]", "b/002.pt", "c/003.pt holds a dict"):
        assert name in err
    assert "weights_only=False" not in err and "weights_only` set to `False`" not in err


def test_a_stray_first_file_neither_hides_the_list_nor_sizes_the_data(tmp_path, capsys):
    """The first file has the odd shape (here a large one): the data is sized by most files, and
    every bad file, unreadable ones included, is still listed at once."""
    run_on_bad_data(tmp_path, ("000.pt", torch.zeros(4, 1024, 1024)))
    err = capsys.readouterr().err
    assert "3 latent file(s) under" in err and "a/000.pt has shape [4, 1024, 1024]; expected [4, 16, 16]" in err
    assert "b/002.pt" in err and "c/003.pt holds a dict" in err


def test_config_bounds_name_the_key():
    from config import load_config

    for override, key in (("model.gen_channels=200000", "model.gen_channels"),
                          ("data.samples_per_epoch=1000000000000", "data.samples_per_epoch"),
                          ("training.batch_size=10000000", "training.batch_size")):
        with pytest.raises(runtime.InputError, match=key):
            load_config(None, [override])
    assert math.isfinite(load_config(None, ["model.gen_channels=512"])["training"]["lr"])


@pytest.mark.parametrize("kind", ["meta", "nested", "compressed"])
def test_a_latent_file_of_an_unusual_kind_is_one_line(kind, tmp_path):
    """A tensor on the meta device (no data), a nested tensor (no shape), a deflated torch.save
    archive (may inflate beyond its size): run.py refuses each, naming the file, in a process."""
    data = write_latent_folders(tmp_path / "data")
    bad = os.path.join(data, "b", "001.pt")
    if kind == "meta":
        torch.save(torch.empty(4, 16, 16, device="meta"), bad)
    elif kind == "nested":
        torch.save(torch.nested.nested_tensor([torch.zeros(4, 16, 16)]), bad)
    else:
        buffer = io.BytesIO()
        torch.save(torch.zeros(4, 16, 16), buffer)
        with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as archive, \
                zipfile.ZipFile(bad, "w", zipfile.ZIP_DEFLATED) as out:
            for name in archive.namelist():
                out.writestr(name, archive.read(name))
    cfg = tiny_run_config(tmp_path)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "run.py", "--config", str(path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert bad in proc.stderr and "Traceback" not in proc.stderr and "Fatal" not in proc.stderr, proc.stderr
    assert {"meta": "meta device", "nested": "nested tensor", "compressed": "is compressed"}[kind] in proc.stderr
