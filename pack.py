"""Per-file latent folders -> packed ones: each domain's latents as one memory-mapped latents.npy
[N, C, H, W] plus index.json, which starts training in seconds however many latents there are.

    python pack.py ../../latent-256 ../../latent-256-packed
    python pack.py ../../latent-256 ../../latent-256-packed --domains photo monet --dtype float32

Rows keep the folder's file order, so the packed copy gives the same batches as the folder
(float16, the default, rounds each value to float16: see docs/data.md). Every file of every domain
is checked as training would check it; a bad file anywhere is named, with every other one, and no
domain is packed. Interrupted, a rerun continues where it stopped; a domain already packed with the
same files is skipped. DST must be a folder that is none of SRC's files. Exit codes: 0 done, 2 bad
input (a file, a folder or a flag), 1 a failed write.
"""

import argparse
import contextlib
import os
import sys

from arguments import check_not_inputs
from latents import LATENT_SUFFIXES, PACKED_ARRAY, PACKED_INDEX, manifest_path
from packing import PACK_DTYPES, PARTIAL_LOG, pack_folders, source_domains
from runtime import output_folder, run_script


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Pack per-file latent folders (one folder per domain of *.pt / *.npy) "
                                            "into one latents.npy + index.json per domain.")
    p.add_argument("src", help="data root holding one folder of latent files per domain")
    p.add_argument("dst", help="data root for the packed copy (created if missing); point data.root here")
    p.add_argument("--domains", nargs="+", default=None, help="domain folders to pack (default: every folder of SRC)")
    p.add_argument("--dtype", choices=tuple(PACK_DTYPES), default="float16",
                   help="stored precision: float16 halves memory and start-up reads (values are rounded to float16)")
    return p.parse_args(argv)


def source_files(src, domains):
    """The files pack.py reads: the root's manifest and every latent file of the domains (a folder
    that cannot be listed is named by the packing itself)."""
    files = [manifest_path(src)]
    for domain in domains:
        with contextlib.suppress(OSError):
            files += [os.path.join(src, domain, name) for name in os.listdir(os.path.join(src, domain))
                      if name.endswith(LATENT_SUFFIXES)]
    return files


def planned_outputs(dst, domains):
    """(path, flag) of DST and every file pack.py may write there."""
    names = (PACKED_ARRAY, PACKED_INDEX, PARTIAL_LOG)
    return [(dst, "dst"), (manifest_path(dst), "dst")] + [
        (os.path.join(dst, domain, name), "dst") for domain in domains for name in ("", *names)]


def run(args):
    src, dst = os.path.expanduser(args.src), os.path.expanduser(args.dst)
    domains = source_domains(src, args.domains)
    check_not_inputs(planned_outputs(dst, domains), source_files(src, domains))  # before any work
    with output_folder(dst, "dst"):  # a file in the way or a folder that cannot be written: one line
        pack_folders(src, dst, domains, args.dtype)
    return 0


def main(argv=None):
    return run_script("pack.py", run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
