"""The per-file latent format: one raw VAE latent [C, H, W] per `.pt` or `.npy` file, one folder
per domain under the data root (a packed domain folder holds `latents.npy` + `index.json` instead,
see packing.py). The latent constants, the rules for file names, reading and writing one file with
its checks, the outlier report and the content hash that names a set of latents in caches.

Files are untrusted input: `.pt` goes through `torch.load(weights_only=True)` (never a full
unpickle, so a hostile pickle cannot run code) and `.npy` through `np.load(allow_pickle=False)`.
Anything unexpected is an InputError naming the file by its full path.
"""

import dataclasses
import hashlib
import io
import json
import math
import os
import re
import reprlib
import warnings
import zipfile

import numpy as np
import torch

from model import LATENT_CHANNELS, MIN_LATENT_SIZE
from runtime import InputError, atomic_write

LATENT_SUFFIXES = (".pt", ".npy")


# Raw SD1.5 latents have a standard deviation of about 5.5 (1 / 0.18215) and in practice stay within a
# few tens. A max |value| above 1e3 (about 180 standard deviations) is no VAE latent: a file scaled
# twice, saved as pixels, or corrupted. Such a value is finite, so the finiteness check misses it, yet
# it drives activations and gradients to inf and every step that draws it is skipped.
OUTLIER_LIMIT = 1e3

MAX_LISTED = 100  # files (or packed rows) named in one error; the count says how many in all

PACKED_ARRAY = "latents.npy"

PACKED_INDEX = "index.json"


def first_lines(lines, total):
    """`lines` (the first of `total`), with a last line saying how many were left out."""
    return lines + ([f"... and {total - len(lines)} more"] if total > len(lines) else [])


def listed(lines):
    """Lines for an error message: the first MAX_LISTED, and a count of the rest."""
    lines = list(lines)
    return "\n  ".join(first_lines(lines[:MAX_LISTED], len(lines)))


def file_stem(path):
    """A file's name without its folder and suffix: what latents and outputs made from it are named after."""
    return os.path.splitext(os.path.basename(path))[0]


def path_component_problem(name):
    """Why `name` cannot be one path component (a domain name becomes a folder and file names in
    every tool), or None. Refused: empty, '.', '..', separators, NUL and other control characters."""
    if not isinstance(name, str) or not name:
        return "expected a non-empty string"
    if name in (".", ".."):
        return "'.' and '..' are not folder names"
    if "/" in name or "\\" in name:
        return "a name may not contain '/' or '\\'"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "a name may not contain NUL or other control characters"
    if len(name.encode("utf-8", "surrogatepass")) > 255:
        return "a name may be at most 255 bytes"
    return None


def is_packed(folder):
    return os.path.exists(os.path.join(folder, PACKED_ARRAY)) or os.path.exists(os.path.join(folder, PACKED_INDEX))


def list_latent_files(folder):
    """Sorted full paths of the `*.pt` / `*.npy` files in `folder`; errors name the folder."""
    if not os.path.isdir(folder):
        root = os.path.dirname(folder)
        found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))) \
            if os.path.isdir(root) else None
        hint = f"; folders in {root}: {found}" if found is not None else f"; {root} does not exist either"
        raise FileNotFoundError(
            f"domain folder not found: {folder} (expected one folder per domain in {root}, "
            f"holding *.pt or *.npy latents{hint})")
    if is_packed(folder):  # its latents.npy is no single latent
        raise InputError(f"{folder} holds packed latents ({PACKED_ARRAY} + {PACKED_INDEX}), not one file per latent")
    try:
        names = os.listdir(folder)
    except OSError as e:
        raise InputError(f"cannot read the domain folder {folder} ({e.strerror or e})") from None
    files = sorted(name for name in names
                   if name.endswith(LATENT_SUFFIXES) and os.path.isfile(os.path.join(folder, name)))
    if not files:
        raise InputError(f"domain folder is empty: {folder} (expected *.pt or *.npy latent files "
                         f"of shape [C, H, W] or [1, C, H, W])")
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
    # surrogateescape: a name that is not UTF-8 hashes as its own bytes
    rank = sorted(names, key=lambda name: hashlib.sha256(f"{seed}:{key}:{name}".encode("utf-8", "surrogateescape"))
                  .hexdigest())
    val = set(rank[:count])
    return [n for n in names if n not in val], [n for n in names if n in val]


