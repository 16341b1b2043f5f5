"""Per-file latent folders -> packed ones: each domain's latents as one memory-mapped latents.npy
[N, 4, H, W] plus index.json, which starts training in seconds however many latents there are.

    python pack.py ../../latent-256 ../../latent-256-packed
    python pack.py ../../latent-256 ../../latent-256-packed --domains photo monet --dtype float32

Rows keep the folder's file order, so the packed copy gives the same batches as the folder
(float16, the default, rounds each value to float16: see docs/data.md). Every file is checked as
training would check it; a bad file is named and its domain is left unfinished. Interrupted, a rerun
continues where it stopped; a domain already packed with the same files is skipped.
"""

import argparse
import sys

from packing import PACK_DTYPES, pack_folders
from runtime import run_script


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Pack per-file latent folders (one folder per domain of *.pt / *.npy) "
                                            "into one latents.npy + index.json per domain.")
    p.add_argument("src", help="data root holding one folder of latent files per domain")
    p.add_argument("dst", help="data root for the packed copy (created if missing); point data.root here")
    p.add_argument("--domains", nargs="+", default=None, help="domain folders to pack (default: every folder of SRC)")
    p.add_argument("--dtype", choices=tuple(PACK_DTYPES), default="float16",
                   help="stored precision: float16 halves memory and start-up reads (values are rounded to float16)")
    return p.parse_args(argv)


def run(args):
    pack_folders(args.src, args.dst, args.domains, args.dtype)
    return 0


def main(argv=None):
    return run_script("pack.py", run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
