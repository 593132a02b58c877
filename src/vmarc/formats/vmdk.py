"""VMDK (VMware Virtual Disk, versions 1-3): monolithicSparse, twoGbMaxExtentSparse,
monolithicFlat, twoGbMaxExtentFlat, vmfs and streamOptimized, from a descriptor file or
a sparse file with its descriptor inside, with parent chains (parentFileNameHint).
Layout and rules: docs/formats/vmdk.md (VMware's Virtual Disk Format 5.0, qemu
block/vmdk.c).

Sparse extents are read through their grain directory and tables. A streamOptimized
disk is also read front to back by its markers, so it streams from a pipe or from inside
an OVA without seeking back (the grain directory may lie at the end).
"""

from __future__ import annotations

import functools
import os
import re
import struct
import zlib
from array import array
from collections import OrderedDict

from ..errors import (
    CorruptError,
    FormatError,
    IntegrityError,
    SourceError,
    TruncatedError,
    UnsupportedError,
)
from ..io.source import open_source
from ..model import DATA, ZERO, Checks, Damage, Disk, is_zero
from .clusters import ClusterAssembler
from .mapped import CODED, PARENT, MappedImage, Run


@functools.cache
def _zlib():
    """ISA-L's zlib (the `gzip` extra) inflates grains twice as fast as zlib and deflates
    them several times faster; imported when a grain is first met, not at every start."""
    try:
        from isal import isal_zlib

        return isal_zlib
    except ImportError:  # pragma: no cover - without the extra
        return zlib


SECTOR = 512
MAGIC = b"KDMV"
COWD = b"COWD"  # ESX 2 sparse (version 1 "hosted" COWD): not read
DESCRIPTOR_MAGIC = b"# Disk DescriptorFile"
# the sparse extent header: magic, version, flags, capacity, grain size, descriptor
# offset and size, GTEs per GT, redundant GD offset, GD offset, overhead, unclean
# shutdown, the four newline-check characters, compression algorithm (then padding)
HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
GD_AT_END = 0xFFFFFFFFFFFFFFFF
FLAG_NEWLINE_TEST, FLAG_REDUNDANT_GD, FLAG_ZERO_GRAIN = 1, 2, 4
FLAG_COMPRESSED, FLAG_MARKERS = 1 << 16, 1 << 17
NEWLINE_CHARS = b"\n \r\n"
COMPRESS_DEFLATE = 1
MARKER = struct.Struct("<QII")  # value (LBA or sectors), size (0: metadata), type
MARKER_EOS, MARKER_GT, MARKER_GD, MARKER_FOOTER = 0, 1, 2, 3
GTE_ZERO = 1  # a zeroed grain, when FLAG_ZERO_GRAIN is set
MAX_CAPACITY = 1 << 47  # sectors: 64 PiB, far past any real disk
MAX_GRAIN = 1 << 18  # sectors (128 MiB)
MAX_GTES = 4096
GT_CACHE = 64
FLAT_KINDS = ("FLAT", "VMFS")
UNREAD_KINDS = ("VMFSSPARSE", "SESPARSE", "VMFSRDM", "VMFSRAW")
EXTENT_LINE = re.compile(
    r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+(\w+)(?:\s+"((?:[^"\\]|\\.)*)"(?:\s+(\d+))?)?\s*$'
)


def parse_descriptor(text: str, where: str) -> tuple[dict[str, str], list[tuple]]:
    """The descriptor's key = value pairs and its extent lines (access, sectors, kind,
    file or None, offset in sectors)."""
    fields, extents = {}, []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = EXTENT_LINE.match(line)
        if m:
            access, sectors, kind, fname, offset = m.groups()
            extents.append((access, int(sectors), kind.upper(), fname, int(offset or 0)))
            continue
        if "=" in line:
            key, value = line.split("=", 1)
            fields[key.strip()] = value.strip().strip('"')
            continue
        raise FormatError(f"{where}: descriptor line not understood: {line[:80]!r}")
    if not extents:
        raise FormatError(f"{where}: descriptor names no extent")
    return fields, extents


