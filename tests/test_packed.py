"""Packed latents (latents.npy + index.json per domain): the same batches as the per-file folder,
hostile shards named, the integer scan against numpy, and the writer's resume and atomicity."""

import json
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

import dataset
import latents
import pack
import packing
from dataset import MultiDomainLatentDataset, build_loader
from latents import write_latent_folders
from packing import PackedShard

H = W = 8
DOMAINS = ["a", "b", "c"]


def half_exact_latents(counts, seed=0, shape=(4, H, W)):
    """{domain: [N, 4, H, W] float32} of SD-like spread whose values float16 holds exactly."""
    g = torch.Generator().manual_seed(seed)
    return {d: (torch.randn(n, *shape, generator=g) * 5).half().float() for d, n in zip(DOMAINS, counts)}


def write_shard(folder, array, names=None):
    """An independent writer: np.save + json, as a user (or an attacker) would."""
    os.makedirs(folder, exist_ok=True)
    np.save(os.path.join(folder, "latents.npy"), array)
    names = [f"{i:05d}.pt" for i in range(len(array))] if names is None else names
    with open(os.path.join(folder, "index.json"), "w") as f:
        json.dump({"version": 1, "names": names}, f)
    return os.path.join(folder, "latents.npy")


def make_dataset(root, domains=DOMAINS, **kwargs):
    kwargs = {"preload_to_gpu": False, "device": "cpu", "log": lambda msg: None, **kwargs}
    return MultiDomainLatentDataset(str(root), domains, **kwargs)


def quiet(*args):
    pass


@pytest.fixture
def roots(tmp_path):
    """(per-file root, float16-packed root, float32-packed root, float16 and float32 domains) of one
    imbalanced data set."""
    files = tmp_path / "files"
    write_latent_folders(files, half_exact_latents([5, 17, 2]))
    packing.pack_folders(files, tmp_path / "f16", log=quiet)
    packing.pack_folders(files, tmp_path / "f32", dtype="float32", log=quiet)
    packing.pack_folders(files, tmp_path / "mixed", domains=["a", "c"], log=quiet)
    packing.pack_folders(files, tmp_path / "mixed", domains=["b"], dtype="float32", log=quiet)
    return files, tmp_path / "f16", tmp_path / "f32", tmp_path / "mixed"


# ---------------------------------------------------------------------- same batches

def test_packed_copy_gives_the_same_batches_for_two_epochs(roots):
    sets = [make_dataset(root, samples_per_epoch=96, hflip=True, seed=3) for root in roots]
    assert sets[0].shards is None and all(ds.shards and ds.data is None for ds in sets[1:])
    assert [ds.counts for ds in sets] == [[5, 17, 2]] * 4
    for epoch in (0, 1):
        batches = []
        for ds in sets:
            ds.set_epoch(epoch)
            batches.append(list(build_loader(ds, batch_size=8)))
        for packed in batches[1:]:
            assert len(packed) == len(batches[0]) == 12
            for got, want in zip(packed, batches[0]):
                for key in want:
                    assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), (epoch, key)
    for ds in sets[1:]:
        for key, value in ds.grid_samples().items():
            assert value.dtype == torch.float32 and torch.equal(value, sets[0].grid_samples()[key]), key
        for d in DOMAINS:
            assert torch.equal(ds.by_domain()[d].float(), sets[0].by_domain()[d])
    assert sets[1].by_domain()["a"].dtype == torch.float16  # stays as stored: no float32 copy


def test_rows_keep_the_file_order_and_names(roots):
    files, f16 = roots[:2]
    for d in DOMAINS:
        shard = PackedShard(str(f16 / d))
        names = sorted(os.listdir(files / d))
        assert shard.names == names and shard.array.dtype == np.float16
        for row, name in enumerate(names):
            assert torch.equal(torch.from_numpy(np.array(shard.array[row])).float(),
                               torch.load(files / d / name, weights_only=True))


