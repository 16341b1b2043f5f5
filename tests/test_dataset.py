"""dataset.py: two-stage uniform sampling, batched == per-item, loader, preload fallback, bad input.

Files encode where they came from: latent value = domain * 100 + file index (+ a small ramp along W
so a horizontal flip is visible), so `value.amin()` names the domain and the file of any sample.
"""

import os
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from dataset import MultiDomainLatentDataset, build_loader, collate_batch

H = W = 8  # the smallest latent the networks take
RAMP = torch.arange(W, dtype=torch.float32) * 0.01  # [W], max 0.03 < 1: never changes the code


def latent(domain, index, shape=(4, H, W)):
    return torch.full(shape, float(domain * 100 + index)) + RAMP[: shape[-1]]  # [4, H, W]


def make_root(tmp_path, counts, fmt="pt", names=None):
    """root/<domain>/<i>.pt|.npy for `counts` files per domain; returns (root, domain names)."""
    names = names or [f"d{k}" for k in range(len(counts))]
    for d, (name, count) in enumerate(zip(names, counts)):
        folder = tmp_path / name
        folder.mkdir(parents=True)
        for i in range(count):
            x = latent(d, i)
            if fmt == "npy":
                np.save(folder / f"{i:05d}.npy", x.numpy())
            else:
                torch.save(x, folder / f"{i:05d}.pt")
    return str(tmp_path), names


def make_dataset(root, domains, **kwargs):
    kwargs = {"preload_to_gpu": False, "device": "cpu", "log": lambda msg: None, **kwargs}
    return MultiDomainLatentDataset(root, domains, **kwargs)


def code(x):
    """[..., 4, H, W] -> (domain, file index) encoded in the values."""
    value = x.amin(dim=(-3, -2, -1)).round().long()
    return value // 100, value % 100


def whole_epoch(ds):
    return ds.__getitems__(list(range(len(ds))))


def test_shapes_dtypes_and_len(tmp_path):
    root, domains = make_root(tmp_path, [3, 5])
    ds = make_dataset(root, domains)
    assert len(ds) == 8 and ds.counts == [3, 5] and ds.num_domains == 2 and ds.shape == (4, H, W)
    assert ds.data.shape == (8, 4, H, W) and ds.data.dtype == torch.float32 and ds.data.is_contiguous()
    assert ds.files[1][0] == os.path.join(root, "d1", "00000.pt")
    item = ds[0]
    assert set(item) == {"content", "target_style", "target_style_2", "target_style_id", "source_style_id"}
    for key in ("content", "target_style", "target_style_2"):
        assert item[key].shape == (4, H, W) and item[key].dtype == torch.float32
    for key in ("target_style_id", "source_style_id"):
        assert item[key].shape == () and item[key].dtype == torch.long
    assert len(make_dataset(root, domains, samples_per_epoch=37)) == 37


def test_uniform_domain_frequencies_on_imbalanced_domains(tmp_path):
    """2 vs 50 vs 10 files: each domain is source (and target) 1/3 of the time, each ordered pair 1/6.

    n = 30000, so one frequency's standard deviation is sqrt(p(1-p)/n) <= 0.003; tolerance 0.015
    (5 sigma). Sampling files instead of domains would give the 50-file domain 50/62 = 0.81.
    """
    root, domains = make_root(tmp_path, [2, 50, 10])
    ds = make_dataset(root, domains, samples_per_epoch=30000, seed=0)
    batch = whole_epoch(ds)
    src, trg = batch["source_style_id"], batch["target_style_id"]
    for ids in (src, trg):
        freq = torch.bincount(ids, minlength=3).double() / len(ds)
        assert torch.allclose(freq, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.015), freq
    pairs = torch.bincount(src * 3 + trg, minlength=9).double() / len(ds)
    off_diagonal = pairs.view(3, 3)[~torch.eye(3, dtype=torch.bool)]
    assert torch.allclose(off_diagonal, torch.full((6,), 1 / 6, dtype=torch.float64), atol=0.015), pairs
    # files uniform within a domain: the 2-file domain's files each take half its content picks
    domain, index = code(batch["content"])
    small = index[domain == 0]
    assert abs((small == 0).double().mean().item() - 0.5) < 0.03
    assert set(index[domain == 1].tolist()) == set(range(50))


