"""Hostile input, second round, with the real scripts: the folder lock removed under a run, stop
signals a terminal sends, shards replaced under a running job, outputs that name an input, sizes
without bounds, system errors, late checks and the app's odd values. Each exits 1 or 2 (or 128 +
the signal after a stop) with one line naming the file, key or value, and overwrites nothing."""

import json
import os
import select
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


@pytest.mark.slow
def test_a_run_whose_lock_file_was_replaced_stops_without_writing(tmp_path):
    """Another run's lock file renamed over .run.lock under a running job (as rm and a second
    `run.py --resume` would leave it, without the race), with no save due for a long while: the
    lock's watcher stops the run within seconds, and its save refuses in one line naming the holder."""
    import fcntl

    cfg = write_run_config(tmp_path, epochs=100000, save_interval=1000)
    first, lines = start(["run.py", "--config", cfg]), []
    try:
        wait_for(first, '{"step": 2,', lines)
        with open(tmp_path / "out" / "other.lock", "a+") as other:
            fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            other.write(f"pid {os.getpid()} on this host\n")
            other.flush()
            os.replace(tmp_path / "out" / "other.lock", tmp_path / "out" / ".run.lock")
            code, out, err = finish(first, timeout=60)
        assert code == 2, err
        line = one_line_naming(err, str(tmp_path / "out"), f"pid {os.getpid()} on this host")
        assert ".run.lock was removed while this run held it" in line and "without writing" in line
        assert not os.path.exists(tmp_path / "out" / "latest.pt")  # no save was due: none written
    finally:
        first.kill()
        first.wait()


@pytest.mark.slow
def test_a_removed_lock_file_is_put_back_and_a_second_run_is_refused(tmp_path):
    """`rm .run.lock` under a run whose next save is far away: within a second the run puts the
    file back, locked, so a second run is refused naming the first; the first trains on alone and
    its stop saves its own latest.pt."""
    cfg = write_run_config(tmp_path, epochs=100000, save_interval=1000)
    first, lines = start(["run.py", "--config", cfg]), []
    try:
        wait_for(first, '{"step": 3,', lines)
        os.remove(tmp_path / "out" / ".run.lock")
        time.sleep(2)
        second = subprocess.run([sys.executable, "run.py", "--config", cfg, "training.epochs=1"], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        one_line_naming(second.stderr, "is in use by another training run", f"pid {first.pid} on ")
        assert first.poll() is None  # the first run trains on, alone
        step = int(wait_for(first, '{"step": ', lines).split(",")[0].split()[-1])
        first.send_signal(signal.SIGTERM)
        code, out, err = finish(first)
        assert code == 128 + signal.SIGTERM, err
        ckpt = torch.load(tmp_path / "out" / "latest.pt", weights_only=True)
        assert ckpt["step"] >= step and ckpt["config"]["training"]["epochs"] == 100000  # the first run's
    finally:
        first.kill()
        first.wait()


# ---------------------------------------------------------------------- 6. signals of a closed terminal

@pytest.mark.slow
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


@pytest.mark.slow
def test_sighup_of_a_closed_terminal_still_saves(tmp_path):
    """The run's terminal really goes away (its pty master closed: every write to it fails), then
    SIGHUP: the stop and its save go on without the terminal, exit code 128 + SIGHUP."""
    cfg = write_run_config(tmp_path, epochs=100000, save_interval=1000)
    master, terminal = os.openpty()
    proc = subprocess.Popen([sys.executable, "-u", "run.py", "--config", cfg], cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=terminal, stderr=terminal)
    os.close(terminal)
    try:
        deadline, shown = time.monotonic() + 120, b""
        while b'{"step": 3,' not in shown:
            assert proc.poll() is None and time.monotonic() < deadline, shown.decode(errors="replace")
            if select.select([master], [], [], 0.5)[0]:  # never block past the deadline
                shown += os.read(master, 65536)
        os.close(master)  # the terminal hangs up
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(timeout=120) == 128 + signal.SIGHUP
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert torch.load(tmp_path / "out" / "latest.pt", weights_only=True)["step"] >= 3


SLOW_GRID = ("import time, vae\nreal = vae.decode\ndef slow(v, raw):\n    time.sleep(0.5)\n    return real(v, raw)\n"
             "vae.decode = slow\n")


@pytest.mark.slow
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


# ---------------------------------------------------------------------- 7. outputs that name an input

def tree_state(folder):
    """{name: bytes} of every file under `folder`: what must stay as it was."""
    state = {}
    for base, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(base, name), "rb") as f:
                state[os.path.relpath(os.path.join(base, name), folder)] = f.read()
    return state


