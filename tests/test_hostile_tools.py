"""Hostile input for the data tools and the checkpoint tools, with the real scripts: outputs that
name an input (encode, pack, split, export, evaluate), files and folders that cannot be read or
written, file names that are not UTF-8 or hold control characters, a bad file in one domain of
many. Each exits 1 or 2 with one line naming the file or flag (a list after it where many files
are bad), overwrites no input and leaves nothing half-written."""

import builtins
import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

import evaluate
import export
import split
from conftest import ROOT, one_line_naming, tiny_run_config, write_latent_folders, write_random_alexnet

ODD_NAMES = [b"\xff.pt", b"new\nline.pt", b"red\x1b[31m.pt"]  # not UTF-8; a newline; a terminal escape


def script(*args, env=None):
    """A script in its own process; stdout and stderr as bytes: raw bytes a terminal would get."""
    return subprocess.run([sys.executable, *map(os.fsdecode, args)], cwd=ROOT, capture_output=True, timeout=300,
                          env={**os.environ, **(env or {})})


def snapshot(root):
    """{path: sha256 of its bytes} of every file under `root`, and its folders: what must not change."""
    found = {}
    for folder, folders, files in os.walk(os.fsencode(root)):
        found[folder] = "folder"
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                found[os.path.join(folder, name)] = hashlib.sha256(f.read()).hexdigest()
    return found


def write_images(folder, count=3):
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i}.png"))
    return str(folder)


