"""Hostile input, second round, with the real scripts: the folder lock removed under a run, stop
signals a terminal sends, shards replaced under a running job, outputs that name an input, sizes
without bounds, system errors, late checks and the app's odd values. Each exits 1 or 2 (or 128 +
the signal after a stop) with one line naming the file, key or value, and overwrites nothing."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from conftest import ROOT, one_line_naming, tiny_run_config, write_latent_folders


def write_run_config(tmp_path, name="cfg", visualization=None, **training):
    root = tmp_path / "data"
    if not root.exists():
        write_latent_folders(root)
    cfg = tiny_run_config(tmp_path, training={"checkpoint_dir": str(tmp_path / "out"), "log_json": True,
                                              "log_interval": 1, **training}, **({"visualization": visualization}
                                                                                   if visualization else {}))
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def start(args, code=None):
    """A script (or `python -c code` calling run.main) in its own process, stdout and stderr apart."""
    cmd = [sys.executable, "-u", *(["-c", code] if code else args)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(proc, prefix, lines, timeout=120):
    """Read `proc`'s stdout into `lines` until a line starts with `prefix`."""
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(prefix):
            return line
        assert time.monotonic() < deadline, "".join(lines)
    pytest.fail(f"no line {prefix!r}: {''.join(lines)}\n{proc.stderr.read()}")


def finish(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def test_a_run_whose_lock_file_was_replaced_stops_without_writing(tmp_path):
    """Another run's lock file renamed over .run.lock under a running job (as rm and a second
    `run.py --resume` would leave it, without the race): the first run's next save finds that its
    lock no longer names the path and stops in one line naming the holder."""
    import fcntl

    cfg = write_run_config(tmp_path, epochs=100000)
    first, lines = start(["run.py", "--config", cfg]), []
    try:
        wait_for(first, '{"step": 2,', lines)
        with open(tmp_path / "out" / "other.lock", "a+") as other:
            fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            other.write(f"pid {os.getpid()} on this host\n")
            other.flush()
            os.replace(tmp_path / "out" / "other.lock", tmp_path / "out" / ".run.lock")
            code, out, err = finish(first)
        assert code == 2, err
        line = one_line_naming(err, str(tmp_path / "out"), f"pid {os.getpid()} on this host")
        assert ".run.lock was removed while this run held it" in line and "without writing" in line
    finally:
        first.kill()
        first.wait()


def test_a_removed_lock_file_is_taken_again_and_a_second_run_is_refused(tmp_path):
    cfg = write_run_config(tmp_path, epochs=100000)
    first, lines = start(["run.py", "--config", cfg]), []
    try:
        wait_for(first, '{"step": 2,', lines)
        os.remove(tmp_path / "out" / ".run.lock")
        wait_for(first, '{"step": 6,', lines)  # two saves later: the first run locked the path again
        second = subprocess.run([sys.executable, "run.py", "--config", cfg, "--resume"], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        one_line_naming(second.stderr, "is in use by another training run", f"pid {first.pid} on ")
        assert first.poll() is None  # the first run trains on, alone
    finally:
        first.kill()
        first.wait()


# ---------------------------------------------------------------------- 6. signals of a closed terminal

def test_sighup_stops_a_run_as_sigterm_does(tmp_path):
    cfg = write_run_config(tmp_path, epochs=100000, save_interval=1000)
    proc, lines = start(["run.py", "--config", cfg]), []
    wait_for(proc, '{"step": 3,', lines)
    proc.send_signal(signal.SIGHUP)
    code, out, err = finish(proc)
    out = "".join(lines) + out
    assert code == 128 + signal.SIGHUP, err
    assert "received SIGHUP" in out and "resume with: python run.py --config" in out
    assert "Traceback" not in out + err
    ckpt = torch.load(tmp_path / "out" / "latest.pt", weights_only=True)
    assert ckpt["step"] >= 3  # the work up to the signal is saved


SLOW_GRID = ("import time, vae\nreal = vae.decode\ndef slow(v, raw):\n    time.sleep(0.5)\n    return real(v, raw)\n"
             "vae.decode = slow\n")


def test_a_stop_during_the_grid_of_an_epoch_between_saves_still_saves_it(tmp_path, tiny_vae_dir):
    """save_interval 2: epoch 1 writes no checkpoint, its grid is cut short by SIGINT; latest.pt must
    hold epoch 1 all the same (it said so), or the epoch's work is lost on resume."""
    cfg = write_run_config(tmp_path, epochs=4, save_interval=2,
                           visualization={"every_epochs": 1, "vae_path": tiny_vae_dir})
    code = f"import sys\nsys.path.insert(0, {ROOT!r})\n{SLOW_GRID}import run\nsys.exit(run.main(['--config', {cfg!r}]))\n"
    proc, lines = start(None, code), []
    wait_for(proc, '{"step": 2,', lines)
    time.sleep(1.5)  # in the grid
    proc.send_signal(signal.SIGINT)
    code, out, err = finish(proc)
    out = "".join(lines) + out
    assert code == 128 + signal.SIGINT, out + err
    assert f"stopped after epoch 1 (step 2); saved {tmp_path / 'out' / 'latest.pt'}" in out
    ckpt = torch.load(tmp_path / "out" / "latest.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"], ckpt["position"]) == (1, 2, 0)
    assert not os.path.exists(tmp_path / "out" / "epoch_0001.pt")  # not a save epoch: latest.pt alone
