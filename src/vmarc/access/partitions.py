"""Partitions of a disk from its MBR (primary and logical) or GPT, for `mount` and the
guest file commands, numbered as Linux numbers them (MBR: slots 1-4, logical from 5;
GPT: the entry's index + 1), so that xvda5 here is xvda5 in the guest.

Only the tables are read (through DiskView.read_at); anything odd (an entry past the
disk's end, a loop in the logical chain) ends the list instead of failing the mount.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

SECTOR = 512
EXTENDED = {0x05, 0x0F, 0x85}
GPT_PROTECTIVE = 0xEE
MAX_PARTITIONS = 128


class Partition(NamedTuple):
    number: int
    offset: int  # bytes
    size: int


def partitions(disk) -> list[Partition]:
    """Each partition, in table order."""
    mbr = disk.read_at(0, SECTOR)
    if len(mbr) < SECTOR or mbr[510:512] != b"\x55\xaa":
        return []
    entries = [struct.unpack_from("<B3xB3xII", mbr, 446 + 16 * i)[1:] for i in range(4)]
    if any(kind == GPT_PROTECTIVE for kind, _, _ in entries):
        return _gpt(disk)
    found = []
    for slot, (kind, start, count) in enumerate(entries, 1):
        if not kind or not count:
            continue
        if kind in EXTENDED:
            found += _logical(disk, start)
        else:
            found.append(Partition(slot, start * SECTOR, count * SECTOR))
    return [p for p in found if p.offset + p.size <= disk.size][:MAX_PARTITIONS]


def _logical(disk, ext_start: int) -> list[Partition]:
    """Logical partitions: a chain of EBRs, each pointing at the next (relative to the
    extended partition's start)."""
    found, seen, ebr = [], set(), ext_start
    while ebr not in seen and len(found) < MAX_PARTITIONS and ebr * SECTOR < disk.size:
        seen.add(ebr)
        sec = disk.read_at(ebr * SECTOR, SECTOR)
        if sec[510:512] != b"\x55\xaa":
            break
        kind, start, count = struct.unpack_from("<B3xB3xII", sec, 446)[1:]
        if kind and count:
            found.append(Partition(5 + len(found), (ebr + start) * SECTOR, count * SECTOR))
        nkind, nstart, _ = struct.unpack_from("<B3xB3xII", sec, 462)[1:]
        if not nkind or not nstart:
            break
        ebr = ext_start + nstart
    return found


def _gpt(disk) -> list[Partition]:
    head = disk.read_at(SECTOR, 92)
    if head[:8] != b"EFI PART":
        return []
    table_lba, count, size = struct.unpack_from("<QII", head, 72)
    if size < 128 or size > 4096 or count > 1024:  # entries are 128 bytes in practice
        return []
    raw = disk.read_at(table_lba * SECTOR, min(count, MAX_PARTITIONS) * size)
    found = []
    for i in range(len(raw) // size):
        entry = raw[i * size : (i + 1) * size]
        if entry[:16] == bytes(16):
            continue
        first, last = struct.unpack_from("<QQ", entry, 32)
        if last >= first:
            found.append(Partition(i + 1, first * SECTOR, (last - first + 1) * SECTOR))
    return [p for p in found if p.offset + p.size <= disk.size]
