"""vmarc map: where each disk's data lies (qemu-img map's JSON, or a dmsetup table)."""

from __future__ import annotations

import json
import sys

from ..access import MappedDisk, open_disks
from ..errors import UsageError
from ..model import LOST, ZERO
from .common import add_random_access_args, layers

SECTOR = 512


def add_parser(sub):
    p = sub.add_parser(
        "map",
        help="show where a disk's data lies (qemu-img map JSON, or a "
        "device-mapper table over an uncompressed archive)",
    )
    add_random_access_args(p)
    p.add_argument("--disk", help="disk id, name, device or index (needed with several)")
    p.add_argument("--output", choices=["json", "human", "dmsetup"], default="human")
    p.add_argument(
        "--device",
        help="dmsetup: the block device holding the archive, e.g. "
        "a read-only loop device from `losetup -r -f --show ARCHIVE` (default: "
        "the archive path, which dmsetup does not accept as is)",
    )
    p.set_defaults(run=run)


def run(args) -> int:
    with open_disks(args.source, args.fmt, index=args.index, **layers(args)) as opened:
        disk = opened.select(args.disk)
        # file offsets mean something to the user for a plain archive read in place and
        # for an image's own tables (a backing file's offsets, with its name); not for a
        # spool or gzip checkpoints
        in_place = isinstance(disk, MappedDisk) and opened.how.startswith("index")
        offsets = in_place or opened.how == "tables"
        if args.output == "dmsetup":
            if not in_place:
                raise UsageError(
                    f"{args.source}: a dmsetup table maps an uncompressed XVA or "
                    "VMA in place; this source is "
                    f"{opened.archive.compression or opened.archive.format}"
                )
            _dmsetup(disk, args.device or args.source)
        elif args.output == "json":
            rows = []
            for e in disk.extents():
                data = e.kind != ZERO
                row = {
                    "start": e.start,
                    "length": e.length,
                    "depth": 0,
                    "present": data,
                    "zero": not data,
                    "data": data,
                }
                if e.kind == LOST:
                    row["damaged"] = True  # the archive lost it: reads fail
                elif offsets and e.at is not None:
                    row["offset"] = e.at
                rows.append(json.dumps(row))
            print("[" + ",\n".join(rows) + "]")
        else:
            print(f"{'offset':>16} {'length':>16} {'mapped to':>16}  file")
            for e in disk.extents():
                if e.kind == ZERO:
                    continue
                where = (
                    f"{'(damaged)':>16}"
                    if e.kind == LOST
                    else f"{e.at:#16x}"
                    if offsets and e.at is not None
                    else f"{'(' + opened.how + ')':>16}"
                )
                print(
                    f"{e.start:#16x} {e.length:#16x} {where}  {e.file if offsets else args.source}"
                )
    return 0


def _dmsetup(disk, device: str) -> None:
    if disk.map.checks is not None:
        print(
            f"vmarc: {disk.disk.describe()}: device-mapper reads the archive as it is: "
            "chunk checksums are not checked through this table (run vmarc verify)",
            file=sys.stderr,
        )
    for e in disk.extents():
        target = {ZERO: "zero", LOST: "error"}.get(e.kind)  # lost: reads fail, as served
        if (
            e.start % SECTOR
            or (e.length % SECTOR and e.start + e.length != disk.size)
            or (target is None and e.at % SECTOR)
        ):
            raise UsageError(
                f"{disk.disk.describe()}: a run at disk offset {e.start} is not "
                "sector-aligned; device-mapper cannot map it"
            )
        sectors = -(-e.length // SECTOR)
        if target is not None:
            print(f"{e.start // SECTOR} {sectors} {target}")
        else:
            print(f"{e.start // SECTOR} {sectors} linear {device} {e.at // SECTOR}")
