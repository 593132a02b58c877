"""vmarc create: a new VMA or XVA archive from disk images (and config files)."""

from __future__ import annotations

import sys
import time

from ..errors import UsageError
from ..ops.convert import parse_options
from ..ops.create import create
from ..ops.pack import ARCHIVE_FORMATS as CREATE_FORMATS
from .common import (
    add_json_summary_arg,
    add_progress_arg,
    add_sync_arg,
    add_verify_arg,
    output_entry,
    print_json,
    summary,
)


def name_path(text: str) -> tuple[str | None, str]:
    """NAME=PATH, or just PATH (the name is then chosen by position)."""
    name, sep, path = text.partition("=")
    return (name, path) if sep and name and "/" not in name else (None, text)


def add_parser(sub):
    p = sub.add_parser("create", help="write a new archive (VMA or XVA) from disk images")
    p.add_argument(
        "output",
        help="archive to write (.vma, .vma.zst, .vma.gz, .vma.lzo; "
        ".xva, .xva.gz, .xva.zst) or - for stdout",
    )
    p.add_argument(
        "-O", dest="out_format", required=True, choices=CREATE_FORMATS, help="archive format"
    )
    p.add_argument(
        "--disk",
        dest="disks",
        action="append",
        type=name_path,
        required=True,
        metavar="NAME=PATH",
        help="a disk: its slot for VMA (scsi0, virtio1, "
        "drive-sata0...), its label for XVA (slots xvda, xvdb... in the order "
        "given), and an image in any format vmarc reads; repeat for more disks",
    )
    p.add_argument(
        "--config",
        dest="configs",
        action="append",
        type=name_path,
        default=[],
        metavar="NAME=FILE",
        help="a config blob (qemu-server.conf, qemu-server.fw); repeat for more",
    )
    p.add_argument("--name", help="VM name (default vm)")
    p.add_argument("--memory", type=int, metavar="MiB", help="VM memory in MiB (default 1024)")
    p.add_argument("--cpus", type=int, metavar="N", help="vCPUs (default 1)")
    p.add_argument(
        "-o",
        dest="options",
        metavar="OPTS",
        help="XVA options: "
        "checksum=xxhash|sha1 (sha1 for hosts older than Citrix Hypervisor 8.1), "
        "header=v7|ustar; compress=gzip|zstd|none (also VMA)",
    )
    p.add_argument(
        "-f",
        "--format",
        dest="fmt",
        help="input format of the disks "
        "(found by content if omitted; raw only with -f raw or a .raw/.img name)",
    )
    p.add_argument(
        "--compress",
        choices=["auto", "none", "zstd", "gzip", "lzop"],
        default="auto",
        help="compression (default: from the output name)",
    )
    add_json_summary_arg(p)
    add_verify_arg(p, "the inputs' checksums")
    add_progress_arg(p)
    add_sync_arg(p)
    p.set_defaults(run=run)


def run(args) -> int:
    compression = None if args.compress == "none" else args.compress
    if args.output_json == "json" and args.output == "-":
        raise UsageError("--output json prints on stdout: give an output file, not -")
    started = time.monotonic()
    stats: dict = {}
    _, warnings = create(
        args.output,
        args.disks,
        args.configs,
        args.out_format,
        fmt=args.fmt,
        compression=compression,
        verify=args.verify,
        progress=args.progress,
        sync=args.sync,
        name=args.name,
        memory_mib=args.memory,
        cpus=args.cpus,
        options=parse_options(args.options),
        stats=stats,
    )
    for text in warnings:
        print(f"vmarc: warning: {text}", file=sys.stderr)
    if args.output_json == "json":
        print_json(
            "create",
            summary(
                stats["archives"],
                [output_entry(args.output, None, args.out_format)],
                started,
                args.verify,
                stats["data_bytes"],
                warnings,
            ),
        )
    return 0
