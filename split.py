"""Split a latent folder into a training part and a held-out part, reproducibly.

    python split.py --input ../../latent-256 --output ../../latent-256-split --val-fraction 0.1 [--seed 0]

StarGAN v2's evaluation translates a held-out split (its val set) and compares with the training
set. This writes `<output>/train/<domain>/` and `<output>/val/<domain>/` from `<input>/<domain>/`,
as hard links (no extra disk space; copies where the file system cannot link, or with --copy).
Which side a file goes to depends on --seed and its name alone (the smallest sha256 of seed, domain
and name go to val), so the split is the same on every machine, in any listing order, and a rerun
with the same arguments finds its work done. --output must lie outside --input (its train/ and val/
would otherwise become folders of the data they split), and no file of --input is ever replaced. A
split that fails half-way (a file that cannot be read, a full disk) removes what it wrote. Train on
`<output>/train` (data.root) and evaluate with `evaluation.source_root` / `evaluate.py --source-root`
set to `<output>/val`. Exit codes: 0 done, 2 bad input, 1 a failed write (nothing written either way).
"""

import argparse
import contextlib
import filecmp
import os
import shutil
import sys

from arguments import check_not_inputs
from latents import copy_manifest, list_latent_files, manifest_path, path_component_problem, shown_name, split_names
from runtime import InputError, atomic_write, check_writable_folder, remove_if_empty, script_main

PARTS = ("train", "val")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Split per-domain latent folders into train/ and val/ (held out), "
                                            "reproducibly, as hard links.")
    p.add_argument("--input", required=True, help="data root: one folder of latents (*.pt, *.npy) per domain")
    p.add_argument("--output", required=True, help="where train/<domain>/ and val/<domain>/ are written")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="fraction of each domain held out (default 0.1; at least 1 file, at most all but 1)")
    p.add_argument("--seed", type=int, default=0, help="which files are held out depends on it and the names alone")
    p.add_argument("--domains", default=None,
                   help="comma-separated domain folders to split (default: every folder under --input)")
    p.add_argument("--copy", action="store_true", help="copy the files instead of hard-linking them")
    args = p.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        p.error(f"--val-fraction {args.val_fraction}: expected a number between 0 and 1")
    return args