def save_latent(latent, path):
    """One raw latent [C, H, W] to `path` (.pt, or .npy by suffix), atomically. A .pt goes through a
    buffer so its bytes do not depend on the file's name (same tensor, same bytes in any folder), and
    is cloned so a row of a batch never saves the whole batch's storage."""
    latent = latent.detach().cpu()
    if path.endswith(".npy"):
        return atomic_write(path, lambda f: np.save(f, latent.numpy(), allow_pickle=False))
    buffer = io.BytesIO()
    torch.save(latent.clone(), buffer)
    return atomic_write(path, lambda f: f.write(buffer.getvalue()))


def write_latent_folders(root, latents, stem="{index:05d}", suffix=".pt"):
    """{domain: raw latents [N, C, H, W]} -> root/<domain>/<stem><suffix>, one file per latent, the
    layout MultiDomainLatentDataset reads. `stem` is formatted with `domain` and `index`. Returns
    the paths written, in order."""
    paths = []
    for domain, batch in latents.items():
        folder = os.path.join(str(root), domain)
        os.makedirs(folder, exist_ok=True)
        for index, latent in enumerate(batch):
            paths.append(save_latent(latent, os.path.join(folder, stem.format(domain=domain, index=index) + suffix)))
    return paths


MAX_LATENT_CHANNELS = 256  # far beyond any VAE (SD1.5 4, SD3 / FLUX.1 16, DC-AE 32 to 128)


def latent_expectation(channels):
    """What a latent file must hold, for error messages."""
    return (f"expected a float tensor of shape [{channels}, H, W] or [1, {channels}, H, W] (a VAE latent of "
            f"{channels} channels)")


def check_latent_shape(path, shape, channels=LATENT_CHANNELS):
    """[C, H, W] or [1, C, H, W] with C = `channels` and MIN_LATENT_SIZE <= H, W <= MAX_LATENT_SIZE,
    else InputError."""
    shape = list(shape)
    expected = latent_expectation(channels)
    shown = shown_name(path, None)  # a name with a control character, escaped
    if len(shape) == 4 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 3 or shape[0] != channels:
        raise InputError(f"{shown} has shape {shape}; {expected}")
    if not all(MIN_LATENT_SIZE <= side <= MAX_LATENT_SIZE for side in shape[1:]):
        raise InputError(f"{shown} has shape {shape}: a latent's H and W must be from {MIN_LATENT_SIZE} (the "
                         f"networks halve them {MIN_LATENT_SIZE.bit_length() - 1} times) to {MAX_LATENT_SIZE}")


def load_latent_file(path, channels=LATENT_CHANNELS):
    """One latent file -> CPU float tensor [C, H, W] (dtype as stored, C = `channels`); InputError
    naming `path`.

    Shape, size and dtype are checked here, where files enter the program (a .npy's from its header,
    before its data is read); finiteness is checked once on the assembled float32 tensor (one
    vectorised pass, which also catches float64 values that overflow float32).
    """
    expected = latent_expectation(channels)
    shown = shown_name(path, None)  # a name with a control character, escaped
    if path.endswith(".npy"):
        try:  # memory-mapped: the header's shape is checked before a byte of data is read
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as e:  # object arrays, pickles, truncated or garbage bytes
            raise InputError(f"cannot read {shown} as a .npy array ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else 'unreadable'}); {expected}") from None
        if not isinstance(array, np.ndarray):  # e.g. an .npz archive renamed to .npy
            raise InputError(f"{shown} holds {type(array).__name__}, not a single array; {expected}")
        if not np.issubdtype(array.dtype, np.floating):
            raise InputError(f"{shown} has dtype {array.dtype}; {expected}")
        check_latent_shape(path, array.shape, channels)
        with np.errstate(over="ignore"):  # float64 beyond float32's range: caught as inf below
            latent = torch.from_numpy(np.array(array, dtype=np.float32))
    else:
        try:
            latent = load_plain(path)
        except Exception as e:  # weights_only refuses any pickle that is not plain tensor data
            raise InputError(f"cannot load {shown} with torch.load(weights_only=True): {load_error_reason(e)}; "
                             f"{expected}, saved with torch.save(tensor)") from None
        if not isinstance(latent, torch.Tensor):
            raise InputError(f"{shown} holds a {type(latent).__name__}, not a tensor; {expected}")
        if not plain_tensor(latent):
            kind = "a nested tensor" if latent.is_nested else f"a {latent.layout} tensor" \
                if latent.layout != torch.strided else f"a tensor on the {latent.device.type} device, without data"
            raise InputError(f"{shown} holds {kind}; {expected}")
        if not latent.is_floating_point() or latent.is_complex():
            raise InputError(f"{shown} has dtype {latent.dtype} and layout {latent.layout}; {expected}")
        check_latent_shape(path, latent.shape, channels)
        latent = latent.detach()
    return latent.reshape(latent.shape[-3:])  # [C, H, W]