def test_translate_never_overwrites_an_input_named_like_an_output(trained, tmp_path):
    import shutil

    source = tmp_path / "src"
    shutil.copytree(os.path.join(trained[1], "a"), source)
    shutil.copy(source / "000.pt", source / "000_to_b_0.pt")  # an earlier output, given back as an input
    before = tree_state(source)
    proc = subprocess.run([sys.executable, "translate.py", "--checkpoint", trained[0], "--source", str(source),
                           "--target-domain", "b", "--num-styles", "1", "--output", str(source)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    line = one_line_naming(proc.stderr, str(source / "000_to_b_0.pt"), "--output")
    assert "is the input" in line and "never overwrites" in line
    assert tree_state(source) == before  # nothing written, nothing replaced


def test_an_output_reaching_an_input_through_a_link_is_refused(trained, tmp_path, capsys):
    import translate

    out = tmp_path / "out"
    os.makedirs(out)
    source = os.path.join(trained[1], "a", "000.pt")
    os.link(source, out / "000_to_b_0.pt") if os.stat(source).st_dev == os.stat(out).st_dev else \
        os.symlink(source, out / "000_to_b_0.pt")
    assert translate.main(["--checkpoint", trained[0], "--source", source, "--target-domain", "b",
                           "--num-styles", "1", "--output", str(out)]) == 2
    one_line_naming(capsys.readouterr().err, str(out / "000_to_b_0.pt"), source)


# ---------------------------------------------------------------------- 9. sizes without bounds

def test_translate_bounds_the_number_of_styles_before_any_work(trained, tmp_path):
    proc = subprocess.run([sys.executable, "translate.py", "--checkpoint", trained[0], "--source",
                           os.path.join(trained[1], "a"), "--target-domain", "b", "--num-styles", "100000000",
                           "--output", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "argument --num-styles: 100000000: expected an integer from 1 to 1024" in proc.stderr.splitlines()[-1]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value, bound", [
    ("--fps", "1e-300", "expected a number from 0.1 to 240"),
    ("--fps", "inf", "expected a number from 0.1 to 240"),
    ("--cell-size", "100000", "expected an integer from 1 to 2048"),
    ("--frames-per-transition", "1e9", "expected an integer from 2 to 10000"),
    ("--batch-size", "0", "expected an integer from 1 to 4096"),
    # values a plain int takes and no later check refuses: only the bound stands in their way
    ("--frames-per-transition", "100000", "expected an integer from 2 to 10000"),
    ("--batch-size", "100000", "expected an integer from 1 to 4096"),
])
def test_every_size_and_rate_of_translate_is_bounded(trained, tmp_path, capsys, flag, value, bound):
    import translate

    code = translate.main(["--checkpoint", trained[0], "--source", os.path.join(trained[1], "a"), "--target-domain",
                           "b", "--num-styles", "2", "--video", "latent", str(tmp_path / "v.gif"), flag, value])
    err = capsys.readouterr().err
    assert code == 2 and f"argument {flag}: {value}: {bound}" in err.splitlines()[-1], err


INT, NUMBER = "expected an integer from", "expected a number from"
# (script, flag, value, the bound the refusal names); each flag has a value a plain int or float
# would take, so that only the bound refuses it ("1e9" is no int literal, 0 often meets a later check)
SCRIPT_BOUNDS = [
    ("evaluate", "--num-outs", "1e9", f"{INT} 2 to 1000"),
    ("evaluate", "--num-outs", "1", f"{INT} 2 to 1000"),
    ("evaluate", "--num-outs", "100000", f"{INT} 2 to 1000"),
    ("evaluate", "--max-sources", "0", f"{INT} 1 to 1e+07"),
    ("evaluate", "--max-sources", "100000000", f"{INT} 1 to 1e+07"),
    ("evaluate", "--batch-size", "-3", f"{INT} 1 to 4096"),
    ("evaluate", "--batch-size", "nan", f"{INT} 1 to 4096"),
    ("encode", "--size", "4", f"{INT} 8 to 8192"),
    ("encode", "--size", "100000", f"{INT} 8 to 8192"),
    ("encode", "--batch-size", "0", f"{INT} 1 to 4096"),
    ("encode", "--batch-size", "1e9", f"{INT} 1 to 4096"),
    ("encode", "--batch-size", "100000", f"{INT} 1 to 4096"),
    ("encode", "--workers", "-1", f"{INT} 0 to 256"),
    ("encode", "--workers", "100000", f"{INT} 0 to 256"),
    ("export", "--tolerance", "inf", f"{NUMBER} 1e-12 to 1e+06"),
    ("export", "--tolerance", "nan", f"{NUMBER} 1e-12 to 1e+06"),
    ("export", "--tolerance", "-1", f"{NUMBER} 1e-12 to 1e+06"),
    ("export", "--tolerance", "0", f"{NUMBER} 1e-12 to 1e+06"),
    ("export", "--tolerance", "1e300", f"{NUMBER} 1e-12 to 1e+06"),
    ("bench", "--steps", "0", f"{INT} 1 to 100000"),
    ("bench", "--steps", "1e9", f"{INT} 1 to 100000"),
    ("bench", "--steps", "1000000", f"{INT} 1 to 100000"),
    ("bench", "--warmup", "-1", f"{INT} 0 to 100000"),
    ("bench", "--peak-tflops", "0", f"{NUMBER} 0.001 to 100000"),
    ("bench", "--peak-tflops", "inf", f"{NUMBER} 0.001 to 100000"),
    ("bench", "--latent-size", "4", f"{INT} 8 to 1024"),
    ("bench", "--latent-size", "100000", f"{INT} 8 to 1024"),
    ("bench", "--threads", "0", f"{INT} 1 to 1024"),
    ("bench", "--export-batch", "0", f"{INT} 1 to 4096"),
    ("bench", "--eval-batch", "100000", f"{INT} 1 to 4096"),
    ("bench", "--video-sources", "0", f"{INT} 1 to 1024"),
    ("bench", "--video-frames", "2", f"{INT} 3 to 10000"),
    ("bench", "--data-startup", "1e12", f"{INT} 1 to 1e+07"),
    ("bench", "--data-startup", "100000000", f"{INT} 1 to 1e+07"),
    ("bench", "--ranks", "100000", f"{INT} 1 to 256"),
    ("score", "--steps", "0", f"{INT} 1 to 100000"),
    ("score", "--steps", "1e9", f"{INT} 1 to 100000"),
    ("score", "--steps", "1000000", f"{INT} 1 to 100000"),
    ("score", "--threads", "0", f"{INT} 1 to 1024"),
    ("score", "--threads", "100000", f"{INT} 1 to 1024"),
    ("score", "--domains", "1", f"{INT} 2 to 1024"),
    ("score", "--domains", "100000", f"{INT} 2 to 1024"),
    ("score", "--size", "4", f"{INT} 8 to 1024"),
    ("score", "--size", "100000", f"{INT} 8 to 1024"),
    ("score", "--num-outs", "1", f"{INT} 2 to 1000"),
    ("score", "--num-outs", "100000", f"{INT} 2 to 1000"),
    ("score", "--test-per-domain", "2", f"{INT} 4 to 10000"),
    ("score", "--test-per-domain", "1000000", f"{INT} 4 to 10000"),
    ("score", "--eval-every", "0", f"{INT} 1 to 100000"),
    ("score", "--eval-every", "1000000", f"{INT} 1 to 100000"),
]


def script_args(script, tmp_path):
    """The required arguments of `script`, naming files in `tmp_path` that exist (a checkpoint, a
    config, an image folder; their content is never read: the bound refuses first) and outputs that
    must not appear."""
    (tmp_path / "latest.pt").write_bytes(b"not read")
    (tmp_path / "images").mkdir()
    (tmp_path / "cfg.yaml").write_text("{}\n")
    return {"evaluate": ["--checkpoint", str(tmp_path / "latest.pt"), "--out", str(tmp_path / "out")],
            "encode": ["--input", str(tmp_path / "images"), "--output", str(tmp_path / "out"), "--vae",
                       str(tmp_path / "vae")],
            "export": ["--checkpoint", str(tmp_path / "latest.pt"), "--output", str(tmp_path / "out"), "--verify"],
            "bench": ["--config", str(tmp_path / "cfg.yaml"), "--data-root", str(tmp_path / "out")],
            "score": ["--config", str(tmp_path / "cfg.yaml")]}[script]


@pytest.mark.parametrize("script, flag, value, bound", SCRIPT_BOUNDS)
def test_every_size_and_rate_of_the_scripts_is_bounded(tmp_path, capsys, script, flag, value, bound):
    """Refused by argparse before anything is loaded or created: exit code 2, the one error line
    names the flag, the value and the range; no traceback."""
    import importlib

    args = script_args(script, tmp_path)
    before = sorted(os.listdir(tmp_path))
    try:
        code = importlib.import_module(script).main([*args, flag, value])
    except SystemExit as e:  # scripts whose main lets argparse exit
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].endswith(f": error: argument {flag}: {value}: {bound}"), err
    assert "Traceback" not in err and sorted(os.listdir(tmp_path)) == before


# ---------------------------------------------------------------------- 2. a mapped shard changed under a run

@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_a_shard_rewritten_under_a_run_ends_it_in_one_line(tmp_path, workers):
    """latents.npy rewritten in place while a run gathers from its map (workers 0: the same bytes'
    size, new values; workers 2: copied over, as `cp` does): one line naming the file, the last
    good checkpoint and the resume command; exit code 2; no traceback, no fatal signal."""
    import shutil

    from packing import pack_folders

    write_latent_folders(tmp_path / "files")
    pack_folders(str(tmp_path / "files"), str(tmp_path / "data"), None, "float16")
    cfg = write_run_config(tmp_path, epochs=100000, num_workers=workers)
    proc, lines = start(["run.py", "--config", cfg]), []
    try:
        wait_for(proc, '{"step": 4,', lines)  # epoch 1 is saved
        shard = tmp_path / "data" / "a" / "latents.npy"
        if workers:
            shutil.copyfile(tmp_path / "data" / "b" / "latents.npy", tmp_path / "new.npy")
            shutil.copyfile(tmp_path / "new.npy", shard)
        else:
            new = (tmp_path / "data" / "b" / "latents.npy").read_bytes()
            with open(shard, "r+b") as f:
                f.write(new)
        code, out, err = finish(proc)
    finally:
        proc.kill()
        proc.wait()
    assert code == 2, err
    line = one_line_naming(err, str(shard), "changed while this job read it")
    assert "The last good checkpoint, " in line and "Resume with: python run.py --config" in line


def start_packed_run(tmp_path, workers, code=None):
    """run.py (or `code` calling run.main) on a packed copy of the tiny data, after epoch 1's save."""
    from packing import pack_folders

    write_latent_folders(tmp_path / "files")
    pack_folders(str(tmp_path / "files"), str(tmp_path / "data"), None, "float16", log=lambda *a: None)
    cfg = write_run_config(tmp_path, epochs=100000, num_workers=workers)
    proc, lines = start(["run.py", "--config", cfg], code and code.format(cfg=cfg)), []
    wait_for(proc, '{"step": 4,', lines)  # epoch 1 is saved
    return proc


def assert_stopped_on_changed_shard(tmp_path, proc, shard):
    """One line naming the shard, exit code 2, no traceback and no fatal signal, latest.pt intact."""
    from checkpoint import load_checkpoint

    code, out, err = finish(proc)
    assert code == 2, err
    line = one_line_naming(err, str(shard), "changed while this job read it")
    assert "The last good checkpoint, " in line and "Resume with: python run.py --config" in line
    assert "Bus error" not in err and "bus error" not in err
    assert load_checkpoint(str(tmp_path / "out" / "latest.pt"))["step"] >= 4  # the last save is intact


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_a_shard_truncated_under_a_run_ends_it_in_one_line(tmp_path, workers):
    proc = start_packed_run(tmp_path, workers)
    shard = tmp_path / "data" / "a" / "latents.npy"
    try:
        os.truncate(shard, os.path.getsize(shard) // 3)
        assert_stopped_on_changed_shard(tmp_path, proc, shard)
    finally:
        proc.kill()
        proc.wait()


# the loader workers read past the per-batch check, as a truncation that lands between the check and
# the read does: a worker faults on the truncated map (SIGBUS)
WORKERS_SKIP_THE_CHECK = (f"import sys\nsys.path.insert(0, {ROOT!r})\nimport packing, torch.utils.data as tud\n"
                          "check = packing.PackedShard.check_unchanged\n"
                          "packing.PackedShard.check_unchanged = lambda self: None if tud.get_worker_info() "
                          "else check(self)\nimport run\nsys.exit(run.main(['--config', {cfg!r}]))\n")


@pytest.mark.slow
def test_a_loader_worker_killed_by_sigbus_names_the_truncated_shard(tmp_path):
    proc = start_packed_run(tmp_path, 2, WORKERS_SKIP_THE_CHECK)
    shard = tmp_path / "data" / "b" / "latents.npy"
    try:
        os.truncate(shard, 128)  # the header alone: rows past the first page fault
        assert_stopped_on_changed_shard(tmp_path, proc, shard)
    finally:
        proc.kill()
        proc.wait()


def test_content_ids_name_a_shard_truncated_after_the_data_set_was_built(tmp_path):
    """evaluate.py and the evaluation during training hash every map whole: a file truncated after
    the data set was opened is named (ShardChanged), not read into a SIGBUS."""
    from dataset import MultiDomainLatentDataset
    from packing import ShardChanged, pack_folders

    write_latent_folders(tmp_path / "files")
    pack_folders(str(tmp_path / "files"), str(tmp_path / "data"), None, "float16", log=lambda *a: None)
    ds = MultiDomainLatentDataset(str(tmp_path / "data"), ["a", "b", "c"], log=lambda *a: None)
    shard = tmp_path / "data" / "a" / "latents.npy"
    os.truncate(shard, 128)
    with pytest.raises(ShardChanged, match=f"{shard} changed while this job read it"):
        ds.content_ids()


# ---------------------------------------------------------------------- 3. weight files beside checkpoints

def write_unusual_kind(path, state, kind):
    """`state` saved with a tensor on the meta device (no data), a nested tensor (no shape), as a
    deflated torch.save archive (it may inflate far beyond its size) or in torch's legacy format."""
    import io
    import zipfile

    first = next(iter(state))
    if kind == "legacy":  # torch's pre-1.6 format: no records to check, so refused with how to convert
        torch.save(state, path, _use_new_zipfile_serialization=False)
        return str(path)
    if kind == "meta":
        state = {**state, first: torch.empty_like(state[first], device="meta")}
    elif kind == "nested":
        state = {**state, first: torch.nested.nested_tensor([torch.zeros_like(state[first])])}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as archive, \
            zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if kind == "deflated" else zipfile.ZIP_STORED) as out:
        for name in archive.namelist():
            out.writestr(name, archive.read(name))
    return str(path)


@pytest.mark.parametrize("kind", ["meta", "nested", "deflated", "legacy"])
def test_lpips_weights_of_an_unusual_kind_are_one_line(trained, tmp_path, kind):
    from conftest import write_random_alexnet

    state = write_random_alexnet(tmp_path / "alexnet.pt")
    bad = write_unusual_kind(tmp_path / "bad.pt", state, kind)
    proc = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", trained[0], "--preview-decode", "--metrics",
                           "LPIPS", "--lpips-weights", bad, "--device", "cpu", "--num-outs", "2", "--max-sources", "2",
                           "--out", str(tmp_path / "eval")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    line = one_line_naming(proc.stderr, bad, "LPIPS weights")
    reason = {"deflated": "compressed", "legacy": "torch.save(torch.load(OLD, weights_only=True), NEW)"}
    assert "Fatal" not in proc.stderr and reason.get(kind, "features.0.weight") in line


@pytest.mark.parametrize("kind", ["meta", "nested", "deflated", "nan"])
def test_a_poisoned_feature_cache_is_recomputed_with_a_warning(tmp_path, kind):
    """The real-feature cache beside a checkpoint is the tool's own file, but a file all the same:
    one that fails the checks is recomputed and replaced, saying so in the one line it logs."""
    import metrics

    key = {"version": metrics.CACHE_VERSION, "real": "x"}
    latents, feats = torch.zeros(3, 4, 8, 8), torch.randn(3, 5)
    metrics.cached_real_features("a", latents, lambda: feats, str(tmp_path), key)  # writes the file
    (path,) = [tmp_path / name for name in os.listdir(tmp_path)]
    poisoned = {"features": torch.full((3, 5), float("nan"))} if kind == "nan" else {"features": feats}
    write_unusual_kind(path, {**poisoned, "key": key, "domain": "a"}, "stored" if kind == "nan" else kind)
    again, how = metrics.cached_real_features("a", latents, lambda: feats * 2, str(tmp_path), key)
    assert torch.equal(again, feats * 2) and "\n" not in how
    assert how.startswith(f"computed and cached ({path.name}); warning: the cached file was refused"), how
    assert metrics.cached_real_features("a", latents, lambda: None, str(tmp_path), key)[1].startswith("cached")


# ---------------------------------------------------------------------- 10. checks that came late

@pytest.mark.parametrize("section, key", [("visualization", "save_dir"), ("evaluation", "source_root")])
def test_a_bad_folder_of_the_config_is_refused_before_the_folder_is_claimed(tmp_path, section, key):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    bad = str(blocker / "sub")
    extra = {"every_epochs": 1, key: bad}
    cfg = write_run_config(tmp_path)
    with open(cfg) as f:
        data = yaml.safe_load(f)
    data[section] = {**data.get(section, {}), **extra}
    with open(cfg, "w") as f:
        yaml.safe_dump(data, f)
    proc = subprocess.run([sys.executable, "run.py", "--config", cfg], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    one_line_naming(proc.stderr, bad, f"{section}.{key}")
    assert not (tmp_path / "out").exists()  # no config.yaml, no lock: nothing of the refused run


@pytest.mark.parametrize("case", ["no VAE", "no Inception weights", "source_root without the domains"])
def test_a_run_whose_evaluation_cannot_start_leaves_no_folder(tmp_path, tiny_vae_dir, case):
    """evaluation.every_epochs set, and its evaluator cannot open (no VAE to decode with, weight files
    that do not exist, held-out latents without the domain folders): one line, and the checkpoint
    folder this run created is gone again, its lock and config.yaml with it."""
    cfg = write_run_config(tmp_path, epochs=1)
    with open(cfg) as f:
        data = yaml.safe_load(f)
    evaluation = {"every_epochs": 1, "vae_path": "no-such-vae-folder/", "metrics": ["FID"]}
    if case == "no VAE":
        evaluation["vae_path"] = None
        expected = "VAE"
    elif case == "no Inception weights":
        evaluation.update(vae_path=str(tiny_vae_dir), inception_weights=str(tmp_path / "missing.pth"))
        expected = str(tmp_path / "missing.pth")
    else:
        (tmp_path / "held").mkdir()
        evaluation["source_root"] = str(tmp_path / "held")
        expected = "evaluation.source_root"
    data["evaluation"] = evaluation
    with open(cfg, "w") as f:
        yaml.safe_dump(data, f)
    proc = subprocess.run([sys.executable, "run.py", "--config", cfg], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    one_line_naming(proc.stderr, expected, "")
    assert not (tmp_path / "out").exists(), os.listdir(tmp_path / "out")


# ---------------------------------------------------------------------- 11. the app's odd values

@pytest.mark.parametrize("label", [{"path": "/etc/passwd"}, ["a", "b"], 3])
def test_the_app_refuses_a_latent_name_of_another_kind_in_one_line(trained, label):
    import app
    from runtime import InputError

    translator = app.Translator(trained[0], vae=None, device="cpu", log=lambda line: None)
    with pytest.raises(InputError, match="no source latent .* in the data; offered: ") as err:
        translator.read_input(app.DATA, None, label, "source")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("frames, fps", [(float("inf"), 10), (10, float("inf")), (float("nan"), 10), ([3], 10)])
def test_the_app_refuses_infinite_or_odd_video_settings_in_one_line(frames, fps):
    import app
    from runtime import InputError

    with pytest.raises(InputError):
        app.check_video_args(frames, fps, app.VIDEO_FORMATS[0])


# ---------------------------------------------------------------------- 12. values whose repr never ends

@pytest.mark.parametrize("key", ["seed", "data.domains", "evaluation.metrics", "training.lr"])
def test_a_config_value_aliased_inside_itself_is_one_line(tmp_path, key):
    """A YAML anchor used twice inside the next one, 30 levels ("billion laughs"): a few hundred bytes
    whose value has 2**30 leaves. The refusal names the key in one line, at once."""
    body = "&a0 [x, x]"
    for level in range(1, 30):
        body = f"&a{level} [{body}, *a{level - 1}]"
    section, _, name = key.rpartition(".")
    path = tmp_path / "laughs.yaml"
    path.write_text(f"{section}:\n  {name}: {body}\n" if section else f"{key}: {body}\n")
    proc = subprocess.run([sys.executable, "run.py", "--config", str(path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    one_line_naming(proc.stderr, f"config key {key!r}", "[[[")
    assert os.listdir(tmp_path) == ["laughs.yaml"]


# ---------------------------------------------------------------------- 8. errors of the system

def test_a_deeply_nested_index_is_one_line(tmp_path):
    from packing import pack_folders

    write_latent_folders(tmp_path / "files", files=2)
    pack_folders(str(tmp_path / "files"), str(tmp_path / "data"), None, "float16", log=lambda *a: None)
    index = tmp_path / "data" / "a" / "index.json"
    index.write_text("[" * 1500 + "]" * 1500)  # within the size bound, deeper than the stack
    cfg = write_run_config(tmp_path, epochs=1)
    proc = subprocess.run([sys.executable, "run.py", "--config", cfg], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    one_line_naming(proc.stderr, str(index), "RecursionError")


DEEP_TEXT = {"yaml": "seed: " + "[" * 2000 + "]" * 2000 + "\n", "json": '{"seed": ' + "[" * 2000 + "]" * 2000 + "}"}


@pytest.mark.parametrize("suffix, content, reason", [
    ("yaml", DEEP_TEXT["yaml"], "RecursionError"), ("json", DEEP_TEXT["json"], "RecursionError"),
    ("yaml", b"seed: 1\n# caf\xe9\n", "UnicodeDecodeError"), ("yaml", "seed: " + "9" * 5000 + "\n", "ValueError")],
    ids=["deep-yaml", "deep-json", "latin1-yaml", "huge-int-yaml"])
def test_a_config_file_nested_too_deep_or_not_utf8_is_one_line(tmp_path, suffix, content, reason):
    path = tmp_path / f"cfg.{suffix}"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    proc = subprocess.run([sys.executable, "run.py", "--config", str(path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc.stderr
    one_line_naming(proc.stderr, f"config file {str(path)!r} is not valid {suffix.upper()}", reason)
    assert os.listdir(tmp_path) == [path.name]


@pytest.mark.parametrize("content, reason", [(b"[" * 5000 + b"]" * 5000, "RecursionError"),
                                             (b'{"version": 1, "vae_source": "\xff"}', "UnicodeDecodeError")],
                         ids=["deep", "not-utf8"])
def test_a_latent_space_manifest_nested_too_deep_or_not_utf8_is_one_line(tmp_path, content, reason):
    cfg = write_run_config(tmp_path, epochs=1)
    manifest = tmp_path / "data" / "latent_space.json"
    manifest.write_bytes(content)
    proc = subprocess.run([sys.executable, "run.py", "--config", cfg], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    one_line_naming(proc.stderr, f"{manifest} is not valid JSON", reason)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"[" * 5000 + b"]" * 5000, b'{"version": "\xff"}'], ids=["deep", "not-utf8"])
def test_a_demo_manifest_nested_too_deep_or_not_utf8_is_made_again(tmp_path, content):
    """demo_manifest.json is the demo data's own record: one that is not as written means the data is
    made again, as for a torn one."""
    from demo_data import MANIFEST_NAME, generate_demo_data

    generate_demo_data(tmp_path, ["a", "b"], files_per_domain=2, size=8, log=lambda line: None)
    (tmp_path / MANIFEST_NAME).write_bytes(content)
    lines = []
    generate_demo_data(tmp_path, ["a", "b"], files_per_domain=2, size=8, log=lines.append)
    assert lines[0].startswith("demo data: wrote 2 domains"), lines
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["domains"] == ["a", "b"]


def test_the_log_of_an_interrupted_pack_nested_too_deep_means_starting_over(tmp_path):
    from packing import PARTIAL_LOG

    write_latent_folders(tmp_path / "files", files=2)
    (tmp_path / "packed" / "a").mkdir(parents=True)
    (tmp_path / "packed" / "a" / PARTIAL_LOG).write_bytes(b"[" * 5000 + b"]" * 5000 + b"\n")
    proc = subprocess.run([sys.executable, "pack.py", str(tmp_path / "files"), str(tmp_path / "packed")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "the log of an interrupted pack is unreadable" in proc.stdout, proc.stdout
    assert not (tmp_path / "packed" / "a" / PARTIAL_LOG).exists()


def test_an_unreadable_domain_folder_is_one_line(tmp_path, monkeypatch):
    """Permissions cannot hide a folder from root, so the failing listing is simulated: the
    error names the folder instead of a PermissionError traceback."""
    import latents

    folder = tmp_path / "a"
    folder.mkdir()
    real = os.listdir
    monkeypatch.setattr(latents.os, "listdir",
                        lambda p: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                        if str(p) == str(folder) else real(p))
    with pytest.raises(latents.InputError, match=r"cannot read the domain folder .*/a \(Permission denied\)"):
        latents.list_latent_files(str(folder))


def test_file_names_with_control_characters_are_escaped_in_the_outlier_report():
    import latents

    lines = latents.outlier_lines([("bad\nname\x1b[31m.pt", 5e3), ("plain.pt", 2e3)])
    assert "\n" not in lines[0] and "\x1b" not in lines[0] and "\\n" in lines[0]
    assert lines[1] == "plain.pt: max |value| 2e+03"