def domain_folders(root, names):
    """The domain folders to split: --domains, else every folder under `root` (hidden ones skipped)."""
    if not os.path.isdir(root):
        raise InputError(f"--input {root!r} is not a folder")
    try:
        entries = [] if names else os.listdir(root)
    except OSError as e:
        raise InputError(f"--input {root!r} cannot be read ({e.strerror or e})") from None
    domains = [d.strip() for d in names.split(",") if d.strip()] if names else sorted(
        d for d in entries if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
    if not domains:
        raise InputError(f"--input {root!r} holds no domain folders")
    for d in domains:
        problem = path_component_problem(d)
        if problem:
            raise InputError(f"--domains: {d!r} is not a folder name: {problem}")
    return domains


def check_apart(args):
    """--output outside --input, and --input inside neither of --output's parts: written into the
    data it splits, train/ and val/ would become domain folders of it, and the parts would hold
    the inputs themselves."""
    source, output = os.path.realpath(args.input), os.path.realpath(args.output)
    if os.path.commonpath([source, output]) == source:
        where = "is" if output == source else "is inside"
        raise InputError(f"--output {args.output!r} {where} --input {args.input!r}: its train/ and val/ would become "
                         "folders of the data they split; choose a folder outside --input")
    for part in PARTS:
        folder = os.path.realpath(os.path.join(args.output, part))
        if os.path.commonpath([source, folder]) == folder:
            raise InputError(f"--input {args.input!r} is inside the {part}/ part of --output {args.output!r} (it "
                             f"leads to {folder!r}): a split never writes among its inputs; choose another --output")


def listed_names(folder):
    """The names in an output folder (none when it does not exist); InputError when it cannot be read."""
    if not os.path.isdir(folder):
        return []
    try:
        return os.listdir(folder)
    except OSError as e:
        raise InputError(f"--output's folder {shown_name(folder, None)} cannot be read ({e.strerror or e})") from None


def plan(args):
    """[(source file, destination file, part)] for every file, checked against what --output holds:
    a rerun finds its own files; a file of another split (another seed or fraction, or a domain
    that has grown so that an old file changed sides) or of other data is refused, so a held-out
    file can never be on both sides."""
    check_apart(args)
    pairs = []
    for domain in domain_folders(args.input, args.domains):
        names = [os.path.basename(p) for p in list_latent_files(os.path.join(args.input, domain))]
        train, val = split_names(names, args.val_fraction, args.seed, key=domain)
        for part, chosen in (("train", train), ("val", val)):
            pairs += [(os.path.join(args.input, domain, n), os.path.join(args.output, part, domain, n), part)
                      for n in chosen]
            folder = os.path.join(args.output, part, domain)
            extra = sorted(set(listed_names(folder)) - set(chosen))
            if extra:
                raise InputError(f"{shown_name(os.path.join(folder, extra[0]), None)} is not in this split's {part} "
                                 f"part ({len(extra)} "
                                 "such file(s)): --output holds another split (another --seed or --val-fraction, or "
                                 "the data changed); choose an empty folder")
    for src, dst, _ in pairs:
        if os.path.lexists(dst) and not (os.path.isfile(dst) and filecmp.cmp(src, dst, shallow=False)):
            raise InputError(f"{shown_name(dst, None)} exists and is not {shown_name(src, None)}: --output holds "
                             "another split; choose an empty folder")
    new = [(dst, "--output") for _, dst, _ in pairs if not os.path.lexists(dst)]  # the rest are kept as they are
    manifests = [(manifest_path(os.path.join(args.output, part)), "--output") for part in PARTS]
    check_not_inputs([(args.output, "--output"), *manifests, *new],
                     [manifest_path(args.input), *(src for src, _, _ in pairs)])
    return pairs


def place(src, dst, copy):
    """Hard-link `src` at `dst` (a copy, written atomically, where the file system cannot link or
    when asked)."""
    if os.path.exists(dst):
        return "kept"
    if not copy:
        try:
            os.link(src, dst)
            return "linked"
        except OSError:  # another file system, or links not supported
            pass
    try:
        f = open(src, "rb")
    except OSError as e:
        raise InputError(f"cannot read {shown_name(src, None)} ({e.strerror or e}): every file of --input must be "
                         "readable to be copied; nothing was written") from None
    with f:
        atomic_write(dst, lambda out: shutil.copyfileobj(f, out, 1 << 20))
    return "copied"


def new_folders(folder):
    """`folder` and those of its parents that do not exist yet, outermost first."""
    missing = []
    while folder and not os.path.isdir(folder) and folder != os.path.dirname(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing[::-1]


def place_all(args, pairs):
    """Every pair placed and the manifests copied, or, when anything fails (a file that cannot be
    read, a full disk, Ctrl-C), what this run made removed again: no half-made split."""
    made_files, made_folders, done = [], [], {"linked": 0, "copied": 0, "kept": 0}
    try:
        for folder in sorted({os.path.dirname(dst) for _, dst, _ in pairs}):
            made_folders += new_folders(os.path.abspath(folder))
            check_writable_folder(folder, "--output")
        for src, dst, _ in pairs:
            how = place(src, dst, args.copy)
            made_files += [dst] if how != "kept" else []
            done[how] += 1
        copy_manifest(args.input, *(os.path.join(args.output, part) for part in PARTS))  # its VAE's record
    except BaseException:
        for path in reversed(made_files):
            with contextlib.suppress(OSError):
                os.remove(path)
        for folder in reversed(made_folders):
            remove_if_empty(folder)
        raise
    return done


def run(args):
    pairs = plan(args)
    done = place_all(args, pairs)
    val = sum(part == "val" for _, _, part in pairs)
    output = shown_name(args.output, None)
    print(f"{len(pairs) - val} training and {val} held-out latents in {output}/train and {output}/val "
          f"(seed {args.seed}, fraction {args.val_fraction:g}): {done['linked']} linked, {done['copied']} copied, "
          f"{done['kept']} already there")
    return 0


def main(argv=None):
    """Exit codes: 0 done, 2 bad input, 1 a failed write (nothing written either way), 130 Ctrl-C."""
    return script_main("split.py", parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
