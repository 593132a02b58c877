"""The volumes on a VM's disks and what each holds.

A volume is a whole disk (a file system written with no partition table), a partition
(MBR primary or logical, GPT) or an LVM2 logical volume, its physical volumes found across
every disk of the VM. What a volume holds is told by its signatures, read here from the
first 68 KiB (no parser is needed to name ext4, a LUKS container or swap); the label,
UUID and space used come from the same bytes, as blkid reports them, so /etc/fstab's
UUID= and LABEL= can be matched.
"""

from __future__ import annotations

import re
import struct
import uuid as uuidlib

from ..access.partitions import partitions
from ..errors import VmarcError
from ..model import Archive, DiskView
from .stream import ViewStream

HEAD = 0x10000 + 0x1000  # btrfs keeps its superblock at 64 KiB
READABLE = {"ext2", "ext3", "ext4", "xfs", "btrfs", "ntfs", "vfat", "exfat"}  # filesystems.OPENERS
ENCRYPTED = {"luks1", "luks2", "bitlocker"}


class Volume:
    """One place a file system may be: its name as a user types it, where it lies, what
    its signatures say it holds."""

    def __init__(self, name: str, disk: str, where: str, size: int, stream):
        self.name = name  # xvda1, scsi0-part2, vg0/root, xvdb
        self.disk = disk  # the disk (or disks, for a logical volume) it lies on
        self.where = where  # "partition 1", "logical volume", "whole disk"
        self.size = size
        self.stream = stream  # a seekable file object over the volume's bytes
        self.fstype: str | None = None  # ext4, xfs, ..., lvm2, luks2, swap; None: unknown
        self.label: str | None = None
        self.uuid: str | None = None
        self.used: int | None = None  # bytes in use, where the superblock says
        self.note: str | None = None  # why it cannot be read, when it cannot

    @property
    def readable(self) -> bool:
        return self.fstype in READABLE

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "disk": self.disk,
            "where": self.where,
            "size": self.size,
            "type": self.fstype,
            "label": self.label,
            "uuid": self.uuid,
            "used": self.used,
            "note": self.note,
        }


def disk_name(archive: Archive, disk) -> str:
    """xvda, scsi0: the device as the guest saw it, else the archive's id made safe."""
    return Archive.disk_filename(archive, disk)[: -len(".raw")]


def partition_name(disk: str, number: int) -> str:
    """xvda1 after a letter, scsi0-part2 after a digit (where Linux itself writes p2)."""
    return f"{disk}-part{number}" if disk[-1:].isdigit() else f"{disk}{number}"


def find_volumes(archive: Archive, views: list[DiskView]) -> list[Volume]:
    """Every volume on the disks, in disk order, logical volumes last."""
    found: list[Volume] = []
    for view in views:
        name = disk_name(archive, view.disk)
        whole = Volume(name, name, "whole disk", view.size, ViewStream(view))
        identify(whole)
        # A file system on the whole disk carries 55 AA too (a FAT or NTFS boot sector);
        # anything the signatures name wins over the partition table's reading of it.
        parts = [] if whole.fstype else partitions(view)
        if not parts:
            found.append(whole)
            continue
        for p in parts:
            vol = Volume(
                partition_name(name, p.number),
                name,
                f"partition {p.number}",
                p.size,
                ViewStream(view, p.offset, p.size),
            )
            identify(vol)
            found.append(vol)
    return found + _logical_volumes([v for v in found if v.fstype == "lvm2"])


