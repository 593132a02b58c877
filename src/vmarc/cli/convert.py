"""vmarc convert: one disk of an archive or image to raw (sparse), qcow2 or VHD."""

from __future__ import annotations

from .. import open as open_archive
from ..ops.convert import OUTPUT_FORMATS, convert, parse_options
from .common import add_progress_arg, add_source_args, add_sync_arg, add_verify_arg


def add_parser(sub):
    p = sub.add_parser("convert", help="write one disk as an image file (or - for stdout)")
    add_source_args(p)
    p.add_argument("output", help="output path, or - for stdout")
    p.add_argument("-O", dest="out_format", default="raw", type=lambda f: {"vpc": "vhd"}.get(f, f),
                   choices=OUTPUT_FORMATS,
                   help="output format (default raw)")
    p.add_argument("-o", dest="options", metavar="OPTS", help="output options, as qemu-img: "
                   "subformat=dynamic|fixed (vhd)")
    p.add_argument("--parent", help="parent of a differencing VHD (instead of its locators)")
    p.add_argument("--disk", help="disk id, name, device or index (needed with several disks)")
    add_verify_arg(p, "chunk checksums")
    add_progress_arg(p)
    add_sync_arg(p)
    p.set_defaults(run=run)


def run(args) -> int:
    options = parse_options(args.options)

    def reopen():
        return open_archive(args.source, args.fmt, parent=args.parent)
    with reopen() as archive:
        convert(archive, args.output, args.out_format, args.disk, verify=args.verify,
                progress=args.progress, sync=args.sync, options=options, reopen=reopen)
    return 0
