"""The packed latent format, reader and writer.

A packed domain folder holds two files instead of one file per latent:
  latents.npy  [N, C, H, W] raw latents, little-endian float16 (the default) or float32, C order
  index.json   {"version": 1, "names": [N names]}: row i came from the file names[i]
Rows are in name order, the order a per-file folder is read in, so a packed copy of a folder gives
the same epoch tables and the same batches.

Reading (`PackedShard`, `scan_packed`, used by dataset.py): a read-only memory map; start-up reads
the headers and the index, then makes one chunked pass over the values.

Writing (pack.py, encode.py --pack) is atomic and resumable. `PackWriter` appends rows, in any order, to a hidden partial file beside the
shard and logs each row's name once the rows are on disk (fsync), so an interrupted run keeps every
logged row and a rerun produces only the rest. `finish` puts the rows in name order and commits:
the old latents.npy is removed, index.json written, the partial renamed to latents.npy. At every
moment the folder holds a complete shard, a partial that a rerun continues, or (between the first
and the last step of a commit) an index without its array, which the dataset reports as an
interrupted pack: never a half-written latents.npy.
"""

import json
import math
import mmap
import os
import re
import struct
import time
import uuid
import warnings

import numpy as np
import torch

from latents import (LATENT_CHANNELS, LATENT_SUFFIXES, MAX_LATENT_CHANNELS, MAX_LATENT_SIZE, MAX_LISTED, OUTLIER_LIMIT,
                     PACKED_ARRAY, PACKED_INDEX, copy_manifest, first_lines, is_packed, list_latent_files,
                     load_latent_file, read_manifest, shown_name)
from model import MIN_LATENT_SIZE
from runtime import InputError, atomic_write, remove_if_empty

PACK_DTYPES = {"float16": torch.float16, "float32": torch.float32}
HEADER_BYTES = 128  # the .npy header slot at the front of a partial file, filled in when it is committed
PARTIAL_LOG = ".latents.partial.json"  # line 1: {"data": partial file, dtype, shape}; then one JSON name per row
PARTIAL_DATA = re.compile(r"\.latents\.[0-9a-f]{12}\.partial")  # the partial files a writer names
COPY_CHUNK_BYTES = 64 * 2**20
CONVERT_ROWS = 1024  # latent files read per append by convert_domain


