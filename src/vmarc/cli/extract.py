"""vmarc extract: every disk (or the chosen ones) plus the VM metadata into a new directory."""

from __future__ import annotations

from .. import open as open_archive
from ..ops.extract import extract
from .common import (add_progress_arg, add_salvage_args, add_source_args, add_sync_arg,
                     add_verify_arg)


def add_parser(sub):
    p = sub.add_parser("extract", help="write every disk and the VM metadata into a new directory")
    add_source_args(p)
    p.add_argument("directory", help="directory to create (must not exist)")
    p.add_argument("-O", dest="out_format", default="raw", choices=["raw"])
    p.add_argument("--disk", action="append", dest="disks",
                   help="only this disk (id, name, device or index); may be repeated")
    add_salvage_args(p)
    add_verify_arg(p)
    add_progress_arg(p)
    add_sync_arg(p)
    p.set_defaults(run=run)


def run(args) -> int:
    with open_archive(args.source, args.fmt) as archive:
        written = extract(archive, args.directory, args.disks, verify=args.verify,
                          progress=args.progress, sync=args.sync, salvage=args.salvage,
                          report=args.report)
    for what, fname in written.items():
        print(f"{fname}\t{what}")
    return 0
