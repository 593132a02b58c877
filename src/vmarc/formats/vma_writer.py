"""Writing VMA archives laid out as Proxmox's vma-writer.c lays them out.

The header holds the configs and the devices (names and sizes) in a blob buffer that
starts with one unused byte, because blob offset 0 means "none". Then extents: a 512-byte
header and at most 58 clusters of 64 KiB (the Proxmox writer flushes before a 59th), each
cluster stored as its non-zero 4 KiB blocks, marked in a 16-bit mask. An all-zero
cluster is still listed, with mask 0: a reader tells a complete archive from a cut one
only by seeing every cluster of every device once.
"""

from __future__ import annotations

import functools
import struct
import time
import uuid as uuidlib

from ..errors import UsageError
from ..io.hashing import md5_digest
from ..model import ZERO_CHUNK, Disk, is_zero
from .clusters import ClusterAssembler
from .vma import (
    BLOCK,
    BLOCKINFOS,
    BLOCKS_PER_CLUSTER,
    CLUSTER,
    CONFIG_DATA,
    CONFIG_DATA_AT,
    CONFIG_NAMES,
    CONFIG_NAMES_AT,
    DEV_INFO,
    DEV_INFO_AT,
    DEV_INFO_SLOT,
    EXTENT_HEAD,
    EXTENT_HEADER,
    EXTENT_MAGIC,
    EXTENT_MD5,
    HEADER_FIXED,
    HEADER_HEAD,
    HEADER_MD5,
    MAGIC,
)

CLUSTERS_PER_EXTENT = BLOCKINFOS - 1  # what Proxmox's writer puts in one extent
MAX_BLOB = 65535  # a blob's length is a u16
MAX_DEVICES = 254  # device ids 1..254


def device_name(name: str) -> str:
    """Proxmox names disk streams drive-<slot>: scsi0 becomes drive-scsi0."""
    return name if name.startswith("drive-") or name == "vmstate" else f"drive-{name}"