def test_content_from_source_styles_from_target_and_target_differs(tmp_path):
    root, domains = make_root(tmp_path, [2, 7, 3, 1])
    ds = make_dataset(root, domains, samples_per_epoch=2000)
    batch = whole_epoch(ds)
    src, trg = batch["source_style_id"], batch["target_style_id"]
    assert (src != trg).all()
    content_domain, content_index = code(batch["content"])
    assert torch.equal(content_domain, src)
    for key in ("target_style", "target_style_2"):
        style_domain, style_index = code(batch[key])
        assert torch.equal(style_domain, trg)
        assert (style_index < torch.tensor(ds.counts)[trg]).all()
    assert (content_index < torch.tensor(ds.counts)[src]).all()
    # the two references are independent draws, not one file twice
    both = [code(batch[k])[1] for k in ("target_style", "target_style_2")]
    many = torch.tensor(ds.counts)[trg] > 1
    assert (both[0][many] != both[1][many]).any()


def test_two_domains_one_file_each(tmp_path):
    root, domains = make_root(tmp_path, [1, 1])
    ds = make_dataset(root, domains, samples_per_epoch=50)
    batch = whole_epoch(ds)
    assert torch.equal(batch["target_style_id"], 1 - batch["source_style_id"])
    assert torch.equal(code(batch["content"])[0], batch["source_style_id"])
    assert torch.equal(code(batch["target_style_2"])[0], batch["target_style_id"])


def test_deterministic_per_seed_and_epoch(tmp_path):
    root, domains = make_root(tmp_path, [4, 9, 2])
    a = whole_epoch(make_dataset(root, domains, samples_per_epoch=200, seed=3))
    ds = make_dataset(root, domains, samples_per_epoch=200, seed=3)
    b = whole_epoch(ds)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ds.set_epoch(1)
    assert ds.epoch == 1
    c = whole_epoch(ds)
    assert not torch.equal(a["content"], c["content"])
    assert not torch.equal(a["source_style_id"], c["source_style_id"])
    ds.set_epoch(0)
    assert torch.equal(whole_epoch(ds)["content"], a["content"])
    other_seed = whole_epoch(make_dataset(root, domains, samples_per_epoch=200, seed=4))
    assert not torch.equal(a["content"], other_seed["content"])


@pytest.mark.parametrize("hflip", [False, True])
def test_batched_equals_per_item(tmp_path, hflip):
    root, domains = make_root(tmp_path, [3, 6, 2])
    ds = make_dataset(root, domains, samples_per_epoch=64, hflip=hflip)
    indices = [5, 0, 63, 17, 17, 42]
    batch = ds.__getitems__(indices)
    per_item = default_collate([ds[i] for i in indices])
    assert set(batch) == set(per_item)
    for key in batch:
        assert batch[key].dtype == per_item[key].dtype
        assert torch.equal(batch[key], per_item[key]), key
    assert collate_batch(batch) is batch
    stacked = collate_batch([ds[i] for i in indices])
    for key in batch:
        assert torch.equal(stacked[key], batch[key]), key


def test_index_out_of_range(tmp_path):
    root, domains = make_root(tmp_path, [1, 2])
    ds = make_dataset(root, domains)
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(IndexError):
        ds.__getitems__([0, 3])
    assert torch.equal(ds[-1]["content"], ds[2]["content"])


def test_hflip(tmp_path):
    """Off: raw files. On: the same files (flags never change the picks), about half flipped per key."""
    root, domains = make_root(tmp_path, [3, 4])
    plain = whole_epoch(make_dataset(root, domains, samples_per_epoch=400))
    flipped = whole_epoch(make_dataset(root, domains, samples_per_epoch=400, hflip=True))
    again = whole_epoch(make_dataset(root, domains, samples_per_epoch=400, hflip=True))
    for key in ("content", "target_style", "target_style_2"):
        assert (plain[key][..., 1] > plain[key][..., 0]).all(), "hflip off must leave files as stored"
        is_flipped = (flipped[key] != plain[key]).flatten(1).any(dim=1)  # [n]
        assert 0.4 < is_flipped.double().mean().item() < 0.6, key
        assert torch.equal(flipped[key][is_flipped], plain[key][is_flipped].flip(-1))
        assert torch.equal(flipped[key], again[key])
    assert not torch.equal(flipped["content"], flipped["target_style"].flip(-1))


@pytest.mark.parametrize("fmt", ["pt", "npy"])
def test_loader_batches(tmp_path, fmt):
    root, domains = make_root(tmp_path, [5, 6], fmt=fmt)
    ds = make_dataset(root, domains, samples_per_epoch=22)
    loader = build_loader(ds, batch_size=4)
    batches = list(loader)
    assert len(batches) == 5  # drop_last: 22 // 4
    for batch in batches:
        for key in ("content", "target_style", "target_style_2"):
            assert batch[key].shape == (4, 4, H, W) and batch[key].dtype == torch.float32
        for key in ("target_style_id", "source_style_id"):
            assert batch[key].shape == (4,) and batch[key].dtype == torch.long
    assert torch.equal(batches[1]["content"], ds.__getitems__([4, 5, 6, 7])["content"])  # in order
    # a rank's share of the indices (multi-GPU) replaces the sequential order
    rank_share = list(range(1, 22, 2))  # 11 indices -> 2 full batches
    shared = list(build_loader(ds, batch_size=4, sampler=rank_share))
    assert len(shared) == 2
    assert torch.equal(shared[1]["target_style"], ds.__getitems__(rank_share[4:8])["target_style"])


