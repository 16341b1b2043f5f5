"""Multi-domain SD1.5 latent dataset with GPU preload and two-stage uniform sampling.

Every file of every domain is read once at start-up into ONE contiguous float32 tensor
`data [N_total, 4, H, W]` (raw, unscaled latents; the trainer applies `latent_scale`), with per-domain
offsets, so that a whole batch is one gather. Packed domains (one `latents.npy` per domain, see the
end of this file) are memory-mapped instead: checked in one pass, then copied to the GPU or left in
their maps, which every process shares through the page cache. `set_epoch` draws the epoch's index table in
one vectorised pass: source domain uniform, target domain uniform among the *other* domains, then a
file uniform within each domain. Sampling domains first (StarGAN v2's per-domain reference
sampling) keeps domain frequencies equal however unbalanced the folders are.

Files are untrusted input: `.pt` goes through `torch.load(weights_only=True)` (never a full
unpickle, so a hostile pickle cannot run code) and `.npy` through `np.load(allow_pickle=False)`.
Anything unexpected stops construction with an error naming the file by its full path.
"""

import hashlib
import io
import json
import math
import mmap
import os
import re
import sys
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from model import MIN_LATENT_SIZE
from runtime import MAX_LATENT_SIZE, InputError, atomic_write, load_error_reason

LATENT_CHANNELS = 4  # SD1.5 VAE latent channels
LATENT_SUFFIXES = (".pt", ".npy")
# Raw SD1.5 latents have a standard deviation of about 5.5 (1 / 0.18215) and in practice stay within a
# few tens. A max |value| above 1e3 (about 180 standard deviations) is no VAE latent: a file scaled
# twice, saved as pixels, or corrupted. Such a value is finite, so the finiteness check misses it, yet
# it drives activations and gradients to inf and every step that draws it is skipped.
OUTLIER_LIMIT = 1e3
MAX_LISTED = 100  # files (or packed rows) named in one error; the count says how many in all
SHAPE_VOTE = 64  # the first files whose most common shape sizes the data tensor
PROGRESS_FILES = 2000  # loading more files than this shows a progress bar (a per-file folder loads ~3k/s)


def _mb(nbytes):
    return f"{nbytes / 2**20:.1f} MB"


def list_latent_files(folder):
    """Sorted full paths of the `*.pt` / `*.npy` files in `folder`; errors name the folder."""
    if not os.path.isdir(folder):
        root = os.path.dirname(folder)
        found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))) \
            if os.path.isdir(root) else None
        hint = f"; folders in {root}: {found}" if found is not None else f"; {root} does not exist either"
        raise FileNotFoundError(
            f"domain folder not found: {folder} (expected one folder per domain under data.root, "
            f"holding *.pt or *.npy latents{hint})")
    if is_packed(folder):  # its latents.npy is no single latent
        raise InputError(f"{folder} holds packed latents ({PACKED_ARRAY} + {PACKED_INDEX}), not one file per latent")
    files = sorted(name for name in os.listdir(folder)
                   if name.endswith(LATENT_SUFFIXES) and os.path.isfile(os.path.join(folder, name)))
    if not files:
        raise InputError(f"domain folder is empty: {folder} (expected *.pt or *.npy latent files "
                         f"of shape [4, H, W] or [1, 4, H, W])")
    return [os.path.join(folder, name) for name in files]


def split_names(names, fraction, seed=0, key=""):
    """(train, val): `names` split reproducibly, `fraction` of them (rounded, at least 1, at most all
    but 1) to val: the names whose sha256 of (seed, key, name) is smallest. A name's side depends on
    the seed and the name alone, not on the machine, the listing order or the other files, so a
    folder that grows keeps its old split for its old files (bar the boundary)."""
    names = sorted(names)
    if len(names) < 2:
        raise InputError(f"{key or 'a domain'} has {len(names)} file(s): a split needs at least 2")
    count = min(len(names) - 1, max(1, round(fraction * len(names))))
    rank = sorted(names, key=lambda name: hashlib.sha256(f"{seed}:{key}:{name}".encode()).hexdigest())
    val = set(rank[:count])
    return [n for n in names if n not in val], [n for n in names if n in val]


def save_latent(latent, path):
    """One raw latent [4, H, W] to `path` (.pt, or .npy by suffix), atomically. A .pt goes through a
    buffer so its bytes do not depend on the file's name (same tensor, same bytes in any folder), and
    is cloned so a row of a batch never saves the whole batch's storage."""
    latent = latent.detach().cpu()
    if path.endswith(".npy"):
        return atomic_write(path, lambda f: np.save(f, latent.numpy(), allow_pickle=False))
    buffer = io.BytesIO()
    torch.save(latent.clone(), buffer)
    return atomic_write(path, lambda f: f.write(buffer.getvalue()))


def write_latent_folders(root, latents, stem="{index:05d}", suffix=".pt"):
    """{domain: raw latents [N, 4, H, W]} -> root/<domain>/<stem><suffix>, one file per latent, the
    layout MultiDomainLatentDataset reads. `stem` is formatted with `domain` and `index`. Returns
    the paths written, in order."""
    paths = []
    for domain, batch in latents.items():
        folder = os.path.join(str(root), domain)
        os.makedirs(folder, exist_ok=True)
        for index, latent in enumerate(batch):
            paths.append(save_latent(latent, os.path.join(folder, stem.format(domain=domain, index=index) + suffix)))
    return paths


