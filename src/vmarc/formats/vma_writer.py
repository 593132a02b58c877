"""Writing VMA archives laid out as Proxmox's vma-writer.c lays them out.

The header holds the configs and the devices (names and sizes) in a blob buffer that
starts with one unused byte, because blob offset 0 means "none". Then extents: a 512-byte
header and at most 58 clusters of 64 KiB (the Proxmox writer flushes before a 59th), each
cluster stored as its non-zero 4 KiB blocks, marked in a 16-bit mask. An all-zero
cluster is still listed, with mask 0: a reader tells a complete archive from a cut one
only by seeing every cluster of every device once.
"""

from __future__ import annotations

import struct
import time
import uuid as uuidlib

from ..errors import UsageError
from ..hashing import md5_digest
from ..model import ZERO_CHUNK, is_zero
from .vma import (BLOCK, BLOCKINFOS, BLOCKS_PER_CLUSTER, CLUSTER, EXTENT_HEADER, EXTENT_MAGIC,
                  HEADER_FIXED, MAGIC)

CLUSTERS_PER_EXTENT = BLOCKINFOS - 1   # what Proxmox's writer puts in one extent
MAX_BLOB = 65535                       # a blob's length is a u16
MAX_DEVICES = 254                      # device ids 1..254


def device_name(name: str) -> str:
    """Proxmox names disk streams drive-<slot>: scsi0 becomes drive-scsi0."""
    return name if name.startswith("drive-") or name == "vmstate" else f"drive-{name}"


