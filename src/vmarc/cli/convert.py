"""vmarc convert: one disk of an archive to a disk image (raw, sparse)."""

from __future__ import annotations

from .. import open as open_archive
from ..ops.convert import OUTPUT_FORMATS, convert
from .common import add_progress_arg, add_source_args, add_sync_arg


def add_parser(sub):
    p = sub.add_parser("convert", help="write one disk as an image file (or - for stdout)")
    add_source_args(p)
    p.add_argument("output", help="output path, or - for stdout")
    p.add_argument("-O", dest="out_format", default="raw", choices=OUTPUT_FORMATS,
                   help="output format (default raw)")
    p.add_argument("--disk", help="disk id, name, device or index (needed with several disks)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="do not check chunk checksums on the way")
    add_progress_arg(p)
    add_sync_arg(p)
    p.set_defaults(run=run)


def run(args) -> int:
    with open_archive(args.source, args.fmt) as archive:
        convert(archive, args.output, args.out_format, args.disk, verify=args.verify,
                progress=args.progress, sync=args.sync)
    return 0