def check_latent_shape(path, shape):
    """[4, H, W] or [1, 4, H, W] with MIN_LATENT_SIZE <= H, W <= MAX_LATENT_SIZE, else InputError."""
    shape = list(shape)
    expected = "expected a float tensor of shape [4, H, W] or [1, 4, H, W] (an SD VAE latent)"
    if len(shape) == 4 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 3 or shape[0] != LATENT_CHANNELS:
        raise InputError(f"{path} has shape {shape}; {expected}")
    if not all(MIN_LATENT_SIZE <= side <= MAX_LATENT_SIZE for side in shape[1:]):
        raise InputError(f"{path} has shape {shape}: a latent's H and W must be from {MIN_LATENT_SIZE} (the "
                         f"networks halve them {MIN_LATENT_SIZE.bit_length() - 1} times) to {MAX_LATENT_SIZE}")


def load_latent_file(path):
    """One latent file -> CPU float tensor [4, H, W] (dtype as stored); InputError naming `path`.

    Shape, size and dtype are checked here, where files enter the program (a .npy's from its header,
    before its data is read); finiteness is checked once on the assembled float32 tensor (one
    vectorised pass, which also catches float64 values that overflow float32).
    """
    expected = "expected a float tensor of shape [4, H, W] or [1, 4, H, W] (an SD VAE latent)"
    if path.endswith(".npy"):
        try:  # memory-mapped: the header's shape is checked before a byte of data is read
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as e:  # object arrays, pickles, truncated or garbage bytes
            raise InputError(f"cannot read {path} as a .npy array ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else 'unreadable'}); {expected}") from None
        if not isinstance(array, np.ndarray):  # e.g. an .npz archive renamed to .npy
            raise InputError(f"{path} holds {type(array).__name__}, not a single array; {expected}")
        if not np.issubdtype(array.dtype, np.floating):
            raise InputError(f"{path} has dtype {array.dtype}; {expected}")
        check_latent_shape(path, array.shape)
        with np.errstate(over="ignore"):  # float64 beyond float32's range: caught as inf below
            latent = torch.from_numpy(np.array(array, dtype=np.float32))
    else:
        try:
            latent = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refuses any pickle that is not plain tensor data
            raise InputError(f"cannot load {path} with torch.load(weights_only=True): {load_error_reason(e)}; "
                             f"{expected}, saved with torch.save(tensor)") from None
        if not isinstance(latent, torch.Tensor):
            raise InputError(f"{path} holds a {type(latent).__name__}, not a tensor; {expected}")
        if latent.layout != torch.strided or not latent.is_floating_point() or latent.is_complex():
            raise InputError(f"{path} has dtype {latent.dtype} and layout {latent.layout}; {expected}")
        check_latent_shape(path, latent.shape)
        latent = latent.detach()
    return latent.reshape(latent.shape[-3:])  # [4, H, W]


def read_latent(path):
    """One latent file to translate: float32 [4, H, W], finite, no outlier; InputError naming the
    file otherwise. (Training checks all its data at once instead.)"""
    latent = load_latent_file(path).float()  # [4, H, W]
    if not torch.isfinite(latent).all():
        raise InputError(f"{path} holds non-finite values (NaN or inf)")
    found = outliers(latent[None], [path])
    if found:
        raise InputError(outlier_message(outlier_lines(found), len(found)) + "\nRe-encode it, or use another file")
    return latent


def outliers(latents, names):
    """[(name, max |value|)] of the latents [N, 4, H, W] beyond OUTLIER_LIMIT: vectorised reductions,
    no copy of the data (abs() would allocate one as large as all the latents)."""
    flat = latents.flatten(1)  # [N, 4*H*W], a view
    peak = torch.maximum(flat.amax(dim=1), flat.amin(dim=1).neg())  # [N] max |value|
    rows = (peak > OUTLIER_LIMIT).nonzero().flatten().tolist()
    return [(names[r], peak[r].item()) for r in rows]


def outlier_lines(found):
    """One line per (name, peak) of `found`, the first MAX_LISTED of them."""
    return [f"{name}: max |value| {peak:.3g}" for name, peak in found[:MAX_LISTED]]


def outlier_message(lines, count, what="latent file(s)"):
    """The message for `count` latents beyond OUTLIER_LIMIT, `lines` naming (the first of) them."""
    return (f"{count} {what} hold values far outside a VAE latent's range (max |value| > {OUTLIER_LIMIT:g}; raw "
            f"SD1.5 latents have a std of about 5.5):\n  " + "\n  ".join(first_lines(lines, count)))


def report_outliers(lines, count, what, reject, log):
    """Latents beyond OUTLIER_LIMIT, one line each in `lines`: an InputError when `reject`, else a
    warning (training then skips the steps that draw them as non-finite)."""
    message = outlier_message(lines, count, what)
    if reject:
        raise InputError(f"{message}\nRe-encode or remove them (training: data.reject_outliers: false trains anyway, "
                         "skipping the steps that draw them as non-finite)")
    log(f"warning: {message}\ndata.reject_outliers is false: training goes on; steps that draw them are skipped "
        "as non-finite")


def listed(lines):
    """Lines for an error message: the first MAX_LISTED, and a count of the rest."""
    lines = list(lines)
    return "\n  ".join(first_lines(lines[:MAX_LISTED], len(lines)))