class SparseHeader:
    def __init__(self, raw: bytes, where: str):
        if raw[:4] != MAGIC:
            raise FormatError(f"{where}: no sparse VMDK magic 'KDMV'")
        (
            _magic,
            self.version,
            self.flags,
            self.capacity,
            self.grain_sectors,
            self.descriptor_offset,
            self.descriptor_size,
            self.gtes_per_gt,
            self.rgd_offset,
            self.gd_offset,
            self.overhead,
            self.unclean,
            self.newlines,
            self.compression,
        ) = HEADER.unpack_from(raw)
        self.raw = bytes(raw[: HEADER.size])
        if self.version not in (1, 2, 3):
            raise UnsupportedError(f"{where}: sparse VMDK version {self.version} (1-3 are read)")
        g = self.grain_sectors
        if not g or g & (g - 1) or g > MAX_GRAIN:
            raise FormatError(
                f"{where}: grain size of {g} sectors is not a power of two <= 128 MiB"
            )
        if self.capacity > MAX_CAPACITY:
            raise FormatError(f"{where}: capacity of {self.capacity} sectors is absurd")
        if not 1 <= self.gtes_per_gt <= MAX_GTES:
            raise FormatError(f"{where}: {self.gtes_per_gt} entries per grain table")
        if self.flags & FLAG_NEWLINE_TEST and self.newlines != NEWLINE_CHARS:
            raise FormatError(
                f"{where}: newline check characters are {self.newlines!r}: the file went "
                "through a text-mode transfer"
            )
        if self.flags & FLAG_COMPRESSED and self.compression != COMPRESS_DEFLATE:
            raise UnsupportedError(f"{where}: grain compression {self.compression}")
        if self.flags & FLAG_COMPRESSED and not self.flags & FLAG_MARKERS:
            raise UnsupportedError(f"{where}: compressed grains without markers")

    @property
    def stream_optimized(self) -> bool:
        return bool(self.flags & FLAG_COMPRESSED)

    @property
    def grain(self) -> int:
        return self.grain_sectors * SECTOR

    @property
    def gd_entries(self) -> int:
        return -(-self.capacity // (self.grain_sectors * self.gtes_per_gt))


def inflate_grain(data, lba: int, header: SparseHeader, where: str) -> bytes:
    """A compressed grain's bytes: a whole grain (less at the disk's end), never more
    (a bomb costs one grain)."""
    want = min(header.grain, (header.capacity - lba) * SECTOR)
    try:
        d = _zlib().decompressobj()
        out = d.decompress(data, header.grain + 1)
        if not d.eof and len(out) <= header.grain:
            raise ValueError("the deflate stream is cut short")
    except Exception as e:
        raise IntegrityError(f"{where}: grain at sector {lba} does not inflate: {e}") from None
    if len(out) > header.grain or len(out) < want:
        raise IntegrityError(
            f"{where}: grain at sector {lba} inflates to {len(out)} bytes, not {want}"
        )
    return out[:want]


class SparseExtent:
    """One sparse extent file: its header, grain directory and (cached) grain tables."""

    def __init__(self, source, where: str):
        self.source = source
        self.where = where
        raw = source.pread(SECTOR, 0, "VMDK sparse header")
        self.header = h = SparseHeader(raw, f"{where}: header")
        self.footer = None
        if h.gd_offset == GD_AT_END:  # streamOptimized: the footer copy has the real one
            size = source.file_size
            if size < 3 * SECTOR:
                raise FormatError(f"{where}: grain directory at the end, but no footer")
            self.footer = SparseHeader(
                source.pread(SECTOR, size - 2 * SECTOR, "VMDK footer"),
                f"{where}: footer at offset {size - 2 * SECTOR}",
            )
            h = self.footer
        self.file_size = source.file_size
        self.gd = self._directory(h.gd_offset, "grain directory")
        self.rgd = None
        if h.flags & FLAG_REDUNDANT_GD and h.rgd_offset not in (0, GD_AT_END):
            self.rgd = self._directory(h.rgd_offset, "redundant grain directory")
        self._gts: OrderedDict[int, array] = OrderedDict()
        self._last = (None, b"")  # the last grain decoded (sequential reads of one grain)

    def _directory(self, sector: int, what: str) -> array:
        h = self.header
        n = h.gd_entries
        at = sector * SECTOR
        if at + 4 * n > self.source.file_size or sector == 0:
            raise FormatError(
                f"{self.where}: {what} at sector {sector} ({n} entries) lies outside the file"
            )
        gd = array("I", self.source.pread(4 * n, at, what))
        if gd.itemsize != 4:  # pragma: no cover - every platform vmarc runs on
            raise UnsupportedError("array('I') is not 32 bits here")
        return _little(gd)

    def table(self, index: int, gd: array | None = None) -> array | None:
        """Grain table `index` (None: not allocated)."""
        cached = gd is None and self._gts.get(index)
        if cached:
            self._gts.move_to_end(index)
            return cached
        sector = (gd or self.gd)[index]
        if not sector:
            return None
        h = self.header
        at = sector * SECTOR
        size = 4 * h.gtes_per_gt
        if at + size > self.file_size:
            raise FormatError(
                f"{self.where}: grain table {index} at offset {at} runs past the end of the "
                f"file ({self.file_size} bytes)"
            )
        gt = _little(array("I", self.source.pread(size, at, f"grain table {index}")))
        if gd is None:
            self._gts[index] = gt
            if len(self._gts) > GT_CACHE:
                self._gts.popitem(last=False)
        return gt

    def runs(self, base: int, start: int, end: int):
        """Runs of [start, end) (offsets in the extent), shifted by base on the disk."""
        h = self.header
        grain = h.grain
        per_gt = grain * h.gtes_per_gt
        pos = start - start % grain
        size = h.capacity * SECTOR
        zero_gte = h.flags & FLAG_ZERO_GRAIN
        while pos < min(end, size):
            gt = self.table(pos // per_gt)
            if gt is None or (pos % per_gt == 0 and not any(gt)):  # (qemu preallocates tables)
                n = min(per_gt - pos % per_gt, size - pos)
                yield Run(base + pos, n, PARENT)
                pos += n
                continue
            entry = gt[pos % per_gt // grain]
            n = min(grain, size - pos)
            if entry == 0:
                yield Run(base + pos, n, PARENT)
            elif entry == GTE_ZERO and zero_gte:
                yield Run(base + pos, n, ZERO)
            elif h.stream_optimized:
                yield Run(base + pos, n, CODED, self, entry, base + pos)
            else:
                at = entry * SECTOR
                if at + n > self.file_size:
                    raise FormatError(
                        f"{self.where}: grain at disk offset {base + pos} points at offset "
                        f"{at}, past the end of the file ({self.file_size} bytes)"
                    )
                yield Run(base + pos, n, DATA, self.source, at)
            pos += n

    def decode(self, sector: int, base: int = 0) -> bytes:
        """The compressed grain whose marker is at this sector."""
        if self._last[0] == sector:
            return self._last[1]
        at = sector * SECTOR
        if at + MARKER.size > self.file_size:
            raise FormatError(
                f"{self.where}: grain marker at offset {at} lies past the end of the file"
            )
        lba, size, _ = MARKER.unpack(self.source.pread(MARKER.size, at, "grain marker"))
        if not size or at + 12 + size > self.file_size or size > 2 * self.header.grain + 4096:
            raise FormatError(
                f"{self.where}: grain marker at offset {at} gives {size} bytes of data"
            )
        data = self.source.pread(size, at + 12, f"grain at offset {at}")
        out = inflate_grain(data, lba, self.header, f"{self.where} (offset {at})")
        self._last = (sector, out)
        return out

    def check(self, disk: Disk, base: int, checks: Checks) -> int:
        """verify's table checks: the redundant directory and its tables against the
        primary ones, every table and grain inside the file, each compressed grain's
        marker naming the sector its table entry is for. Returns the grains counted."""
        h = self.header
        grain, per_gt = h.grain, h.grain * h.gtes_per_gt

        def damage(pos, n):
            return [Damage(disk, base + pos, n, "structure", file=self.where)]

        count = 0
        for i in range(len(self.gd)):
            try:
                gt = self.table(i, self.gd)
            except FormatError as e:
                checks.fail(FormatError(str(e), damage(i * per_gt, per_gt)))
                continue
            if self.rgd is not None:
                try:
                    rgt = self.table(i, self.rgd)
                except FormatError as e:
                    checks.fail(FormatError(f"{e} (redundant directory)", []))
                    rgt = None
                if (gt is None) != (rgt is None) or (gt is not None and gt != rgt):
                    checks.fail(
                        FormatError(
                            f"{self.where}: grain table {i} differs between the primary and "
                            "the redundant grain directory",
                            damage(i * per_gt, per_gt),
                        )
                    )
            if gt is None:
                continue
            for j, entry in enumerate(gt):
                pos = i * per_gt + j * grain
                if entry in (0, GTE_ZERO) or pos >= h.capacity * SECTOR:
                    continue
                count += 1
                try:
                    if h.stream_optimized:
                        self._check_marker(entry, pos)
                    elif entry * SECTOR + grain > self.file_size:
                        raise FormatError(
                            f"{self.where}: grain table {i} entry {j} points at offset "
                            f"{entry * SECTOR}, past the end of the file"
                        )
                except CorruptError as e:
                    checks.fail(type(e)(str(e), damage(pos, min(grain, h.capacity * SECTOR - pos))))
        return count

    def _check_marker(self, sector: int, pos: int) -> None:
        at = sector * SECTOR
        if at + MARKER.size > self.file_size:
            raise FormatError(f"{self.where}: grain at disk offset {pos} points past the file")
        lba, size, _ = MARKER.unpack(self.source.pread(MARKER.size, at, "grain marker"))
        if lba * SECTOR != pos or not size:
            raise FormatError(
                f"{self.where}: the grain table puts disk offset {pos} at offset {at}, but "
                f"the marker there is for sector {lba}"
            )


def _embedded(raw: bytes, name: str) -> tuple[dict, list]:
    """A sparse file's own descriptor (NUL-padded; none at all in some extent files)."""
    text = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
    return parse_descriptor(text, f"{name}: descriptor") if text.strip() else ({}, [])


def _flat_runs(part, a: int, b: int, shift: int):
    """A flat extent's [a, b) (disk offsets; file offset = disk offset + shift): its
    file's holes (SEEK_HOLE) as ZERO, so a mostly empty -flat.vmdk is not read whole."""
    pos = a
    while pos < b:
        data_at, hole_at = part.next_data(pos + shift)
        if data_at is None or data_at - shift >= b:
            yield Run(pos, b - pos, ZERO)
            return
        start = data_at - shift
        if start > pos:
            yield Run(pos, start - pos, ZERO)
        stop = min(b, int(min(hole_at, 1 << 62)) - shift)
        yield Run(start, stop - start, DATA, part, data_at)
        pos = stop


def _little(a: array) -> array:
    if struct.pack("=I", 1) != struct.pack("<I", 1):  # pragma: no cover - big-endian hosts
        a.byteswap()
    return a


class VmdkArchive(MappedImage):
    format = "vmdk"

    @classmethod
    def probe(cls, head: bytes) -> bool:
        return head[:4] in (MAGIC, COWD) or head.lstrip().startswith(DESCRIPTOR_MAGIC)

    @classmethod
    def needs_file(
        cls, head: bytes, unsized: bool = False, parent: str | None = None
    ) -> str | None:
        if head[:4] == MAGIC and len(head) >= HEADER.size:
            flags = struct.unpack_from("<I", head, 8)[0]
            if flags & FLAG_MARKERS and flags & FLAG_COMPRESSED:
                return None  # streamOptimized: read by its markers
        return "a sparse VMDK is read through its grain tables"

    def __init__(
        self, source, parent: str | None = None, no_backing: bool = False, _chain: tuple = ()
    ):
        super().__init__(source)
        name = source.name
        self._extra = []  # extent files opened besides the source
        self.pieces: list[tuple] = []  # (disk offset, length, kind, SparseExtent|Source, at)
        self.streaming = not source.seekable  # a streamOptimized VMDK from a pipe
        head = source.peek(SECTOR)
        if head[:4] == COWD:
            raise UnsupportedError(f"{name}: ESX 2 'COWD' sparse VMDK is not read")
        self.header = None
        if self.streaming:  # the descriptor sits right after the header: peeked
            self.header = h = SparseHeader(head, f"{name}: header")
            end = (h.descriptor_offset + h.descriptor_size) * SECTOR
            text = b""
            if h.descriptor_offset and end <= 1 << 16:
                text = source.peek(end)[h.descriptor_offset * SECTOR :]
            self.fields, self.extent_lines = _embedded(text, name)
            self.size = h.capacity * SECTOR
        elif head[:4] == MAGIC:
            self._open_sparse_file()
        else:
            self._open_descriptor()
        self.fields.setdefault("createType", "")
        disk = Disk(
            id="disk",
            name=os.path.basename(source.path or name),
            size=self.size,
            meta={"subformat": self.fields.get("createType") or "sparse extent"},
        )
        for key in ("ddb.adapterType", "ddb.virtualHWVersion"):
            if key in self.fields:
                disk.meta[key[4:]] = self.fields[key]
        self.disks.append(disk)
        hint = self.fields.get("parentFileNameHint")
        if self.fields.get("parentCID", "ffffffff").lower() != "ffffffff" and not no_backing:
            if self.streaming:
                raise UnsupportedError(f"{name}: a VMDK with a parent cannot be read from a pipe")
            self._open_parent(parent or hint, _chain, given=bool(parent))
            disk.meta["parent"] = self.parent.source.path

    # -- opening -------------------------------------------------------------------------
    def _open_sparse_file(self):
        """A sparse file: its own descriptor (if any) names it as the one extent."""
        src = self.source
        ext = SparseExtent(src, src.name)
        self.header = ext.header
        h = ext.header
        text = b""
        if h.descriptor_offset and h.descriptor_size:
            at, n = h.descriptor_offset * SECTOR, h.descriptor_size * SECTOR
            if at + n > src.file_size or n > 1 << 20:
                raise FormatError(f"{src.name}: embedded descriptor at {at} lies outside the file")
            text = src.pread(n, at, "VMDK descriptor")
        self.fields, self.extent_lines = _embedded(text, src.name)
        self.size = h.capacity * SECTOR
        self.pieces = [(0, self.size, "SPARSE", ext, 0)]

    def _open_descriptor(self):
        src = self.source
        if src.file_size > 1 << 20:
            raise FormatError(f"{src.name}: a {src.file_size}-byte VMDK descriptor is absurd")
        raw = src.pread(src.file_size, 0, "VMDK descriptor")
        text = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
        self.fields, self.extent_lines = parse_descriptor(text, f"{src.name}: descriptor")
        base = os.path.dirname(os.path.abspath(src.path or "-"))
        pos = 0
        for access, sectors, kind, fname, offset in self.extent_lines:
            n = sectors * SECTOR
            if kind == "ZERO":
                self.pieces.append((pos, n, ZERO, None, 0))
            elif kind in UNREAD_KINDS:
                raise UnsupportedError(f"{src.name}: {kind} extents are not read")
            elif kind in FLAT_KINDS + ("SPARSE",) and fname:
                path = os.path.join(base, fname)
                if not os.path.isfile(path):
                    raise SourceError(
                        f"{src.name}: extent file {fname} not found or not a regular file ({path})"
                    )
                part = open_source(path)
                self._extra.append(part)
                if not part.seekable:
                    raise UnsupportedError(f"{src.name}: extent file {fname} is compressed")
                if kind == "SPARSE":
                    ext = SparseExtent(part, path)
                    if ext.header.capacity != sectors:
                        raise FormatError(
                            f"{src.name}: extent {fname} holds {ext.header.capacity} sectors, "
                            f"the descriptor says {sectors}"
                        )
                    self.pieces.append((pos, n, "SPARSE", ext, 0))
                else:
                    if offset * SECTOR + n > part.file_size:
                        raise FormatError(
                            f"{src.name}: flat extent {fname} holds {part.file_size} bytes, "
                            f"the descriptor reads {n} from offset {offset * SECTOR}"
                        )
                    self.pieces.append((pos, n, DATA, part, offset * SECTOR))
            else:
                raise FormatError(f"{src.name}: extent line of kind {kind} without a file")
            pos += n
        self.size = pos

    def _open_parent(self, hint: str | None, chain: tuple, given: bool):
        name = self.source.name
        me = os.path.realpath(self.source.path or "-")
        if not hint:
            raise FormatError(f"{name}: a parent CID but no parentFileNameHint; give --parent")
        path = self.beside(hint, "parent", chain, "; give it with --parent")
        parent = VmdkArchive(open_source(path), _chain=chain + (me,))
        want = self.fields["parentCID"].lower()
        got = parent.fields.get("CID", "").lower()
        if got != want and not given:
            parent.close()
            raise FormatError(
                f"{name}: parent {path} has CID {got or '(none)'}, but the disk expects {want} "
                "(the parent changed since the child was made)"
            )
        self.parent = parent

    def close(self):
        for part in self._extra:
            part.close()
        super().close()

    def details(self) -> dict:
        d = {"subformat": self.fields.get("createType") or "sparse extent"}
        if self.header is not None:
            d["grain_size"] = self.header.grain
            d["version"] = self.header.version
        d["extents"] = [
            {"kind": kind, "sectors": sectors, "file": fname}
            for _a, sectors, kind, fname, _o in self.extent_lines
        ]
        if self.parent is not None:
            d["backing_chain"] = self.chain()
        return d

    # -- reading -------------------------------------------------------------------------
    def runs(self, start: int, end: int):
        for pos, n, kind, holder, at in self.pieces:
            if pos + n <= start:
                continue
            if pos >= end:
                return
            a, b = max(start, pos), min(end, pos + n)
            if kind == "SPARSE":
                yield from holder.runs(pos, a - pos, b - pos)
            elif kind == DATA:
                yield from _flat_runs(holder, a, b, at - pos)
            else:
                yield Run(a, b - a, ZERO)

    def stream(self, disks=None, checks: Checks | None = None, verify: bool = True):
        disk = self.disks[0]
        if disks is not None and disk not in disks:
            return
        if self.header is not None and self.header.stream_optimized and self.parent is None:
            self.source.read_ahead()
            yield from stream_markers(self.source, self.header, disk, self.source.name)
        else:
            yield from super().stream(disks, checks, verify)

    # -- checks --------------------------------------------------------------------------
    def checked(self):
        items = []
        sparse = [p for p in self.pieces if p[2] == "SPARSE"]
        if self.extent_lines and not self.header:
            items.append(
                f"the descriptor's {len(self.extent_lines)} extents against their files "
                "(present, sizes, sparse capacities)"
            )
        if sparse:
            items += [
                "sparse headers (magic, version, grain size, newline check characters)",
                "every grain table and grain inside its file",
            ]
            if any(p[3].rgd is not None for p in sparse):
                items.append("the redundant grain directory and tables against the primary")
        if self.header is not None and self.header.stream_optimized:
            items += [
                "every grain marker in file order: sector inside the disk, data inflates "
                "to a whole grain",
            ]
            if not self.streaming:
                items.append("each grain table entry against the marker it points at")
        if self.parent is not None:
            items.append("each parent's CID against the parentCID its child records")
        return self.every_disk(items, ["the disk's data: VMDK keeps no checksum of it"])

    def check_more(self, checks: Checks) -> None:
        disk = self.disks[0]
        for pos, _n, kind, holder, _at in self.pieces:
            if kind == "SPARSE":
                holder.check(disk, pos, checks)


def stream_markers(src, header: SparseHeader, disk: Disk, where: str):
    """A streamOptimized VMDK front to back (a pipe, an OVA member): after the header,
    the descriptor and the overhead, each grain's marker and deflate data in turn;
    metadata markers are passed over, the end-of-stream marker ends it. src reads
    sequentially (readinto_exact, readinto_upto, skip, offset); it stands after the
    header's first sector, or at 0.

    VMware puts the grain tables at the end and always closes with the end-of-stream
    marker; qemu-img puts them before the grains and may end the file after the last
    grain. Then the highest grain the tables point at says where the stream must reach,
    so a cut stream is still told from a whole one."""
    if src.offset == 0:
        src.skip(SECTOR, "VMDK header")
    first = header.overhead * SECTOR
    if first < src.offset:
        raise FormatError(f"{where}: overhead of {header.overhead} sectors ends inside the header")
    must_reach = None
    if header.gd_offset == GD_AT_END:
        src.skip(first - src.offset, "VMDK metadata before the grains")
    else:
        must_reach = _highest_grain(src, first, header)
    size = header.capacity * SECTOR
    sector = memoryview(bytearray(SECTOR))
    buf = bytearray(header.grain + 4096)
    view = memoryview(buf)
    last = -1
    while True:
        at = src.offset
        got = src.readinto_upto(sector)
        if got == 0 and must_reach is not None and at > must_reach:
            return  # qemu-img's ending: every grain its tables name has come
        if got < SECTOR:
            raise TruncatedError(
                f"{where}: the stream ends at offset {at + got}, before its end-of-stream "
                "marker" + ("" if must_reach is None else f" (a grain at {must_reach} is named)")
            )
        value, length, kind = MARKER.unpack_from(sector)
        if length:  # a grain: its LBA, then `length` bytes of deflate data
            need = -(-(12 + length) // SECTOR) * SECTOR
            if length > len(buf) - 12:
                raise FormatError(
                    f"{where}: grain marker at offset {at} gives {length} bytes of data"
                )
            view[:SECTOR] = sector
            if need > SECTOR:
                src.readinto_exact(view[SECTOR:need], f"grain at offset {at}")
            if value % header.grain_sectors or value * SECTOR >= size:
                raise FormatError(
                    f"{where}: grain marker at offset {at} is for sector {value}, not a grain "
                    f"boundary inside the {size}-byte disk"
                )
            if value * SECTOR <= last:
                raise UnsupportedError(
                    f"{where}: grain for sector {value} at offset {at} comes after a later one"
                )
            data = inflate_grain(view[12 : 12 + length], value, header, f"{where} (offset {at})")
            last = value * SECTOR
            out = memoryview(data)
            if not is_zero(out):
                yield disk, value * SECTOR, out
            continue
        if kind == MARKER_EOS:
            return
        if kind not in (MARKER_GT, MARKER_GD, MARKER_FOOTER):
            raise FormatError(f"{where}: unknown marker type {kind} at offset {at}")
        if value > (1 << 24):
            raise FormatError(f"{where}: metadata marker at offset {at} spans {value} sectors")
        src.skip(value * SECTOR, "VMDK metadata")


def _highest_grain(src, first: int, header: SparseHeader) -> int:
    """Skip to the first grain (offset `first`), reading the grain directories and tables
    that lie before it: the file offset of the highest grain they point at (a directory
    entry points inside the metadata, below `first`, so any entry at or past it is a
    grain)."""
    highest = 0
    tables = min(o for o in (header.gd_offset, header.rgd_offset) if o) * SECTOR
    if src.offset < tables < first:  # the descriptor lies before them: not read as numbers
        src.skip(tables - src.offset, "VMDK descriptor")
    chunk = memoryview(bytearray(1 << 20))
    while src.offset < first:
        n = min(len(chunk), first - src.offset)
        n -= n % 4
        if not n:
            src.skip(first - src.offset, "VMDK metadata")
            break
        src.readinto_exact(chunk[:n], "VMDK grain tables")
        values = array("I")
        values.frombytes(chunk[:n])  # (array("I", a memoryview) would take its bytes one by one)
        _little(values)
        highest = max(highest, max(values))
    return highest * SECTOR if highest * SECTOR >= first else first - 1


# -- writing ------------------------------------------------------------------------------
GRAIN_SECTORS = 128  # 64 KiB grains, as VMware writes them
GTES = 512
DEFLATE_LEVEL = 1  # (ISA-L's levels are 0-3; zlib's 1 is its fastest too)


def descriptor(capacity: int, extent_name: str, cid: int, adapter: str = "lsilogic") -> str:
    """The embedded descriptor of a streamOptimized disk (what VMware's exports carry)."""
    cyl = min(65535, capacity // (255 * 63))
    return (
        "# Disk DescriptorFile\n"
        "version=1\n"
        'encoding="UTF-8"\n'
        f"CID={cid:08x}\n"
        "parentCID=ffffffff\n"
        'createType="streamOptimized"\n\n'
        "# Extent description\n"
        f'RW {capacity} SPARSE "{extent_name}"\n\n'
        "# The Disk Data Base\n#DDB\n\n"
        f'ddb.adapterType = "{adapter}"\n'
        f'ddb.geometry.cylinders = "{cyl}"\n'
        'ddb.geometry.heads = "255"\n'
        'ddb.geometry.sectors = "63"\n'
        f'ddb.longContentID = "{cid:08x}{os.urandom(12).hex()}"\n'
        'ddb.virtualHWVersion = "4"\n'
    )


class VmdkWriter:
    """streamOptimized VMDK written front to back (a pipe, or a member of an OVA): the
    header (grain directory at the end), the descriptor, then each non-zero grain
    deflated behind its marker, each grain table behind a GT marker once its grains are
    out, and at the end the grain directory, a footer (the header with the directory's
    place) and the end-of-stream marker. Pieces must come in ascending order.

    emit(bytes) takes the output; size is the disk's size in bytes."""

    def __init__(
        self,
        emit,
        size: int,
        extent_name: str = "disk.vmdk",
        adapter: str = "lsilogic",
        at_end=None,
    ):
        self.emit = emit
        self.at_end = at_end  # a device: writes its last bytes (readers seek the footer there)
        self.size = size
        self.capacity = -(-size // SECTOR)
        text = descriptor(self.capacity, extent_name, int.from_bytes(os.urandom(4), "big"), adapter)
        desc = text.encode()
        desc_sectors = -(-len(desc) // SECTOR) + 1
        self.overhead = 1 + desc_sectors
        self.gd = [0] * -(-self.capacity // (GRAIN_SECTORS * GTES))
        self.header = self._header(GD_AT_END, desc_sectors)
        self.pos = 0  # bytes written
        self._out(self.header + desc + bytes(desc_sectors * SECTOR - len(desc)))
        self.gt_index = -1
        self.gt = array("I", bytes(4 * GTES))
        grain = GRAIN_SECTORS * SECTOR
        self.asm = ClusterAssembler(grain, self.capacity * SECTOR, self._grain)

    def _header(self, gd_sector: int, desc_sectors: int) -> bytes:
        raw = HEADER.pack(
            MAGIC,
            3,
            FLAG_NEWLINE_TEST | FLAG_COMPRESSED | FLAG_MARKERS,
            self.capacity,
            GRAIN_SECTORS,
            1,
            desc_sectors,
            GTES,
            0,
            gd_sector,
            self.overhead,
            0,
            NEWLINE_CHARS,
            COMPRESS_DEFLATE,
        )
        return raw + bytes(SECTOR - len(raw))

    def _out(self, data) -> None:
        self.emit(data)
        self.pos += len(data)

    def _marker(self, value: int, kind: int) -> None:
        self._out(MARKER.pack(value, 0, kind) + bytes(SECTOR - MARKER.size))

    def write(self, offset: int, data) -> None:
        self.asm.add(offset, data)

    def _grain(self, index: int, data) -> None:
        if is_zero(data):
            return
        if index // GTES != self.gt_index:
            self._close_table()
            self.gt_index = index // GTES
        packed = _zlib().compress(data, DEFLATE_LEVEL)
        self.gt[index % GTES] = self.pos // SECTOR
        head = struct.pack("<QI", index * GRAIN_SECTORS, len(packed))
        pad = -(len(head) + len(packed)) % SECTOR
        self._out(head + packed + bytes(pad))

    def _close_table(self) -> None:
        if self.gt_index < 0:
            return
        self._marker(4 * GTES // SECTOR, MARKER_GT)
        self.gd[self.gt_index] = self.pos // SECTOR
        self._out(_little(array("I", self.gt)).tobytes())
        self.gt = array("I", bytes(4 * GTES))

    def finish(self) -> None:
        self.asm.flush()
        self._close_table()
        gd = array("I", self.gd)
        gd_bytes = _little(gd).tobytes()
        gd_sectors = -(-len(gd_bytes) // SECTOR)
        self._marker(gd_sectors, MARKER_GD)
        gd_at = self.pos // SECTOR
        self._out(gd_bytes + bytes(gd_sectors * SECTOR - len(gd_bytes)))
        tail = (
            MARKER.pack(1, 0, MARKER_FOOTER)
            + bytes(SECTOR - MARKER.size)
            + self._header(gd_at, self.overhead - 1)
            + bytes(SECTOR)  # end of stream
        )
        self._out(tail)
        if self.at_end is not None:  # a device larger than the image: the footer again
            self.at_end(tail, self.pos)  # where a reader looks for it, its last 1.5 KiB


READERS = {"vmdk": VmdkArchive}