def test_persistent_workers_follow_set_epoch(tmp_path):
    """A persistent worker holds its own copy of the dataset; it must still serve the new epoch."""
    root, domains = make_root(tmp_path, [3, 5])
    ds = make_dataset(root, domains, samples_per_epoch=16)
    loader = build_loader(ds, batch_size=8, num_workers=1)
    assert loader.persistent_workers
    for epoch in (0, 1, 2):
        ds.set_epoch(epoch)
        got = torch.cat([b["content"] for b in loader])
        assert torch.equal(got, whole_epoch(ds)["content"]), epoch


def test_mixed_formats_dtypes_and_squeeze(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    torch.save(latent(0, 0)[None], tmp_path / "a" / "0.pt")  # [1, 4, H, W]
    torch.save(latent(0, 1).to(torch.float16), tmp_path / "a" / "1.pt")
    np.save(tmp_path / "a" / "2.npy", latent(0, 2)[None].numpy())  # [1, 4, H, W]
    np.save(tmp_path / "b" / "0.npy", latent(1, 0).double().numpy())
    torch.save(latent(1, 1).to(torch.bfloat16), tmp_path / "b" / "1.pt")
    (tmp_path / "b" / "notes.txt").write_text("ignored: not a latent suffix")
    ds = make_dataset(str(tmp_path), ["a", "b"])
    assert ds.counts == [3, 2] and ds.shape == (4, H, W) and ds.data.dtype == torch.float32
    assert [os.path.basename(p) for p in ds.files[0]] == ["0.pt", "1.pt", "2.npy"]
    domain, index = code(ds.data)
    assert domain.tolist() == [0, 0, 0, 1, 1] and index.tolist() == [0, 1, 2, 0, 1]


def test_cpu_fallback_without_cuda(tmp_path, monkeypatch):
    root, domains = make_root(tmp_path, [2, 2])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    lines = []
    ds = MultiDomainLatentDataset(root, domains, preload_to_gpu=True, device="cuda", log=lines.append)
    assert not ds.on_gpu and ds.device == torch.device("cpu")
    assert any("CUDA is not available" in line and "MB" in line for line in lines), lines
    assert ds[0]["content"].device == torch.device("cpu")
    lines.clear()
    build_loader(ds, batch_size=2, pin_memory=True, log=lines.append)
    assert any("pin_memory -> False" in line for line in lines), lines


def test_cpu_fallback_when_too_big(tmp_path, monkeypatch):
    root, domains = make_root(tmp_path, [2, 2])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 2000))  # 1000 B free
    lines = []
    ds = MultiDomainLatentDataset(root, domains, device="cuda", preload_max_fraction=0.5, log=lines.append)
    assert not ds.on_gpu and ds.device == torch.device("cpu")
    assert any("too big" in line and "MB" in line for line in lines), lines


@pytest.mark.cuda
def test_preload_to_gpu(tmp_path):
    root, domains = make_root(tmp_path, [3, 4])
    lines = []
    ds = MultiDomainLatentDataset(root, domains, device="cuda", samples_per_epoch=8, log=lines.append)
    assert ds.on_gpu and ds.data.is_cuda, lines
    loader = build_loader(ds, batch_size=4, num_workers=2, pin_memory=True, log=lines.append)
    assert loader.num_workers == 0 and not loader.pin_memory
    assert any("num_workers 2 -> 0" in line for line in lines) and any("pin_memory -> False" in line for line in lines)
    batch = next(iter(loader))
    assert batch["content"].is_cuda and batch["target_style_id"].is_cuda
    assert torch.equal(code(batch["content"])[0], batch["source_style_id"])


def test_needs_two_distinct_domains(tmp_path):
    root, _ = make_root(tmp_path, [2, 2])
    with pytest.raises(ValueError, match="at least 2 distinct"):
        make_dataset(root, ["d0"])
    with pytest.raises(ValueError, match="at least 2 distinct"):
        make_dataset(root, ["d0", "d0"])