def test_float16_packing_rounds_and_float32_packing_keeps(tmp_path):
    g = torch.Generator().manual_seed(0)
    latents = {d: torch.randn(3, 4, H, W, generator=g) * 5 for d in DOMAINS}
    write_latent_folders(tmp_path / "files", latents)
    packing.pack_folders(tmp_path / "files", tmp_path / "f16", log=quiet)
    packing.pack_folders(tmp_path / "files", tmp_path / "f32", dtype="float32", log=quiet)
    exact, f16, f32 = (make_dataset(tmp_path / r).by_domain() for r in ("files", "f16", "f32"))
    for d in DOMAINS:
        assert torch.equal(f32[d], exact[d])
        assert not torch.equal(f16[d].float(), exact[d])
        assert torch.equal(f16[d], exact[d].half())  # round to nearest, as a float16 cast
        assert (f16[d].float() - exact[d]).abs().max() <= exact[d].abs().max() * 2 ** -11


def test_per_file_listing_refuses_a_packed_folder(roots):
    """The app's examples and a checkpoint's latent-size probe list per-file folders: a packed one
    says what it is (they skip it) instead of offering latents.npy as one latent."""
    with pytest.raises(ValueError, match="packed latents"):
        latents.list_latent_files(str(roots[1] / "a"))


def test_workers_and_pickling_map_the_file_again(roots):
    f16 = roots[1]
    ds = make_dataset(f16, samples_per_epoch=32)
    shard = ds.shards[1]
    blob = pickle.dumps(shard)
    assert len(blob) < 1000  # the folder, not the rows
    again = pickle.loads(blob)
    assert torch.equal(again.tensor(), shard.tensor()) and again.names == shard.names
    plain = list(build_loader(ds, batch_size=8))
    workers = list(build_loader(ds, batch_size=8, num_workers=1))
    for got, want in zip(workers, plain):
        assert torch.equal(got["content"], want["content"])


def test_preload_pass_fills_one_tensor(roots):
    """The GPU preload's pass (checks and copies in one read), run into a CPU tensor here; small
    chunks so rows cross chunk boundaries."""
    files, f16 = roots[:2]
    shards = [PackedShard(str(f16 / d)) for d in DOMAINS]
    out = torch.full((24, 4, H, W), float("nan"), dtype=torch.float16)
    assert packing.scan_packed(shards, out, chunk_bytes=3 * 4 * H * W * 2) == ([], [])
    assert torch.equal(out.float(), make_dataset(files).data)


def test_the_start_up_pass_holds_one_chunk_not_the_file(tmp_path):
    """The check pass reads through a map but drops each chunk's pages: the process's peak memory
    grows by about a chunk (1 MB here), not by the file (64 MB), which stays in the page cache."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc")
    big = np.random.default_rng(0).standard_normal((8192, 4, 32, 32)).astype(np.float16)  # 64 MB
    for d in DOMAINS:
        write_shard(str(tmp_path / d), big if d == "b" else big[:2])
    script = f"""
import sys
sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
import dataset
import packing

def kb(key):
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1])

packing.SCAN_CHUNK_BYTES = 2**20
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from now
before = kb("VmRSS")
ds = dataset.MultiDomainLatentDataset({str(tmp_path)!r}, {DOMAINS!r}, preload_to_gpu=False, device="cpu",
                                      log=lambda message: None)
print((kb("VmHWM") - before) / 1024)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) < 16, proc.stdout  # MB; without dropping the pages: about 64


@pytest.mark.cuda
def test_packed_preload_to_gpu(roots):
    files, f16 = roots[:2]
    ds = make_dataset(f16, preload_to_gpu=True, device="cuda", samples_per_epoch=16)
    assert ds.on_gpu and ds.data.dtype == torch.float16 and ds.data.is_cuda
    plain = make_dataset(files, samples_per_epoch=16)
    for key, value in ds.__getitems__(list(range(16))).items():
        assert value.is_cuda and torch.equal(value.cpu(), plain.__getitems__(list(range(16)))[key]), key


# ---------------------------------------------------------------------- the integer scan