def preload_device(nbytes, preload_to_gpu, device, max_fraction, log):
    """`device` when data of `nbytes` should be preloaded there (asked, CUDA, fits within
    `max_fraction` of its free memory), else None, saying why."""
    if not preload_to_gpu:
        return None
    if device.type != "cuda":
        log(f"dataset: preload_to_gpu ignored, device is {device}: {_mb(nbytes)} stay on the CPU")
        return None
    if not torch.cuda.is_available():
        log(f"dataset: preload_to_gpu requested but CUDA is not available: {_mb(nbytes)} stay on the CPU")
        return None
    free, _total = torch.cuda.mem_get_info(device)
    budget = max_fraction * free
    if nbytes > budget:
        log(f"dataset: too big to preload: {_mb(nbytes)} > {max_fraction:g} x {_mb(free)} free "
            f"on {device} ({_mb(budget)}); data stays on the CPU")
        return None
    return device


class MultiDomainLatentDataset(Dataset):
    """Latents from `root/<domain>/*.pt|*.npy` (or packed `root/<domain>/latents.npy`), sampled as
    (content, two target-domain references).

    Item i of the current epoch is a dict of raw latents: `content` [4, H, W] from the source
    domain, `target_style` and `target_style_2` [4, H, W] (two independent files of the target
    domain: the reference-guided diversity loss needs two references), `source_style_id` and
    `target_style_id` (long scalars). `__getitems__` returns the same keys batched ([B, 4, H, W],
    ids [B]) with one gather for the three latent keys; use it through `build_loader`.
    """

    def __init__(self, root, domains, preload_to_gpu=True, device="cuda", samples_per_epoch=None,
                 seed=0, hflip=False, preload_max_fraction=0.5, reject_outliers=True, log=print, progress=True):
        domains = [domains] if isinstance(domains, str) else list(domains)
        if len(domains) < 2 or len(set(domains)) != len(domains):
            raise InputError(f"data.domains must name at least 2 distinct domains (the target domain "
                             f"is drawn among the others), got {domains}")
        if samples_per_epoch is not None and (not isinstance(samples_per_epoch, int) or samples_per_epoch < 1):
            raise InputError(f"samples_per_epoch must be a positive int or None, got {samples_per_epoch!r}")
        if not 0 < preload_max_fraction <= 1:
            raise InputError(f"preload_max_fraction must be in (0, 1], got {preload_max_fraction}")
        self.root = os.path.abspath(os.path.expanduser(str(root)))
        self.domains = domains
        self.num_domains = len(domains)
        self.samples_per_epoch = samples_per_epoch
        self.seed = int(seed)
        self.hflip = bool(hflip)

        # packed domains (one memory-mapped array each) or one file per latent, never a mix
        self.shards = open_packed_domains([os.path.join(self.root, d) for d in domains])
        if self.shards is None:
            self.files = [list_latent_files(os.path.join(self.root, d)) for d in domains]
            self.counts = [len(f) for f in self.files]
            self.data = self._load_all(progress)  # [N_total, 4, H, W] float32, CPU
            self._check_outliers(reject_outliers, log)
            self.shape = tuple(self.data.shape[1:])
            self.data = self._maybe_preload(self.data, preload_to_gpu, torch.device(device), preload_max_fraction, log)
        else:
            self.files = [[s.path, s.index_path] for s in self.shards]
            self.counts = [len(s) for s in self.shards]
            self.shape = self.shards[0].shape
            self.data = self._load_packed(preload_to_gpu, torch.device(device), preload_max_fraction, reject_outliers,
                                          log)  # [N_total, 4, H, W] on the GPU, or None: the maps serve the batches
        self.device = self.data.device if self.data is not None else torch.device("cpu")
        offsets = [0]
        for count in self.counts[:-1]:
            offsets.append(offsets[-1] + count)
        self.offsets = offsets
        self._offsets = torch.tensor(offsets, dtype=torch.long)  # [D]
        self._counts = torch.tensor(self.counts, dtype=torch.long)  # [D]
        where = f"on {self.device}" if self.data is not None else f"memory-mapped from {PACKED_ARRAY} files"
        log(f"dataset: {self.num_domains} domains under {self.root} "
            f"({', '.join(f'{d}={n}' for d, n in zip(domains, self.counts))} {'rows' if self.shards else 'files'}), "
            f"latents {list(self.shape)}, {_mb(self.nbytes)} {where}")

        # The epoch lives in shared memory too: persistent DataLoader workers hold their own copy of
        # the dataset, and compare this cell with their local epoch to rebuild a stale index table.
        self._shared_epoch = torch.zeros(1, dtype=torch.long)
        try:
            self._shared_epoch.share_memory_()
        except RuntimeError:  # no shared memory here: workers then see only the epoch they start with
            pass
        self.set_epoch(0)

    # loading

    def _load_all(self, progress=True):
        """Read every file once into one preallocated tensor: no list of tensors, no stack copy.
        Every unreadable file, and every file whose shape differs from most files', is named in one
        error, so one run finds them all. The tensor's shape is the one most of the first SHAPE_VOTE
        files share (a stray huge file first must not decide it). Many files (100k take tens of
        seconds) show a progress bar."""
        from tqdm import tqdm

        flat = [p for paths in self.files for p in paths]
        shapes, problems, head = {}, [], []  # path -> shape of every readable file; messages; buffered first files
        data, row = None, 0
        bar = tqdm(total=len(flat), desc="loading latents", unit="file", dynamic_ncols=True, leave=False,
                   disable=not progress or len(flat) < PROGRESS_FILES, file=sys.stderr, mininterval=1.0)
        for k, path in enumerate(flat):
            bar.update(1)
            try:
                latent = load_latent_file(path)  # [4, H, W]
            except InputError as err:
                problems.append(str(err))
                continue
            shapes[path] = tuple(latent.shape)
            if data is None:
                head.append(latent)
                if len(head) < SHAPE_VOTE and k < len(flat) - 1:
                    continue
                data = self._allocate(len(flat), head)
                latents, head = head, []
            else:
                latents = [latent]
            for latent in latents:
                if tuple(latent.shape) == tuple(data.shape[1:]):
                    data[row].copy_(latent)  # casts float16/bfloat16/float64 to float32
                    row += 1
        bar.close()
        problems += self._odd_shapes(shapes)
        if problems:
            raise InputError(f"{len(problems)} latent file(s) under {self.root} cannot be used:\n  {listed(problems)}")
        # min and max propagate NaN and are +-inf only if some value is: one cheap pass over all
        # the data; the per-file scan that names the files runs only on failure
        low, high = torch.aminmax(data)
        if not (torch.isfinite(low) and torch.isfinite(high)):
            rows = (~torch.isfinite(data).flatten(1).all(dim=1)).nonzero().flatten().tolist()
            raise InputError(f"{len(rows)} latent file(s) hold a non-finite value (NaN or +-inf, possibly after the "
                             f"cast to float32); expected finite raw latents:\n  {listed(flat[r] for r in rows)}")
        return data

    def _allocate(self, count, first):
        """float32 [count, 4, H, W] of the shape most of the `first` latents share; InputError when
        the machine cannot hold it."""
        votes = {}
        for latent in first:
            votes[tuple(latent.shape)] = votes.get(tuple(latent.shape), 0) + 1
        shape = max(votes, key=votes.get)
        try:
            return torch.empty(count, *shape, dtype=torch.float32)
        except RuntimeError:  # the allocator's "can't allocate memory"
            raise InputError(f"{count} latents of shape {list(shape)} under {self.root} need "
                             f"{_mb(count * math.prod(shape) * 4)} of float32 in memory, more than this machine "
                             "can give: use fewer or smaller latents, or packed latents (pack.py)") from None

    def _odd_shapes(self, shapes):
        """Messages for the files whose shape is not the one most readable files share."""
        votes = {}
        for s in shapes.values():
            votes[s] = votes.get(s, 0) + 1
        if len(votes) < 2:
            return []
        majority = max(votes, key=votes.get)
        return [f"{p} has shape {list(s)}; expected {list(majority)} like {votes[majority]} other file(s) (every file "
                "of every domain must share one shape)" for p, s in shapes.items() if s != majority]

    def _check_outliers(self, reject, log):
        """Name every file whose max |value| exceeds OUTLIER_LIMIT: an error when `reject`, else a
        warning (training then skips the steps that draw them as non-finite)."""
        found = outliers(self.data, [p for paths in self.files for p in paths])
        if not found:
            return
        report_outliers(outlier_lines(found), len(found), "latent file(s)", reject, log)

    def _maybe_preload(self, data, preload_to_gpu, device, max_fraction, log):
        """Move `data` to the GPU when asked and it fits in `max_fraction` of the free memory."""
        if preload_device(data.nbytes, preload_to_gpu, device, max_fraction, log) is None:
            return data
        try:
            return data.to(device)
        except torch.cuda.OutOfMemoryError:
            log(f"dataset: out of memory moving {_mb(data.nbytes)} to {device}; data stays on the CPU")
            return data

    def _load_packed(self, preload_to_gpu, device, max_fraction, reject_outliers, log):
        """Packed domains: one chunked pass over every row checks the values (finite, within
        OUTLIER_LIMIT) and, when the set goes to the GPU, copies it there in the same pass. Returns
        that [N_total, 4, H, W] GPU tensor (float16 unless a shard is float32; batches are cast to
        float32), or None when the set stays on the CPU: batches are then gathered from the maps,
        which every process (torchrun ranks, loader workers) shares through the page cache."""
        for shard in self.shards[1:]:
            if shard.shape != self.shape:
                raise InputError(f"{shard.path} holds latents of shape {list(shard.shape)}; expected "
                                 f"{list(self.shape)} like {self.shards[0].path} (every domain must share one shape)")
        float32 = any(s.dtype == torch.float32 for s in self.shards)
        dtype = self.packed_dtype = torch.float32 if float32 else torch.float16
        rows = sum(self.counts)
        nbytes = rows * dtype.itemsize * math.prod(self.shape)
        data = None
        target = preload_device(nbytes, preload_to_gpu, device, max_fraction, log)
        if target is not None:
            try:
                data = torch.empty(rows, *self.shape, dtype=dtype, device=target)  # [N_total, 4, H, W]
            except torch.cuda.OutOfMemoryError:
                log(f"dataset: out of memory allocating {_mb(nbytes)} on {target}; data stays on the CPU")
        nonfinite, far = scan_packed(self.shards, data)  # [(shard, row)] each: non-finite, beyond OUTLIER_LIMIT
        if nonfinite:
            labels = [s.label(r) for s, r in nonfinite[:MAX_LISTED]]
            raise InputError(f"{len(nonfinite)} packed latent(s) hold non-finite values (NaN or +-inf); expected "
                             f"finite raw latents:\n  " + "\n  ".join(first_lines(labels, len(nonfinite))))
        if far:
            lines = [f"{s.label(r)}: max |value| {s.peak(r):.3g}" for s, r in far[:MAX_LISTED]]
            report_outliers(lines, len(far), "packed latent(s)", reject_outliers, log)
        return data

    @property
    def nbytes(self):
        if self.data is not None:
            return self.data.nbytes
        return sum(s.array.nbytes for s in self.shards)

    def by_domain(self):
        """{domain: raw latents [N_d, 4, H, W]}: views of the data in file order, as stored (packed
        float16 stays float16; a packed set not preloaded gives its memory maps, read on use)."""
        if self.data is None:
            return {d: s.tensor() for d, s in zip(self.domains, self.shards)}
        return {d: self.data[first:first + count] for d, first, count in zip(self.domains, self.offsets, self.counts)}

    def content_ids(self):
        """{domain: sha256 of its latents' shape, dtype and bytes}, computed once (the data never
        changes after loading): names a real set for caches (evaluation's real-domain features) by
        what it holds, so files rewritten with their old sizes and times are never mistaken."""
        if getattr(self, "_content_ids", None) is None:
            from metrics import content_hash

            self._content_ids = {d: content_hash(latents) for d, latents in self.by_domain().items()}
        return self._content_ids

    def grid_samples(self):
        """One source and one reference latent per domain, for the grids: each domain's first two
        files. {"sources": [N, 4, H, W], "references": [N, 4, H, W]} raw."""
        first = torch.tensor(self.offsets)
        second = first + (torch.tensor(self.counts) > 1).long()
        sources, references = self._gather(torch.cat([first, second]).to(self.device)).chunk(2)
        return {"sources": sources, "references": references}

    @property
    def on_gpu(self):
        return self.device.type == "cuda"

    def _gather(self, rows):
        """Raw latents [R, 4, H, W] float32 at global `rows` [R] (on self.device): one gather from
        the contiguous data, or, for packed domains left in their memory maps, one per domain (never
        one per sample) reading only the rows asked for."""
        if self.data is not None:
            return self.data.index_select(0, rows).float()  # float32 data: no copy; float16: cast
        domain = torch.bucketize(rows, self._offsets[1:], right=True)  # [R]
        out = torch.empty(len(rows), *self.shape, dtype=self.packed_dtype)  # [R, 4, H, W]
        for d, shard in enumerate(self.shards):
            pick = (domain == d).nonzero().flatten()  # [R_d]
            if len(pick):
                out.index_copy_(0, pick, shard.tensor().index_select(0, rows[pick] - self.offsets[d]).to(out.dtype))
        return out.float()  # one cast per batch: half the time of one per domain

    # sampling

    def set_epoch(self, epoch):
        """Draw the whole epoch's index table at once, seeded by (seed, epoch) alone.

        Per sample: (1) source domain uniform, (2) target domain uniform among the other N-1
        (src + U{1..N-1} mod N), (3) a uniform file in the source domain (content) and two
        independent uniform files in the target domain (target_style, target_style_2). Flip flags
        are always drawn, last, so `hflip` never changes which files are picked.
        """
        self._shared_epoch[0] = int(epoch)  # written only here: a worker's rebuild never writes it back
        self._build_table(int(epoch))

    def _build_table(self, epoch):
        self.epoch = epoch
        n, num_domains = len(self), self.num_domains
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        src = torch.randint(0, num_domains, (n,), generator=g)  # [n]
        trg = (src + torch.randint(1, num_domains, (n,), generator=g)) % num_domains  # [n], never src
        domain = torch.stack([src, trg, trg], dim=1)  # [n, 3]: content, target_style, target_style_2
        counts = self._counts[domain]  # [n, 3]
        # uniform file index in [0, count): float64 keeps the bias negligible for any real folder size
        u = torch.rand(n, 3, generator=g, dtype=torch.float64)
        file_index = torch.minimum((u * counts).long(), counts - 1)  # [n, 3]
        rows = self._offsets[domain] + file_index  # [n, 3] global rows of self.data
        flip = torch.rand(n, 3, generator=g) < 0.5  # [n, 3]
        self._rows = rows.to(self.device)
        self._src = src.to(self.device)
        self._trg = trg.to(self.device)
        self._flip = flip.to(self.device) if self.hflip else None

    def _sync_epoch(self):
        """In a persistent worker, rebuild the table if the main process has moved to another epoch."""
        epoch = int(self._shared_epoch[0])
        if epoch != self.epoch:
            self._build_table(epoch)

    def __len__(self):
        return self.samples_per_epoch if self.samples_per_epoch is not None else sum(self.counts)

    def __getitems__(self, indices):
        """A batch as one dict: one gather for the latents, flips applied with one `torch.where` per key."""
        self._sync_epoch()
        index = torch.as_tensor(indices, dtype=torch.long).reshape(-1)  # [B], CPU
        n = len(self)
        if index.numel() and not (-n <= int(index.min()) and int(index.max()) < n):
            raise IndexError(f"index out of range for a dataset of length {n}: {indices}")
        index = index.remainder(n)  # negative indices count from the end, as in Python
        if self.on_gpu:  # a pageable host->device copy would sync the host on every batch
            index = index.pin_memory().to(self.device, non_blocking=True)
        # index_select rather than data[rows]: the same gather, ~3x less overhead on the CPU
        rows = self._rows.index_select(0, index).T.contiguous()  # [3, B]
        flip = self._flip.index_select(0, index).T.contiguous() if self._flip is not None else None  # [3, B]
        latents = self._gather(rows.flatten()).view(3, -1, *self.shape)  # [3, B, 4, H, W] float32: one gather
        batch = {}
        for k, key in enumerate(("content", "target_style", "target_style_2")):
            x = latents[k]  # [B, 4, H, W]
            if flip is not None:
                x = torch.where(flip[k, :, None, None, None], x.flip(-1), x)  # [B, 4, H, W]
            batch[key] = x
        batch["target_style_id"] = self._trg.index_select(0, index)  # [B]
        batch["source_style_id"] = self._src.index_select(0, index)  # [B]
        return batch

    def __getitem__(self, i):
        """One sample, through the batched path so the two can never disagree."""
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of length {len(self)}")
        return {key: value[0] for key, value in self.__getitems__([i]).items()}