class VmaWriter:
    """Writes a VMA to out (anything with write(bytes-like)).

    Devices are given as (name, Disk). add(disk, offset, data) takes a device's bytes in
    any order, as long as the pieces of one 64 KiB cluster come one after another (see
    clusters.py); finish_disk(disk) lists the clusters never given as zero clusters;
    close() writes the last extent.
    """

    def __init__(
        self,
        out,
        devices: list[tuple[str, Disk]],
        configs: dict[str, bytes],
        uuid: bytes | None = None,
        ctime: int | None = None,
        ordered: bool = False,
    ):
        # ordered: each device's pieces come in ascending order, so a cluster skipped
        # over is zero and is listed at once, as vzdump lists it (a reader can then tell
        # how far a device is complete without waiting for the end)
        if len(devices) > MAX_DEVICES:
            raise UsageError(f"a VMA holds at most {MAX_DEVICES} devices, not {len(devices)}")
        self.out = out
        self.uuid = uuid or uuidlib.uuid4().bytes
        self._dev_id = {id(d): i for i, (_, d) in enumerate(devices, start=1)}  # by identity
        devices = [(name, d.size) for name, d in devices]
        self._assemblers = [None] + [
            ClusterAssembler(CLUSTER, size, functools.partial(self.put_cluster, dev_id))
            for dev_id, (_, size) in enumerate(devices, start=1)
        ]
        out.write(self._header(devices, configs, int(time.time()) if ctime is None else ctime))
        self._ext = bytearray(EXTENT_HEADER + CLUSTERS_PER_EXTENT * CLUSTER)
        self._view = memoryview(self._ext)
        self._pos = EXTENT_HEADER
        self._infos: list[int] = []
        self.extents = 0
        # the memory state is always given in order, and readers require it in order
        self._in_order = [False] + [ordered or name == "vmstate" for name, _ in devices]
        self._next = [0] * len(self._assemblers)  # first cluster not listed yet

    # -- header --------------------------------------------------------------------------
    def _header(self, devices, configs, ctime) -> bytes:
        blobs = bytearray(1)  # offset 0 is "no blob"

        def blob(data: bytes, what: str) -> int:
            if len(data) > MAX_BLOB:
                raise UsageError(f"{what}: {len(data)} bytes; a VMA blob holds at most {MAX_BLOB}")
            at = len(blobs)
            blobs.extend(struct.pack("<H", len(data)) + data)
            return at

        head = bytearray(HEADER_FIXED)
        if len(configs) > 256:
            raise UsageError(f"a VMA holds at most 256 configs, not {len(configs)}")
        names, datas = [0] * 256, [0] * 256
        for i, (name, data) in enumerate(configs.items()):
            names[i] = blob(name.encode() + b"\0", name)
            datas[i] = blob(bytes(data), name)
        CONFIG_NAMES.pack_into(head, CONFIG_NAMES_AT, *names)
        CONFIG_DATA.pack_into(head, CONFIG_DATA_AT, *datas)
        for dev_id, (name, size) in enumerate(devices, start=1):
            if size <= 0:
                raise UsageError(f"{name}: a VMA device cannot be empty")
            DEV_INFO.pack_into(
                head,
                DEV_INFO_AT + DEV_INFO_SLOT * dev_id,
                blob(name.encode() + b"\0", name),
                0,
                size,
            )
        used = len(blobs)
        blobs.extend(bytes(-len(blobs) % 512))  # header_size is a multiple of 512
        HEADER_HEAD.pack_into(
            head,
            0,
            MAGIC,
            1,
            self.uuid,
            ctime,
            bytes(16),
            HEADER_FIXED,
            used,
            HEADER_FIXED + len(blobs),
        )
        header = head + blobs
        header[HEADER_MD5] = md5_digest(header)
        return bytes(header)

    # -- clusters ------------------------------------------------------------------------
    def add(self, disk: Disk, offset: int, data: memoryview) -> None:
        self._assemblers[self._dev_id[id(disk)]].add(offset, data)

    def put_cluster(self, dev_id: int, cluster: int, data: memoryview) -> None:
        """One whole cluster (shorter only at the device's end); zero blocks left out."""
        if self._in_order[dev_id] and cluster > self._next[dev_id]:
            seen = self._assemblers[dev_id].seen
            for skipped in range(self._next[dev_id], cluster):
                if not seen[skipped]:
                    seen.set(skipped)
                    self._store(dev_id, skipped, memoryview(b""))
        self._next[dev_id] = max(self._next[dev_id], cluster + 1)
        self._store(dev_id, cluster, data)

    def _store(self, dev_id: int, cluster: int, data: memoryview) -> None:
        if len(self._infos) == CLUSTERS_PER_EXTENT:
            self._flush_extent()
        mask = 0
        if not is_zero(data):
            ext, pos = self._view, self._pos
            # a zero block starts with a zero byte: when no block does (one strided
            # copy of 16 bytes), every block holds data and none needs a full look
            if len(data) == CLUSTER and (
                0 not in bytes(data[::BLOCK])
                or not any(
                    ZERO_CHUNK.startswith(data[b : b + BLOCK]) for b in range(0, CLUSTER, BLOCK)
                )
            ):
                ext[pos : pos + CLUSTER] = data  # the common case: every block holds data
                mask, pos = 0xFFFF, pos + CLUSTER
            else:
                for i in range(BLOCKS_PER_CLUSTER):
                    block = data[i * BLOCK : (i + 1) * BLOCK]
                    if block and not ZERO_CHUNK.startswith(block):
                        ext[pos : pos + len(block)] = block
                        if len(block) < BLOCK:  # the device ends inside this block
                            ext[pos + len(block) : pos + BLOCK] = ZERO_CHUNK[: BLOCK - len(block)]
                        mask |= 1 << i
                        pos += BLOCK
            self._pos = pos
        self._infos.append((mask << 48) | (dev_id << 32) | cluster)

    def finish_disk(self, disk: Disk) -> None:
        """The device's data is all given: list every cluster not seen as a zero cluster."""
        dev_id = self._dev_id[id(disk)]
        asm = self._assemblers[dev_id]
        asm.flush()
        for cluster in asm.missing():  # lazily: a huge sparse disk has many
            asm.seen.set(cluster)
            self._store(dev_id, cluster, memoryview(b""))

    def _flush_extent(self) -> None:
        ext = self._ext
        infos = self._infos + [0] * (BLOCKINFOS - len(self._infos))
        EXTENT_HEAD.pack_into(
            ext,
            0,
            EXTENT_MAGIC,
            0,
            (self._pos - EXTENT_HEADER) // BLOCK,
            self.uuid,
            bytes(16),
            *infos,
        )
        ext[EXTENT_MD5] = md5_digest(self._view[:EXTENT_HEADER])
        self.out.write(self._view[: self._pos])
        self._pos = EXTENT_HEADER
        self._infos = []
        self.extents += 1

    def close(self) -> None:
        for dev_id, asm in enumerate(self._assemblers[1:], start=1):
            if asm.seen.find_unset() >= 0:
                raise RuntimeError(f"device {dev_id} not finished")
        self._flush_extent()
