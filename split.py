"""Split a latent folder into a training part and a held-out part, reproducibly.

    python split.py --input ../../latent-256 --output ../../latent-256-split --val-fraction 0.1 [--seed 0]

StarGAN v2's evaluation translates a held-out split (its val set) and compares with the training
set. This writes `<output>/train/<domain>/` and `<output>/val/<domain>/` from `<input>/<domain>/`,
as hard links (no extra disk space; copies where the file system cannot link, or with --copy).
Which side a file goes to depends on --seed and its name alone (the smallest sha256 of seed, domain
and name go to val), so the split is the same on every machine, in any listing order, and a rerun
with the same arguments finds its work done. Train on `<output>/train` (data.root) and evaluate
with `evaluation.source_root` / `evaluate.py --source-root` set to `<output>/val`. Exit codes: 0
done, 2 bad input (nothing written).
"""

import argparse
import filecmp
import os
import shutil
import sys

from latents import copy_manifest, list_latent_files, path_component_problem, split_names
from runtime import InputError, atomic_write, check_writable_folder, script_main


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
    domains = [d.strip() for d in names.split(",") if d.strip()] if names else sorted(
        d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
    if not domains:
        raise InputError(f"--input {root!r} holds no domain folders")
    for d in domains:
        problem = path_component_problem(d)
        if problem:
            raise InputError(f"--domains: {d!r} is not a folder name: {problem}")
    return domains


def plan(args):
    """[(source file, destination file, part)] for every file, checked against what --output holds:
    a rerun finds its own files; a file of another split (another seed or fraction, or a domain
    that has grown so that an old file changed sides) or of other data is refused, so a held-out
    file can never be on both sides."""
    pairs = []
    for domain in domain_folders(args.input, args.domains):
        names = [os.path.basename(p) for p in list_latent_files(os.path.join(args.input, domain))]
        train, val = split_names(names, args.val_fraction, args.seed, key=domain)
        for part, chosen in (("train", train), ("val", val)):
            pairs += [(os.path.join(args.input, domain, n), os.path.join(args.output, part, domain, n), part)
                      for n in chosen]
            folder = os.path.join(args.output, part, domain)
            extra = sorted(set(os.listdir(folder)) - set(chosen)) if os.path.isdir(folder) else []
            if extra:
                raise InputError(f"{os.path.join(folder, extra[0])} is not in this split's {part} part ({len(extra)} "
                                 "such file(s)): --output holds another split (another --seed or --val-fraction, or "
                                 "the data changed); choose an empty folder")
    for src, dst, _ in pairs:
        if os.path.lexists(dst) and not (os.path.isfile(dst) and filecmp.cmp(src, dst, shallow=False)):
            raise InputError(f"{dst} exists and is not {src}: --output holds another split; choose an empty folder")
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
    with open(src, "rb") as f:
        atomic_write(dst, lambda out: shutil.copyfileobj(f, out, 1 << 20))
    return "copied"


def run(args):
    pairs = plan(args)
    for folder in sorted({os.path.dirname(dst) for _, dst, _ in pairs}):
        check_writable_folder(folder, "--output")
    done = {"linked": 0, "copied": 0, "kept": 0}
    for src, dst, _ in pairs:
        done[place(src, dst, args.copy)] += 1
    copy_manifest(args.input, *(os.path.join(args.output, part) for part in ("train", "val")))  # its VAE's record
    val = sum(part == "val" for _, _, part in pairs)
    print(f"{len(pairs) - val} training and {val} held-out latents in {args.output}/train and {args.output}/val "
          f"(seed {args.seed}, fraction {args.val_fraction:g}): {done['linked']} linked, {done['copied']} copied, "
          f"{done['kept']} already there")
    return 0


def main(argv=None):
    """Exit codes: 0 done, 2 bad input (nothing written), 130 Ctrl-C."""
    return script_main("split.py", parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