def read_latent(path, channels=LATENT_CHANNELS):
    """One latent file to translate: float32 [C, H, W], finite, no outlier; InputError naming the
    file otherwise. (Training checks all its data at once instead.)"""
    latent = load_latent_file(path, channels).float()  # [C, H, W]
    if not torch.isfinite(latent).all():
        raise InputError(f"{path} holds non-finite values (NaN or inf)")
    found = outliers(latent[None], [path])
    if found:
        raise InputError(outlier_message(outlier_lines(found), len(found)) + "\nRe-encode it, or use another file")
    return latent


def outliers(latents, names):
    """[(name, max |value|)] of the latents [N, C, H, W] beyond OUTLIER_LIMIT: vectorised reductions,
    no copy of the data (abs() would allocate one as large as all the latents)."""
    flat = latents.flatten(1)  # [N, C*H*W], a view
    peak = torch.maximum(flat.amax(dim=1), flat.amin(dim=1).neg())  # [N] max |value|
    rows = (peak > OUTLIER_LIMIT).nonzero().flatten().tolist()
    return [(names[r], peak[r].item()) for r in rows]


def outlier_lines(found):
    """One line per (name, peak) of `found`, the first MAX_LISTED of them."""
    return [f"{shown_name(name)}: max |value| {peak:.3g}" for name, peak in found[:MAX_LISTED]]


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

MAX_LATENT_SIZE = 1024  # latent H and W: an 8192 px image for an SD VAE


def plain_tensor(value):
    """A dense CPU tensor: what torch.load(map_location="cpu") gives for any tensor run.py saved.
    Meta-device and nested tensors load too, but have no data to check (or no shape)."""
    return isinstance(value, torch.Tensor) and not value.is_nested and value.layout == torch.strided \
        and value.device.type == "cpu"


class ArchiveError(ValueError):
    """A file that is not a torch.save zip archive of stored records; the message says why."""


def check_archive(path):
    """torch.save writes a zip archive whose records are stored, not compressed. Refuse anything
    else before torch.load reads it: a compressed record can inflate far beyond the file's size (an
    8 MB file into 8 GiB, all allocated before any check), and the legacy format allocates whatever
    sizes it declares. Stored records whose declared sizes fit the file bound torch.load's memory
    by the file's own size."""
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError):
        if is_legacy_torch_file(path):
            raise ArchiveError("it is in torch's legacy format (torch.save before 1.6, or "
                               "_use_new_zipfile_serialization=False), whose storages allocate whatever sizes they "
                               "declare before any check; convert it once where you trust it: "
                               "torch.save(torch.load(OLD, weights_only=True), NEW)") from None
        raise ArchiveError("it is not a torch.save file, or a truncated or corrupted one") from None
    declared = 0
    for record in records:
        if record.compress_type != zipfile.ZIP_STORED:
            raise ArchiveError(f"its record {safe_name(record.filename)} is compressed (zip method "
                               f"{record.compress_type}); torch.save stores records uncompressed, and a compressed "
                               "one may inflate far beyond the file's size")
        declared += record.file_size
        if record.file_size != record.compress_size or declared > size:
            raise ArchiveError(f"its records declare {declared:,} bytes in a file of {size:,} bytes (a truncated "
                               "or forged archive)")


LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")  # torch.serialization.MAGIC_NUMBER


def is_legacy_torch_file(path):
    """Whether `path` starts as torch's legacy (non-zip) format does: a pickled long, its magic number."""
    try:
        with open(path, "rb") as f:
            head = f.read(14)
    except OSError:
        return False
    return head[:2] == b"\x80\x02" and head[2:4] == b"\x8a\x0a" and head[4:] == LEGACY_MAGIC


def shown_name(name, limit=80):
    """`name` as it is when printable, else escaped (`safe_name`): a file name with a newline or an
    escape sequence must not break a log line or reach the terminal raw, nor one that is not UTF-8
    (its bytes read as surrogates) crash a print. `limit=None` keeps a whole path."""
    return name if name.isprintable() else safe_name(name, limit)