def collate_batch(batch):
    """collate_fn for `build_loader`: passes `__getitems__`'s batched dict through unchanged; a list
    of per-item dicts (a loader without `__getitems__`) is stacked key by key."""
    if isinstance(batch, dict):
        return batch
    return {key: torch.stack([item[key] for item in batch]) for key in batch[0]}


def build_loader(dataset, batch_size, num_workers=0, pin_memory=False, drop_last=True, shuffle=False,
                 log=print, sampler=None, generator=None):
    """DataLoader over `dataset` in index order: the epoch table is already random.

    `sampler` (e.g. a rank's disjoint share of indices under multi-GPU) replaces the sequential
    order. Data preloaded on the GPU forces `num_workers=0` and `pin_memory=False`: CUDA tensors
    cannot cross worker processes, and pinning applies to CPU tensors only.
    """
    if getattr(dataset, "on_gpu", False):
        if num_workers > 0:
            log(f"build_loader: data is on {dataset.device}, num_workers {num_workers} -> 0 "
                f"(CUDA tensors cannot cross worker processes)")
            num_workers = 0
        if pin_memory:
            log(f"build_loader: data is on {dataset.device}, pin_memory -> False (batches are already on the GPU)")
            pin_memory = False
    elif pin_memory and not torch.cuda.is_available():
        log("build_loader: pin_memory -> False (no CUDA device to pin for)")
        pin_memory = False
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler,
                      num_workers=num_workers, pin_memory=pin_memory, drop_last=drop_last,
                      collate_fn=collate_batch, persistent_workers=num_workers > 0, generator=generator)


