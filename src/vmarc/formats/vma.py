"""VMA: Proxmox VE vzdump archive (pve-qemu's vma_spec.txt, vma-reader.c).

A header (magic, uuid, md5, config blobs, up to 254 devices) then extents of up to 59
clusters of 64 KiB, each cluster stored as the 4 KiB blocks its 16-bit mask marks; the
rest of the cluster is zero. Cluster data is never checksummed, only headers are (md5).
Clusters come out of order and interleaved across devices. There is no trailer: the
archive ends at an extent boundary, so the only way to tell a complete archive from a
cut one is to check that every cluster of every device appeared exactly once, which
Proxmox's own `vma verify` does not do and this reader does.
"""

from __future__ import annotations

import functools
import struct

from ..errors import CorruptError, FormatError, TruncatedError
from ..io.hashing import md5_digest
from ..model import SCAN, Archive, Checks, Damage, Disk
from ..settings import proxmox
from .clusters import cluster_flags

MAGIC = b"VMA\0"
EXTENT_MAGIC = b"VMAE"
HEADER_FIXED = 12288  # header struct size; the blob buffer follows
MAX_HEADER = HEADER_FIXED + (1 << 20) * 16  # blobs are small configs; refuse absurd sizes
CLUSTER = 65536
BLOCK = 4096
BLOCKS_PER_CLUSTER = 16
EXTENT_HEADER = 512
BLOCKINFOS = 59
MAX_DEVICE_SIZE = 1 << 50  # 1 PiB: larger is hostile, not a disk

# -- on-disk records, used by the reader here and by vma_writer.py (docs/formats/vma.md) --
# the header's start: magic, version, uuid, ctime, md5 (of the header with this field
# zeroed), blob_buffer_offset, blob_buffer_size, header_size
HEADER_HEAD = struct.Struct(">4sI16sq16sIII")
HEADER_MD5 = slice(32, 48)
CONFIG_NAMES = struct.Struct(">256I")  # blob offsets of the config names, at CONFIG_NAMES_AT
CONFIG_NAMES_AT = 2044
CONFIG_DATA = CONFIG_NAMES  # blob offsets of their contents, at CONFIG_DATA_AT
CONFIG_DATA_AT = 3068
DEV_INFO = struct.Struct(">IIQ")  # device name blob, reserved, size; 32 bytes a slot
DEV_INFO_AT = 4096  # slot of device id i: DEV_INFO_AT + 32 * i (ids 1..254)
DEV_INFO_SLOT = 32
# an extent's header: magic, reserved, block_count, uuid, md5 (zeroed for the sum),
# 59 blockinfos (mask << 48 | dev_id << 32 | cluster)
EXTENT_HEAD = struct.Struct(">4sHH16s16s59Q")
EXTENT_MD5 = slice(24, 40)


@functools.lru_cache(maxsize=4096)
def mask_runs(mask: int) -> tuple[tuple[int, int, int], ...]:
    """The stored stretches of a cluster: (first block, block count, index of the first
    block among the stored ones). One tuple per stretch instead of a test per block."""
    runs = []
    rank = 0
    b = 0
    while b < BLOCKS_PER_CLUSTER:
        if mask >> b & 1:
            first = b
            while b < BLOCKS_PER_CLUSTER and mask >> b & 1:
                b += 1
            runs.append((first, b - first, rank))
            rank += b - first
        else:
            b += 1
    return tuple(runs)


class _ExtentData:
    """One extent's data, consumed in order a run at a time: each run is a view of the
    read-ahead buffer it lies in (no copy), or read into the extent buffer when it
    straddles two; the data of devices not wanted is skipped."""

    def __init__(self, src, buf: memoryview, size: int, what: str, read: bool = True):
        self.src, self.buf, self.size, self.what = src, buf, size, what
        self.pos = 0  # bytes of the extent's data consumed
        self.done = False
        self.read = read  # False: the index scan, which seeks over the data at the end

    def take(self, at: int, n: int) -> memoryview:
        self.src.skip(at - self.pos, self.what)
        view = self.src.take_view(n)
        if view is None:
            view = self.buf[at : at + n]
            self.src.readinto_exact(view, self.what)
        self.pos = at + n
        return view

    def finish(self) -> None:
        self.src.skip(self.size - self.pos, self.what)
        self.pos = self.size
        self.done = True