class _Payload:
    """Unpickling this calls open(marker, "w"): it creates `marker` if the pickle ever runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _bad_pt_file(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(content, path)


def _bad_input_cases():
    """name -> writer(root) returning the path the error must name; domains are always d0, d1."""
    def missing_folder(root):
        make_root(root, [2], names=["d0"])
        return root / "d1"

    def empty_folder(root):
        make_root(root, [2, 0])
        (root / "d1" / "readme.txt").write_text("no latents here")
        return root / "d1"

    def wrong_shape(root):
        make_root(root, [2, 2])
        torch.save(torch.zeros(4, H), root / "d1" / "00001.pt")
        return root / "d1" / "00001.pt"

    def three_channels(root):
        make_root(root, [2, 2])
        np.save(root / "d0" / "00001.npy", np.zeros((3, H, W), np.float32))
        return root / "d0" / "00001.npy"

    def domains_of_different_shapes(root):
        make_root(root, [2], names=["d0"])
        (root / "d1").mkdir()
        torch.save(torch.zeros(4, 2 * H, 2 * W), root / "d1" / "00000.pt")
        return root / "d1" / "00000.pt"

    def garbage_pt(root):
        make_root(root, [2, 2])
        (root / "d0" / "00001.pt").write_bytes(os.urandom(64) + b"not a tensor")
        return root / "d0" / "00001.pt"

    def garbage_npy(root):
        make_root(root, [2, 2])
        (root / "d1" / "00002.npy").write_bytes(b"\x93NUMPY garbage" + os.urandom(32))
        return root / "d1" / "00002.npy"

    def nan_value(root):
        make_root(root, [2, 2])
        x = latent(1, 1)
        x[2, 1, 1] = float("nan")
        torch.save(x, root / "d1" / "00001.pt")
        return root / "d1" / "00001.pt"

    def inf_after_cast(root):
        make_root(root, [2, 2])
        np.save(root / "d0" / "00000.npy", np.full((4, H, W), 1e300))  # finite float64, inf in float32
        return root / "d0" / "00000.npy"

    def npy_object_array(root):
        make_root(root, [2, 2])
        np.save(root / "d0" / "00001.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
        return root / "d0" / "00001.npy"

    def pt_not_a_tensor(root):
        make_root(root, [2, 2])
        torch.save({"latent": latent(0, 0)}, root / "d0" / "00001.pt")
        return root / "d0" / "00001.pt"

    def pt_integer_tensor(root):
        make_root(root, [2, 2])
        torch.save(torch.zeros(4, H, W, dtype=torch.int64), root / "d1" / "00000.pt")
        return root / "d1" / "00000.pt"

    return {f.__name__: f for f in (missing_folder, empty_folder, wrong_shape, three_channels,
                                    domains_of_different_shapes, garbage_pt, garbage_npy, nan_value,
                                    inf_after_cast, npy_object_array, pt_not_a_tensor, pt_integer_tensor)}


@pytest.mark.parametrize("case", list(_bad_input_cases()))
def test_bad_input_names_the_path(tmp_path, case):
    bad_path = _bad_input_cases()[case](tmp_path)
    error = FileNotFoundError if case == "missing_folder" else ValueError
    with pytest.raises(error) as info:
        make_dataset(str(tmp_path), ["d0", "d1"])
    assert str(bad_path) in str(info.value)
    assert "expected" in str(info.value)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("container", ["torch.save", "raw pickle"])
def test_hostile_pickle_is_never_executed(tmp_path, container):
    root, domains = make_root(tmp_path / "data", [2, 2])
    # control: the payload really does create its marker when fully unpickled
    control = tmp_path / "control_marker"
    pickle.loads(pickle.dumps(_Payload(control))).close()
    assert control.exists()

    marker = tmp_path / "pwned_marker"
    hostile = tmp_path / "data" / "d1" / "00001.pt"
    if container == "torch.save":
        torch.save(_Payload(marker), hostile)
    else:
        hostile.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError) as info:
        make_dataset(root, domains)
    assert str(hostile) in str(info.value) and "weights_only" in str(info.value)
    assert not marker.exists()


def test_outlier_files_are_refused_by_name(tmp_path):
    """A finite but absurd latent (1e30) is no VAE latent: the error names the file and its max |value|."""
    root, domains = make_root(tmp_path, [3, 3])
    bad = os.path.join(root, "d1", "00002.pt")
    torch.save(torch.full((4, H, W), 1e30), bad)
    with pytest.raises(ValueError, match="data.reject_outliers") as err:
        make_dataset(root, domains)
    assert f"{bad}: max |value| 1e+30" in str(err.value)
    assert "00001.pt" not in str(err.value)


def test_outliers_allowed_with_a_warning(tmp_path):
    root, domains = make_root(tmp_path, [3, 3])
    torch.save(torch.full((4, H, W), -2e3), os.path.join(root, "d0", "00000.pt"))
    logged = []
    ds = make_dataset(root, domains, reject_outliers=False, log=logged.append)
    assert ds.data.abs().max() == 2e3
    assert any("00000.pt: max |value| 2e+03" in line and "warning" in line for line in logged)