def unreadable(path, monkeypatch):
    """Make `path` unreadable: chmod 000, or, as root (whom permissions do not stop), an `open` of it
    that fails as the operating system would."""
    if os.geteuid() != 0:
        os.chmod(path, 0)
        return
    real = builtins.open

    def refusing(file, *args, **kwargs):
        if os.fspath(file) == os.fspath(path):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(file, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", refusing)


# ---------------------------------------------------------------------- 7. outputs that name an input

def test_pack_refuses_an_output_that_is_one_of_its_inputs(tmp_path):
    src = write_latent_folders(tmp_path / "src", files=2, size=8)
    before, target = snapshot(src), os.path.join(src, "a", "000.pt")
    proc = script("pack.py", src, target)
    assert proc.returncode == 2, proc.stderr
    line = one_line_naming(proc.stderr.decode(), f"dst {target!r}", f"is the input {target!r}")
    assert "never overwrites or deletes its input" in line
    assert snapshot(src) == before


@pytest.mark.parametrize("case", ["an input image", "a link to an input image"])
def test_encode_refuses_an_output_that_is_one_of_its_images(tmp_path, tiny_vae_dir, case):
    images = write_images(tmp_path / "images")
    image = os.path.join(images, "1.png")
    if case == "an input image":
        output, named = image, f"--output {image!r}"
    else:  # out/1.pt would be written through the link, over the image
        output = str(tmp_path / "out")
        os.makedirs(output)
        os.symlink(image, os.path.join(output, "1.pt"))
        named = f"--output {os.path.join(output, '1.pt')!r}"
    before = snapshot(images)
    proc = script("encode.py", "--input", images, "--output", output, "--vae", tiny_vae_dir, "--size", "16",
                  "--workers", "0")
    assert proc.returncode == 2, proc.stderr
    one_line_naming(proc.stderr.decode(), named, f"is the input {image!r}")
    assert snapshot(images) == before and not os.path.exists(os.path.join(images, "latent_space.json"))


@pytest.mark.parametrize("case", ["the input", "inside the input", "a part linked to the input"])
def test_split_never_writes_among_its_inputs(tmp_path, capsys, case):
    """Written into the data it splits, train/ and val/ would become domain folders of it (the old
    behaviour: a first run wrote them there, a rerun then failed on them)."""
    root = write_latent_folders(tmp_path / "data", files=3, size=8)
    output = {"the input": root, "inside the input": os.path.join(root, "split")}.get(case, str(tmp_path / "s"))
    if case == "a part linked to the input":
        os.makedirs(output)
        os.symlink(root, os.path.join(output, "train"))
    before = snapshot(root)
    assert split.main(["--input", root, "--output", output]) == 2
    err = capsys.readouterr().err
    one_line_naming(err, f"--input {root!r}", f"--output {output!r}")
    assert "split.py: error:" in err and snapshot(root) == before


def test_export_refuses_to_write_over_its_checkpoint(trained, tmp_path, capsys):
    out = tmp_path / "exported"
    out.mkdir()
    checkpoint = str(out / "latent_guided.pt2")  # a checkpoint named like the graph export.py writes
    shutil.copy(trained[0], checkpoint)
    before = snapshot(out)
    assert export.main(["--checkpoint", checkpoint, "--output", str(out), "--format", "pt2"]) == 2
    one_line_naming(capsys.readouterr().err, f"--output {checkpoint!r}", f"is the input {checkpoint!r}")
    assert snapshot(out) == before


def test_evaluate_refuses_to_write_its_metrics_over_an_input(trained, tmp_path, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    weights = str(out / "metrics.json")  # LPIPS weights where the metrics would go
    write_random_alexnet(weights)
    before = snapshot(out)
    code = evaluate.main(["--checkpoint", trained[0], "--out", str(out), "--lpips-weights", weights, "--metrics",
                          "lpips", "--preview-decode", "--num-outs", "2", "--max-sources", "1", "--device", "cpu"])
    assert code == 2
    one_line_naming(capsys.readouterr().err, f"--out {weights!r}", f"is the input {weights!r}")
    assert snapshot(out) == before


# ---------------------------------------------------------------------- 8. files the system refuses

def test_split_copy_of_an_unreadable_file_is_one_line_and_leaves_no_split(tmp_path, capsys, monkeypatch):
    root = write_latent_folders(tmp_path / "data", files=4, size=8)
    bad = os.path.join(root, "c", "002.pt")  # the last domain: files of a and b are copied before it
    unreadable(bad, monkeypatch)
    assert split.main(["--input", root, "--output", str(tmp_path / "s"), "--copy"]) == 2
    line = one_line_naming(capsys.readouterr().err, f"cannot read {bad}", "Permission denied")
    assert "nothing was written" in line
    assert not (tmp_path / "s").exists()  # the files copied before it removed again, and their folders


def test_a_split_rerun_that_fails_keeps_the_split_it_found(tmp_path, capsys, monkeypatch):
    root = write_latent_folders(tmp_path / "data", files=4, size=8)
    assert split.main(["--input", root, "--output", str(tmp_path / "s"), "--copy"]) == 0
    before = snapshot(tmp_path / "s")
    write_latent_folders(root, domains=("d", "e"), files=2, size=8, seed=3)  # two new domains; e cannot be read
    for name in ("000.pt", "001.pt"):
        unreadable(os.path.join(root, "e", name), monkeypatch)
    capsys.readouterr()
    assert split.main(["--input", root, "--output", str(tmp_path / "s"), "--copy"]) == 2
    one_line_naming(capsys.readouterr().err, os.path.join(root, "e"), "nothing was written")
    assert snapshot(tmp_path / "s") == before  # d's copies made by the rerun removed again, and their folders


def test_split_with_an_input_folder_that_cannot_be_listed_is_one_line(tmp_path, capsys, monkeypatch):
    """Permissions cannot hide a folder from root, so the failing listing is simulated."""
    root = write_latent_folders(tmp_path / "data", files=3, size=8)
    real = os.listdir
    monkeypatch.setattr(split.os, "listdir", lambda p=".": (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                        if os.fspath(p) == root else real(p))
    assert split.main(["--input", root, "--output", str(tmp_path / "s")]) == 2
    one_line_naming(capsys.readouterr().err, f"--input {root!r}", "Permission denied")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("tool", ["pack", "encode"])
@pytest.mark.parametrize("case", ["a file", "under a file"])
def test_an_output_that_is_a_file_or_cannot_be_written_is_one_line(tmp_path, tiny_vae_dir, tool, case):
    """A folder under a file cannot be made by anyone, root included: the unwritable folder here."""
    (tmp_path / "file").write_bytes(b"mine")
    output = str(tmp_path / "file") if case == "a file" else str(tmp_path / "file" / "out")
    if tool == "pack":
        proc = script("pack.py", write_latent_folders(tmp_path / "src", files=2, size=8), output)
        flag = "dst"
    else:
        proc = script("encode.py", "--input", write_images(tmp_path / "images"), "--output", output, "--vae",
                      tiny_vae_dir, "--size", "16", "--workers", "0")
        flag = "--output"
    assert proc.returncode == 2, proc.stderr
    one_line_naming(proc.stderr.decode(), f"{flag} {output!r}",
                    "exists and is not a folder" if case == "a file" else "is not writable")
    assert (tmp_path / "file").read_bytes() == b"mine" and not (tmp_path / "latent_space.json").exists()


# ---------------------------------------------------------------------- 10. odd file names

def test_pack_shows_a_domain_and_file_named_in_no_encoding_escaped(tmp_path):
    """A strict UTF-8 stdout (PYTHONIOENCODING) cannot print a name that is not UTF-8: the summary
    shows it escaped; no raw byte reaches the terminal either way."""
    src = write_latent_folders(tmp_path / "src", domains=("a", "b"), files=2, size=8)
    os.rename(os.path.join(src, "b"), os.path.join(os.fsencode(src), b"\xff"))
    os.rename(os.path.join(src, "a", "001.pt"), os.path.join(os.fsencode(src), b"a", b"\xff.pt"))
    proc = script("pack.py", src, tmp_path / "out", env={"PYTHONIOENCODING": "utf-8"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.decode("ascii").splitlines()  # nothing raw: every byte is ASCII
    assert len(lines) == 2 and "\\xff" in lines[1] and "2 latents" in lines[1], lines
    assert os.path.exists(os.path.join(os.fsencode(tmp_path), b"out", b"\xff", b"latents.npy"))


def test_pack_names_odd_file_names_escaped_and_every_bad_file_of_every_domain(tmp_path):
    """Bad files in two domains, one of them named in no encoding, and names with a newline and a
    terminal escape in a third: every one named (escaped), no domain packed, not even the good one."""
    src = write_latent_folders(tmp_path / "src", domains=("a", "b", "c", "d"), files=2, size=8)
    with open(os.path.join(os.fsencode(src), b"b", b"\xff.pt"), "wb") as f:
        f.write(b"not a tensor")
    torch.save(torch.full((4, 8, 8), float("nan")), os.path.join(src, "c", "nan.pt"))
    for name in ODD_NAMES[1:]:
        shutil.copy(os.path.join(src, "d", "000.pt"), os.path.join(os.fsencode(src), b"d", name))
    proc = script("pack.py", src, tmp_path / "out", env={"PYTHONIOENCODING": "utf-8"})
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.decode("ascii")  # nothing raw: no escape byte, no byte of the odd name
    lines = err.strip().splitlines()
    assert lines[0].startswith("pack.py: error:") and "2 bad latent file(s) and 1 domain folder(s)" in lines[0]
    assert any(os.path.join(src, "b", "\\xff.pt") in line for line in lines[1:]), err
    assert any(f"{os.path.join(src, 'c', 'nan.pt')} holds a non-finite value" in line for line in lines[1:])
    assert "'new\\nline.pt'" in err and "'red\\x1b[31m.pt'" in err and "\x1b" not in err
    packed = [p for p in snapshot(tmp_path / "out") if p.endswith((b"latents.npy", b"index.json"))] \
        if (tmp_path / "out").exists() else []
    assert packed == []  # domain a is good, yet not committed: nothing half-made


def test_split_takes_a_file_named_in_no_encoding_and_escapes_odd_names(tmp_path, capsys):
    root = write_latent_folders(tmp_path / "data", files=3, size=8)
    os.rename(os.path.join(root, "a", "001.pt"), os.path.join(os.fsencode(root), b"a", b"\xff.pt"))
    assert split.main(["--input", root, "--output", str(tmp_path / "s")]) == 0  # was: UnicodeEncodeError
    assert "6 training and 3 held-out latents" in capsys.readouterr().out
    stray = os.path.join(tmp_path, "s", "train", "a", "new\nline\x1b[31m.pt")  # a file of no split
    torch.save(torch.zeros(4, 8, 8), stray)
    assert split.main(["--input", root, "--output", str(tmp_path / "s")]) == 2
    line = one_line_naming(capsys.readouterr().err, "new\\nline\\x1b[31m.pt", "is not in this split's train part")
    assert "\x1b" not in line


def test_encode_shows_broken_images_with_odd_names_escaped(tmp_path, tiny_vae_dir):
    images = write_images(tmp_path / "images", count=2)
    for name in (b"\xff.png", b"new\nline\x1b[31m.png"):
        with open(os.path.join(os.fsencode(images), name), "wb") as f:
            f.write(b"not an image")
    proc = script("encode.py", "--input", images, "--output", tmp_path / "out", "--vae", tiny_vae_dir, "--size", "16",
                  "--workers", "0", env={"PYTHONIOENCODING": "utf-8"})
    assert proc.returncode == 1, proc.stderr
    assert b"\xff" not in proc.stderr and b"\x1b" not in proc.stderr  # nothing raw (the progress bar is UTF-8)
    err = proc.stderr.decode()
    skipped = [line for line in err.splitlines() if line.startswith("encode.py: skipping")]
    assert len(skipped) == 2 and "\x1b" not in err, err
    assert any("new\\nline\\x1b[31m.png" in line for line in skipped)
    assert sorted(os.listdir(tmp_path / "out")) == ["0.pt", "1.pt"]


# ---------------------------------------------------------------------- names printed on a strict UTF-8 stdout

@pytest.mark.parametrize("tool", ["translate", "export", "run"])
def test_a_name_in_no_encoding_prints_escaped_on_a_strict_utf8_stdout(trained, tmp_path, tool):
    """An output or checkpoint folder whose name is not UTF-8, on the stdout an en_US.UTF-8 locale
    gives (strict errors): the tool does its work and prints the name escaped, never a traceback."""
    odd = os.path.join(os.fsencode(tmp_path), b"odd\xff")
    checkpoint, data = trained
    if tool == "run":
        os.makedirs(odd)
        shutil.copyfile(checkpoint, os.path.join(odd, b"latest.pt"))
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text(yaml.safe_dump(tiny_run_config(tmp_path, data={"root": data, "domains": ["a", "b", "c"],
                                                                         "samples_per_epoch": 8},
                                                      training={"epochs": 2})))
        args = ["run.py", "--config", cfg, "--resume", os.path.join(odd, b"latest.pt")]
    elif tool == "translate":
        args = ["translate.py", "--checkpoint", checkpoint, "--source", os.path.join(data, "a"), "--target-domain", "b",
                "--num-styles", "1", "--output", odd]
    else:
        args = ["export.py", "--checkpoint", checkpoint, "--output", odd]
    proc = script(*args, env={"PYTHONIOENCODING": "utf-8"})
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr.decode(errors="replace")
    assert b"odd\\udcff" in proc.stdout, proc.stdout