class VmaArchive(Archive):
    format = "vma"
    access = SCAN

    @classmethod
    def probe(cls, head: bytes) -> bool:
        return head.startswith(MAGIC)

    ordered = False  # clusters come as the backup job wrote them

    def __init__(self, source):
        super().__init__(source)
        name = source.name
        head = source.read_exact(HEADER_FIXED, "VMA header")
        if head[:4] != MAGIC:
            raise FormatError(f"{name}: no VMA magic at offset 0")
        _magic, version, self.uuid, self.ctime, stored_md5, blob_off, blob_size, header_size = (
            HEADER_HEAD.unpack_from(head)
        )
        if version != 1:
            raise FormatError(f"{name}: VMA version {version} (only version 1 exists)")
        if header_size % 512 == 0 and header_size > MAX_HEADER:
            raise FormatError(
                f"{name}: VMA header_size {header_size} at offset 56 is too large "
                f"(at most {MAX_HEADER}: configs are small)"
            )
        if not (HEADER_FIXED <= header_size <= MAX_HEADER) or header_size % 512:
            raise FormatError(
                f"{name}: VMA header_size {header_size} at offset 56 is not a "
                f"multiple of 512 between {HEADER_FIXED} and {MAX_HEADER}"
            )
        if blob_off < HEADER_FIXED or blob_off + blob_size > header_size:
            raise FormatError(
                f"{name}: VMA blob buffer [{blob_off}, {blob_off + blob_size}) "
                f"lies outside the {header_size}-byte header"
            )
        rest = source.read_exact(header_size - HEADER_FIXED, "VMA header blob buffer")
        header = head + rest
        zeroed = bytearray(header)
        zeroed[HEADER_MD5] = bytes(16)
        if md5_digest(zeroed) != stored_md5:
            raise FormatError(f"{name}: VMA header md5 mismatch (header of {header_size} bytes)")
        self.header_size = header_size
        blobs = header[blob_off : blob_off + blob_size]

        def blob(ptr: int, what: str) -> bytes:
            if ptr == 0 or ptr + 2 > len(blobs):
                raise FormatError(
                    f"{name}: {what}: blob pointer {ptr} outside the {len(blobs)}-byte blob buffer"
                )
            (length,) = struct.unpack_from("<H", blobs, ptr)
            if ptr + 2 + length > len(blobs):
                raise FormatError(
                    f"{name}: {what}: blob at {ptr} of {length} bytes runs past the blob buffer"
                )
            return blobs[ptr + 2 : ptr + 2 + length]

        def text(ptr: int, what: str) -> str:
            raw = blob(ptr, what)
            if not raw.endswith(b"\0"):
                raise FormatError(f"{name}: {what}: string blob at {ptr} is not NUL-terminated")
            if b"\0" in raw[:-1] or len(raw) > 256:  # a file name: extract writes it
                raise FormatError(
                    f"{name}: {what}: string blob at {ptr} holds a NUL byte or "
                    "is longer than 255 bytes"
                )
            return raw[:-1].decode("utf-8", "replace")

        names = CONFIG_NAMES.unpack_from(header, CONFIG_NAMES_AT)
        datas = CONFIG_DATA.unpack_from(header, CONFIG_DATA_AT)
        for i in range(256):
            if names[i]:
                cname = text(names[i], f"config {i} name")
                if "/" in cname or cname in ("", ".", ".."):
                    raise FormatError(f"{name}: config name {cname!r} cannot be a file name")
                if cname in self.configs:  # the second would silently replace the first
                    raise FormatError(f"{name}: config {cname!r} appears twice in the header")
                self.configs[cname] = blob(datas[i], f"config {cname} data")
            elif datas[i]:
                raise FormatError(f"{name}: config {i} has data but no name")

        self.devices: dict[int, Disk] = {}
        self.vmstate: Disk | None = None
        conf = self.configs.get("qemu-server.conf", b"").decode("utf-8", "replace")
        drives = proxmox.drives(conf)
        for dev_id in range(256):
            ptr, _reserved, size = DEV_INFO.unpack_from(
                header, DEV_INFO_AT + DEV_INFO_SLOT * dev_id
            )
            if not ptr:
                continue
            if dev_id in (0, 255):
                raise FormatError(f"{name}: device id {dev_id} is reserved")
            devname = text(ptr, f"device {dev_id} name")
            if any(d.id == devname for d in self.devices.values()):  # one would be dropped
                raise FormatError(
                    f"{name}: device name {devname!r} appears twice in the header (device {dev_id})"
                )
            if size > MAX_DEVICE_SIZE:
                raise FormatError(f"{name}: device {devname} claims {size} bytes")
            short = devname[6:] if devname.startswith("drive-") else devname
            disk = Disk(
                id=devname,
                name=devname,
                size=size,
                device=short if devname != "vmstate" else None,
                meta={"dev_id": dev_id, "clusters": -(-size // CLUSTER)},
            )
            if short in drives:
                disk.meta["volume"] = drives[short]
            self.devices[dev_id] = disk
            if devname == "vmstate":
                self.vmstate = disk
            else:
                self.disks.append(disk)
        for i, d in enumerate(self.disks):
            d.index = i
        files = {self.disk_filename(d) for d in self.disks} | {"vmstate.bin"}
        for cname in self.configs:  # extract writes both into one directory
            if cname in files:
                raise FormatError(f"{name}: config {cname!r} has the name of a disk's file")
        self.vm = proxmox.vm_summary(conf)
        self._streamed = False

    def settings(self):
        conf = self.configs.get("qemu-server.conf", b"").decode("utf-8", "replace")
        return proxmox.read_settings(conf, self.disks)

    def covered(self, disk: Disk) -> int:
        """Disk offset below which every cluster has been read (see Archive.covered)."""
        marks = self._seen[disk.meta["dev_id"]]
        first = self._first_unseen.get(disk.id, 0)
        while first < len(marks) and marks[first]:
            first += 1
        self._first_unseen[disk.id] = first
        covered = min(first * CLUSTER, disk.size)
        if self._pending and self._pending[0] == disk.id:
            covered = min(covered, self._pending[1])
        return covered

    def disk_filename(self, disk: Disk) -> str:
        return f"disk-{disk.id}.raw"  # what `vma extract` writes

    def extra_streams(self):
        return [(self.vmstate, "vmstate.bin")] if self.vmstate else []

    def extra_selectors(self, disk: Disk) -> set[str]:
        return {disk.id[6:]} if disk.id.startswith("drive-") else set()

    def details(self) -> dict:
        d = {"uuid": self.uuid.hex(), "ctime": self.ctime}
        if self.vmstate:
            d["vmstate"] = self.vmstate.size
        return d

    @staticmethod
    def _run(run, base_at: int, extent):
        disk, start, at, n = run
        return disk, start, n, base_at + at, extent.take(at, n) if extent.read else None

    def _at(self, disk: Disk, cluster: int, where: int) -> str:
        return f"{self.source.name}: {disk.id}, cluster {cluster} (extent at offset {where})"

    # -- the streaming pass ----------------------------------------------------------
    def stream(self, disks=None, checks: Checks | None = None, verify: bool = True):
        self.source.read_ahead()
        for disk, start, n, _, data in self._runs(disks, checks or Checks(), read=True):
            yield disk, start, data
            self.source.release_views()  # the consumer is done with the run

    def scan(self, checks: Checks | None = None):
        """(disk, disk offset, length, archive offset, None) of every stored run, reading
        the extent headers only (the index of `map`/`serve`/`mount`). VMA keeps no
        checksum of the data: the None is where XVA's scan gives a chunk's."""
        for disk, start, n, at, _ in self._runs(None, checks or Checks(), read=False):
            yield disk, start, n, at, None

    def _runs(self, disks, checks: Checks, read: bool):
        """(disk, disk offset, length, archive offset, data or None) of every stored run
        of 4 KiB blocks contiguous on disk and in the archive, every rule checked. The
        data is read (read=True) or seeked over."""
        if self._streamed:
            raise RuntimeError("a VMA stream can be read once; open the archive again")
        self._streamed = True
        src = self.source
        name = src.name
        wanted = {d.id for d in (disks if disks is not None else self.disks)}
        total = sum(d.meta["clusters"] for d in self.devices.values())
        seen = {
            dev_id: cluster_flags(d.meta["clusters"], total) for dev_id, d in self.devices.items()
        }
        self._seen, self._first_unseen, self._pending = seen, {}, None
        self._extents = 0  # extent headers whose md5 matched
        next_state = 0  # vmstate clusters must arrive in order
        hdr = bytearray(EXTENT_HEADER)
        hview = memoryview(hdr)
        data = bytearray(BLOCKINFOS * BLOCKS_PER_CLUSTER * BLOCK)
        dview = memoryview(data)
        extent = infos = None
        try:
            while True:
                where = src.offset
                got = src.readinto_upto(hview)
                if got == 0:
                    break
                if got < EXTENT_HEADER:
                    raise TruncatedError(
                        f"{name}: truncated in the extent header at offset {where} "
                        f"({got} of 512 bytes)"
                    )
                if hdr[:4] != EXTENT_MAGIC:
                    raise FormatError(f"{name}: no extent magic at offset {where}")
                _magic, reserved, block_count, uuid, stored, *infos = EXTENT_HEAD.unpack_from(hdr)
                if reserved:
                    raise FormatError(
                        f"{name}: extent at offset {where}: reserved field is {reserved}, must be 0"
                    )
                if uuid != self.uuid:
                    raise FormatError(
                        f"{name}: extent at offset {where} carries another archive's uuid"
                    )
                hdr[EXTENT_MD5] = bytes(16)
                if md5_digest(hdr) != stored:
                    raise FormatError(f"{name}: extent header md5 mismatch at offset {where}")
                self._extents += 1
                total = sum((bi >> 48).bit_count() for bi in infos if (bi >> 32) & 0xFF)
                if total != block_count:
                    raise FormatError(
                        f"{name}: extent at offset {where}: masks mark {total} blocks "
                        f"but block_count is {block_count}"
                    )
                base_at = where + EXTENT_HEADER  # archive offset of this extent's data
                extent = _ExtentData(
                    src, dview, block_count * BLOCK, f"the data of the extent at {where}", read
                )
                pos = 0  # next unread block of this extent's data
                run = None  # (disk, disk offset, data start, length): coalesced contiguous writes
                for bi in infos:
                    dev_id = (bi >> 32) & 0xFF
                    if not dev_id:
                        continue
                    mask = bi >> 48
                    cluster = bi & 0xFFFFFFFF
                    disk = self.devices.get(dev_id)
                    if disk is None:
                        raise FormatError(
                            f"{name}: extent at offset {where}, device {dev_id}: no "
                            "such device in the header"
                        )
                    marks = seen[dev_id]
                    if cluster >= len(marks):
                        raise FormatError(
                            f"{self._at(disk, cluster, where)}: past the device's "
                            f"end ({disk.size} bytes)"
                        )
                    base = cluster * CLUSTER
                    if marks[cluster]:  # a salvaged output gets the later copy over it
                        self._broken(checks, disk, cluster, where, "cluster appears a second time")
                    marks[cluster] = 1
                    if disk is self.vmstate:
                        if cluster != next_state:
                            self._broken(
                                checks,
                                disk,
                                cluster,
                                where,
                                f"vmstate cluster out of order (expected {next_state})",
                            )
                        next_state = cluster + 1
                    if (
                        mask
                        and base + CLUSTER > disk.size
                        and mask >> -(-(disk.size - base) // BLOCK)
                    ):  # blocks past the end
                        self._broken(
                            checks, disk, cluster, where, "mask stores blocks past the device's end"
                        )
                    if disk.id in wanted and mask:
                        for first, count, rank in mask_runs(mask):
                            start = base + first * BLOCK
                            if start >= disk.size:
                                break
                            n = min(count * BLOCK, disk.size - start)
                            at = (pos + rank) * BLOCK
                            # extend the run when this follows it both on disk and in the data
                            if (
                                run
                                and run[0] is disk
                                and run[1] + run[3] == start
                                and run[2] + run[3] == at
                            ):
                                run[3] += n
                            else:
                                # marked seen but not yet yielded: covered() stays below it
                                self._pending = (disk.id, start)
                                if run:
                                    yield self._run(run, base_at, extent)
                                run = [disk, start, at, n]
                    pos += mask.bit_count()
                if run:
                    self._pending = None
                    yield self._run(run, base_at, extent)
                extent.finish()
        except CorruptError as e:
            checks.stop(e)  # raises unless keeping intact disks or salvaging
            if extent is not None and not extent.done:
                self._cut_extent(checks, infos, extent, base_at)
        for dev_id, disk in self.devices.items():
            marks = seen[dev_id]
            missing = len(marks) - marks.set_count
            if missing:
                first = marks.find_unset()
                damage = [
                    Damage(
                        disk,
                        a * CLUSTER,
                        min(b * CLUSTER, disk.size) - a * CLUSTER,
                        "missing",
                        cluster=a,
                        clusters=b - a,
                    )
                    for a, b in marks.unset_runs()
                ]
                checks.fail(
                    TruncatedError(
                        f"{name}: {disk.id} is incomplete: {len(marks) - missing} of {len(marks)} "
                        f"clusters present, {missing} missing (first missing: cluster {first}, disk "
                        f"offset {first * CLUSTER}); the archive ends at offset {src.offset}",
                        damage,
                    )
                )

    def stream_checks(self):
        return super().stream_checks() + [
            f"md5 of the header and of {self._extents:,} extent headers"
        ]

    def checked(self):
        return {
            d.id: {
                "checked": [
                    f"every one of its {d.meta['clusters']:,} clusters present exactly once"
                ],
                "unchecked": ["the disk's data: VMA keeps no checksum of it"],
            }
            for d in self.disks
        }

    def _broken(self, checks: Checks, disk: Disk, cluster: int, where: int, what: str) -> None:
        """A cluster that breaks a rule: damage to its 64 KiB."""
        base = cluster * CLUSTER
        checks.fail(
            FormatError(
                f"{self._at(disk, cluster, where)}: {what}",
                [
                    Damage(
                        disk,
                        base,
                        min(CLUSTER, disk.size - base),
                        "structure",
                        cluster=cluster,
                        extent_offset=where,
                    )
                ],
            )
        )

    def _cut_extent(self, checks: Checks, infos, extent: _ExtentData, base_at: int) -> None:
        """An extent whose data broke off: its stored blocks not handed out are missing
        (its header was whole and md5-checked, so where they belong is known)."""
        # bytes of the extent's data that arrived: handed out (wanted disks) or skipped;
        # a plain file has what lies before its end (the index scan seeks, never reads)
        src = self.source
        arrived = max(extent.pos, src.offset - base_at)
        if src.seekable and src.file_size is not None:
            arrived = max(arrived, src.file_size - base_at)
        pos = 0
        for bi in infos:
            dev_id = (bi >> 32) & 0xFF
            disk = self.devices.get(dev_id)
            if not dev_id or disk is None:
                continue
            mask, cluster = bi >> 48, bi & 0xFFFFFFFF
            if cluster < len(self._seen[dev_id]):
                self._seen[dev_id].set(cluster)  # accounted for here, not as never seen
            base = cluster * CLUSTER
            damage = []
            for first, count, rank in mask_runs(mask):
                start = base + first * BLOCK
                n = min(count * BLOCK, disk.size - start)
                if n > 0 and (pos + rank + count) * BLOCK > arrived:
                    damage.append(
                        Damage(
                            disk,
                            start,
                            n,
                            "missing",
                            cluster=cluster,
                            extent_offset=base_at - EXTENT_HEADER,
                        )
                    )
            pos += mask.bit_count()
            if damage:
                checks.fail(
                    TruncatedError(
                        f"{self._at(disk, cluster, base_at - EXTENT_HEADER)}: the extent's data "
                        "breaks off before this cluster's blocks",
                        damage,
                    )
                )


READERS = {"vma": VmaArchive}
