"""vmarc extract: every disk (or the chosen ones) plus the VM metadata into a new directory."""

from __future__ import annotations

import os
import time

from ..formats import open_archive
from ..ops.damage import elsewhere
from ..ops.extract import extract
from .common import (
    add_json_summary_arg,
    add_progress_arg,
    add_salvage_args,
    add_source_args,
    add_sync_arg,
    add_verify_arg,
    layers,
    output_entry,
    print_json,
    summary,
)


def add_parser(sub):
    p = sub.add_parser("extract", help="write every disk and the VM metadata into a new directory")
    add_source_args(p)
    p.add_argument("directory", help="directory to create (must not exist)")
    p.add_argument("-O", dest="out_format", default="raw", choices=["raw"])
    p.add_argument(
        "--disk",
        action="append",
        dest="disks",
        help="only this disk (id, name, device or index); may be repeated",
    )
    add_salvage_args(p)
    add_json_summary_arg(p)
    add_verify_arg(p)
    add_progress_arg(p)
    add_sync_arg(p)
    p.set_defaults(run=run)


def run(args) -> int:
    started = time.monotonic()
    stats: dict = {}
    with open_archive(args.source, args.fmt, **layers(args)) as archive:
        written = extract(
            archive,
            args.directory,
            args.disks,
            verify=args.verify,
            progress=args.progress,
            sync=args.sync,
            salvage=args.salvage,
            report=args.report,
            stats=stats,
        )
    if args.output_json == "json":
        ids = {d.id for d in archive.disks} | {d.id for d, _ in archive.extra_streams()}
        outputs = [
            output_entry(
                os.path.join(args.directory, fname),
                what if what in ids else None,
                "raw" if what in ids else "config",
            )
            for what, fname in written.items()
        ]
        disks = [d for d in archive.disks if d.id in written]
        warning = elsewhere(stats["checks"], disks)
        print_json(
            "extract",
            summary(
                [archive],
                outputs,
                started,
                args.verify,
                stats["data_bytes"],
                [warning] if warning else [],
            ),
        )
        return 0
    for what, fname in written.items():
        print(f"{fname}\t{what}")
    return 0