def safe_name(name, limit=80):
    """`name` quoted for one log line: control characters escaped (`\\n`, `\\x1b`), a byte that is not
    UTF-8 (read as a surrogate) as itself (`\\xff`), at most `limit` characters (None: all)."""
    text = "".join(escaped_character(c) for c in name)
    cut = text if limit is None or len(text) <= limit else text[:limit - 3] + "..."
    return repr(cut) if text == name else f"'{cut}'"  # repr would double the escapes' backslashes


class BoundedRepr(reprlib.Repr):
    """reprlib's repr, which stops after a few levels and items, also for subclasses of the built-in
    containers (OrderedDict) and for ints beyond str()'s 4300 digits: a YAML alias repeated inside
    itself ("billion laughs") or a pickled list shared with itself is small on disk, but its full
    repr doubles with each level and would never end."""

    def repr1(self, x, level):
        for kind in (dict, list, tuple, set, frozenset):
            if isinstance(x, kind) and type(x) is not kind:  # reprlib dispatches on the type's name alone
                return getattr(self, f"repr_{kind.__name__}")(x, level)
        return super().repr1(x, level)

    def repr_int(self, x, level):
        if x.bit_length() > 4 * self.maxlong:  # more than maxlong digits: str() may refuse it
            return f"<an int of {x.bit_length()} bits>"
        return super().repr_int(x, level)


_REPR = BoundedRepr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 60, 60, 40
_REPR.maxdict = _REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxfrozenset = 6