def rank_indices(n, dist, batch_size, drop_last):
    """This rank's disjoint share of the epoch table (strided, equal length on every rank) and the
    number of batches it makes."""
    per_rank = n // dist.world_size
    indices = list(range(dist.rank, per_rank * dist.world_size, dist.world_size))
    steps = per_rank // batch_size if drop_last else -(-per_rank // batch_size)
    return indices, steps


def check_epoch_has_steps(dataset, dist, t, position=0):
    """An epoch of zero steps would write checkpoints and grids of untrained networks and exit 0; a
    resumed position (batches done in the next epoch) must lie inside that epoch."""
    _, steps = rank_indices(len(dataset), dist, t["batch_size"], t["drop_last"])
    if steps > 0 and position < steps:
        return
    if steps > 0:
        raise InputError(
            f"the checkpoint stopped after batch {position} of its epoch, but an epoch now has {steps} batches "
            f"(training.batch_size={t['batch_size']}, {len(dataset)} samples per epoch, {dist.world_size} "
            "process(es)): resume with the batch size and data it was saved with, or from an epoch_NNNN.pt")
    raise InputError(
        f"an epoch would train 0 steps: {sum(dataset.counts)} latent files, data.samples_per_epoch="
        f"{dataset.samples_per_epoch} -> {len(dataset)} samples per epoch over {dist.world_size} process(es) = "
        f"{len(dataset) // dist.world_size} per process, fewer than training.batch_size={t['batch_size']}"
        f"{' with training.drop_last true' if t['drop_last'] else ''}. Lower training.batch_size, raise "
        f"data.samples_per_epoch to at least {t['batch_size'] * dist.world_size}, or add data")