def _logical_volumes(pvs: list[Volume]) -> list[Volume]:
    """The logical volumes of every volume group whose physical volumes are here. A group
    missing a physical volume is named, its volumes are not read."""
    if not pvs:
        return []
    try:
        from dissect.volume.lvm import LVM2
        from dissect.volume.lvm.physical import LVM2Device
    except ImportError:
        for pv in pvs:
            pv.note = "LVM2 needs the files extra: pip install 'vmarc[files]'"
        return []

    groups: dict[str, list[tuple[Volume, object]]] = {}
    for pv in pvs:
        try:
            device = LVM2Device(pv.stream)
            vg = next(k for k, v in device.metadata.items() if isinstance(v, dict))
        except VmarcError:
            raise  # the source's own damage is reported as such, not as the volume's
        except Exception as e:  # the label is there but its metadata does not parse
            pv.note = f"LVM2 metadata unreadable: {_reason(e)}"
            continue
        pv.label = vg
        groups.setdefault(vg, []).append((pv, device))
    found = []
    for vg, members in groups.items():
        disks = ",".join(dict.fromkeys(pv.disk for pv, _ in members))
        try:
            lvm = LVM2([device for _, device in members])
            lvs = [lv for lv in lvm.vg.lv if lv.is_visible]
        except VmarcError:
            raise
        except Exception as e:
            for pv, _ in members:
                pv.note = f"volume group {vg}: {_reason(e)}"
            continue
        missing = [pv.name for pv in lvm.vg.pv if pv.dev is None]
        for lv in lvs:
            size = sum(s.extent_count for s in lv.segments) * lvm.vg.extent_size * 512
            vol = Volume(f"{vg}/{lv.name}", disks, "logical volume", size, None)
            if missing:
                vol.note = f"volume group {vg} lacks physical volume(s) {', '.join(missing)}"
            elif lv.type not in (None, "striped", "linear"):
                vol.note = f"{lv.type} logical volumes are not supported"
            else:
                try:
                    extent = lvm.vg.extent_size * 512
                    vol.stream = _LogicalVolumeStream(lv, extent, size)
                    identify(vol)
                except VmarcError:
                    raise
                except Exception as e:
                    vol.note = f"cannot open: {_reason(e)}"
            found.append(vol)
    return found


