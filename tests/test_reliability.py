"""Never lose work: exact resume (end of epoch and mid-epoch), SIGINT/SIGTERM, atomic checkpoints.
Straight and resumed runs are compared weight by weight, bitwise (CPU, fp32)."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

import run
import runtime
import trainer as T
from conftest import ROOT, tiny_run_config, write_latent_folders
from train_skips import NonFiniteError


def write_config(tmp_path, out, reject_outliers=True, **training):
    cfg = tiny_run_config(tmp_path, training={"checkpoint_dir": str(tmp_path / out), **training},
                          visualization={"every_epochs": 1, "vae_path": None})
    cfg["data"]["reject_outliers"] = reject_outliers
    cfg["data"]["samples_per_epoch"] = 12  # 3 steps of 4 per epoch
    cfg["loss"]["ds_decay_steps"] = 10
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def final_state(folder):
    return torch.load(os.path.join(folder, "latest.pt"), weights_only=True)


def assert_same_weights(a, b):
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]
    for group in ("models", "ema"):
        for net, sd in a[group].items():
            for key, value in sd.items():
                assert torch.equal(value, b[group][net][key]), f"{group}.{net}.{key} differs"
    for net, sd in a["optimizers"].items():
        for pid, state in sd["state"].items():
            for key, value in state.items():
                assert torch.equal(value, b["optimizers"][net]["state"][pid][key]), f"optimizer {net}.{key}"


@pytest.fixture
def data(tmp_path):
    return write_latent_folders(tmp_path / "data")


@pytest.fixture
def straight(tmp_path, data):
    cfg = write_config(tmp_path, "straight", epochs=3)
    assert run.main(["--config", cfg]) == 0
    return final_state(tmp_path / "straight")


def test_resume_after_an_epoch_is_exact(tmp_path, straight):
    cfg = write_config(tmp_path, "split", epochs=1)
    assert run.main(["--config", cfg]) == 0
    assert run.main(["--config", cfg, "--resume", "training.epochs=3"]) == 0
    assert_same_weights(straight, final_state(tmp_path / "split"))


def test_resume_mid_epoch_is_exact(tmp_path, straight, monkeypatch):
    """Stop after step 4 (second batch of epoch 2), as a signal would, then resume."""
    real_step = T.Trainer.train_step

    def stop_after_four(self, batch):
        out = real_step(self, batch)
        if self.step == 4:
            self.stop_request.signum = signal.SIGTERM
        return out

    monkeypatch.setattr(T.Trainer, "train_step", stop_after_four)
    cfg = write_config(tmp_path, "mid", epochs=3)
    assert run.main(["--config", cfg]) == 128 + signal.SIGTERM
    ckpt = final_state(tmp_path / "mid")
    assert (ckpt["epoch"], ckpt["step"], ckpt["position"]) == (1, 4, 1)
    monkeypatch.setattr(T.Trainer, "train_step", real_step)
    assert run.main(["--config", cfg, "--resume"]) == 0
    assert_same_weights(straight, final_state(tmp_path / "mid"))


def test_sigint_mid_epoch_then_resume(tmp_path, data):
    """A real process gets SIGINT mid-epoch: it finishes the step, saves latest.pt with the exact
    position, prints how to resume, exits non-zero; the resumed run completes."""
    cfg = write_config(tmp_path, "sig", epochs=1000, log_json=True, log_interval=1)
    proc = subprocess.Popen([sys.executable, "-u", "run.py", "--config", cfg], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.time() + 120
    for line in proc.stdout:  # wait until training is under way
        lines.append(line)
        if line.startswith('{"step": 5,') or time.time() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    sent = time.time()
    out, _ = proc.communicate(timeout=60)
    out = "".join(lines) + out
    assert proc.returncode == 128 + signal.SIGINT, out
    assert time.time() - sent < 30
    assert "resume with: python run.py --config" in out and "--resume" in out
    ckpt = final_state(tmp_path / "sig")
    assert ckpt["step"] >= 5
    assert ckpt["step"] == ckpt["epoch"] * 3 + ckpt["position"]
    assert not [f for f in os.listdir(tmp_path / "sig") if ".tmp" in f]
    # resume for just the rest of the next epoch
    epochs = ckpt["epoch"] + 1
    assert run.main(["--config", cfg, "--resume", f"training.epochs={epochs}", "training.log_json=false"]) == 0
    assert final_state(tmp_path / "sig")["step"] == epochs * 3


def test_kill_during_checkpoint_write_keeps_previous(tmp_path, data, monkeypatch):
    cfg = write_config(tmp_path, "kill", epochs=1)
    assert run.main(["--config", cfg]) == 0
    before = final_state(tmp_path / "kill")

    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(100)  # half-written, then the "crash"
        raise KeyboardInterrupt

    monkeypatch.setattr(runtime.torch, "save", dying_save)
    assert run.main(["--config", cfg, "--resume", "training.epochs=2"]) == 128 + signal.SIGINT  # no traceback
    monkeypatch.undo()
    after = final_state(tmp_path / "kill")  # still loadable, still the old one
    assert after["step"] == before["step"] == 3
    assert not [f for f in os.listdir(tmp_path / "kill") if ".tmp" in f]


def test_checkpoint_never_holds_nonfinite_weights(tmp_path):
    cfg = tiny_run_config(tmp_path)
    from config import resolve_config
    from model import build_models

    tr = T.Trainer(resolve_config(cfg), build_models(num_domains=3, **cfg["model"]), "cpu", log=lambda *a: None)
    with torch.no_grad():
        next(tr.nets["generator"].parameters())[0].fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="non-finite"):
        tr.save_checkpoint(str(tmp_path / "latest.pt"), 1)
    assert not os.path.exists(tmp_path / "latest.pt")


def test_poisoned_data_is_skipped_and_reported(tmp_path, capsys):
    """One absurd (1e30) file among normal ones, with data.reject_outliers off: steps that draw it
    are skipped and counted, the run finishes, and the checkpoint is finite."""
    root = write_latent_folders(tmp_path / "data")
    torch.save(torch.full((4, 16, 16), 1e30), os.path.join(root, "a", "000.pt"))
    cfg = write_config(tmp_path, "poison", epochs=2, log_json=True, log_interval=1, reject_outliers=False)
    assert run.main(["--config", cfg]) == 0
    import json

    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert records[-1]["nonfinite_skipped"] >= 1
    ckpt = final_state(tmp_path / "poison")
    assert all(torch.isfinite(v).all() for sd in ckpt["models"].values() for v in sd.values())


def test_skipped_steps_are_reported_without_display_or_log(tmp_path, capsys):
    """progress_style off, no JSON: skipped steps still get a line per epoch and one in `done:`."""
    root = write_latent_folders(tmp_path / "data")
    torch.save(torch.full((4, 16, 16), 1e30), os.path.join(root, "a", "000.pt"))
    cfg = write_config(tmp_path, "quiet", epochs=2, reject_outliers=False)
    assert run.main(["--config", cfg]) == 0
    out = capsys.readouterr().out
    skipped = final_state(tmp_path / "quiet")["counters"]["nonfinite_total"]
    assert skipped >= 1
    epoch_lines = [line for line in out.splitlines() if "step(s) skipped (non-finite loss or gradient)" in line]
    assert 1 <= len(epoch_lines) <= 2
    assert sum(int(line.split(": ")[1].split()[0]) for line in epoch_lines) == skipped
    assert f"done: 2 epochs, 6 steps, {int(skipped)} skipped (non-finite)" in out


def test_outlier_data_is_refused_before_training(tmp_path, capsys):
    root = write_latent_folders(tmp_path / "data")
    bad = os.path.join(root, "b", "003.pt")
    torch.save(torch.full((4, 16, 16), 1e30), bad)
    cfg = write_config(tmp_path, "refused", epochs=1)
    assert run.main(["--config", cfg]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: max |value| 1e+30" in err and "data.reject_outliers: false" in err
    assert not os.path.exists(tmp_path / "refused" / "latest.pt")


def test_consecutive_skips_stop_the_run(tmp_path, capsys):
    root = write_latent_folders(tmp_path / "data")
    for d in ("a", "b", "c"):
        for f in os.listdir(os.path.join(root, d)):
            torch.save(torch.full((4, 16, 16), 1e30), os.path.join(root, d, f))
    cfg = write_config(tmp_path, "allbad", epochs=5, max_nonfinite_steps=4, reject_outliers=False)
    assert run.main(["--config", cfg]) == 2
    assert "max_nonfinite_steps=4" in capsys.readouterr().err


def test_a_signal_after_the_epochs_last_agreement_stops_at_the_epochs_end(tmp_path, data, monkeypatch):
    """Every rank must take the same path at an epoch's end: the stop decision is a value every
    rank agreed on, never a flag a handler set afterwards (under torchrun one rank would stop while
    another went on to its next collective: a deadlock). A signal landing after the loop's last
    agreement is taken up by the agreement at the epoch's end: the epoch is saved as any other,
    latest.pt included, and the run stops there (no grid)."""
    real_epoch = T.Trainer.train_epoch

    def signal_after_epoch_one(self, dataset, epoch, start_batch=0):
        out = real_epoch(self, dataset, epoch, start_batch)
        if epoch == 1:
            self.stop_request.signum = signal.SIGTERM  # as the handler would, after the loop's last agreement
        return out

    monkeypatch.setattr(T.Trainer, "train_epoch", signal_after_epoch_one)
    cfg = write_config(tmp_path, "late", epochs=3)
    assert run.main(["--config", cfg]) == 128 + signal.SIGTERM
    ckpt = final_state(tmp_path / "late")
    assert (ckpt["epoch"], ckpt["step"], ckpt["position"]) == (1, 3, 0)
    assert os.path.exists(tmp_path / "late" / "epoch_0001.pt")  # epoch 1 ended as any other
    assert not os.path.exists(tmp_path / "late" / "vis")  # the grid waits for the resumed run


def start_patched_run(cfg, patch):
    """`python -c` that applies `patch` (source code run after the imports) and calls run.main."""
    code = (f"import sys, time\nsys.path.insert(0, {ROOT!r})\nimport metrics, vae\n{patch}\nimport run\n"
            f"sys.exit(run.main(['--config', {cfg!r}]))\n")
    return subprocess.Popen([sys.executable, "-u", "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for_line(proc, prefix, lines, timeout=120):
    deadline = time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(prefix) or time.time() > deadline:
            return


SLOW_DECODE = "real = vae.decode\ndef slow(v, raw):\n    time.sleep({s})\n    return real(v, raw)\nvae.decode = slow"


def slow_grid_config(tmp_path, tiny_vae_dir):
    cfg = tiny_run_config(tmp_path, training={"checkpoint_dir": str(tmp_path / "out"), "epochs": 3, "log_json": True,
                                              "log_interval": 1},
                          visualization={"every_epochs": 1, "vae_path": tiny_vae_dir})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_ctrl_c_during_a_slow_grid_stops_at_the_next_batch(tmp_path, data, tiny_vae_dir):
    """The grid of 27 cells decodes 2 at a time, 0.5 s per batch here (a real VAE on a CPU takes
    seconds per cell): SIGINT ends it at the next batch, the epoch's checkpoint is already saved, and
    the run says so and how to resume."""
    proc = start_patched_run(slow_grid_config(tmp_path, tiny_vae_dir), SLOW_DECODE.format(s=0.5))
    lines = []
    wait_for_line(proc, '{"step": 2,', lines)  # the last step of epoch 1: save, then the grid
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    sent = time.time()
    out, _ = proc.communicate(timeout=120)
    out = "".join(lines) + out
    assert proc.returncode == 128 + signal.SIGINT, out
    assert time.time() - sent < 10, out  # the rest of the grid alone would take about 5 s more
    assert "epoch 1: grid abandoned (stop requested); latest.pt will hold this epoch" in out
    assert f"stopped after epoch 1 (step 2); saved {tmp_path / 'out' / 'latest.pt'}" in out
    assert "resume with: python run.py --config" in out and "Traceback" not in out
    assert final_state(tmp_path / "out")["epoch"] == 1 and not (tmp_path / "out" / "vis" / "epoch_0001.png").exists()


def test_a_second_ctrl_c_stops_at_once_without_a_traceback(tmp_path, data, tiny_vae_dir):
    proc = start_patched_run(slow_grid_config(tmp_path, tiny_vae_dir), SLOW_DECODE.format(s=4))
    lines = []
    wait_for_line(proc, '{"step": 2,', lines)
    time.sleep(1)
    proc.send_signal(signal.SIGINT)  # waits for the 4 s batch to end...
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)  # ...unless a second one comes
    sent = time.time()
    out, _ = proc.communicate(timeout=120)
    out = "".join(lines) + out
    assert proc.returncode == 128 + signal.SIGINT and time.time() - sent < 3, out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    assert (f"stopped at once at step 2. The last good checkpoint, {tmp_path / 'out' / 'latest.pt'} (epoch 1, step 2), "
            "is intact.") in out
    assert "resume with: python run.py --config" in out
    assert [f for f in os.listdir(tmp_path / "out") if f.endswith(".tmp")] == []


def test_ctrl_c_during_an_evaluation_abandons_it_and_saves_the_epoch(tmp_path, data):
    """An evaluation that calls its progress hook batch by batch (as metrics.evaluate_translations
    does; a stand-in here, 0.3 s per batch): SIGINT ends it at the next batch, then the epoch is saved."""
    fake = ("class Slow:\n    def __call__(self, *a, progress=None, **k):\n        for _ in range(100):\n"
            "            time.sleep(0.3)\n            progress(1, 100)\n"
            "import train_eval\ntrain_eval.open_evaluator = lambda *a, **k: Slow()")
    cfg = tiny_run_config(tmp_path, training={"checkpoint_dir": str(tmp_path / "out"), "epochs": 3, "log_json": True,
                                              "log_interval": 1},
                          visualization={"every_epochs": 1, "vae_path": None}, evaluation={"every_epochs": 1})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = start_patched_run(str(path), fake)
    lines = []
    wait_for_line(proc, '{"step": 2,', lines)
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    sent = time.time()
    out, _ = proc.communicate(timeout=120)
    out = "".join(lines) + out
    assert proc.returncode == 128 + signal.SIGINT and time.time() - sent < 10, out
    assert "epoch 1: evaluation abandoned (stop requested); the checkpoint is saved next" in out
    assert f"stopped after epoch 1 (step 2); saved {tmp_path / 'out' / 'latest.pt'}" in out
    assert final_state(tmp_path / "out")["epoch"] == 1 and not (tmp_path / "out" / "metrics.jsonl").exists()