# ---------------------------------------------------------------------- packed latents
#
# A packed domain folder holds two files instead of one file per latent:
#   latents.npy  [N, 4, H, W] raw latents, little-endian float16 (the default) or float32, C order
#   index.json   {"version": 1, "names": [N names]}: row i came from the file names[i]
# Rows are in name order, the order a per-file folder is read in, so a packed copy of a folder gives
# the same epoch tables and the same batches. packing.py writes them (pack.py, encode.py --pack);
# here they are read through a read-only memory map: start-up reads the headers and the index, then
# makes one chunked pass over the values.

PACKED_ARRAY = "latents.npy"
PACKED_INDEX = "index.json"
PACKED_VERSION = 1
PACKED_DTYPES = (np.dtype("<f2"), np.dtype("<f4"))
NAME_MAX = 255  # bytes in a file name on common file systems
SCAN_CHUNK_BYTES = 32 * 2**20  # one read of the start-up pass: its memory, whatever the data's size
_INT_VIEWS = {np.dtype("<f2"): (np.int16, np.uint16), np.dtype("<f4"): (np.int32, np.uint32)}  # same bits


def first_lines(lines, total):
    """`lines` (the first of `total`), with a last line saying how many were left out."""
    return lines + ([f"... and {total - len(lines)} more"] if total > len(lines) else [])


def is_packed(folder):
    return os.path.exists(os.path.join(folder, PACKED_ARRAY)) or os.path.exists(os.path.join(folder, PACKED_INDEX))


