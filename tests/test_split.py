"""split.py: a reproducible held-out split of per-domain latent folders, as hard links."""

import os

import pytest
import torch

import split
from conftest import write_latent_folders
from dataset import MultiDomainLatentDataset
from latents import split_names


def test_split_is_disjoint_complete_linked_and_reproducible(tmp_path, capsys):
    root = write_latent_folders(tmp_path / "data", files=10)
    assert split.main(["--input", root, "--output", str(tmp_path / "s"), "--val-fraction", "0.2"]) == 0
    assert "24 training and 6 held-out latents" in capsys.readouterr().out
    for domain in ("a", "b", "c"):
        train, val = (sorted(os.listdir(tmp_path / "s" / part / domain)) for part in ("train", "val"))
        assert len(val) == 2 and not set(train) & set(val) and sorted(train + val) == sorted(os.listdir(
            os.path.join(root, domain)))
        for name in val:  # a hard link: no copy on disk
            assert os.path.samefile(tmp_path / "s" / "val" / domain / name, os.path.join(root, domain, name))
    again = tmp_path / "again"
    assert split.main(["--input", root, "--output", str(again), "--val-fraction", "0.2", "--copy"]) == 0
    assert os.listdir(again / "val" / "b") and sorted(os.listdir(again / "val" / "b")) == sorted(
        os.listdir(tmp_path / "s" / "val" / "b"))  # the same files on a second run (copies this time)
    assert not os.path.samefile(again / "val" / "b" / os.listdir(again / "val" / "b")[0],
                                os.path.join(root, "b", os.listdir(again / "val" / "b")[0]))
    # a rerun finds its work done; the parts load as data sets of the same domains
    assert split.main(["--input", root, "--output", str(tmp_path / "s"), "--val-fraction", "0.2"]) == 0
    assert "0 linked, 0 copied, 30 already there" in capsys.readouterr().out
    val = MultiDomainLatentDataset(str(tmp_path / "s" / "val"), ["a", "b", "c"], preload_to_gpu=False, device="cpu",
                                   log=lambda *a: None)
    assert val.counts == [2, 2, 2] and torch.isfinite(val.data).all()


def test_a_files_side_depends_on_the_seed_and_its_name_alone():
    names = [f"{i:04d}.pt" for i in range(200)]
    train, val = split_names(names, 0.1, seed=0, key="monet")
    assert len(val) == 20 and split_names(list(reversed(names)), 0.1, seed=0, key="monet") == (train, val)
    assert split_names(names, 0.1, seed=1, key="monet")[1] != val  # another seed, another split
    grown = split_names(names + [f"new_{i}.pt" for i in range(10)], 0.1, seed=0, key="monet")[1]
    assert len(set(val) & set(grown)) >= 17  # old files keep their side, but for the boundary
    with pytest.raises(ValueError, match="needs at least 2"):
        split_names(["only.pt"], 0.5)


def test_an_output_holding_another_split_is_refused(tmp_path, capsys):
    root = write_latent_folders(tmp_path / "data", files=4)
    os.makedirs(tmp_path / "s" / "train" / "a")
    torch.save(torch.zeros(4, 16, 16), tmp_path / "s" / "train" / "a" / "000.pt")
    torch.save(torch.zeros(4, 16, 16), tmp_path / "s" / "train" / "a" / "001.pt")
    assert split.main(["--input", root, "--output", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "exists and is not" in err and "holds another split" in err
    assert not (tmp_path / "s" / "val").exists()  # nothing written
    assert split.main(["--input", root, "--output", str(tmp_path / "t"), "--val-fraction", "1.5"]) == 2
    assert split.main(["--input", root, "--output", str(tmp_path / "t"), "--domains", "a,../b"]) == 2
    assert "not a folder name" in capsys.readouterr().err


def test_a_grown_folder_rerun_into_the_old_split_is_refused(tmp_path, capsys):
    """After the folder grows, an old file may change sides: rerunning into the same --output would
    leave it on both (held-out data in training). Refused, naming the file; nothing written."""
    root = write_latent_folders(tmp_path / "data", files=10)
    assert split.main(["--input", root, "--output", str(tmp_path / "s"), "--val-fraction", "0.2", "--seed", "197"]) == 0
    more = write_latent_folders(tmp_path / "more", files=10, seed=5)
    for domain in ("a", "b", "c"):
        for name in os.listdir(os.path.join(more, domain)):
            os.replace(os.path.join(more, domain, name), os.path.join(root, domain, "new_" + name))
    before = {p: sorted(os.listdir(tmp_path / "s" / p / "a")) for p in ("train", "val")}
    train_now, val_now = split_names(os.listdir(os.path.join(root, "a")), 0.2, 197, "a")
    assert set(before["train"]) & set(val_now) or set(before["val"]) & set(train_now)  # this seed moves an old file
    capsys.readouterr()
    assert split.main(["--input", root, "--output", str(tmp_path / "s"), "--val-fraction", "0.2", "--seed", "197"]) == 2
    assert "is not in this split's" in capsys.readouterr().err
    assert {p: sorted(os.listdir(tmp_path / "s" / p / "a")) for p in ("train", "val")} == before  # nothing written
