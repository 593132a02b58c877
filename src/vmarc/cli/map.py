"""vmarc map: where each disk's data lies (qemu-img map's JSON, or a dmsetup table)."""

from __future__ import annotations

import json
import sys

from ..access import BAD, MappedDisk, open_disks
from ..errors import UsageError
from .common import layers, add_random_access_args

SECTOR = 512


def add_parser(sub):
    p = sub.add_parser("map", help="show where a disk's data lies (qemu-img map JSON, or a "
                       "device-mapper table over an uncompressed archive)")
    add_random_access_args(p)
    p.add_argument("--disk", help="disk id, name, device or index (needed with several)")
    p.add_argument("--output", choices=["json", "human", "dmsetup"], default="human")
    p.add_argument("--device", help="dmsetup: the block device holding the archive, e.g. "
                   "a read-only loop device from `losetup -r -f --show ARCHIVE` (default: "
                   "the archive path, which dmsetup does not accept as is)")
    p.set_defaults(run=run)


def run(args) -> int:
    with open_disks(args.source, args.fmt, index=args.index, **layers(args)) as opened:
        disk = opened.select(args.disk)
        in_place = isinstance(disk, MappedDisk) and opened.how.startswith("index")
        if args.output == "dmsetup":
            if not in_place:
                raise UsageError(f"{args.source}: a dmsetup table maps an uncompressed XVA or "
                                 "VMA in place; this source is "
                                 f"{opened.archive.compression or opened.archive.format}")
            _dmsetup(disk, args.device or args.source)
        elif args.output == "json":
            rows = []
            for start, n, data, at, _file in _runs(disk, in_place, args.source):
                row = {"start": start, "length": n, "depth": 0, "present": data,
                       "zero": not data, "data": data}
                if at is not None and at >= BAD:
                    row["damaged"] = True  # the archive lost it: reads fail
                elif at is not None:
                    row["offset"] = at
                rows.append(json.dumps(row))
            print("[" + ",\n".join(rows) + "]")
        else:
            print(f"{'offset':>16} {'length':>16} {'mapped to':>16}  file")
            for start, n, data, at, file in _runs(disk, in_place, args.source):
                if data:
                    where = (f"{'(damaged)':>16}" if at is not None and at >= BAD else
                             f"{at:#16x}" if at is not None else f"{'(' + opened.how + ')':>16}")
                    print(f"{start:#16x} {n:#16x} {where}  {file}")
    return 0


def _runs(disk, in_place: bool, source: str):
    """(start, length, holds data, file offset or None, file). Offsets are given for an
    uncompressed archive read in place and for qcow2 and VHD (a backing file's own,
    with its name), where they are offsets in that file."""
    if in_place:
        for start, n, at in disk.store_pieces():
            yield start, n, at is not None, at, source
    elif hasattr(disk, "sources"):  # an image read through its tables
        pos = 0
        for start, n, at, file in disk.sources():
            if start > pos:
                yield pos, start - pos, False, None, source
            yield start, n, True, at, file
            pos = start + n
        if pos < disk.size:
            yield pos, disk.size - pos, False, None, source
    else:
        for start, n, data in disk.pieces():
            yield start, n, data, None, source


def _dmsetup(disk, device: str) -> None:
    if disk.map.checks is not None:
        print(f"vmarc: {disk.disk.describe()}: device-mapper reads the archive as it is: "
              "chunk checksums are not checked through this table (run vmarc verify)",
              file=sys.stderr)
    for start, n, at in disk.store_pieces():
        if at is not None and at >= BAD:  # lost by the archive: reads fail, as served
            at = "error"
        if start % SECTOR or (n % SECTOR and start + n != disk.size) or \
                (isinstance(at, int) and at % SECTOR):
            raise UsageError(f"{disk.disk.describe()}: a run at disk offset {start} is not "
                             "sector-aligned; device-mapper cannot map it")
        sectors = -(-n // SECTOR)
        if at is None or at == "error":
            print(f"{start // SECTOR} {sectors} {at or 'zero'}")
        else:
            print(f"{start // SECTOR} {sectors} linear {device} {at // SECTOR}")