def test_magnitude_bits_match_numpy():
    """Per-row finiteness and max |value| > 1e3 from bit patterns == numpy's float answers, with
    signed zeros, subnormals, the limit itself, its neighbours, inf and NaN, and rows of one sign."""
    for np_dtype in (np.float16, np.float32):
        limit = np_dtype(latents.OUTLIER_LIMIT)
        specials = [0.0, -0.0, np.finfo(np_dtype).smallest_subnormal, -np.finfo(np_dtype).smallest_subnormal,
                    limit, -limit, np.nextafter(limit, np_dtype(np.inf)), -np.nextafter(limit, np_dtype(np.inf)),
                    np.nextafter(limit, np_dtype(0)), np.finfo(np_dtype).max, -np.finfo(np_dtype).max,
                    np.inf, -np.inf, np.nan, -np.nan]
        rng = np.random.default_rng(0)
        rows = (rng.standard_normal((400, 4, 2, 2)) * 5).astype(np_dtype)
        for i, value in enumerate(specials):
            rows[10 * i + 1, i % 4, 1, 0] = value  # one special per row, elsewhere in each
        rows[300] = -2e3
        rows[301:350] = np.abs(rows[301:350])  # all non-negative
        rows[350:399] = -np.abs(rows[350:399])  # all negative (the unsigned reading alone sees them)
        rows[351, 2, 0, 1] = -1500
        peak = packing.magnitude_bits(rows)
        finite_max = packing.magnitude_threshold(np.finfo(np_dtype).max, rows.dtype)
        beyond = packing.magnitude_threshold(latents.OUTLIER_LIMIT, rows.dtype)
        with np.errstate(invalid="ignore"):
            want_nonfinite = ~np.isfinite(rows).reshape(400, -1).all(axis=1)
            magnitude = np.nan_to_num(np.abs(rows.astype(np.float64)), nan=np.inf).reshape(400, -1).max(axis=1)
        assert np.array_equal(peak > finite_max, want_nonfinite), np_dtype
        assert np.array_equal(peak > beyond, magnitude > 1e3), np_dtype
        # non-finite: inf, -inf, nan, -nan; beyond 1e3: those, 2 x the number above 1e3, +-max, rows 300, 351
        assert want_nonfinite.sum() == 4 and (magnitude > 1e3).sum() == 4 + 6
        # the patterns order like the magnitudes among finite rows
        finite = ~want_nonfinite
        assert np.array_equal(np.argsort(peak[finite], kind="stable"), np.argsort(magnitude[finite], kind="stable"))
    # limits between two float16 numbers (1000 and 1000.5): the threshold is the one below, even where
    # the cast rounds up (1000.4 -> 1000.5, which would let 1000.5 > 1000.4 pass)
    bits = {v: int(np.array(v, np.float16).view(np.int16)) for v in (1000.0, 1000.5)}
    assert packing.magnitude_threshold(1000.4, np.dtype(np.float16)) == bits[1000.0]
    assert packing.magnitude_threshold(1000.6, np.dtype(np.float16)) == bits[1000.5]


# ---------------------------------------------------------------------- hostile shards

