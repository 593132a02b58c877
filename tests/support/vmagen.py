"""An independent VMA generator for the tests (imports nothing from vmarc).

Writes what Proxmox's vma-writer.c writes: header with md5 and blob buffer, extents of at
most 58 clusters (clusters in any order, interleaved across devices), zero 4 KiB blocks
left out by mask, all-zero clusters listed with mask 0, and a final empty extent.
"""

from __future__ import annotations

import hashlib
import random
import struct
import uuid as uuidlib

CLUSTER = 65536
BLOCK = 4096


def _blobs(items):
    """Blob buffer (offset 0 unused) and the pointer of each item."""
    buf = bytearray(b"\0")
    ptrs = []
    for data in items:
        ptrs.append(len(buf))
        buf += struct.pack("<H", len(data)) + data
    return bytes(buf), ptrs


def header(devices, configs, uid: bytes, ctime: int = 1700000000) -> bytes:
    """devices: [(name, size)] given ids 1..; configs: [(name, bytes)]."""
    strings = (
        [n.encode() + b"\0" for n, _ in configs]
        + [d for _, d in configs]
        + [n.encode() + b"\0" for n, _ in devices]
    )
    blobs, ptrs = _blobs(strings)
    nc = len(configs)
    h = bytearray(12288)
    h[0:4] = b"VMA\0"
    struct.pack_into(">I", h, 4, 1)
    h[8:24] = uid
    struct.pack_into(">q", h, 24, ctime)
    header_size = (12288 + len(blobs) + 511) // 512 * 512
    struct.pack_into(">III", h, 48, 12288, len(blobs), header_size)
    for i in range(nc):
        struct.pack_into(">I", h, 2044 + 4 * i, ptrs[i])
        struct.pack_into(">I", h, 3068 + 4 * i, ptrs[nc + i])
    for i, (_, size) in enumerate(devices):
        struct.pack_into(">IIQ", h, 4096 + 32 * (i + 1), ptrs[2 * nc + i], 0, size)
    full = bytearray(h + blobs + bytes(header_size - 12288 - len(blobs)))
    full[32:48] = hashlib.md5(full).digest()
    return bytes(full)


def cluster_blocks(data: bytes, cluster: int, size: int):
    """(mask, stored blocks) of one cluster: zero blocks and blocks past the end left out."""
    mask = 0
    stored = []
    for b in range(16):
        start = cluster * CLUSTER + b * BLOCK
        if start >= size:
            break
        block = data[start : start + BLOCK].ljust(BLOCK, b"\0")
        if block.count(0) != BLOCK:
            mask |= 1 << b
            stored.append(block)
    return mask, stored


def extent(entries, uid: bytes) -> bytes:
    """entries: [(dev_id, cluster, mask, blocks)] (at most 59)."""
    h = bytearray(512)
    h[0:4] = b"VMAE"
    count = sum(len(b) for *_, b in entries)
    struct.pack_into(">HH", h, 4, 0, count)
    h[8:24] = uid
    for i, (dev, cl, mask, _) in enumerate(entries):
        struct.pack_into(">Q", h, 40 + 8 * i, (mask << 48) | (dev << 32) | cl)
    h[24:40] = hashlib.md5(h).digest()
    return bytes(h) + b"".join(b"".join(blocks) for *_, blocks in entries)


def build(
    disks,
    configs=(("qemu-server.conf", b"name: t\nmemory: 1024\ncores: 2\n"),),
    order="shuffle",
    per_extent=58,
    seed=1,
    uid=None,
    drop=(),
    duplicate=(),
    vmstate: bytes | None = None,
) -> bytes:
    """disks: [(name, bytes)]. order: 'shuffle' (interleaved, out of order), 'seq', or
    'backup' (what a live backup writes: in order, with one cluster in twenty pulled
    forward, as copy-before-write does when the guest writes ahead of the backup job).
    drop/duplicate: (dev_id, cluster) pairs to leave out or write twice."""
    uid = uid or uuidlib.UUID(int=seed).bytes
    devices = [(n, len(d)) for n, d in disks]
    if vmstate is not None:
        devices.append(("vmstate", len(vmstate)))
    out = [header(devices, list(configs), uid)]
    work = []
    for dev_id, (_, data) in enumerate(disks, start=1):
        n = -(-len(data) // CLUSTER)
        work += [(dev_id, c) for c in range(n)]
    if order == "shuffle":
        random.Random(seed).shuffle(work)
    elif order == "backup":
        rnd = random.Random(seed)
        for i in range(0, len(work), 20):
            j = rnd.randrange(i, min(len(work), i + 2000))
            work.insert(i, work.pop(j))
    if vmstate is not None:  # memory state: strictly in order, after the disks here
        sid = len(disks) + 1
        work += [(sid, c) for c in range(-(-len(vmstate) // CLUSTER))]
    contents = {i + 1: d for i, (_, d) in enumerate(disks)}
    if vmstate is not None:
        contents[len(disks) + 1] = vmstate
    work = [w for w in work if w not in set(drop)] + list(duplicate)
    for i in range(0, len(work), per_extent):
        entries = []
        for dev_id, cl in work[i : i + per_extent]:
            data = contents[dev_id]
            mask, blocks = cluster_blocks(data, cl, len(data))
            entries.append((dev_id, cl, mask, blocks))
        out.append(extent(entries, uid))
    out.append(extent([], uid))  # Proxmox ends with one more, empty extent
    return b"".join(out)


def disk_bytes(size: int, seed: int = 0, zero_every: int = 3) -> bytes:
    """Data with whole zero clusters, zero 4 KiB blocks inside clusters and a partial end."""
    rnd = random.Random(seed)
    buf = bytearray(size)
    for off in range(0, size, BLOCK):
        c, b = off // CLUSTER, (off % CLUSTER) // BLOCK
        if c % zero_every == 1 or b % 5 == 2:
            continue
        n = min(BLOCK, size - off)
        buf[off : off + n] = rnd.randbytes(n)
    return bytes(buf)