def npy_header(shape, dtype):
    """A .npy format 1.0 header of exactly HEADER_BYTES for a C-order array: magic string, version,
    little-endian uint16 header length, the header dict padded with spaces and a newline (numpy's
    format specification, NEP 1), so it fills the slot a partial file keeps in front of its rows."""
    text = repr({"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                 "shape": tuple(shape)}).encode("latin1")
    padding = HEADER_BYTES - 10 - len(text) - 1
    if padding < 0:
        raise ValueError(f"a .npy header for shape {tuple(shape)} does not fit in {HEADER_BYTES} bytes")
    return np.lib.format.magic(1, 0) + struct.pack("<H", HEADER_BYTES - 10) + text + b" " * padding + b"\n"


def fsync_folder(folder):
    """Make renames and removals in `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_names(names, where):
    """Row names must be plain file names (they name rows in errors): InputError listing the bad ones."""
    bad = [f"{n!r} is {why}" for n in names if (why := bad_name(n))]
    if bad:
        raise InputError(f"{shown_name(where, None)}: {len(bad)} name(s) cannot name a packed row:\n  " +
                         "\n  ".join(first_lines(bad[:MAX_LISTED], len(bad))))


class PackWriter:
    """Writes one packed domain folder, `folder`/latents.npy + index.json, resumably.

    `has(name)`: a row for `name` is already written (by this run or an interrupted one, or, with
    `reuse_shard`, in the folder's existing shard). `append(latents, names)` adds rows durably;
    `finish(order)` commits the shard with its rows in `order`.
    """

    def __init__(self, folder, shape, dtype="float16", reuse_shard=False, log=print):
        if dtype not in PACK_DTYPES:
            raise InputError(f"packed dtype must be one of {', '.join(PACK_DTYPES)}, got {dtype!r}")
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or min(shape[1:]) < MIN_LATENT_SIZE:
            raise InputError(f"cannot pack latents of shape {list(shape)} into {shown_name(folder, None)}: "
                             f"expected [C, H, W] with H, W >= {MIN_LATENT_SIZE}")
        self.folder, self.shape, self.log = folder, shape, log
        self.dtype = PACK_DTYPES[dtype]
        self.np_dtype = np.dtype(np.float16 if self.dtype == torch.float16 else np.float32)
        self.row_bytes = self.np_dtype.itemsize * math.prod(shape)
        self.log_path = os.path.join(folder, PARTIAL_LOG)
        self.array_path = os.path.join(folder, PACKED_ARRAY)
        os.makedirs(folder, exist_ok=True)
        others = sorted(n for n in os.listdir(folder) if n.endswith(LATENT_SUFFIXES) and n != PACKED_ARRAY)
        if others:
            raise InputError(f"{shown_name(folder, None)} holds {len(others)} latent file(s) "
                             f"({', '.join(map(shown_name, others[:3]))}{', ...' if len(others) > 3 else ''}); "
                             f"a packed folder holds only {PACKED_ARRAY} and "
                             f"{PACKED_INDEX}: pack into another folder")
        self.shard = self._open_shard()
        self.reuse_shard = reuse_shard and self.shard is not None and self.shard.array.dtype == self.np_dtype
        self.data_path, self.names = self._resume()
        self._partial_row = {n: i for i, n in enumerate(self.names)}
        self._shard_row = {n: i for i, n in enumerate(self.shard.names)} if self.reuse_shard else {}

    # state on disk

    def _open_shard(self):
        """The folder's complete shard of this latent shape, or None (absent, mid-commit, unreadable)."""
        try:
            shard = PackedShard(self.folder)
        except InputError:
            return None
        return shard if shard.shape == self.shape else None

    def _resume(self):
        """(partial data file, names of its committed rows) of an interrupted run, or (None, []);
        removes partial files that no log refers to."""
        data_path, names = None, []
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().split(b"\n")
            head = json.loads(lines[0])
            if (head.get("version") == PACKED_VERSION and PARTIAL_DATA.fullmatch(str(head.get("data")))
                    and head.get("dtype") == self.np_dtype.str and head.get("shape") == list(self.shape)):
                data_path = os.path.join(self.folder, head["data"])
                names = [json.loads(line) for line in lines[1:-1]]  # the last piece is "" or a torn line
                rows_on_disk = (os.path.getsize(data_path) - HEADER_BYTES) // self.row_bytes
                names = names[:max(rows_on_disk, 0)]  # rows are synced before their names: only a lost disk differs
            else:
                self.log(f"{shown_name(self.folder, None)}: an interrupted pack of another dtype or latent shape is "
                         "discarded")
        except FileNotFoundError:  # no log, or its data file is gone (renamed by a commit that then stopped)
            data_path, names = None, []
        except (ValueError, AttributeError, IndexError, RecursionError) as e:  # RecursionError: nested too deep
            self.log(f"{shown_name(self.folder, None)}: the log of an interrupted pack is unreadable ({e}); "
                     "starting over")
            data_path, names = None, []
        for name in os.listdir(self.folder):
            if PARTIAL_DATA.fullmatch(name) and os.path.join(self.folder, name) != data_path:
                os.remove(os.path.join(self.folder, name))
        if data_path is None:
            if os.path.exists(self.log_path):
                os.remove(self.log_path)
            return None, []
        self._write_log(data_path, names)  # drops a torn last line: appends start on a line of their own
        with open(data_path, "r+b") as f:
            f.truncate(HEADER_BYTES + len(names) * self.row_bytes)  # rows written after the last logged name go
        if names:
            self.log(f"{shown_name(self.folder, None)}: resuming an interrupted pack: {len(names)} row(s) already "
                     "written")
        return data_path, names

    def _new_partial(self):
        """A fresh partial file (header slot only) and its log."""
        data_path = os.path.join(self.folder, f".latents.{uuid.uuid4().hex[:12]}.partial")
        with open(data_path, "wb") as f:
            f.write(b"\0" * HEADER_BYTES)
        self._write_log(data_path, [])
        return data_path

    def _write_log(self, data_path, names):
        head = {"version": PACKED_VERSION, "data": os.path.basename(data_path), "dtype": self.np_dtype.str,
                "shape": list(self.shape)}
        text = "".join(json.dumps(line) + "\n" for line in [head, *names])
        atomic_write(self.log_path, lambda f: f.write(text.encode()), fsync=True)

    # rows

    def has(self, name):
        return name in self._partial_row or name in self._shard_row

    def append(self, latents, names):
        """Rows [k, C, H, W] (cast to the packed dtype) for `names`, durably: rows first, then names."""
        latents = latents.detach().cpu().to(self.dtype).contiguous()  # [k, C, H, W]
        if tuple(latents.shape[1:]) != self.shape or len(latents) != len(names):
            raise ValueError(f"expected {len(names)} latents of shape {list(self.shape)}, got {list(latents.shape)}")
        again = [n for n in names if n in self._partial_row]
        if again or len(set(names)) != len(names):
            raise ValueError(f"rows written twice: {again or names}")
        if self.data_path is None:
            self.data_path = self._new_partial()
        with open(self.data_path, "r+b") as f:
            f.seek(HEADER_BYTES + len(self.names) * self.row_bytes)
            f.write(latents.numpy().tobytes())
            f.flush()
            os.fsync(f.fileno())
        with open(self.log_path, "ab") as f:
            f.write("".join(json.dumps(n) + "\n" for n in names).encode())
            f.flush()
            os.fsync(f.fileno())
        for n in names:
            self._partial_row[n] = len(self.names)
            self.names.append(n)

    def up_to_date(self, order):
        """The folder's shard already holds exactly `order`, in this dtype, and nothing is pending."""
        return (self.shard is not None and not self.names and self.shard.names == list(order)
                and self.shard.array.dtype == self.np_dtype)

    def finish(self, order):
        """Commit latents.npy with one row per name of `order` (each must be `has`), and index.json.
        Returns the number of rows, or 0 when the shard already held exactly these rows."""
        order = list(order)
        if self.up_to_date(order):
            self._discard_partial()
            return 0
        missing = [n for n in order if not self.has(n)]
        if missing or not order:
            raise ValueError(f"cannot finish {self.folder}: no row for {missing[:5]}" if missing else
                             f"cannot finish {self.folder}: no rows")
        if self.names != order:
            self._rewrite(order)  # a merge with reused rows, or rows that came out of name order
        with open(self.data_path, "r+b") as f:
            f.write(npy_header((len(order), *self.shape), self.np_dtype))
            f.flush()
            os.fsync(f.fileno())
        self.shard = None  # its map may be a source no more: it is removed now
        if os.path.exists(self.array_path):
            os.remove(self.array_path)  # from here to the rename, the folder reads as an interrupted pack
        index = json.dumps({"version": PACKED_VERSION, "names": order})
        atomic_write(os.path.join(self.folder, PACKED_INDEX), lambda f: f.write(index.encode()), fsync=True)
        # a rename of its own, not runtime.atomic_write: the partial file outlives a run (rows appended,
        # fsynced and logged as they come, resumed by the next run), atomic_write's lives for one call
        os.replace(self.data_path, self.array_path)
        os.remove(self.log_path)
        fsync_folder(self.folder)
        return len(order)

    def _discard_partial(self):
        for path in (self.log_path, self.data_path):
            if path and os.path.exists(path):
                os.remove(path)

    def _rewrite(self, order):
        """Copy the rows into a new partial file in `order` (from this partial and the reused shard,
        cast to the packed dtype), then switch the log to it: the switch is one atomic rename."""
        sources = [np.memmap(self.data_path, self.np_dtype, "r", HEADER_BYTES, (len(self.names), *self.shape))
                   if self.names else None, self.shard.array if self.reuse_shard else None]
        where = [(0, self._partial_row[n]) if n in self._partial_row else (1, self._shard_row[n]) for n in order]
        source, row = (np.array(column, dtype=np.int64) for column in zip(*where))
        new_path = os.path.join(self.folder, f".latents.{uuid.uuid4().hex[:12]}.partial")
        chunk = max(1, COPY_CHUNK_BYTES // self.row_bytes)
        with open(new_path, "wb") as f:
            f.write(b"\0" * HEADER_BYTES)
            for start in range(0, len(order), chunk):
                block = np.empty((min(chunk, len(order) - start), *self.shape), self.np_dtype)  # [k, C, H, W]
                for s, array in enumerate(sources):
                    pick = np.flatnonzero(source[start:start + len(block)] == s)
                    if len(pick):
                        block[pick] = array[row[start + pick]]
                f.write(block.tobytes())
            f.flush()
            os.fsync(f.fileno())
        old_path = self.data_path
        self._write_log(new_path, order)
        if old_path is not None:
            os.remove(old_path)
        self.data_path, self.names = new_path, order
        self._partial_row = {n: i for i, n in enumerate(order)}


def cast_rows(latents, dtype):
    """Latents [k, C, H, W] (any float dtype) -> (the packed dtype's rows [k, C, H, W], [k] bool:
    finite after the cast; float16 turns |values| above 65504 into inf)."""
    packed = latents.float().to(PACK_DTYPES[dtype])
    return packed, torch.isfinite(packed).flatten(1).all(dim=1)


def first_shape(src_folder, files, channels=LATENT_CHANNELS):
    """The shape of the first readable latent file, which every file of the domain must share (the
    packing loop names every bad one); an InputError when none is readable."""
    problems = []
    for path in files:
        try:
            return tuple(load_latent_file(path, channels).shape)
        except InputError as e:
            problems.append(str(e))
    raise InputError(f"{src_folder}: none of its {len(files)} latent files is readable:\n  "
                     + "\n  ".join(first_lines(problems[:MAX_LISTED], len(problems))))


def convert_domain(src_folder, dst_folder, dtype="float16", log=print, channels=LATENT_CHANNELS):
    """One per-file domain folder into its packed folder's partial file, rows in the folder's file
    order (the order the dataset reads it in), nothing committed. Every latent file is checked as
    the dataset would (readable, one shape, finite, in float16 too); rows go in while every file so
    far is good, so a rerun keeps them. Returns (writer, row names, [a line per bad file])."""
    if is_packed(src_folder):
        raise InputError(f"{shown_name(src_folder, None)} is packed already ({PACKED_ARRAY} + {PACKED_INDEX})")
    files = list_latent_files(src_folder)
    names = [os.path.basename(p) for p in files]
    check_names(names, src_folder)
    shape = first_shape(src_folder, files, channels)
    writer = PackWriter(dst_folder, shape, dtype, log=log)
    if writer.up_to_date(names):
        return writer, names, []
    todo = [(n, p) for n, p in zip(names, files) if not writer.has(n)]
    bad = []
    for first in range(0, len(todo), CONVERT_ROWS):
        batch, rows = [], []
        for name, path in todo[first:first + CONVERT_ROWS]:
            try:
                latent = load_latent_file(path, channels)  # [C, H, W]
            except InputError as e:
                bad.append(str(e))
                continue
            if tuple(latent.shape) != shape:
                bad.append(f"{shown_name(path, None)} has shape {list(latent.shape)}; expected {list(shape)} like "
                           f"{shown_name(files[0], None)}")
                continue
            batch.append(name)
            rows.append(latent)
        if not rows:
            continue
        packed, finite = cast_rows(torch.stack([r.float() for r in rows]), dtype)  # [k, C, H, W], [k]
        for name, ok, latent in zip(batch, finite.tolist(), rows):
            if not ok:
                beyond = dtype == "float16" and bool(torch.isfinite(latent.float()).all())
                bad.append(f"{shown_name(os.path.join(src_folder, name), None)} holds "
                           + ("values beyond float16's range (|value| > 65504): pack with --dtype float32"
                              if beyond else "a non-finite value (NaN or +-inf); expected finite raw latents"))
        if not bad:  # rows go in while every file so far is good: the partial stays in name order
            writer.append(packed, batch)
    return writer, names, bad


def source_domains(src_root, domains=None):
    """The domain folders to pack: `domains`, else every folder of `src_root` (hidden ones skipped);
    InputError naming the root or the names that are no single folder names."""
    if not os.path.isdir(src_root):
        raise InputError(f"{shown_name(str(src_root), None)} is not a folder (expected one folder per domain of "
                         "latent files)")
    if domains is None:
        try:
            entries = os.listdir(src_root)
        except OSError as e:
            raise InputError(f"cannot read {shown_name(str(src_root), None)} ({e.strerror or e})") from None
        domains = sorted(d for d in entries if not d.startswith(".") and os.path.isdir(os.path.join(src_root, d)))
        if not domains:
            raise InputError(f"{shown_name(str(src_root), None)} has no domain folders")
    bad = [d for d in domains if bad_name(d)]
    if bad:
        raise InputError(f"domain names must be single folder names, got {bad}")
    return list(domains)


def pack_folders(src_root, dst_root, domains=None, dtype="float16", log=print):
    """Every domain folder of `src_root` (or those named) -> packed under `dst_root`/<domain>/.
    Every domain is converted and checked before any is committed: a bad file anywhere names every
    bad file of every domain and commits none (the rows converted so far wait for the rerun). The
    root's latent-space manifest (encode.py's) says the latents' channels and is copied along.
    Returns {domain: rows written}."""
    src_root, dst_root = os.path.abspath(os.path.expanduser(src_root)), os.path.abspath(os.path.expanduser(dst_root))
    domains = source_domains(src_root, domains)
    if os.path.realpath(src_root) == os.path.realpath(dst_root):
        raise InputError(f"the packed copy must go to another folder than {shown_name(src_root, None)}: a domain "
                         "folder holds one layout")
    found = read_manifest(src_root)
    channels = found[0].channels if found else LATENT_CHANNELS
    converted, problems, bad_files = {}, [], 0
    for d in domains:
        start = time.perf_counter()
        try:
            writer, names, bad = convert_domain(os.path.join(src_root, d), os.path.join(dst_root, d), dtype, log,
                                                channels)
        except (InputError, FileNotFoundError) as e:  # the domain cannot be packed at all: named, the others checked
            problems.append(str(e))
            continue
        converted[d] = (writer, names, time.perf_counter() - start)
        problems += bad
        bad_files += len(bad)
    if problems:
        for d in domains:
            remove_if_empty(os.path.join(dst_root, d))  # a domain with no row converted leaves no folder
        folders = len(problems) - bad_files
        raise InputError(f"{shown_name(src_root, None)}: {bad_files} bad latent file(s)"
                         + (f" and {folders} domain folder(s) that cannot be packed" if folders else "")
                         + f"; no domain was packed (the rows before each domain's first bad file are kept for the "
                         "rerun: fix or remove the files and rerun):\n  "
                         + "\n  ".join(first_lines(problems[:MAX_LISTED], len(problems))))
    rows = {d: commit_domain(*converted[d], dtype, log) for d in domains}
    copy_manifest(src_root, dst_root)
    return rows


def commit_domain(writer, names, seconds, dtype, log):
    """Commit a converted domain (`convert_domain`) and say so; returns its rows (0: already packed)."""
    start = time.perf_counter()
    rows = writer.finish(names)  # 0: the shard held these rows already (what an interrupted commit left goes)
    folder = shown_name(writer.folder, None)
    if rows == 0:
        log(f"{folder}: already packed ({len(names)} latents, {dtype}); skipped")
        return 0
    log(f"{folder}: {rows} latents {list(writer.shape)} {dtype} in {shown_name(writer.array_path, None)} "
        f"({rows * writer.row_bytes / 2**20:.1f} MB, {seconds + time.perf_counter() - start:.1f}s)")
    return rows

PACKED_VERSION = 1

PACKED_DTYPES = (np.dtype("<f2"), np.dtype("<f4"))

NAME_MAX = 255  # bytes in a file name on common file systems

SCAN_CHUNK_BYTES = 32 * 2**20  # one read of the start-up pass: its memory, whatever the data's size

_INT_VIEWS = {np.dtype("<f2"): (np.int16, np.uint16), np.dtype("<f4"): (np.int32, np.uint32)}  # same bits


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
            f"folders with `python pack.py SRC DST` (docs/data.md)")
    return [PackedShard(f) for f in folders]


def open_packed_array(path):
    """`path` as a read-only memory map [N, C, H, W] after checking its header against the file's
    size; nothing beyond the header is read. InputError naming the file otherwise."""
    expected = (f"expected a .npy array [N, C, H, W] (C <= {MAX_LATENT_CHANNELS}, {MIN_LATENT_SIZE} <= H, W <= "
                f"{MAX_LATENT_SIZE}) of "
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
    if len(shape) != 4 or shape[0] < 1 or not 1 <= shape[1] <= MAX_LATENT_CHANNELS or min(shape[2:]) < MIN_LATENT_SIZE \
            or max(shape[2:]) > MAX_LATENT_SIZE:
        raise InputError(f"{path} has shape {list(shape)}; {expected}")
    size, needed = os.path.getsize(path), offset + math.prod(shape) * dtype.itemsize
    if size != needed:
        raise InputError(f"{path} is {size} bytes but its header promises {needed} ({list(shape)} {dtype.name} "
                         f"after a {offset}-byte header): {'truncated' if size < needed else 'bytes after the array'}; "
                         f"{expected}")
    return np.load(path, mmap_mode="r", allow_pickle=False)  # [N, C, H, W], read-only


def bad_name(name):
    """Why `name` is not a plain file name (a row's origin in a packed index), or None."""
    if not isinstance(name, str):
        return f"a {type(name).__name__}, not a string"
    if name in ("", ".", ".."):
        return "not a file name"
    if re.search(r"[/\\\x00-\x1f]", name):
        return "a name with a path separator or a control character"
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
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested deeper than Python's stack
        raise InputError(f"cannot read {path} as JSON ({type(e).__name__}: {e}); {expected}") from None
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


class ShardChanged(InputError):
    """A mapped latents.npy was replaced, truncated or rewritten under a running job."""


def file_identity(path):
    """(device, inode, size, modification time) of `path`: what changes when a file is replaced or rewritten."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class PackedShard:
    """One packed domain folder: latents.npy as a read-only memory map (only its header is read
    here) and the row names of index.json. Pickled (a loader worker under spawn), it travels as its
    folder and maps the file again: the data never goes through a pipe. `check_unchanged` before
    each read of the map: a file truncated under a map kills the reader with SIGBUS."""

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
        self.identity = file_identity(self.path)  # before the map: a change after it is seen
        self.array = open_packed_array(self.path)  # [N, C, H, W] np.memmap
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
        """The map as a CPU tensor [N, C, H, W] (no copy)."""
        if self._tensor is None:
            self._tensor = read_only_tensor(self.array)
        return self._tensor

    def chunks(self, rows):
        """(first row, [k, C, H, W] read-only array) for every `rows` rows in order, from a map of
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
                self.check_unchanged()  # a truncated file faults the read: name it instead
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

    def check_unchanged(self):
        """One stat: raise ShardChanged when latents.npy is no longer the file this job mapped."""
        try:
            same = file_identity(self.path) == self.identity
        except OSError:
            same = False
        if not same:
            raise ShardChanged(f"{self.path} changed while this job read it (replaced, truncated or rewritten: its "
                               "inode, size or modification time differ from when it was opened); the rows it holds "
                               "now cannot be trusted: restore it, or pack into a new folder and point data.root there")

    def __getstate__(self):
        return {"folder": self.folder, "identity": self.identity}

    def __setstate__(self, state):
        self.__init__(state["folder"])
        self.identity = state.get("identity", self.identity)  # the parent's: a change since then is seen


def changed_shard(shards):
    """The ShardChanged of the first of `shards` whose file is no longer the one mapped, else None:
    after a reader died of SIGBUS, which file was truncated under it."""
    for shard in shards:
        try:
            shard.check_unchanged()
        except ShardChanged as err:
            return err
    return None


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
    beyond OUTLIER_LIMIT). With `out` [N_total, C, H, W] (the GPU preload), each chunk is copied
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