def short_repr(value, limit=80):
    """A value of a config or checkpoint for one error line: a bounded repr (`BoundedRepr`), at most
    `limit` characters."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def escaped_character(c):
    if c.isprintable():
        return c
    if "\udc80" <= c <= "\udcff":  # os.fsdecode's surrogateescape of an undecodable byte
        return f"\\x{ord(c) - 0xdc00:02x}"
    return c.encode("unicode_escape").decode("ascii")


def load_plain(path, map_location="cpu"):
    """torch.load with weights_only=True: tensors and plain containers only, never a full unpickle
    (a hostile file cannot run code), after `check_archive`. torch's note on a plain pickle's
    protocol is silenced: the caller's error, with `load_error_reason`, says what is wrong in one line."""
    check_archive(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(path, map_location=map_location, weights_only=True)


def load_error_reason(err):
    """Why torch.load(weights_only=True) refused a file, in one line. torch's own message advises
    retrying with weights_only=False: wrong for a corrupt file and unsafe for a hostile one."""
    text = str(err)
    if isinstance(err, ArchiveError):
        return text
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return (f"it holds a pickled {found.group(1)}, which is refused: only tensors and plain containers load "
                "safely (unpickling anything else could run code)")
    found = re.search(r"WeightsUnpickler error: \s*(.+)", text)
    if found or "Weights only load failed" in text:
        detail = found.group(1).strip().splitlines()[0] if found else "unsupported content"
        return f"it is not a torch.save file of tensors (the weights-only unpickler stopped: {detail})"
    if "zip archive" in text or "central directory" in text:
        return "it is not a torch.save file, or a truncated or corrupted one"
    first = text.strip().splitlines()[0][:200] if text.strip() else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__

HASH_CHUNK_BYTES = 64 * 2**20  # content_hash reads this much at a time: its memory, whatever the set's size


def content_hash(tensor):
    """sha256 of a tensor's shape, dtype and bytes: identifies a real set given as tensors. Read in
    chunks of rows, so a memory-mapped set (packed latents) is never copied whole into memory."""
    t = tensor.detach()
    digest = hashlib.sha256(f"{tuple(t.shape)}{t.dtype}".encode())
    rows = max(1, HASH_CHUNK_BYTES // max(1, t[:1].numel() * t.element_size())) if t.dim() else 1
    for chunk in (t.split(rows) if t.dim() else [t]):
        digest.update(memoryview(chunk.contiguous().cpu().reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()

SD15_LATENT_SCALE = 0.18215  # the SD1.5 VAE's scaling_factor: scaled latents have roughly unit std
MAX_DOWNSAMPLE = 256  # image pixels per latent position: 8 for the SD VAEs, 32 to 128 for DC-AE
MAX_FACTOR = 100.0  # |scaling_factor| and |shift_factor|: SD1.5 0.18215, SDXL 0.13025, SD3 1.5305


@dataclasses.dataclass(frozen=True)
class LatentSpace:
    """A VAE's latent space as the networks see it. Files hold raw latents; the networks see
    `z = (raw - shift_factor) * scaling_factor` (diffusers' convention: SD3 and FLUX.1 have a shift,
    SD1.5 and SDXL none), and `raw = z / scaling_factor + shift_factor` goes back. `downsample`:
    image pixels per latent position along a side (8 for the SD VAEs, 32 for a DC-AE f32)."""

    channels: int = LATENT_CHANNELS
    scaling_factor: float = SD15_LATENT_SCALE
    shift_factor: float = 0.0
    downsample: int = 8

    def normalize(self, raw):
        """Raw latents [B, C, H, W] -> what the networks see (no subtraction pass when there is no shift:
        the trainer calls this on every batch)."""
        return (raw - self.shift_factor) * self.scaling_factor if self.shift_factor else raw * self.scaling_factor

    def denormalize(self, z):
        """What the networks output -> raw latents, as the VAE decodes them."""
        return z / self.scaling_factor + self.shift_factor if self.shift_factor else z / self.scaling_factor

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data):
        return cls(int(data["channels"]), float(data["scaling_factor"]), float(data["shift_factor"]),
                   int(data["downsample"]))

    @classmethod
    def from_vae(cls, vae):
        """The space of a diffusers VAE, from its config: AutoencoderKL (`block_out_channels`: one
        halving per block but the last; `shift_factor` None means 0), AutoencoderDC and
        AutoencoderTiny (`encoder_block_out_channels`, the same rule: diffusers' own
        `spatial_compression_ratio` for DC-AE)."""
        return cls.from_config(vae.config)

    @classmethod
    def from_config(cls, config):
        """The space of a diffusers VAE's config (a dict, or the model's `config`); see `from_vae`."""
        blocks = config.get("encoder_block_out_channels") or config["block_out_channels"]
        return cls(int(config["latent_channels"]), float(config.get("scaling_factor") or 1.0),
                   float(config.get("shift_factor") or 0.0), 2 ** (len(blocks) - 1))

    def describe(self):
        return (f"{self.channels} channels, scaling_factor {self.scaling_factor:g}, shift_factor "
                f"{self.shift_factor:g}, {self.downsample}x downsampling")

    def differences(self, other, mine, theirs, keys=None):
        """'key: <mine> a vs <theirs> b' for each number of `keys` (default: all) that differs (floats
        to 1e-6, relative)."""
        out = []
        for key, a in self.to_dict().items():
            if keys is not None and key not in keys:
                continue
            b = getattr(other, key)
            if not (a == b if isinstance(a, int) else math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)):
                out.append(f"{key}: {mine} {a:g} vs {theirs} {b:g}")
        return out


SD15 = LatentSpace()  # SD1.5's VAE: 4 channels, 0.18215, no shift, 8x down
# What a latent means: a VAE must agree on these to decode a checkpoint's latents. Its downsampling
# factor only sizes the pictures (read from the VAE itself wherever pictures are made).
VALUE_KEYS = ("channels", "scaling_factor", "shift_factor")


def check_same_space(space, other, mine, theirs, what="", keys=None):
    """InputError, one line starting with `what`, naming both values of every number (of `keys`,
    default all) that differs."""
    diff = space.differences(other, mine, theirs, keys)
    if diff:
        raise InputError(f"{what}the {mine} and the {theirs} have different latent spaces ({'; '.join(diff)}): "
                         "latents of one VAE decode wrongly with another's numbers")


def check_root_space(root, space, what="", theirs="checkpoint"):
    """InputError when a data root's manifest (if it has one) names another latent space than `space`."""
    found = read_manifest(root)
    if found is not None:
        check_same_space(found[0], space, f"data ({manifest_path(root)})", theirs, what, VALUE_KEYS)


# The data root's record of the VAE that encoded it (encode.py writes it, pack.py copies it, run.py
# reads it). Untrusted input like every file: its size, keys, types and ranges are checked.
MANIFEST_NAME = "latent_space.json"
MANIFEST_VERSION = 1
MAX_MANIFEST_BYTES = 64 * 1024
MANIFEST_TEXT_KEYS = ("vae_source", "vae_subfolder", "vae_class", "vae_config_sha256", "posterior", "dtype")
MANIFEST_KEYS = ("version", "channels", "scaling_factor", "shift_factor", "downsample", "image_size") \
    + MANIFEST_TEXT_KEYS
MAX_MANIFEST_TEXT = 1000


def manifest_path(root):
    return os.path.join(str(root), MANIFEST_NAME)


def vae_config_sha256(vae):
    """sha256 of a VAE's config, its private keys (`_name_or_path`, versions) left out: the same
    VAE gives the same hash wherever it is stored."""
    public = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(public, sort_keys=True, default=str).encode()).hexdigest()


def write_manifest(root, space, **details):
    """`root/latent_space.json`: the space's numbers and `details` (MANIFEST_TEXT_KEYS, image_size)."""
    record = {"version": MANIFEST_VERSION, **space.to_dict(), **details}
    text = (json.dumps(record, indent=2) + "\n").encode("utf-8")
    check_manifest(record, manifest_path(root))
    return atomic_write(manifest_path(root), lambda f: f.write(text))


def copy_manifest(src_root, *dst_roots):
    """A data root's manifest (checked) into the roots made from it (packed, split); returns
    read_manifest(src_root)."""
    found = read_manifest(src_root)
    if found is not None:
        details = {k: v for k, v in found[1].items() if k in MANIFEST_TEXT_KEYS + ("image_size",)}
        for root in dst_roots:
            write_manifest(root, found[0], **details)
    return found


def parse_file(path, parse, kind="JSON", what=None, errors=()):
    """parse(text) of the UTF-8 file at `path`: a config, a manifest, small files a user may edit.
    One InputError naming `what` (default: the path) for a file that cannot be read, bytes that are
    not UTF-8, bad syntax (ValueError, or `errors` such as yaml.YAMLError) or nesting deeper than
    Python's stack (RecursionError)."""
    what = what or path
    try:
        with open(path, encoding="utf-8") as f:
            return parse(f.read())
    except OSError as e:
        raise InputError(f"cannot read {what} ({e.strerror or e})") from None
    except (ValueError, RecursionError, *errors) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        reason = "nested deeper than Python's stack" if isinstance(e, RecursionError) else " ".join(str(e).split())
        raise InputError(f"{what} is not valid {kind} ({type(e).__name__}: {reason[:200]})") from None


def read_manifest(root):
    """(LatentSpace, record) from `root/latent_space.json`, or None when the root has none.
    InputError naming the file (and the key) for anything malformed."""
    path = manifest_path(root)
    if not os.path.isfile(path):
        return None
    if os.path.getsize(path) > MAX_MANIFEST_BYTES:
        raise InputError(f"{path} is {os.path.getsize(path):,} bytes; a latent-space manifest has at most "
                         f"{MAX_MANIFEST_BYTES:,}")
    record = parse_file(path, json.loads)
    check_manifest(record, path)
    return LatentSpace.from_dict(record), record


def check_manifest(record, path):
    """Every key of a manifest record: known, of its type, in its range; InputError naming `path` and the key."""
    def bad(key, expected):
        raise InputError(f"{path}: key {key!r} = {short_repr(record.get(key))}: expected {expected}")

    if not isinstance(record, dict):
        raise InputError(f"{path} must hold a JSON object, got {type(record).__name__}")
    unknown = sorted(str(k) for k in record if k not in MANIFEST_KEYS)
    if unknown:
        raise InputError(f"{path}: unknown key(s) {', '.join(map(repr, unknown[:10]))}; known: "
                         f"{', '.join(MANIFEST_KEYS)}")
    for key in ("version", "channels", "scaling_factor", "shift_factor", "downsample"):
        if key not in record:
            bad(key, "a value (the key is missing)")
    if not is_int(record["version"]) or record["version"] != MANIFEST_VERSION:
        bad("version", f"{MANIFEST_VERSION}")
    if not is_int(record["channels"]) or not 1 <= record["channels"] <= MAX_LATENT_CHANNELS:
        bad("channels", f"an int from 1 to {MAX_LATENT_CHANNELS}")
    if not is_int(record["downsample"]) or not 1 <= record["downsample"] <= MAX_DOWNSAMPLE:
        bad("downsample", f"an int from 1 to {MAX_DOWNSAMPLE}")
    for key, low in (("scaling_factor", 0.0), ("shift_factor", -MAX_FACTOR)):
        value = record[key]
        if not is_number(value) or not low < value <= MAX_FACTOR or (low == 0.0 and value <= 0):
            bad(key, f"a finite number in ({low:g}, {MAX_FACTOR:g}]")
    image_size = record.get("image_size")
    if image_size is not None and (not is_int(image_size) or not 1 <= image_size <= MAX_LATENT_SIZE * MAX_DOWNSAMPLE):
        bad("image_size", "null or a positive int")
    for key in MANIFEST_TEXT_KEYS:
        value = record.get(key)
        if value is not None and (not isinstance(value, str) or len(value) > MAX_MANIFEST_TEXT):
            bad(key, f"null or a string of at most {MAX_MANIFEST_TEXT} characters")


def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