def _bad_shard_cases():
    """name -> writer(root) returning (the path the error must name, a phrase it must hold); the
    domains are a, b, c, shards of 4 rows."""
    good = (np.random.default_rng(0).standard_normal((4, 4, H, W)) * 5).astype(np.float16)

    def base(root, skip="b"):
        for d in DOMAINS:
            if d != skip:
                write_shard(str(root / d), good)
        return str(root / skip)

    def truncated(root):
        path = write_shard(base(root), good)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 100)
        return path, "truncated"

    def bytes_after_the_array(root):
        path = write_shard(base(root), good)
        with open(path, "ab") as f:
            f.write(b"\0" * 64)
        return path, "bytes after the array"

    def garbage_header(root):
        path = write_shard(base(root), good)
        with open(path, "r+b") as f:
            f.write(b"\x93NUMPY\x01\x00\x20\x00{'descr': garbage")
        return path, "header"

    def not_npy(root):
        folder = base(root)
        path = write_shard(folder, good)
        np.savez(os.path.join(folder, "x.npz"), good)
        os.replace(os.path.join(folder, "x.npz"), path)
        return path, "header"

    def float64(root):
        return write_shard(base(root), good.astype(np.float64)), "<f8"

    def big_endian(root):
        return write_shard(base(root), good.astype(">f2")), ">f2"

    def integers(root):
        return write_shard(base(root), good.astype(np.int16)), "<i2"

    def fortran_order(root):
        return write_shard(base(root), np.asfortranarray(good)), "Fortran"

    def three_channels(root):
        return write_shard(base(root), good[:, :3]), "[4, 3, 8, 8]"

    def too_small(root):
        return write_shard(base(root), good[:, :, :4, :4]), "[4, 4, 4, 4]"

    def three_dims(root):
        return write_shard(base(root), good[0]), "[4, 8, 8]"

    def other_shape_than_the_first(root):
        return write_shard(base(root), np.zeros((4, 4, 2 * H, W), np.float16)), "every domain must share"

    def index_missing(root):
        path = write_shard(base(root), good)
        os.remove(os.path.join(os.path.dirname(path), "index.json"))
        return os.path.join(os.path.dirname(path), "index.json"), "not found"

    def array_missing(root):
        folder = base(root)
        os.remove(write_shard(folder, good))
        return folder, "interrupted pack"

    def index_not_json(root):
        folder = base(root)
        write_shard(folder, good)
        with open(os.path.join(folder, "index.json"), "w") as f:
            f.write('{"version": 1, "names": ["a.pt",')
        return os.path.join(folder, "index.json"), "JSON"

    def index_of_another_version(root):
        folder = base(root)
        write_shard(folder, good)
        with open(os.path.join(folder, "index.json"), "w") as f:
            json.dump({"version": 2, "names": ["0", "1", "2", "3"]}, f)
        return os.path.join(folder, "index.json"), "version-1"

    def index_shorter_than_the_array(root):
        folder = base(root)
        write_shard(folder, good, names=["0.pt", "1.pt", "2.pt"])
        return os.path.join(folder, "index.json"), "names 3 rows but"

    def index_longer_than_the_array(root):
        folder = base(root)
        write_shard(folder, good, names=[f"{i}.pt" for i in range(5)])
        return os.path.join(folder, "index.json"), "names 5 rows but"

    def duplicate_name(root):
        folder = base(root)
        write_shard(folder, good, names=["0.pt", "1.pt", "2.pt", "1.pt"])
        return os.path.join(folder, "index.json"), "rows [1, 3]: '1.pt' names more than one row"

    def per_file_latents_beside_the_shard(root):
        folder = base(root)
        write_shard(folder, good)
        torch.save(torch.zeros(4, H, W), os.path.join(folder, "extra.pt"))
        return folder, "extra.pt"

    def mixed_layouts(root):
        folder = base(root)
        write_latent_folders(root, {"b": torch.zeros(2, 4, H, W)})
        return folder, "mixed"

    def object_array(root):
        folder = base(root)
        write_shard(folder, good)  # the index
        np.save(os.path.join(folder, "latents.npy"), np.array([None] * 4, dtype=object), allow_pickle=True)
        return os.path.join(folder, "latents.npy"), "|O"

    return {f.__name__: f for f in (truncated, bytes_after_the_array, garbage_header, not_npy, float64, big_endian,
                                    integers, fortran_order, three_channels, too_small, three_dims,
                                    other_shape_than_the_first, index_missing, array_missing, index_not_json,
                                    index_of_another_version, index_shorter_than_the_array,
                                    index_longer_than_the_array, duplicate_name, per_file_latents_beside_the_shard,
                                    mixed_layouts, object_array)}


@pytest.mark.parametrize("case", list(_bad_shard_cases()))
def test_bad_shard_is_named(tmp_path, case):
    path, phrase = _bad_shard_cases()[case](tmp_path)
    with pytest.raises(ValueError) as info:
        make_dataset(tmp_path)
    assert str(path) in str(info.value) and phrase in str(info.value), str(info.value)
    assert isinstance(info.value, dataset.InputError)


