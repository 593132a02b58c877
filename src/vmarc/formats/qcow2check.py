"""What `qemu-img check` checks in a qcow2: every cluster's stored refcount against the
references to it (qemu's block/qcow2-refcount.c, qcow2_check_refcounts; the layout in
docs/interop/qcow2.txt).

References: the header cluster; the active L1 table, each L2 table it names and each data
cluster those map; the same for every snapshot's L1 table; the bytes a compressed cluster
spans; the refcount table and each refcount block; the snapshot table. A refcount below
the references is corruption (a cluster in use could be given away); one above them is a
leak (wasted space: exit 3 as qemu-img check, not damage). COPIED flags of the active
tables must say whether the refcount is exactly 1. An image with an external data file
keeps no refcount of its data clusters.
"""

from __future__ import annotations

import struct

from ..errors import FormatError
from ..model import Checks, Damage
from .qcow2_layout import COMPRESSED, COPIED, OFFSET_MASK

SNAPSHOT_FIXED = 40  # bytes of a snapshot table entry before its extra data and names


class _Refs:
    """References counted per cluster of the image file (saturating at 255)."""

    def __init__(self, img, checks: Checks):
        self.img, self.checks = img, checks
        self.cs = img.cluster_size
        self.count = bytearray(-(-img.file_size // self.cs))

    def add(self, offset: int, length: int, what: str) -> None:
        cs = self.cs
        first, last = offset // cs, (offset + max(length, 1) - 1) // cs
        if last >= len(self.count):
            self.error(
                f"{what} at offset {offset} ({length} bytes) runs past the end of the "
                f"{self.img.file_size}-byte file",
                offset,
            )
            last = len(self.count) - 1
        for c in range(first, last + 1):
            if self.count[c] < 255:
                self.count[c] += 1

    def error(self, text: str, offset: int) -> None:
        self.checks.fail(
            FormatError(
                f"{self.img.source.name}: {text}",
                [Damage(self.img.disks[0], 0, 0, "metadata", file_offset=offset)],
            )
        )


def _table(img, offset: int, entries: int, what: str) -> tuple[int, ...]:
    return struct.unpack(f">{entries}Q", img.source.pread(8 * entries, offset, what))


def _count_l1(
    img, refs: _Refs, l1_offset: int, l1_size: int, what: str, active: bool, l2_seen: list
) -> None:
    """The references of one L1 table (the active one or a snapshot's) and below it."""
    cs = img.cluster_size
    refs.add(l1_offset, 8 * l1_size, f"{what} L1 table")
    if l1_offset % cs:
        refs.error(f"{what} L1 table at offset {l1_offset} is not cluster-aligned", l1_offset)
        return
    for i, entry in enumerate(_table(img, l1_offset, l1_size, f"{what} L1 table")):
        l2 = entry & OFFSET_MASK
        if not l2:
            continue
        if l2 % cs:
            refs.error(f"{what} L1 entry {i}: L2 table at offset {l2} is not cluster-aligned", l2)
            continue
        refs.add(l2, cs, f"{what} L2 table {i}")
        if l2 + cs > img.file_size:
            continue
        if active:
            l2_seen.append((entry, None))
        for j, e in enumerate(_table(img, l2, cs // 8, f"{what} L2 table {i}")):
            if e & COMPRESSED:
                x = 62 - (img.cluster_bits - 8)
                coff = e & ((1 << x) - 1)
                sectors = ((e >> x) & ((1 << (img.cluster_bits - 8)) - 1)) + 1
                refs.add(coff, sectors * 512 - (coff & 511), f"{what} compressed cluster")
                if active and e & COPIED:
                    refs.error(
                        f"L2 table {i} entry {j}: a compressed cluster carries the COPIED flag",
                        l2 + 8 * j,
                    )
                continue
            host = e & OFFSET_MASK
            if not host and not (e & COPIED and img.data is not img.source):
                continue
            if host % cs:
                refs.error(
                    f"{what} L2 table {i} entry {j}: cluster offset {host} is not cluster-aligned",
                    l2 + 8 * j,
                )
                continue
            if img.data is img.source:  # a data file keeps no refcounts
                refs.add(host, cs, f"{what} data cluster (L2 table {i} entry {j})")
                if active:
                    l2_seen.append((e, (i, j)))


def _stored(img, refs: _Refs):
    """The stored refcount of every cluster the refcount table covers: (cluster, count)
    for the non-zero ones, and the table's own references counted."""
    cs = img.cluster_size
    bits = 1 << img.refcount_order
    per_block = cs * 8 // bits
    table_off, clusters = img.refcount_table_offset, img.refcount_table_clusters
    refs.add(table_off, clusters * cs, "refcount table")
    if table_off % cs or table_off + clusters * cs > img.file_size:
        refs.error(
            f"refcount table at offset {table_off} is unaligned or outside the file", table_off
        )
        return {}
    stored = {}
    for t, block in enumerate(_table(img, table_off, clusters * cs // 8, "refcount table")):
        block &= OFFSET_MASK
        if not block:
            continue
        if block % cs:
            refs.error(
                f"refcount table entry {t}: block at offset {block} is not cluster-aligned", block
            )
            continue
        refs.add(block, cs, f"refcount block {t}")
        if block + cs > img.file_size:
            continue
        raw = img.source.pread(cs, block, f"refcount block {t}")
        value = int.from_bytes(raw, "big")
        if not value:
            continue
        for k in range(per_block):
            n = (value >> (bits * (per_block - 1 - k))) & ((1 << bits) - 1)
            if n:
                stored[t * per_block + k] = n
    return stored


def _count_snapshots(img, refs: _Refs, l2_seen: list) -> None:
    pos = img.snapshots_offset
    if not img.nb_snapshots:
        return
    start = pos
    for k in range(img.nb_snapshots):
        head = img.source.pread(SNAPSHOT_FIXED, pos, f"snapshot {k}")
        l1_off, l1_size, id_len, name_len = struct.unpack_from(">QIHH", head, 0)
        (extra,) = struct.unpack_from(">I", head, 36)
        _count_l1(img, refs, l1_off, l1_size, f"snapshot {k}", False, l2_seen)
        pos += SNAPSHOT_FIXED + extra + id_len + name_len
        pos += -pos % 8
    refs.add(start, pos - start, "snapshot table")


def check_refcounts(img, checks: Checks) -> None:
    refs = _Refs(img, checks)
    cs = img.cluster_size
    refs.add(0, cs, "header")
    active: list = []  # (L1 entry, None) or (L2 entry, (table, index)) of the active image
    _count_l1(img, refs, img.l1_offset, len(img.l1), "active", True, active)
    _count_snapshots(img, refs, active)
    stored = _stored(img, refs)
    leaked = 0
    for c in range(max(len(refs.count), max(stored, default=-1) + 1)):
        want = refs.count[c] if c < len(refs.count) else 0
        got = stored.get(c, 0)
        if got == want or (want == 255 and got >= 255):
            continue
        if got > want:  # more than is used: wasted space, as qemu-img check counts it
            leaked += 1
            if len(checks.leaks) < 100:
                checks.leaks.append(
                    f"{img.source.name}: leaked cluster {c} (offset {c * cs}): "
                    f"refcount {got}, {want} reference{'s' if want != 1 else ''}"
                )
            continue
        refs.error(
            f"cluster {c} (offset {c * cs}): refcount {got} but {want} reference"
            f"{'s' if want != 1 else ''} to it",
            c * cs,
        )
    if leaked > 100:
        checks.leaks.append(f"{img.source.name}: {leaked - 100} more leaked clusters")
    for entry, where in active:
        host = entry & OFFSET_MASK
        if host % cs:
            continue
        one = stored.get(host // cs, 0) == 1
        if bool(entry & COPIED) != one:
            what = (
                "L2 table"
                if where is None
                else f"data cluster (L2 table {where[0]} entry {where[1]})"
            )
            refs.error(
                f"{what} at offset {host}: COPIED flag "
                f"{'set' if entry & COPIED else 'clear'} but refcount "
                f"{stored.get(host // cs, 0)}",
                host,
            )
