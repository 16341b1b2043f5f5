"""Checkpoints that carry a pickle payload (an object whose unpickling runs code; here it creates a
marker file), as a torch.save archive and as a plain pickle, at the top level and as one weight of an
otherwise real checkpoint: every tool that loads a checkpoint (run.py --resume, translate.py,
evaluate.py, export.py, app.py) refuses it with exit code 2 and one line naming the file, and the
payload never runs. weights_only=True is what stops it: a full unpickle runs it, as the control shows,
and a refusal for bad values after such a load would come too late."""

import os
import pickle
import socket
import subprocess
import sys

import pytest
import torch
import yaml

import app
import evaluate
import export
import run
import translate
from conftest import ROOT, one_line_naming, tiny_run_config, write_latent_folders

GOOD = os.path.join(ROOT, "tests", "data", "tiny_checkpoint.pt")  # a real checkpoint of a tiny run
REFUSED = "not a Latent StarGAN v2 checkpoint"  # the load itself refused, before any value was checked
MAINS = {"run.py": run.main, "translate.py": translate.main, "evaluate.py": evaluate.main, "export.py": export.main,
         "app.py": app.main}

# (container, where the payload sits): torch.save's zip archive or a plain pickle.dump file; the whole
# checkpoint, or models.generator.conv_in.weight of the real one
FORMS = [("torch.save", "top level"), ("torch.save", "in models.generator"),
         ("pickle", "top level"), ("pickle", "in models.generator")]
IDS = [f"{container}, {where}" for container, where in FORMS]


class _Payload:
    """Unpickling this calls open(marker, "w"): it creates `marker` if the pickle ever runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def payloads(tmp_path_factory):
    """Every FORM written once: {form: (checkpoint path, the marker its payload creates)}."""
    folder = tmp_path_factory.mktemp("payloads")
    good = torch.load(GOOD, weights_only=True)
    files = {}
    for k, (container, where) in enumerate(FORMS):
        marker = str(folder / f"ran_{k}")
        ckpt = _Payload(marker)
        if where != "top level":
            generator = {**good["models"]["generator"], "conv_in.weight": ckpt}
            ckpt = {**good, "models": {**good["models"], "generator": generator}}
        path = str(folder / f"payload_{k}.pt")
        if container == "torch.save":
            torch.save(ckpt, path)
        else:
            with open(path, "wb") as f:
                pickle.dump(ckpt, f)
        files[(container, where)] = path, marker
    return files


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(data root, a valid tiny config to resume with, the checkpoint folder that config names)."""
    folder = tmp_path_factory.mktemp("setup")
    data = write_latent_folders(folder / "data")
    cfg = tiny_run_config(folder, data={"root": data})
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return data, str(path), cfg["training"]["checkpoint_dir"]


def tool_args(path, setup, out):
    """{script: the arguments that make it load checkpoint `path`}: the fewest, all valid but the
    checkpoint; outputs under `out`."""
    data, resume_config, _ = setup
    return {
        "run.py": ["--config", resume_config, "--resume", path],
        "translate.py": ["--checkpoint", path, "--source", os.path.join(data, "a"), "--target-domain", "b",
                         "--num-styles", "1", "--output", str(out / "translated")],
        "evaluate.py": ["--checkpoint", path, "--device", "cpu", "--out", str(out / "evaluated")],
        "export.py": ["--checkpoint", path, "--output", str(out / "exported")],
        "app.py": ["--checkpoint", path, "--device", "cpu", "--port", str(free_port())],
    }


def free_port():
    """A port nothing listens on now: the app checks its port before it loads the checkpoint, and a
    server already on the default one is no part of this."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(autouse=True)
def no_marker_left(payloads):
    """Markers are removed after each test: a payload run in one test is not blamed on the next."""
    yield
    for _, marker in payloads.values():
        if os.path.exists(marker):
            os.remove(marker)


@pytest.mark.parametrize("form", FORMS, ids=IDS)
def test_the_payload_runs_when_fully_unpickled(form, payloads):
    """The control: each file's payload really does run when unpickled fully
    (torch.load(weights_only=False) for the archives, pickle.load for the plain pickles), so its
    marker staying absent below means that no tool ever ran it."""
    path, marker = payloads[form]
    container, where = form
    with open(path, "rb") as f:
        loaded = torch.load(f, weights_only=False) if container == "torch.save" else pickle.load(f)
    opened = loaded if where == "top level" else loaded["models"]["generator"]["conv_in.weight"]
    opened.close()  # what the payload returned: the marker, opened for writing
    assert os.path.exists(marker)


@pytest.mark.parametrize("form", FORMS, ids=IDS)
def test_every_tool_refuses_a_payload_without_running_it(form, payloads, setup, tmp_path, capsys, monkeypatch):
    """Each tool's main(): exit 2, one line naming the file, the payload not run, nothing made (the
    app serves nothing)."""
    path, marker = payloads[form]
    monkeypatch.setattr(app, "launch", lambda *a, **k: pytest.fail("app.py served a checkpoint with a payload"))
    for prog, argv in tool_args(path, setup, tmp_path).items():
        code = MAINS[prog](argv)
        err = capsys.readouterr().err
        assert not os.path.exists(marker), f"{prog} ran the payload of {path}"
        assert code == 2, (prog, err)
        assert one_line_naming(err, path, REFUSED).startswith(f"{prog}: error: ")
    assert os.listdir(tmp_path) == [] and not os.path.exists(setup[2])  # no output, no run folder


# one real process per script, the forms spread over them so that each container and each place of
# the payload goes through at least one
IN_A_PROCESS = [("run.py", FORMS[3]), ("translate.py", FORMS[0]), ("evaluate.py", FORMS[2]),
                ("export.py", FORMS[1]), ("app.py", FORMS[3])]


@pytest.mark.parametrize("prog, form", IN_A_PROCESS, ids=[f"{p}: {c}, {w}" for p, (c, w) in IN_A_PROCESS])
def test_every_script_refuses_a_payload_in_a_process_of_its_own(prog, form, payloads, setup, tmp_path):
    """The script as users run it: exit 2 and the process's whole stderr one line naming the file (a
    warning that torch prints about a plain pickle would be a second line), the payload not run."""
    path, marker = payloads[form]
    proc = subprocess.run([sys.executable, prog, *tool_args(path, setup, tmp_path)[prog]], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert not os.path.exists(marker), f"{prog} ran the payload of {path}"
    assert proc.returncode == 2, proc.stderr
    assert one_line_naming(proc.stderr, path, REFUSED).startswith(f"{prog}: error: ")
    assert os.listdir(tmp_path) == [] and not os.path.exists(setup[2])