def test_every_bad_name_is_listed(tmp_path):
    good = np.zeros((8, 4, H, W), np.float16)
    for d in ("a", "c"):
        write_shard(str(tmp_path / d), good)
    names = ["ok.pt", "../up.pt", "sub/dir.pt", "", ".", "tab\there.pt", "ok.pt", 7]
    write_shard(str(tmp_path / "b"), good, names=names)
    with pytest.raises(ValueError) as info:
        make_dataset(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "b" / "index.json") in message and "7 bad name(s)" in message
    for row in (1, 2, 3, 4, 5, 7):
        assert f"row {row}: " in message, row
    assert "rows [0, 6]: 'ok.pt' names more than one row" in message


def test_hostile_pickle_in_a_shard_is_never_run(tmp_path):
    from test_dataset import _Payload

    marker = tmp_path / "pwned"
    good = np.zeros((2, 4, H, W), np.float16)
    for d in ("a", "c"):
        write_shard(str(tmp_path / d), good)
    write_shard(str(tmp_path / "b"), good)
    np.save(tmp_path / "b" / "latents.npy", np.array([_Payload(marker), None], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="dtype"):
        make_dataset(tmp_path)
    assert not marker.exists()


def test_non_finite_rows_are_all_named(tmp_path, monkeypatch):
    monkeypatch.setattr(packing, "SCAN_CHUNK_BYTES", 3 * 4 * H * W * 2)  # 3 float16 rows a read
    latents = half_exact_latents([6, 9, 3])
    latents["b"][2, 1, 3, 3] = float("nan")
    latents["b"][7, 0, 0, 0] = float("-inf")
    latents["c"][0, 3, 7, 7] = float("inf")
    write_latent_folders(tmp_path / "files", {d: torch.zeros(1, 4, H, W) for d in DOMAINS})  # layout only
    for d, x in latents.items():
        write_shard(str(tmp_path / "packed" / d), x.numpy().astype(np.float32 if d == "c" else np.float16))
    with pytest.raises(ValueError) as info:
        make_dataset(tmp_path / "packed")
    message = str(info.value)
    assert message.startswith("3 packed latent(s) hold non-finite values")
    for d, row in (("b", 2), ("b", 7), ("c", 0)):
        assert f"{tmp_path / 'packed' / d / 'latents.npy'} row {row} ({row:05d}.pt)" in message
    assert "row 1 (" not in message and "row 3 (" not in message


def test_outlier_rows_are_refused_or_warned_by_name(tmp_path):
    latents = half_exact_latents([4, 4, 4])
    latents["a"][3, 0, 0, 0] = -2048.0
    latents["c"][1] *= 300  # about 1500 at its peak
    for d, x in latents.items():
        write_shard(str(tmp_path / d), x.numpy().astype(np.float16))
    with pytest.raises(ValueError, match="data.reject_outliers") as info:
        make_dataset(tmp_path)
    message = str(info.value)
    assert message.startswith("2 packed latent(s) hold values far outside")
    assert f"{tmp_path / 'a' / 'latents.npy'} row 3 (00003.pt): max |value| 2.05e+03" in message
    peak = float(np.abs(latents["c"][1].numpy().astype(np.float16)).max())
    assert f"{tmp_path / 'c' / 'latents.npy'} row 1 (00001.pt): max |value| {peak:.3g}" in message
    logged = []
    ds = make_dataset(tmp_path, reject_outliers=False, log=logged.append)
    assert any("warning" in line and "row 3 (00003.pt)" in line for line in logged)
    assert ds.by_domain()["a"][3].abs().max() == 2048


def test_a_long_list_is_cut_with_a_count(tmp_path):
    bad = np.full((150, 4, H, W), np.nan, np.float16)
    for d in DOMAINS:
        write_shard(str(tmp_path / d), bad if d == "b" else np.zeros((2, 4, H, W), np.float16))
    with pytest.raises(ValueError) as info:
        make_dataset(tmp_path)
    message = str(info.value)
    assert message.startswith("150 packed latent(s)") and "row 99 (00099.pt)" in message
    assert "row 100 (" not in message and "... and 50 more" in message


# ---------------------------------------------------------------------- the converter

@pytest.fixture
def source(tmp_path):
    write_latent_folders(tmp_path / "src", half_exact_latents([7, 11, 5]))
    return tmp_path / "src"


def read_bytes(root):
    return {d: ((root / d / "latents.npy").read_bytes(), (root / d / "index.json").read_bytes()) for d in DOMAINS}


def counting_loads(monkeypatch, fail_after=None):
    """Counts packing's latent-file reads; raises KeyboardInterrupt (an interruption) at read
    `fail_after`."""
    calls = []
    real = packing.load_latent_file

    def load(path, *args):
        calls.append(path)
        if fail_after is not None and len(calls) == fail_after:
            raise KeyboardInterrupt
        return real(path, *args)

    monkeypatch.setattr(packing, "load_latent_file", load)
    return calls


def test_interrupted_conversion_resumes_and_matches_one_run(tmp_path, source, monkeypatch):
    packing.pack_folders(source, tmp_path / "once", log=quiet)
    monkeypatch.setattr(packing, "CONVERT_ROWS", 3)
    counting_loads(monkeypatch, fail_after=1 + 1 + 7 + 1 + 5)  # in domain b: probe, 7 rows, then 5 of 11
    with pytest.raises(KeyboardInterrupt):
        packing.pack_folders(source, tmp_path / "out", log=quiet)
    b = tmp_path / "out" / "b"
    # no domain is committed before every domain is checked: a's rows wait in its partial file
    assert not (tmp_path / "out" / "a" / "latents.npy").exists() and not (tmp_path / "out" / "c").exists()
    assert all(n.startswith(".") for n in os.listdir(tmp_path / "out" / "a"))
    hidden = sorted(os.listdir(b))
    assert "latents.npy" not in hidden and "index.json" not in hidden and all(n.startswith(".") for n in hidden)
    with pytest.raises(ValueError):  # never a half-written shard under the final name
        PackedShard(str(b))
    # a torn log line and rows written after the last logged name: both dropped on resume
    log = b / packing.PARTIAL_LOG
    data = b / json.loads(log.read_text().splitlines()[0])["data"]
    assert os.path.getsize(data) == packing.HEADER_BYTES + 3 * 4 * H * W * 2  # one commit of 3 rows
    with open(log, "a") as f:
        f.write('"00003.p')
    with open(data, "ab") as f:
        f.write(b"\x7f" * 50_000)  # more than the rows still to come

    lines = []
    calls = counting_loads(monkeypatch)
    packing.pack_folders(source, tmp_path / "out", log=lines.append)
    assert any("resuming an interrupted pack: 3 row(s)" in line for line in lines)
    assert len(calls) == 1 + 1 + (11 - 3) + 1 + 5  # a: probe only; b: probe + the 8 rows not written; c: all
    assert read_bytes(tmp_path / "out") == read_bytes(tmp_path / "once")
    assert sorted(os.listdir(b)) == ["index.json", "latents.npy"]


@pytest.mark.parametrize("stop_at", ["remove", "index", "rename"])
def test_a_commit_stopped_at_any_step_is_finished_by_a_rerun(tmp_path, source, monkeypatch, stop_at):
    """A stale shard is being replaced (the source gained a file): stopping between the commit's
    steps leaves the old shard or an error that says "interrupted pack", never a mismatched pair."""
    packing.pack_folders(source, tmp_path / "out", domains=["a"], log=quiet)
    torch.save(torch.ones(4, H, W), source / "a" / "00003b.pt")  # sorts between 00003 and 00004
    packing.pack_folders(source, tmp_path / "once", log=quiet)
    steps = {"remove": (os, "remove"), "index": (packing, "atomic_write"), "rename": (os, "replace")}
    module, name = steps[stop_at]
    real = getattr(module, name)

    def stop(path, *args, **kwargs):
        if os.path.basename(str(path)) in ("latents.npy", "index.json") or (
                name == "replace" and os.path.basename(str(args[0])) == "latents.npy"):
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(module, name, stop)
    with pytest.raises(KeyboardInterrupt):
        packing.pack_folders(source, tmp_path / "out", domains=["a"], log=quiet)
    monkeypatch.setattr(module, name, real)
    if stop_at == "remove":
        assert len(PackedShard(str(tmp_path / "out" / "a"))) == 7  # still the old, complete shard
    else:
        with pytest.raises(ValueError, match="interrupted pack"):
            PackedShard(str(tmp_path / "out" / "a"))
    calls = counting_loads(monkeypatch)
    packing.pack_folders(source, tmp_path / "out", log=quiet)
    assert calls.count(str(source / "a" / "00000.pt")) == 1  # the probe: a's rows were all written
    assert read_bytes(tmp_path / "out") == read_bytes(tmp_path / "once")
    assert sorted(os.listdir(tmp_path / "out" / "a")) == ["index.json", "latents.npy"]


def test_bad_files_are_all_named_and_the_good_prefix_is_kept(tmp_path, source, monkeypatch):
    (source / "b" / "00004.pt").write_bytes(b"not a tensor")
    nan = torch.zeros(4, H, W)
    nan[0, 0, 0] = float("nan")
    torch.save(nan, source / "b" / "00008.pt")
    torch.save(torch.full((4, H, W), 1e5), source / "c" / "00001.pt")
    monkeypatch.setattr(packing, "CONVERT_ROWS", 2)
    with pytest.raises(ValueError) as info:
        packing.pack_folders(source, tmp_path / "out", log=quiet)
    message = str(info.value)
    assert "3 bad latent file(s)" in message and str(source / "b" / "00004.pt") in message  # every domain's
    assert f"{source / 'b' / '00008.pt'} holds a non-finite value" in message
    assert f"{source / 'c' / '00001.pt'} holds values beyond float16's range" in message
    assert "kept" in message and not any((tmp_path / "out" / d / "latents.npy").exists() for d in "abc")
    torch.save(half_exact_latents([1])["a"][0], source / "b" / "00004.pt")
    torch.save(half_exact_latents([1])["a"][0], source / "b" / "00008.pt")
    calls = counting_loads(monkeypatch)
    with pytest.raises(ValueError) as info:  # float16 cannot hold 1e5
        packing.pack_folders(source, tmp_path / "out", log=quiet)
    assert len([c for c in calls if "/b/" in c]) == 1 + (11 - 4)  # probe + from the first bad file on
    assert f"{source / 'c' / '00001.pt'} holds values beyond float16's range" in str(info.value)
    assert "--dtype float32" in str(info.value)
    packing.pack_folders(source, tmp_path / "f32", domains=["c"], dtype="float32", log=quiet)
    assert PackedShard(str(tmp_path / "f32" / "c")).array[1].max() == 1e5


def test_converter_skips_what_is_packed_and_refuses_what_it_cannot_pack(tmp_path, source, monkeypatch):
    assert packing.pack_folders(source, tmp_path / "out", log=quiet) == {"a": 7, "b": 11, "c": 5}
    calls = counting_loads(monkeypatch)
    assert packing.pack_folders(source, tmp_path / "out", log=quiet) == {"a": 0, "b": 0, "c": 0}
    assert len(calls) == 3  # one probe per domain
    assert packing.pack_folders(source, tmp_path / "out", dtype="float32", log=quiet)["a"] == 7  # another dtype
    with pytest.raises(ValueError, match="another folder"):
        packing.pack_folders(source, source, log=quiet)
    with pytest.raises(ValueError, match="packed already"):
        packing.pack_folders(tmp_path / "out", tmp_path / "again", log=quiet)
    write_latent_folders(tmp_path / "per_file", {"a": torch.zeros(1, 4, H, W)})
    with pytest.raises(ValueError, match="latent file"):
        packing.pack_folders(source, tmp_path / "per_file", domains=["a"], log=quiet)


def test_pack_script(tmp_path, source, capsys):
    assert pack.main([str(source), str(tmp_path / "out"), "--domains", "a", "b"]) == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["a", "b"]
    assert "11 latents [4, 8, 8] float16" in capsys.readouterr().out
    assert pack.main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "pack.py: error:" in capsys.readouterr().err


def test_npy_header_is_what_numpy_reads(tmp_path):
    for shape, dtype in (((3, 4, 8, 8), np.float16), ((10 ** 12, 4, 128, 96), np.float32)):
        header = packing.npy_header(shape, dtype)
        assert len(header) == packing.HEADER_BYTES and header.endswith(b"\n")
        assert struct.unpack("<H", header[8:10])[0] == packing.HEADER_BYTES - 10
    array = np.arange(3 * 4 * 8 * 8, dtype=np.float16).reshape(3, 4, 8, 8)
    path = tmp_path / "x.npy"
    path.write_bytes(packing.npy_header(array.shape, array.dtype) + array.tobytes())
    assert np.array_equal(np.load(path), array)


# ---------------------------------------------------------------------- evaluation

def test_evaluate_reads_a_packed_data_root(trained, tiny_vae_dir, tmp_path, monkeypatch):
    """evaluate.py takes reals and sources from by_domain: from a packed root those are the maps,
    float16 as stored. A float32 copy gives the per-file metrics exactly; float16 ones close by."""
    import evaluate
    import metrics
    from conftest import write_random_alexnet
    from test_evaluate import DIM, evaluate_args
    from test_metrics import StyleGANFormStandIn, script_to

    monkeypatch.setattr(metrics, "INCEPTION_DIM", DIM)
    torch.manual_seed(0)
    weights = {metrics.FORM_STYLEGAN: script_to(tmp_path / "inception.pt", StyleGANFormStandIn(dim=DIM)),
               "alexnet": str(tmp_path / metrics.ALEXNET_FILE)}
    write_random_alexnet(tmp_path / metrics.ALEXNET_FILE)
    ckpt, data = trained
    packing.pack_folders(data, tmp_path / "f32", dtype="float32", log=quiet)
    packing.pack_folders(data, tmp_path / "f16", log=quiet)
    results = {}
    for name, root in (("files", data), ("f32", tmp_path / "f32"), ("f16", tmp_path / "f16")):
        args = evaluate_args(ckpt, weights, tiny_vae_dir, tmp_path / f"eval_{name}", metrics.FORM_STYLEGAN,
                             "--data-root", str(root))
        assert evaluate.main(args) == 0
        record = json.loads((tmp_path / f"eval_{name}" / "metrics.json").read_text())
        results[name] = {k: v for k, v in record.items() if "/" in k}
    assert results["f32"] == results["files"]
    assert results["f16"].keys() == results["files"].keys() and results["f16"] != results["files"]
    for key, value in results["files"].items():
        assert results["f16"][key] == pytest.approx(value, rel=0.05, abs=1e-3), key


# ---------------------------------------------------------------------- torchrun

@pytest.mark.slow
def test_two_process_torchrun_trains_the_same_on_a_packed_set(tmp_path):
    """Two ranks map one packed set: training ends bitwise where it ends on the per-file folder."""
    import yaml

    from conftest import tiny_run_config
    from test_distributed import torchrun

    write_latent_folders(tmp_path / "files", half_exact_latents([6, 9, 4], shape=(4, 16, 16)))
    packing.pack_folders(tmp_path / "files", tmp_path / "packed", log=quiet)
    states = {}
    for layout in ("files", "packed"):
        cfg = tiny_run_config(tmp_path, training={"epochs": 1, "checkpoint_dir": str(tmp_path / f"out_{layout}")},
                              visualization={"every_epochs": 10, "vae_path": None})
        cfg["data"].update(root=str(tmp_path / layout), samples_per_epoch=16)  # 8 per rank: 2 steps of 4
        path = tmp_path / f"{layout}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        proc = torchrun(str(path))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        ckpt = torch.load(tmp_path / f"out_{layout}" / "latest.pt", weights_only=True)
        assert ckpt["step"] == 2 and len(ckpt["rng_per_rank"]) == 2
        states[layout] = ckpt
    assert "memory-mapped" in proc.stdout + proc.stderr
    for group in ("models", "ema"):
        for net, state in states["files"][group].items():
            for key, value in state.items():
                assert torch.equal(states["packed"][group][net][key], value), (group, net, key)
