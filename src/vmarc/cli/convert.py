"""vmarc convert: one disk to raw (sparse), qcow2, VHD or VMDK, or a whole VM to VMA, XVA or OVA."""

from __future__ import annotations

import sys
import time

from ..errors import UsageError
from ..formats import open_archive
from ..ops.convert import OUTPUT_FORMATS, convert, parse_options
from ..ops.damage import elsewhere
from ..ops.pack import ARCHIVE_FORMATS
from ..settings.proxmox import BUS_SLOTS
from .common import (
    add_json_summary_arg,
    add_progress_arg,
    add_salvage_args,
    add_source_args,
    add_sync_arg,
    add_target_args,
    add_verify_arg,
    layers,
    output_entry,
    print_json,
    summary,
)


def add_parser(sub):
    p = sub.add_parser(
        "convert",
        help="write one disk as an image file, or the whole VM as "
        "a VMA or XVA archive (or - for stdout)",
    )
    add_source_args(p)
    p.add_argument(
        "output",
        help="output path, a directory (VMA/XVA: a vzdump-style or "
        "VM name is chosen), or - for stdout. A new or existing regular file is "
        "written under a temporary name and renamed into place when complete; a "
        "block device, a character device (/dev/null), a FIFO, or a symlink "
        "(its target) is written in place, never replaced",
    )
    p.add_argument(
        "-O",
        dest="out_format",
        default="raw",
        type=lambda f: {"vpc": "vhd"}.get(f, f),
        choices=OUTPUT_FORMATS + ARCHIVE_FORMATS,
        help="output format (default raw); vma, xva and ova carry the whole VM",
    )
    p.add_argument(
        "-o",
        dest="options",
        metavar="OPTS",
        help="output options, as qemu-img: "
        "subformat=dynamic|fixed (vhd); checksum=xxhash|sha1, header=v7|ustar, "
        "compress=gzip|zstd|none (xva); compress=zstd|gzip|lzop|none (vma; "
        "default from the name)",
    )
    p.add_argument(
        "--disk",
        help="disk id, name, device or index (needed with several disks; "
        "not with -O vma|xva|ova, which carry every disk)",
    )
    vm = p.add_argument_group("VM settings (-O vma)")
    vm.add_argument(
        "--storage",
        default="local-lvm",
        help="Proxmox storage the restore puts the disks on (default local-lvm)",
    )
    vm.add_argument(
        "--vmid",
        type=int,
        help="VM id in the config's volume names (default: "
        "from a vzdump-qemu-<vmid>- output name, else 100)",
    )
    vm.add_argument(
        "--bus",
        choices=sorted(BUS_SLOTS),
        help="disk bus (default scsi with "
        "virtio-scsi, sata for Windows guests, which lack virtio drivers)",
    )
    vm.add_argument(
        "--bridge",
        help="Proxmox bridge for every network interface (default: xenbrN becomes vmbrN)",
    )
    add_target_args(p)
    add_salvage_args(p)
    add_json_summary_arg(p)
    add_verify_arg(p, "chunk checksums")
    add_progress_arg(p)
    add_sync_arg(p)
    p.set_defaults(run=run)


def run(args) -> int:
    options = parse_options(args.options)
    if args.output_json == "json" and args.output == "-":
        raise UsageError("--output json prints on stdout: give an output file, not -")
    started = time.monotonic()
    stats: dict = {}

    def reopen():
        return open_archive(args.source, args.fmt, **layers(args), unsized=args.out_format == "raw")

    with reopen() as archive:
        if args.out_format in ARCHIVE_FORMATS:
            from ..ops.vmconvert import convert_vm  # on demand: the writers' imports

            if args.no_create or args.target_is_zero or args.salvage:
                raise UsageError(
                    "-n, --target-is-zero and --salvage apply to disk images "
                    "(raw, qcow2, vhd, vmdk), not to -O vma|xva|ova archives"
                )
            if args.disk:
                print(
                    "vmarc: warning: --disk ignored: -O vma|xva|ova carries every disk",
                    file=sys.stderr,
                )
            path, warnings = convert_vm(
                archive,
                args.output,
                args.out_format,
                options=options,
                storage=args.storage,
                vmid=args.vmid,
                bus=args.bus,
                bridge=args.bridge,
                verify=args.verify,
                progress=args.progress,
                sync=args.sync,
            )
            for text in warnings:
                print(f"vmarc: warning: not carried: {text}", file=sys.stderr)
            if path != args.output:
                print(f"vmarc: wrote {path}", file=sys.stderr)
            if args.output_json == "json":
                print_json(
                    "convert",
                    summary(
                        [archive],
                        [output_entry(path, None, args.out_format)],
                        started,
                        args.verify,
                        0,
                        [f"not carried: {t}" for t in warnings],
                    ),
                )
            return 0
        disk = convert(
            archive,
            args.output,
            args.out_format,
            args.disk,
            verify=args.verify,
            progress=args.progress,
            sync=args.sync,
            options=options,
            reopen=reopen,
            no_create=args.no_create,
            target_is_zero=args.target_is_zero,
            salvage=args.salvage,
            report=args.report,
            stats=stats,
        )
        if args.output_json == "json":
            warning = elsewhere(stats["checks"], [disk])
            print_json(
                "convert",
                summary(
                    [archive],
                    [output_entry(args.output, disk.id, args.out_format)],
                    started,
                    args.verify,
                    stats["data_bytes"],
                    [warning] if warning else [],
                ),
            )
    return 0
