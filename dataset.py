"""Multi-domain latent dataset (any VAE's latents) with GPU preload and two-stage uniform sampling.

Every file of every domain is read once at start-up into ONE contiguous float32 tensor
`data [N_total, C, H, W]` (raw latents as on disk; the trainer normalises them, `LatentSpace`), with per-domain
offsets, so that a whole batch is one gather. Packed domains (one `latents.npy` per domain, see
packing.py) are memory-mapped instead: checked in one pass, then copied to the GPU or left in
their maps, which every process shares through the page cache. `set_epoch` draws the epoch's index table in
one vectorised pass: source domain uniform, target domain uniform among the *other* domains, then a
file uniform within each domain. Sampling domains first (StarGAN v2's per-domain reference
sampling) keeps domain frequencies equal however unbalanced the folders are.

Files are untrusted input, read and checked by latents.py and packing.py: anything unexpected
stops construction with an error naming the file by its full path.
"""

import math
import os
import signal
import sys

import torch
from torch.utils.data import DataLoader, Dataset

from latents import (LATENT_CHANNELS, MANIFEST_NAME, MAX_LISTED, PACKED_ARRAY, content_hash, first_lines,
                     list_latent_files, listed, load_latent_file, outlier_lines, outliers, report_outliers)
from packing import open_packed_domains, scan_packed
from runtime import InputError

SHAPE_VOTE = 64  # the first files whose most common shape sizes the data tensor
PROGRESS_FILES = 2000  # loading more files than this shows a progress bar (a per-file folder loads ~3k/s)


def _mb(nbytes):
    return f"{nbytes / 2**20:.1f} MB"


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

    Item i of the current epoch is a dict of raw latents: `content` [C, H, W] from the source
    domain, `target_style` and `target_style_2` [C, H, W] (two independent files of the target
    domain: the reference-guided diversity loss needs two references), `source_style_id` and
    `target_style_id` (long scalars). `__getitems__` returns the same keys batched ([B, C, H, W],
    ids [B]) with one gather for the three latent keys; use it through `build_loader`.
    """

    def __init__(self, root, domains, preload_to_gpu=True, device="cuda", samples_per_epoch=None,
                 seed=0, hflip=False, preload_max_fraction=0.5, reject_outliers=True, log=print, progress=True,
                 channels=LATENT_CHANNELS):
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
        self.channels = int(channels)  # the VAE's latent channels (the data root's manifest): every file's C

        # packed domains (one memory-mapped array each) or one file per latent, never a mix
        self.shards = open_packed_domains([os.path.join(self.root, d) for d in domains])
        if self.shards is None:
            self.files = [list_latent_files(os.path.join(self.root, d)) for d in domains]
            self.counts = [len(f) for f in self.files]
            self.data = self._load_all(progress)  # [N_total, C, H, W] float32, CPU
            self._check_outliers(reject_outliers, log)
            self.shape = tuple(self.data.shape[1:])
            self.data = self._maybe_preload(self.data, preload_to_gpu, torch.device(device), preload_max_fraction, log)
        else:
            self.files = [[s.path, s.index_path] for s in self.shards]
            self.counts = [len(s) for s in self.shards]
            self.shape = self.shards[0].shape
            for shard in self.shards:
                if shard.shape[0] != self.channels:
                    raise InputError(f"{shard.path} has shape {[len(shard), *shard.shape]}; the run's latent space has "
                                     f"{self.channels} channels (the data root's {MANIFEST_NAME}, else SD1.5's 4)")
            self.data = self._load_packed(preload_to_gpu, torch.device(device), preload_max_fraction, reject_outliers,
                                          log)  # [N_total, C, H, W] on the GPU, or None: the maps serve the batches
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
                latent = load_latent_file(path, self.channels)  # [C, H, W]
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
        """float32 [count, C, H, W] of the shape most of the `first` latents share; InputError when
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
        that [N_total, C, H, W] GPU tensor (float16 unless a shard is float32; batches are cast to
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
                data = torch.empty(rows, *self.shape, dtype=dtype, device=target)  # [N_total, C, H, W]
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
        """{domain: raw latents [N_d, C, H, W]}: views of the data in file order, as stored (packed
        float16 stays float16; a packed set not preloaded gives its memory maps, read on use)."""
        if self.data is None:
            for shard in self.shards:  # the maps are read later: a file changed by now is named, not a SIGBUS
                shard.check_unchanged()
            return {d: s.tensor() for d, s in zip(self.domains, self.shards)}
        return {d: self.data[first:first + count] for d, first, count in zip(self.domains, self.offsets, self.counts)}

    def content_ids(self):
        """{domain: sha256 of its latents' shape, dtype and bytes}, computed once (the data never
        changes after loading): names a real set for caches (evaluation's real-domain features) by
        what it holds, so files rewritten with their old sizes and times are never mistaken."""
        if getattr(self, "_content_ids", None) is None:
            ids = {}
            for k, (d, latents) in enumerate(self.by_domain().items()):
                if self.data is None:  # each map again just before it is read whole: hashing the others takes time
                    self.shards[k].check_unchanged()
                ids[d] = content_hash(latents)
            self._content_ids = ids
        return self._content_ids

    def grid_samples(self):
        """One source and one reference latent per domain, for the grids: each domain's first two
        files. {"sources": [N, C, H, W], "references": [N, C, H, W]} raw."""
        first = torch.tensor(self.offsets)
        second = first + (torch.tensor(self.counts) > 1).long()
        sources, references = self._gather(torch.cat([first, second]).to(self.device)).chunk(2)
        return {"sources": sources, "references": references}

    @property
    def on_gpu(self):
        return self.device.type == "cuda"

    def _gather(self, rows):
        """Raw latents [R, C, H, W] float32 at global `rows` [R] (on self.device): one gather from
        the contiguous data, or, for packed domains left in their memory maps, one per domain (never
        one per sample) reading only the rows asked for."""
        if self.data is not None:
            return self.data.index_select(0, rows).float()  # float32 data: no copy; float16: cast
        for shard in self.shards:  # one stat per shard and batch: a file changed under its map is named, not a SIGBUS
            shard.check_unchanged()
        domain = torch.bucketize(rows, self._offsets[1:], right=True)  # [R]
        out = torch.empty(len(rows), *self.shape, dtype=self.packed_dtype)  # [R, C, H, W]
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
        latents = self._gather(rows.flatten()).view(3, -1, *self.shape)  # [3, B, C, H, W] float32: one gather
        batch = {}
        for k, key in enumerate(("content", "target_style", "target_style_2")):
            x = latents[k]  # [B, C, H, W]
            if flip is not None:
                x = torch.where(flip[k, :, None, None, None], x.flip(-1), x)  # [B, C, H, W]
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
                      collate_fn=collate_batch, persistent_workers=num_workers > 0, generator=generator,
                      worker_init_fn=default_sigbus if getattr(dataset, "shards", None) else None)


def default_sigbus(worker_id):
    """In a loader worker over memory maps: SIGBUS (a file truncated under the read) ends the worker
    without torch's note blaming shared memory; the main process then names the file (run.py)."""
    signal.signal(signal.SIGBUS, signal.SIG_DFL)


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