class VmaWriter:
    """Writes a VMA to out (anything with write(bytes-like)).

    add(dev_id, offset, data) takes a device's bytes in any order, as long as the pieces
    of one 64 KiB cluster come one after another (every reader's stream keeps that);
    finish_device(dev_id) lists the clusters never given as zero clusters; close()
    writes the last extent.
    """

    def __init__(self, out, devices: list[tuple[str, int]], configs: dict[str, bytes],
                 uuid: bytes | None = None, ctime: int | None = None):
        if len(devices) > MAX_DEVICES:
            raise UsageError(f"a VMA holds at most {MAX_DEVICES} devices, not {len(devices)}")
        self.out = out
        self.uuid = uuid or uuidlib.uuid4().bytes
        self.sizes = [0] + [size for _, size in devices]   # by dev_id
        self.done = [bytearray()] + [bytearray(-(-size // CLUSTER)) for _, size in devices]
        out.write(self._header(devices, configs, int(time.time()) if ctime is None else ctime))
        self._ext = bytearray(EXTENT_HEADER + CLUSTERS_PER_EXTENT * CLUSTER)
        self._view = memoryview(self._ext)
        self._pos = EXTENT_HEADER
        self._infos: list[int] = []
        self._partial: dict[int, tuple[int, bytearray]] = {}  # dev_id -> (cluster, bytes)
        self.extents = 0

    # -- header --------------------------------------------------------------------------
    def _header(self, devices, configs, ctime) -> bytes:
        blobs = bytearray(1)  # offset 0 is "no blob"

        def blob(data: bytes, what: str) -> int:
            if len(data) > MAX_BLOB:
                raise UsageError(f"{what}: {len(data)} bytes; a VMA blob holds at most "
                                 f"{MAX_BLOB}")
            at = len(blobs)
            blobs.extend(struct.pack("<H", len(data)) + data)
            return at

        head = bytearray(HEADER_FIXED)
        if len(configs) > 256:
            raise UsageError(f"a VMA holds at most 256 configs, not {len(configs)}")
        for i, (name, data) in enumerate(configs.items()):
            struct.pack_into(">I", head, 2044 + 4 * i, blob(name.encode() + b"\0", name))
            struct.pack_into(">I", head, 3068 + 4 * i, blob(bytes(data), name))
        for dev_id, (name, size) in enumerate(devices, start=1):
            if size <= 0:
                raise UsageError(f"{name}: a VMA device cannot be empty")
            struct.pack_into(">IIQ", head, 4096 + 32 * dev_id,
                             blob(name.encode() + b"\0", name), 0, size)
        used = len(blobs)
        blobs.extend(bytes(-len(blobs) % 512))  # header_size is a multiple of 512
        head[0:4] = MAGIC
        struct.pack_into(">I16sq", head, 4, 1, self.uuid, ctime)
        struct.pack_into(">III", head, 48, HEADER_FIXED, used, HEADER_FIXED + len(blobs))
        header = head + blobs
        header[32:48] = md5_digest(header)
        return bytes(header)

    # -- clusters ------------------------------------------------------------------------
    def add(self, dev_id: int, offset: int, data: memoryview) -> None:
        size = self.sizes[dev_id]
        if offset + len(data) > size:
            raise ValueError(f"device {dev_id}: data past its end ({offset + len(data)} > {size})")
        while data:
            cluster, within = divmod(offset, CLUSTER)
            part = self._partial.get(dev_id)
            if part is not None and part[0] != cluster:
                self._flush_partial(dev_id)
                part = None
            cluster_len = min(CLUSTER, size - cluster * CLUSTER)
            if part is None and within == 0 and len(data) >= cluster_len:
                self.put_cluster(dev_id, cluster, data[:cluster_len])
                step = cluster_len
            else:
                if part is None:
                    part = self._partial[dev_id] = (cluster, bytearray(CLUSTER))
                step = min(len(data), cluster_len - within)
                part[1][within:within + step] = data[:step]
            data = data[step:]
            offset += step

    def _flush_partial(self, dev_id: int) -> None:
        cluster, buf = self._partial.pop(dev_id)
        self.put_cluster(dev_id, cluster, memoryview(buf))

    def put_cluster(self, dev_id: int, cluster: int, data: memoryview) -> None:
        """One whole cluster (shorter only at the device's end); zero blocks left out."""
        done = self.done[dev_id]
        if done[cluster]:
            raise RuntimeError(f"device {dev_id}: cluster {cluster} written twice")
        done[cluster] = 1
        if len(self._infos) == CLUSTERS_PER_EXTENT:
            self._flush_extent()
        mask = 0
        if not is_zero(data):
            ext, pos = self._view, self._pos
            if len(data) == CLUSTER and not any(
                    ZERO_CHUNK.startswith(data[b:b + BLOCK]) for b in range(0, CLUSTER, BLOCK)):
                ext[pos:pos + CLUSTER] = data  # the common case: every block holds data
                mask, pos = 0xFFFF, pos + CLUSTER
            else:
                for i in range(BLOCKS_PER_CLUSTER):
                    block = data[i * BLOCK:(i + 1) * BLOCK]
                    if block and not ZERO_CHUNK.startswith(block):
                        ext[pos:pos + len(block)] = block
                        if len(block) < BLOCK:  # the device ends inside this block
                            ext[pos + len(block):pos + BLOCK] = ZERO_CHUNK[:BLOCK - len(block)]
                        mask |= 1 << i
                        pos += BLOCK
            self._pos = pos
        self._infos.append((mask << 48) | (dev_id << 32) | cluster)

    def finish_device(self, dev_id: int) -> None:
        """The device's data is all given: list every cluster not seen as a zero cluster."""
        if dev_id in self._partial:
            self._flush_partial(dev_id)
        done = self.done[dev_id]
        cluster = done.find(0)
        while cluster >= 0:
            self.put_cluster(dev_id, cluster, memoryview(b""))
            cluster = done.find(0, cluster + 1)

    def _flush_extent(self) -> None:
        ext = self._ext
        infos = self._infos + [0] * (BLOCKINFOS - len(self._infos))
        ext[0:EXTENT_HEADER] = bytes(EXTENT_HEADER)
        ext[0:4] = EXTENT_MAGIC
        struct.pack_into(">HH16s", ext, 4, 0, (self._pos - EXTENT_HEADER) // BLOCK, self.uuid)
        struct.pack_into(">59Q", ext, 40, *infos)
        ext[24:40] = md5_digest(self._view[:EXTENT_HEADER])
        self.out.write(self._view[:self._pos])
        self._pos = EXTENT_HEADER
        self._infos = []
        self.extents += 1

    def close(self) -> None:
        for dev_id in range(1, len(self.sizes)):
            if self.done[dev_id].find(0) >= 0 or dev_id in self._partial:
                raise RuntimeError(f"device {dev_id} not finished")
        self._flush_extent()