def open_packed_domains(folders):
    """[PackedShard] when every folder is packed, None when none is; a mix is an InputError."""
    packed = [is_packed(f) for f in folders]
    if not any(packed):
        return None
    if not all(packed):
        per_file = [f for f, p in zip(folders, packed) if not p]
        for folder in per_file:
            list_latent_files(folder)  # a missing or empty folder says so first
        raise InputError(
            f"packed and per-file domain folders mixed under one data.root: {', '.join(per_file)} hold(s) one file per "
            f"latent, the others a packed {PACKED_ARRAY} + {PACKED_INDEX}. Use one layout: pack the per-file "
            f"folders with `python pack.py SRC DST` (README, 'Packed latents')")
    return [PackedShard(f) for f in folders]


def open_packed_array(path):
    """`path` as a read-only memory map [N, 4, H, W] after checking its header against the file's
    size; nothing beyond the header is read. InputError naming the file otherwise."""
    expected = (f"expected a .npy array [N, 4, H, W] ({MIN_LATENT_SIZE} <= H, W <= {MAX_LATENT_SIZE}) of "
                "little-endian float16 or float32 in C order, as pack.py writes")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f".npy format version {version} (1.0 or 2.0 expected)")
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran_order, dtype = read_header(f)  # a literal, never unpickled
            offset = f.tell()
    except Exception as e:  # not a .npy file, a garbled or truncated header
        raise InputError(f"cannot read {path} as a .npy array header ({type(e).__name__}: {e}); {expected}") from e
    if dtype not in PACKED_DTYPES or fortran_order:
        raise InputError(f"{path} has dtype {dtype.str}{' in Fortran order' if fortran_order else ''}; {expected}")
    if len(shape) != 4 or shape[0] < 1 or shape[1] != LATENT_CHANNELS or min(shape[2:]) < MIN_LATENT_SIZE \
            or max(shape[2:]) > MAX_LATENT_SIZE:
        raise InputError(f"{path} has shape {list(shape)}; {expected}")
    size, needed = os.path.getsize(path), offset + math.prod(shape) * dtype.itemsize
    if size != needed:
        raise InputError(f"{path} is {size} bytes but its header promises {needed} ({list(shape)} {dtype.name} "
                         f"after a {offset}-byte header): {'truncated' if size < needed else 'bytes after the array'}; "
                         f"{expected}")
    return np.load(path, mmap_mode="r", allow_pickle=False)  # [N, 4, H, W], read-only


def bad_name(name):
    """Why `name` is not a plain file name (a row's origin in a packed index), or None."""
    if not isinstance(name, str):
        return f"a {type(name).__name__}, not a string"
    if name in ("", ".", ".."):
        return "not a file name"
    if re.search(r"[/\\\x00-\x1f]", name):
        return "holds a path separator or a control character"
    if len(name.encode("utf-8", "surrogatepass")) > NAME_MAX:
        return f"longer than {NAME_MAX} bytes"
    return None


def read_packed_index(path, count, array_path):
    """The `count` row names of a packed domain from `path`: plain file names, each once.
    InputError naming the index and every bad entry otherwise."""
    expected = (f'expected {{"version": {PACKED_VERSION}, "names": [...]}} with one plain file name per row of '
                f'{array_path}, as pack.py writes')
    if not os.path.isfile(path):
        raise InputError(f"{path} not found: a packed domain needs it beside {array_path}; {expected}")
    if os.path.getsize(path) > 64 + count * (6 * NAME_MAX + 4):  # each name fully \u-escaped, quoted, comma
        raise InputError(f"{path} is {os.path.getsize(path)} bytes, too large for {count} names; {expected}")
    try:
        with open(path, "rb") as f:
            index = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path} as JSON ({type(e).__name__}: {e}); {expected}") from e
    names = index.get("names") if isinstance(index, dict) and index.get("version") == PACKED_VERSION else None
    if not isinstance(names, list):
        raise InputError(f"{path} is not a version-{PACKED_VERSION} index; {expected}")
    if len(names) != count:
        raise InputError(f"{path} names {len(names)} rows but {array_path} holds {count}; {expected}")
    # the common case checked at C speed: strings, no separator or control character, short, unique
    plain = (all(type(n) is str for n in names) and not re.search(r"[/\\\x00-\x1f]", "".join(names))
             and not {"", ".", ".."} & set(names) and len(set(names)) == count
             and (max(map(len, names)) * 4 <= NAME_MAX or max(len(n.encode("utf-8", "surrogatepass")) for n in names)
                  <= NAME_MAX))
    if not plain:
        bad = [f"row {i}: {n!r} is {why}" for i, n in enumerate(names) if (why := bad_name(n))]
        rows_of = {}
        for i, n in enumerate(names):
            if isinstance(n, str):
                rows_of.setdefault(n, []).append(i)
        bad += [f"rows {rows}: {n!r} names more than one row" for n, rows in rows_of.items() if len(rows) > 1]
        raise InputError(f"{path}: {len(bad)} bad name(s); {expected}:\n  " +
                         "\n  ".join(first_lines(bad[:MAX_LISTED], len(bad))))
    return names