class _LogicalVolumeStream:
    """A logical volume's bytes from its linear and striped segments. dissect.volume
    parses the metadata; the mapping is done here because its striped segments lay the
    stripes end to end instead of in turn (dissect.volume 3.18)."""

    def __init__(self, lv, extent: int, size: int):
        self.size, self.pos = size, 0
        self.segments = []  # (start, length, [(pv file, byte offset)], stripe bytes)
        for seg in lv.segments:
            stripes = [
                (lv.vg.physical_volumes[name].dev.open(), first * extent)
                for name, first in seg.stripes
            ]
            stripe = (seg.stripe_size or 0) * 512 if len(stripes) > 1 else 0
            self.segments.append(
                (seg.start_extent * extent, seg.extent_count * extent, stripes, stripe)
            )

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else self.size + pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        data = self.pread(self.pos, self.size - self.pos if n is None or n < 0 else n)
        self.pos += len(data)
        return data

    def pread(self, pos: int, n: int) -> bytes:
        n = max(0, min(n, self.size - pos))
        parts = []
        while n > 0:
            start, length, stripes, stripe = next(
                s for s in self.segments if s[0] <= pos < s[0] + s[1]
            )
            at = pos - start
            if stripe:  # piece k of the segment lies on stripe k % count, row k // count
                piece, within = divmod(at, stripe)
                fh, base = stripes[piece % len(stripes)]
                where = base + (piece // len(stripes)) * stripe + within
                take = min(n, stripe - within)
            else:
                fh, base = stripes[0]
                where, take = base + at, min(n, length - at)
            fh.seek(where)
            data = fh.read(take)
            if len(data) < take:
                raise EOFError(f"physical volume ends at {where + len(data)}")
            parts.append(data)
            pos, n = pos + take, n - take
        return b"".join(parts)


def _reason(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _text(raw: bytes, encoding: str = "utf-8") -> str | None:
    text = raw.split(b"\0")[0].decode(encoding, "replace").strip()
    return text or None


def identify(vol: Volume) -> None:
    """Fill in fstype, label, uuid and used from the volume's first bytes."""
    head = vol.stream.pread(0, HEAD).ljust(HEAD, b"\0")
    sb = head[1024:2048]
    if sb[0x38:0x3A] == b"\x53\xef":
        _ext(vol, sb)
    elif head[:4] == b"XFSB":
        _xfs(vol, head)
    elif head[0x10040:0x10048] == b"_BHRfS_M":
        _btrfs(vol, head[0x10000:])
    elif head[3:11] == b"NTFS    ":
        vol.fstype = "ntfs"
        vol.uuid = "%016X" % struct.unpack_from("<Q", head, 0x48)[0]
    elif head[3:11] == b"EXFAT   ":
        vol.fstype = "exfat"
        serial = struct.unpack_from("<I", head, 0x64)[0]
        vol.uuid = f"{serial >> 16:04X}-{serial & 0xFFFF:04X}"
    elif head[3:11] == b"-FVE-FS-":
        vol.fstype, vol.note = "bitlocker", "encrypted (BitLocker): not read"
    elif head[:6] == b"LUKS\xba\xbe":
        version = struct.unpack_from(">H", head, 6)[0]
        vol.fstype, vol.note = f"luks{version}", f"encrypted (LUKS{version}): not read"
        vol.uuid = _text(head[168:208], "ascii")
    elif any(head[i * 512 : i * 512 + 8] == b"LABELONE" for i in range(4)):
        _lvm2(vol, head)
    elif head[4086:4096] in (b"SWAPSPACE2", b"SWAP-SPACE"):
        vol.fstype = "swap"
        vol.uuid = str(uuidlib.UUID(bytes=head[1036:1052]))
        vol.label = _text(head[1052:1068])
    elif head[510:512] == b"\x55\xaa" and (
        head[0x36:0x3B] in (b"FAT12", b"FAT16") or head[0x52:0x57] == b"FAT32"
    ):
        fat32 = head[0x52:0x57] == b"FAT32"
        at = 0x43 if fat32 else 0x27
        serial = struct.unpack_from("<I", head, at)[0]
        vol.fstype = "vfat"
        vol.uuid = f"{serial >> 16:04X}-{serial & 0xFFFF:04X}"
        label = _text(head[at + 4 : at + 15], "cp437")
        vol.label = None if label == "NO NAME" else label
    elif head[3:11] == b"ReFS\0\0\0\0" or head[0x400:0x402] in (b"H+", b"HX"):
        vol.fstype = "refs" if head[3:7] == b"ReFS" else "hfsplus"
        vol.note = "no reader for this file system"
    elif any(head[: 1 << 16]):
        vol.note = "no known file system"
    else:
        vol.note = "empty"


def _ext(vol: Volume, sb: bytes) -> None:
    compat, incompat, ro_compat = struct.unpack_from("<III", sb, 0x5C)
    vol.fstype = "ext4" if incompat & 0x2C0 else "ext3" if compat & 0x4 else "ext2"
    vol.uuid = str(uuidlib.UUID(bytes=sb[0x68:0x78]))
    vol.label = _text(sb[0x78:0x88])
    block = 1024 << struct.unpack_from("<I", sb, 0x18)[0]
    blocks = struct.unpack_from("<I", sb, 0x4)[0] | struct.unpack_from("<I", sb, 0x150)[0] << 32
    free = struct.unpack_from("<I", sb, 0xC)[0] | struct.unpack_from("<I", sb, 0x158)[0] << 32
    if not incompat & 0x80:  # the high halves are only meaningful with 64bit
        blocks, free = blocks & 0xFFFFFFFF, free & 0xFFFFFFFF
    vol.used = (blocks - free) * block if free <= blocks else None


def _xfs(vol: Volume, head: bytes) -> None:
    block, dblocks = struct.unpack_from(">IQ", head, 4)
    vol.fstype = "xfs"
    vol.uuid = str(uuidlib.UUID(bytes=head[32:48]))
    vol.label = _text(head[108:120])
    free = struct.unpack_from(">Q", head, 144)[0]
    vol.used = (dblocks - free) * block if free <= dblocks else None


def _btrfs(vol: Volume, sb: bytes) -> None:
    vol.fstype = "btrfs"
    vol.uuid = str(uuidlib.UUID(bytes=sb[0x20:0x30]))
    vol.label = _text(sb[0x12B:0x22B])
    vol.used = struct.unpack_from("<Q", sb, 0x78)[0]


def _lvm2(vol: Volume, head: bytes) -> None:
    at = next(i * 512 for i in range(4) if head[i * 512 : i * 512 + 8] == b"LABELONE")
    if head[at + 24 : at + 32] != b"LVM2 001":
        vol.note = "no known file system"
        return
    vol.fstype = "lvm2"
    pv_at = at + struct.unpack_from("<I", head, at + 20)[0]
    raw = head[pv_at : pv_at + 32].decode("ascii", "replace")
    # LVM writes its 32-character ids in groups of 6-4-4-4-4-4-6
    groups = re.fullmatch(r"(.{6})(.{4})(.{4})(.{4})(.{4})(.{4})(.{6})", raw)
    vol.uuid = "-".join(groups.groups()) if groups else raw