class PackedShard:
    """One packed domain folder: latents.npy as a read-only memory map (only its header is read
    here) and the row names of index.json. Pickled (a loader worker under spawn), it travels as its
    folder and maps the file again: the data never goes through a pipe."""

    def __init__(self, folder):
        self.folder = folder
        self.path = os.path.join(folder, PACKED_ARRAY)
        self.index_path = os.path.join(folder, PACKED_INDEX)
        if not os.path.isfile(self.path):
            raise InputError(f"{folder} holds {PACKED_INDEX} but no {PACKED_ARRAY}: an interrupted pack? Rerun the "
                             f"pack.py or encode.py --pack command that writes it")
        others = sorted(n for n in os.listdir(folder) if n.endswith(LATENT_SUFFIXES) and n != PACKED_ARRAY)
        if others:
            raise InputError(f"{folder} holds both a packed {PACKED_ARRAY} and {len(others)} latent file(s) "
                             f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); expected one layout per "
                             f"domain folder: move one of them away")
        self.array = open_packed_array(self.path)  # [N, 4, H, W] np.memmap
        self.names = read_packed_index(self.index_path, len(self.array), self.path)
        self._tensor = None

    def __len__(self):
        return self.array.shape[0]

    @property
    def shape(self):
        return tuple(self.array.shape[1:])

    @property
    def dtype(self):
        return torch.float16 if self.array.dtype.itemsize == 2 else torch.float32

    def label(self, row):
        return f"{self.path} row {row} ({self.names[row]})"

    def peak(self, row):
        """Max |value| of one row, read from the map."""
        return float(np.abs(self.array[row].astype(np.float32)).max())

    def tensor(self):
        """The map as a CPU tensor [N, 4, H, W] (no copy)."""
        if self._tensor is None:
            self._tensor = read_only_tensor(self.array)
        return self._tensor

    def chunks(self, rows):
        """(first row, [k, 4, H, W] read-only array) for every `rows` rows in order, from a map of
        its own whose pages are dropped from this process after each chunk. Every page a map has
        touched counts in the process's memory until it is unmapped, so a pass over the whole file
        would hold all of it; this pass holds one chunk and leaves the file in the page cache for the
        batches and for the other ranks."""
        with open(self.path, "rb") as f:
            whole = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        row_bytes = self.array.nbytes // len(self)
        array = np.frombuffer(whole, self.array.dtype, self.array.size, self.array.offset).reshape(self.array.shape)
        advise = getattr(whole, "madvise", lambda *args: None)  # no madvise on Windows

        def pages(start):  # the page-aligned byte range of the chunk at row `start`
            begin = (self.array.offset + start * row_bytes) // mmap.PAGESIZE * mmap.PAGESIZE
            return begin, self.array.offset + min(start + rows, len(self)) * row_bytes - begin

        try:
            advise(mmap.MADV_SEQUENTIAL)
            for start in range(0, len(self), rows):
                if start + rows < len(self):
                    advise(mmap.MADV_WILLNEED, *pages(start + rows))  # read ahead while this chunk is checked
                yield start, array[start:start + rows]
                advise(mmap.MADV_DONTNEED, *pages(start))
        finally:
            del array
            try:
                whole.close()
            except BufferError:  # a chunk is still referenced: the map closes with it
                pass

    def __getstate__(self):
        return {"folder": self.folder}

    def __setstate__(self, state):
        self.__init__(state["folder"])


def read_only_tensor(array):
    """torch.from_numpy of a read-only array (a map), without torch's warning that the tensor is
    not writable: nothing here writes to one (gathers copy)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def magnitude_bits(chunk):
    """Per-row max |value| of a float16/float32 array [k, ...] as an integer ordered like |value|.

    IEEE 754 orders non-negative floats like their bit patterns read as integers, with inf and then
    NaN above every finite number, and a negative number is its magnitude's pattern plus the sign
    bit. So a row's largest non-negative magnitude is the max of its patterns read as signed
    integers (the negatives read below zero), and its largest negative magnitude the max read as
    unsigned integers, less the sign bit. Two integer reductions that write nothing (so they run on
    the read-only map, ~10 GB/s each in numpy) answer both start-up questions exactly: finite, and
    within OUTLIER_LIMIT."""
    signed, unsigned = _INT_VIEWS[chunk.dtype]
    flat = chunk.reshape(len(chunk), -1)  # [k, 4*H*W]
    sign_bit = 1 << (8 * chunk.dtype.itemsize - 1)
    return np.maximum(flat.view(signed).max(axis=1).astype(np.int64),
                      flat.view(unsigned).max(axis=1).astype(np.int64) - sign_bit)  # [k]


def magnitude_threshold(value, dtype):
    """The bit pattern of the largest `dtype` (float16 or float32) number <= `value`: |x| > value
    iff magnitude_bits of x is above it."""
    x = np.array(value, dtype)
    if float(x) > value:  # rounded up: step down (compared in float64: numpy would compare in float16)
        x = np.nextafter(x, x.dtype.type(0))
    return int(x.view(_INT_VIEWS[x.dtype][0]))


def scan_packed(shards, out=None, chunk_bytes=None):
    """One pass over every row of `shards`, in order: ([(shard, row)] non-finite, [(shard, row)]
    beyond OUTLIER_LIMIT). With `out` [N_total, 4, H, W] (the GPU preload), each chunk is copied
    there from the map first: the file is read once for both."""
    nonfinite, outliers, first = [], [], 0
    for shard in shards:
        dtype = shard.array.dtype
        finite_max = magnitude_threshold(np.finfo(dtype).max, dtype)
        limit = magnitude_threshold(OUTLIER_LIMIT, dtype)
        rows = max(1, (chunk_bytes or SCAN_CHUNK_BYTES) // (shard.array.nbytes // len(shard)))
        for start, chunk in shard.chunks(rows):
            if out is not None:
                out[first + start:first + start + len(chunk)].copy_(read_only_tensor(chunk))
            peak = magnitude_bits(chunk)  # [k]
            for row in np.flatnonzero(peak > limit).tolist():
                (nonfinite if peak[row] > finite_max else outliers).append((shard, start + row))
        first += len(shard)
    return nonfinite, outliers
