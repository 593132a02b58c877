"""VHD (Microsoft Virtual Hard Disk v1): fixed, dynamic and differencing; XenServer's
native disk format. Layout and rules: docs/formats/vhd.md, the VHD spec, qemu block/vpc.c and
blktap's vhd-util check.

A dynamic or differencing VHD is read from a file by block index (pread), merging each
block with its parents, or from a pipe front to back: footer copy, header, BAT, then the
blocks in file order (what XAPI's vhd-tool and qemu-img write), so no seek is needed.
"""

from __future__ import annotations

import os
import re
import struct
import sys
import time
import urllib.parse
import uuid as uuidlib
from array import array

from ..errors import (
    CorruptError,
    FormatError,
    IntegrityError,
    SourceError,
    UnsupportedError,
    UsageError,
)
from ..io.output import pwrite_all, write_all, write_zeros
from ..io.source import Source, open_source
from ..model import (
    DATA,
    HOLE,
    RANDOM,
    STREAM,
    ZERO_CHUNK,
    Archive,
    Checks,
    Damage,
    Disk,
    Extent,
    data_runs,
    filled,
    is_zero,
)
from . import reader_for
from .clusters import ClusterAssembler
from .raw import RawWriter
from .tar import TarReader, parse_header

COOKIE = b"conectix"
HEADER_COOKIE = b"cxsparse"
FOOTER = 512
HEADER = 1024
SECTOR = 512
FIXED, DYNAMIC, DIFFERENCING = 2, 3, 4
TYPES = {FIXED: "fixed", DYNAMIC: "dynamic", DIFFERENCING: "differencing"}
UNALLOCATED = 0xFFFFFFFF
VHD_EPOCH = 946684800  # 2000-01-01 UTC
MAX_GEOMETRY = 65535 * 16 * 255  # sectors
MAX_SIZE = MAX_GEOMETRY * SECTOR * 2  # a little over 2 TiB: the format's own limit
MAX_BLOCK = 1 << 28
MAX_CHAIN = 32
ALIAS_SUFFIX = ".alias.vhd"  # Xen Orchestra: a text file naming a VHD directory
# Creators whose disks are current_size bytes; the others (Virtual PC, qemu without
# force_size...) are read by qemu as cylinders * heads * sectors (block/vpc.c).
SIZE_BY_CURRENT = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")


# -- on-disk records, read and written with the same layouts (docs/formats/vhd.md) -------
# the footer: cookie, features, version, data_offset, timestamp, creator app, creator
# version, creator OS, original size, current size, cylinders, heads, sectors, type,
# checksum, uuid, saved state (then reserved bytes to 512)
FOOTER_FIELDS = struct.Struct(">8sIIQI4sI4sQQHBBII16sB")
FOOTER_CHECKSUM_AT = 64
# the dynamic header: cookie, data_offset, table_offset, version, max_table_entries,
# block_size, checksum, parent uuid, parent timestamp, reserved; the parent's name
# (UTF-16BE, 512 bytes) and eight parent locators follow
HEADER_FIELDS = struct.Struct(">8sQQIIII16sI4x")
HEADER_CHECKSUM_AT = 36
PARENT_NAME = slice(64, 576)
LOCATOR = struct.Struct(">4sIIIQ")  # code, data space, data length, reserved, data offset
LOCATORS_AT = 576


def checksum(data: bytes, field: int) -> int:
    """One's complement of the byte sum, the checksum field counted as zero."""
    return ~(sum(data) - sum(data[field : field + 4])) & 0xFFFFFFFF


def _looks_like_vhd(path: str) -> bool:
    """A VHD footer at the start or the end of the file (a parent found by a locator)."""
    with open(path, "rb") as f:
        if VhdArchive.probe(f.read(FOOTER)):
            return True
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - FOOTER))
        return VhdArchive.probe_tail(f.read(FOOTER))


class Footer:
    def __init__(self, raw: bytes, where: str):
        if len(raw) == FOOTER - 1:  # old 511-byte footer: the last reserved byte is missing
            raw += b"\0"
        if raw[:8] != COOKIE:
            raise FormatError(f"{where}: no VHD footer cookie 'conectix'")
        self.raw = raw
        (
            _cookie,
            self.features,
            self.version,
            self.data_offset,
            self.timestamp,
            self.creator_app,
            self.creator_version,
            self.creator_os,
            self.original_size,
            self.current_size,
            self.cylinders,
            self.heads,
            self.sectors,
            self.type,
            self.checksum,
            self.uuid,
            self.saved_state,
        ) = FOOTER_FIELDS.unpack_from(raw)
        self.checksum_ok = checksum(raw, FOOTER_CHECKSUM_AT) == self.checksum

    @property
    def size(self) -> int:
        """The disk size as qemu-img reports it (block/vpc.c's rule by creator)."""
        chs = self.cylinders * self.heads * self.sectors
        if self.creator_app in SIZE_BY_CURRENT or chs >= MAX_GEOMETRY:
            return self.current_size // SECTOR * SECTOR
        return chs * SECTOR


class DynamicHeader:
    def __init__(self, raw: bytes, where: str):
        if raw[:8] != HEADER_COOKIE:
            raise FormatError(f"{where}: no VHD dynamic header cookie 'cxsparse'")
        self.raw = raw
        (
            _cookie,
            self.data_offset,
            self.table_offset,
            self.version,
            self.max_table_entries,
            self.block_size,
            self.checksum,
            self.parent_uuid,
            self.parent_timestamp,
        ) = HEADER_FIELDS.unpack_from(raw)
        self.parent_name = raw[PARENT_NAME].decode("utf-16-be", "replace").split("\0", 1)[0]
        self.locators = [LOCATOR.unpack_from(raw, LOCATORS_AT + LOCATOR.size * i) for i in range(8)]
        self.checksum_ok = checksum(raw, HEADER_CHECKSUM_AT) == self.checksum


def chs_for(size: int) -> tuple[int, int, int]:
    """The VHD spec's geometry for a sector count (capped at the maximum)."""
    total = min(size // SECTOR, MAX_GEOMETRY)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total // spt
    else:
        spt = 17
        cth = total // spt
        heads = max(4, (cth + 1023) // 1024)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total // spt
    return cth // heads, heads, spt


def covering_chs(size: int) -> tuple[int, int, int]:
    """The smallest spec geometry whose capacity is at least size (qemu grows it the same
    way); the maximum when none is that large."""
    sectors = -(-size // SECTOR)
    for extra in range(0, 4096):
        c, h, s = chs_for((sectors + extra) * SECTOR)
        if c * h * s >= sectors or (sectors + extra) >= MAX_GEOMETRY:
            return c, h, s
    return 65535, 16, 255


def bitmap_runs(bitmap: bytes, sectors: int):
    """(first sector, count) of each stretch of set bits (MSB first) in a sector bitmap."""
    if bitmap.count(b"\xff") * 8 >= sectors:
        yield 0, sectors
        return
    bits = bin(int.from_bytes(bitmap, "big") | (1 << len(bitmap) * 8))[3 : 3 + sectors]
    for m in re.finditer("1+", bits):
        yield m.start(), m.end() - m.start()


class VhdArchive(Archive):
    format = "vhd"
    access = RANDOM
    layered = True

    @classmethod
    def probe(cls, head: bytes) -> bool:
        return head.startswith(COOKIE)  # dynamic and differencing start with a footer copy

    @classmethod
    def probe_tail(cls, tail: bytes) -> bool:
        """A fixed VHD is raw data with a footer at the end (512 bytes, or 511 from old
        tools)."""
        return tail[-FOOTER:].startswith(COOKIE) or tail[-FOOTER + 1 :].startswith(COOKIE)

    def __init__(
        self, source, parent: str | None = None, no_backing: bool = False, _children: tuple = ()
    ):
        super().__init__(source)
        self.parent_override = parent
        self.parent: VhdArchive | None = None
        self._chain_paths = _children
        name = source.name
        self.fixed_stream = False  # a fixed VHD from a pipe: its footer comes last
        if source.seekable:
            self._open_file()
        elif not source.peek(FOOTER).startswith(COOKIE):
            self._open_fixed_stream()
            return
        else:
            self._open_stream()
        f = self.footer
        if f.type not in TYPES:
            raise FormatError(
                f"{name}: VHD disk type {f.type} is not fixed (2), dynamic (3) or differencing (4)"
            )
        size = f.size
        if size > MAX_SIZE:
            raise FormatError(f"{name}: VHD claims {size} bytes, past the format's limit")
        self.size = size
        disk = Disk(
            id=str(uuidlib.UUID(bytes=f.uuid)),
            name=os.path.basename(source.path or name),
            size=size,
            meta={
                "subformat": TYPES[f.type],
                "creator": f.creator_app.decode("latin-1").rstrip("\0 "),
            },
        )
        self.disks.append(disk)
        if f.type == DIFFERENCING and not no_backing:  # no_backing: this layer alone
            self._open_parent()
            disk.meta["parent"] = self.parent.source.path

    # -- opening -------------------------------------------------------------------------
    def _open_file(self):
        src = self.source
        size = src.file_size
        if size < FOOTER - 1:
            raise FormatError(f"{src.name}: {size} bytes is too small for a VHD")
        tail = src.pread(min(size, FOOTER), size - min(size, FOOTER), "VHD footer")
        if tail.startswith(COOKIE):
            self.footer = Footer(tail, f"{src.name}: footer at offset {size - FOOTER}")
            self.footer_at = size - FOOTER
        elif tail[1:].startswith(COOKIE):
            self.footer = Footer(tail[1:], f"{src.name}: footer at offset {size - FOOTER + 1}")
            self.footer_at = size - FOOTER + 1
        else:
            head = src.pread(FOOTER, 0, "VHD footer copy") if size >= FOOTER else b""
            cut = FormatError(
                f"{src.name}: no VHD footer at the end of the file (offset "
                f"{size - FOOTER}): truncated?"
            )
            if not head.startswith(COOKIE):
                raise FormatError(f"{src.name}: no VHD footer at offset {size - FOOTER}")
            copy = Footer(head, f"{src.name}: footer copy at offset 0")
            if copy.type not in (DYNAMIC, DIFFERENCING):
                raise cut
            # a dynamic VHD cut short: its footer copy describes it; reading reports the
            # cut (stream), and --salvage reads the blocks that are still there
            self.footer, self.footer_at = copy, size
            self.open_problems.append(cut)
        self.file_size = size
        if self.footer.type == FIXED:
            if self.footer.size > self.footer_at:
                raise FormatError(
                    f"{src.name}: fixed VHD of {self.footer.size} bytes in a file "
                    f"of {size}: truncated"
                )
            self.header = None
            return
        self.head_footer = Footer(
            src.pread(FOOTER, 0, "VHD footer copy"), f"{src.name}: footer copy at offset 0"
        )
        self._read_header(lambda n, off, what: src.pread(n, off, what))

    @classmethod
    def needs_file(
        cls, head: bytes, unsized: bool = False, parent: str | None = None
    ) -> str | None:
        if not head.startswith(COOKIE) and not unsized:
            return "a fixed VHD keeps its footer, and so its size, at the end"
        if (
            head.startswith(COOKIE)
            and struct.unpack_from(">I", head, 60)[0] == DIFFERENCING
            and not parent
        ):
            return "a differencing VHD names its parent in locators read at random"
        return None

    def _open_fixed_stream(self):
        """A fixed VHD from a pipe (-f vhd): raw data, then the footer. Its size is known
        only when the footer has come; until then disk.size is None, and only a raw output
        (which needs no size before its end) can take it (vmarc.open(unsized=True))."""
        self.fixed_stream = True
        self.footer = self.header = None
        self.file_size = self.footer_at = None
        self.size = None
        self.disks.append(
            Disk(id="vhd", name=self.source.name, size=None, meta={"subformat": "fixed"})
        )

    def _stream_fixed_pipe(self, disk, checks: Checks):
        """The data, holding back the last 512 bytes read: at the end they are the
        footer, checked then, and the disk takes the size it states."""
        src = self.source
        buf = memoryview(bytearray(4 << 20))
        tail = b""
        pos = 0
        while n := src.readinto_upto(buf):
            chunk = tail + bytes(buf[:n]) if tail else bytes(buf[:n])
            tail = chunk[-FOOTER:]
            if len(chunk) > FOOTER:
                yield disk, pos, memoryview(chunk)[:-FOOTER]
                pos += len(chunk) - FOOTER
        where = f"{src.name}: footer at offset {pos}"
        if not tail.startswith(COOKIE):
            raise FormatError(
                f"{src.name}: no VHD footer at the end of the stream (offset "
                f"{pos}): not a fixed VHD, or truncated"
            )
        self.footer = self.head_footer = Footer(tail, where)
        self.footer_at = pos
        if self.footer.type != FIXED:
            raise FormatError(
                f"{where}: disk type {self.footer.type}; a VHD without a footer "
                "copy at the start must be fixed"
            )
        self.size = disk.size = self.footer.size
        if self.size != pos:
            raise FormatError(
                f"{where}: the footer gives {self.size} bytes but the data before it holds {pos}"
            )
        self.check_structure(checks)

    def _open_stream(self):
        src = self.source
        first = src.read_exact(FOOTER, "VHD footer copy")
        self.footer = self.head_footer = Footer(first, f"{src.name}: footer copy at offset 0")
        self.file_size = None
        self.footer_at = None

        def read(n, off, what):
            if off < src.offset:
                raise UnsupportedError(
                    f"{src.name}: {what} at offset {off} lies before the "
                    "data already read; this VHD cannot be read from a pipe"
                )
            src.skip(off - src.offset, what)
            return src.read_exact(n, what)

        self._read_header(read)
        # Read from a pipe, blocks come in file order: in disk order only if the BAT says so
        # (and a differencing disk adds its parents' blocks at the end).
        order = self._file_order()
        self.ordered = self.footer.type != DIFFERENCING and all(
            a[1] < b[1] for a, b in zip(order, order[1:])
        )

    def _read_header(self, read):
        name = self.source.name
        f = self.footer
        if f.data_offset < FOOTER or f.data_offset > MAX_SIZE:
            raise FormatError(
                f"{name}: footer data_offset {f.data_offset} does not point at a dynamic header"
            )
        self.header = h = DynamicHeader(
            read(HEADER, f.data_offset, "VHD dynamic header"),
            f"{name}: dynamic header at offset {f.data_offset}",
        )
        if not (SECTOR <= h.block_size <= MAX_BLOCK) or h.block_size & (h.block_size - 1):
            raise FormatError(
                f"{name}: block size {h.block_size} is not a power of two between "
                f"512 and {MAX_BLOCK}"
            )
        if h.max_table_entries * h.block_size < self.footer.size:
            raise FormatError(
                f"{name}: {h.max_table_entries} BAT entries of {h.block_size} "
                f"bytes cannot hold a disk of {self.footer.size} bytes"
            )
        if h.max_table_entries > MAX_SIZE // h.block_size + 1:
            raise FormatError(f"{name}: {h.max_table_entries} BAT entries is absurd")
        if (
            h.table_offset < f.data_offset + HEADER
            and h.table_offset + 4 * h.max_table_entries > f.data_offset
        ):
            raise FormatError(f"{name}: BAT at offset {h.table_offset} overlaps the dynamic header")
        if (
            self.file_size is not None and h.table_offset + 4 * h.max_table_entries > self.file_size
        ):  # a header's claim checked against the file it is in
            raise FormatError(
                f"{name}: a BAT of {h.max_table_entries} entries at offset "
                f"{h.table_offset} runs past the end of the file"
            )
        raw = read(4 * h.max_table_entries, h.table_offset, "VHD block allocation table")
        self.bat = array("I", raw)  # 4 bytes an entry, not a Python int each
        if sys.byteorder == "little":
            self.bat.byteswap()
        self.bitmap_size = -(-(h.block_size // SECTOR) // 8 // SECTOR) * SECTOR
        self.sectors_per_block = h.block_size // SECTOR
        self.meta_end = max(
            h.table_offset + 4 * h.max_table_entries, f.data_offset + HEADER, FOOTER
        )

    def _parent_candidates(self):
        h = self.header
        # relative locators start beside the file (from a pipe: the current directory)
        base = os.path.dirname(os.path.abspath(self.source.path or "-"))
        for code, _space, length, _res, offset in h.locators:
            if code not in (b"W2ru", b"W2ku", b"MacX") or not length or length > 4096:
                continue
            if self.file_size is not None and offset + length > self.file_size:
                continue
            raw = self.source.pread(length, offset, "parent locator")
            if code == b"MacX":
                text = urllib.parse.unquote(raw.decode("utf-8", "replace").rstrip("\0"))
                text = text[7:] if text.startswith("file://") else text
            else:
                text = raw.decode("utf-16-le", "replace").rstrip("\0").replace("\\", "/")
            yield code.decode(), os.path.join(base, text) if code == b"W2ru" else text
        if h.parent_name:  # Xen Orchestra's chains name the parent relative to the child
            rel = h.parent_name.replace("\\", "/")
            if not os.path.isabs(rel) and "/" in rel:
                yield "parent name", os.path.normpath(os.path.join(base, rel))
            yield "parent name", os.path.join(base, os.path.basename(rel))

    def _open_parent(self):
        name = self.source.name
        me = os.path.realpath(self.source.path or "-")
        chain = self._chain_paths + (me,)
        if len(chain) > MAX_CHAIN:
            raise FormatError(f"{name}: differencing chain deeper than {MAX_CHAIN}")
        tried = []
        if self.parent_override:
            candidates = [("--parent", self.parent_override)]
        else:
            candidates = list(self._parent_candidates())
        want = uuidlib.UUID(bytes=self.header.parent_uuid)
        for how, path in candidates:
            xo = os.path.isdir(path) or path.endswith(ALIAS_SUFFIX)  # Xen Orchestra's
            if not (xo or os.path.isfile(path)):
                tried.append(f"{path} ({how}, missing or not a regular file)")
                continue
            if os.path.realpath(path) in chain:
                raise FormatError(f"{name}: parent chain loops back to {path}")
            if not xo and not _looks_like_vhd(path):  # what it holds is none of our business
                if how == "--parent":
                    raise FormatError(f"{name}: parent {path} is not a VHD")
                tried.append(f"{path} ({how}, not a VHD)")
                continue
            if xo:  # a VHD directory, or an alias naming one (formats/vhddir.py)
                parent = reader_for("vhddir").open_path(path, _children=chain)
            else:
                parent = VhdArchive(open_source(path), _children=chain)
            got = uuidlib.UUID(bytes=parent.footer.uuid)
            if got != want:
                parent.close()
                if how == "--parent":
                    raise FormatError(
                        f"{name}: parent {path} has uuid {got}, but the disk expects {want}"
                    )
                tried.append(f"{path} ({how}, uuid {got})")
                continue
            self.parent = parent
            return
        raise SourceError(
            f"{name}: parent {want} ({self.header.parent_name}) not found; tried "
            f"{'; '.join(tried) or 'no locator'}; give it with --parent"
        )

    def close(self):
        if self.parent is not None:
            self.parent.close()
        super().close()

    def details(self) -> dict:
        d = {}
        f = self.footer
        d["subformat"] = TYPES[f.type]
        d["current_size"] = f.current_size
        d["geometry"] = [f.cylinders, f.heads, f.sectors]
        if self.header is not None:
            d["block_size"] = self.header.block_size
        if self.parent is not None:
            d["backing_chain"] = []
            p = self.parent
            while p is not None:
                d["backing_chain"].append(p.source.path)
                p = p.parent
        return d

    # -- checks --------------------------------------------------------------------------
    def checked(self):
        items = [
            "footer checksum and fields"
            + (" (and its copy at offset 0)" if self.header is not None else "")
        ]
        if self.header is not None:
            n = sum(1 for e in self.bat if e != UNALLOCATED)
            items += [
                "dynamic header checksum and fields",
                f"BAT: {n:,} blocks inside the file, none overlapping",
            ]
        if self.parent is not None:
            items.append("each parent's uuid against the one its child records")
        return self.every_disk(items, ["the disk's data: VHD keeps no checksum of it"])

    def check_structure(self, checks: Checks) -> None:
        """vhd-util check's rules (docs/formats/vhd.md); each problem to checks. Problems of the
        footer or header spoil no stretch in particular ("metadata", length 0); a bad
        BAT entry spoils its block."""
        name = self.source.name
        disk = self.disks[0]

        def meta(at):
            return [Damage(disk, 0, 0, "metadata", file_offset=at)]

        def block(i, at):
            return [
                Damage(
                    disk, i * bs, min(bs, disk.size - i * bs), "structure", block=i, file_offset=at
                )
            ]

        for err in self.open_problems:
            checks.fail(type(err)(str(err), meta(self.footer_at)))
        for where, f, at in (("footer", self.footer, self.footer_at),) + (
            (("footer copy", self.head_footer, 0),)
            if self.header is not None and self.head_footer is not self.footer
            else ()
        ):
            if not f.checksum_ok:
                checks.fail(
                    IntegrityError(
                        f"{name}: {where} checksum mismatch (stored "
                        f"{f.checksum:#010x}, computed {checksum(f.raw, 64):#010x})",
                        meta(at),
                    )
                )
            if not f.features & 2:  # the spec's "always set" bit: nobody reads it
                checks.warn(f"{name}: {where}: reserved feature bit 0x2 not set")
            if f.version != 0x00010000:
                checks.fail(
                    FormatError(f"{name}: {where}: version {f.version:#x}, not 0x10000", meta(at))
                )
            if f.timestamp + VHD_EPOCH > time.time() + 86400:
                # Xen Orchestra's vhd-lib stores Unix time where VHD counts from 2000; the
                # data reads the same (qemu-img and libvhdi ignore the field): a warning
                checks.warn(
                    f"{name}: {where}: timestamp {f.timestamp} lies in the future "
                    "when counted from 2000 (Unix time, as Xen Orchestra writes it?)"
                )
        if self.footer.type == FIXED:
            if self.footer.data_offset != 0xFFFFFFFFFFFFFFFF:  # unused by a fixed disk
                checks.warn(
                    f"{name}: fixed VHD with data_offset {self.footer.data_offset:#x}, not all ones"
                )
            return
        if self.head_footer.raw != self.footer.raw:
            checks.fail(
                FormatError(f"{name}: the footer copy at offset 0 differs from the footer", meta(0))
            )
        h = self.header
        bs = h.block_size
        if not h.checksum_ok:
            checks.fail(
                IntegrityError(
                    f"{name}: dynamic header checksum mismatch", meta(self.footer.data_offset)
                )
            )
        if h.version != 0x00010000:
            checks.fail(
                FormatError(
                    f"{name}: dynamic header version {h.version:#x}, not 0x10000",
                    meta(self.footer.data_offset),
                )
            )
        self.check_blocks(checks, block)

    def check_blocks(self, checks: Checks, block) -> None:
        """Where the BAT puts each block: outside the metadata, inside the data area, no
        two overlapping. block(i, at) gives the Damage of block i."""
        name = self.source.name
        span = self.bitmap_size + self.header.block_size
        placed = []
        for i, entry in enumerate(self.bat):
            if entry == UNALLOCATED:
                continue
            start = entry * SECTOR
            if start < self.meta_end:
                checks.fail(
                    FormatError(
                        f"{name}: BAT entry {i} points at offset {start}, inside the metadata",
                        block(i, start),
                    )
                )
            # a file cut short: its missing blocks are reported as each is read
            end_limit = self.footer_at if not self.open_problems else None
            if end_limit is not None and start + span > end_limit:
                checks.fail(
                    FormatError(
                        f"{name}: BAT entry {i}: block at offset {start} runs "
                        f"past the data area (footer at {end_limit})",
                        block(i, start),
                    )
                )
            placed.append((start, i))
        placed.sort()
        for (a, i), (b, j) in zip(placed, placed[1:]):
            if b < a + span:
                checks.fail(
                    FormatError(
                        f"{name}: BAT entries {i} and {j} overlap (blocks at offsets {a} and {b})",
                        block(j, b),
                    )
                )

    # -- reading -------------------------------------------------------------------------
    def block_layers(self, index: int, bs: int, buf: bytearray | None = None):
        """(bitmap, data) of block index (of bs bytes) in this layer, or None when not
        allocated here. With buf (bitmap + block sized) a dynamic block is read into it:
        the streaming pass reuses one buffer instead of faulting in a fresh 2 MiB a block."""
        if self.header is None:  # fixed: all data, read straight
            start = index * bs
            n = min(bs, self.size - start)
            if n <= 0:
                return None
            return None, self.source.pread(n, start, "VHD data")
        if index >= len(self.bat) or self.bat[index] == UNALLOCATED:
            return None
        off = self.bat[index] * SECTOR
        if buf is not None:
            view = memoryview(buf)
            self.source.preadinto(view, off, f"VHD block {index}")
            return bytes(view[: self.bitmap_size]), view[self.bitmap_size :]
        raw = self.source.pread(
            self.bitmap_size + self.header.block_size, off, f"VHD block {index}"
        )
        return raw[: self.bitmap_size], memoryview(raw)[self.bitmap_size :]

    def stream(self, disks=None, checks: Checks | None = None, verify: bool = True):
        checks = checks or Checks()
        disk = self.disks[0]
        if disks is not None and disk not in disks:
            return
        if self.fixed_stream:
            yield from self._stream_fixed_pipe(disk, checks)
            return
        self.check_structure(checks)
        if self.footer.type == FIXED:
            yield from self._stream_fixed(disk)
        elif not self.source.seekable:
            yield from self._stream_pipe(disk)
        else:
            yield from self._stream_blocks(disk, checks)
        if not self.source.seekable:
            self._check_trailing_footer()

    def _stream_fixed(self, disk):
        buf = memoryview(bytearray(4 << 20))
        pos = 0
        while pos < disk.size:
            n = min(len(buf), disk.size - pos)
            self.source.preadinto(buf[:n], pos, "fixed VHD data")
            yield disk, pos, buf[:n]
            pos += n

    def _layers(self) -> list:
        """This disk and its parents, newest first; all must share one block size."""
        bs = self.header.block_size
        layers = []
        p = self
        while p is not None:
            if p.header is not None and p.header.block_size != bs:
                raise UnsupportedError(
                    f"{self.source.name}: parent {p.source.name} has {p.header.block_size}-byte "
                    f"blocks, this disk {bs}-byte ones; chains of mixed block sizes are not read"
                )
            layers.append(p)
            p = p.parent
        return layers

    def _stream_blocks(self, disk, checks: Checks):
        """By block index, merging each block with the parents' for differencing disks.
        A block that cannot be read (the file cut short) is missing; salvage reads the
        part of it that is still there."""
        layers = self._layers()
        bs = self.header.block_size
        buf = bytearray(self.bitmap_size + bs)
        for index in range(-(-disk.size // bs)):
            try:
                pieces = list(self._block_pieces(index, layers, buf))
            except CorruptError as e:
                base = index * bs
                whole = [(base, min(bs, disk.size - base))]
                pieces, lost = self._cut_block(index, buf) if checks.salvage else ([], whole)
                where = self.block_where(index)
                checks.fail(
                    type(e)(
                        str(e),
                        [Damage(disk, a, n, "missing", block=index, **where) for a, n in lost],
                    )
                )
            yield from ((disk, off, data) for off, data in pieces)

    def block_where(self, index: int) -> dict:
        """Where block index lies, for a Damage: its offset in the file."""
        at = self.bat[index] * SECTOR if self.bat[index] != UNALLOCATED else None
        return {"file_offset": at}

    def block_at(self, index: int, within: int) -> tuple[int | None, str]:
        """(file offset, file) of byte `within` of block index's data, for extents."""
        at = self.bat[index] * SECTOR + self.bitmap_size + within
        return at, self.source.path or self.source.name

    def _cut_block(self, index: int, buf: bytearray):
        """Block index of a file cut short: (pieces still in the file, [(disk offset,
        length)] of the stored sectors that are not). A differencing block, or one whose
        bitmap is gone, is missing whole."""
        base = index * self.header.block_size
        limit = min(self.header.block_size, self.size - base)
        whole = ([], [(base, limit)])
        if self.parent is not None or self.bat[index] == UNALLOCATED:
            return whole
        off = self.bat[index] * SECTOR
        have = max(0, min(len(buf), self.file_size - off))
        if have <= self.bitmap_size:
            return whole
        view = memoryview(buf)[:have]
        self.source.preadinto(view, off, f"VHD block {index}")
        got = have - self.bitmap_size
        data = view[self.bitmap_size :]
        pieces, lost = [], []
        for first, count in bitmap_runs(bytes(view[: self.bitmap_size]), -(-limit // SECTOR)):
            a, b = first * SECTOR, min((first + count) * SECTOR, limit)
            if a < got:
                pieces.append((base + a, data[a : min(b, got)]))
            if b > got:
                lost.append((base + max(a, got), b - max(a, got)))
        return pieces, lost

    def _block_pieces(self, index: int, layers: list, buf: bytearray | None = None, mine=None):
        """(disk offset, data) of every stretch of block index that some layer stores;
        buf: a reusable buffer for this layer's block (one reader only: not read_at);
        mine: this layer's (bitmap, data) when already read (from a pipe)."""
        bs = self.header.block_size
        spb = self.sectors_per_block
        base = index * bs
        limit = min(bs, self.size - base)
        if mine is None:
            mine = self.block_layers(index, bs, buf)
        if mine is not None and len(layers) == 1:
            for first, count in bitmap_runs(mine[0], min(spb, -(-limit // SECTOR))):
                a, b = first * SECTOR, min((first + count) * SECTOR, limit)
                yield base + a, mine[1][a:b]
            return
        merged = None
        present = None
        for layer in reversed(layers):  # oldest first, newer data on top
            got = layer.block_layers(index, bs) if layer is not self else mine
            if got is None:
                continue
            bitmap, data = got
            if merged is None:
                merged = bytearray(bs)
                present = bytearray(spb)
            runs = (
                [(0, len(data) // SECTOR + (1 if len(data) % SECTOR else 0))]
                if bitmap is None
                else bitmap_runs(bitmap, spb)
            )
            for first, count in runs:
                a, b = first * SECTOR, min((first + count) * SECTOR, len(data))
                merged[a:b] = data[a:b]
                present[first : first + count] = b"\1" * count
        if merged is None:
            return
        view = memoryview(merged)
        for m in re.finditer(b"\1+", bytes(present[: -(-limit // SECTOR)])):
            a, b = m.start() * SECTOR, min(m.end() * SECTOR, limit)
            yield base + a, view[a:b]

    # -- random access (serve, mount) ------------------------------------------------------
    def read_at(self, offset: int, n: int) -> bytes:
        """n bytes of the disk at offset (zeros past the end); a file, not a pipe."""
        out = bytearray(n)
        end = min(offset + n, self.size)
        if self.footer.type == FIXED:
            if end > offset:
                self.source.preadinto(memoryview(out)[: end - offset], offset, "fixed VHD data")
            return bytes(out)
        bs = self.header.block_size
        layers = self._layers()
        for index in range(offset // bs, -(-end // bs)):
            for at, data in self._block_pieces(index, layers):
                a, b = max(at, offset), min(at + len(data), end)
                if a < b:
                    out[a - offset : b - offset] = data[a - at : b - at]
        return bytes(out)

    def lower(self):
        return self.parent

    def extents(self, offset: int = 0, length: int | None = None, depth: int = 0):
        """Every block some layer of the chain allocates, from the newest layer that does
        (a block's sector bitmap is not consulted, as qemu-img map does not), and ZERO
        where none does."""
        end = self.size if length is None else min(offset + length, self.size)
        layers = [] if self.footer.type == FIXED else self._layers()
        return filled(
            self._stored(offset, end, depth, layers),
            offset,
            end,
            self.source.path or self.source.name,
            depth + max(0, len(layers) - 1),
        )

    def _stored(self, start: int, end: int, depth: int, layers: list):
        if self.footer.type == FIXED:
            if start < end:
                yield Extent(
                    start, end - start, DATA, start, self.source.path or self.source.name, depth
                )
            return
        bs = self.header.block_size
        for index in range(start // bs, -(-end // bs)):
            a, b = max(start, index * bs), min(end, (index + 1) * bs)
            for k, p in enumerate(layers):
                if p.header is None:  # a fixed parent stores everything
                    yield Extent(a, b - a, DATA, a, p.source.path or p.source.name, depth + k)
                    break
                if index < len(p.bat) and p.bat[index] != UNALLOCATED:
                    at, file = p.block_at(index, a - index * bs)
                    yield Extent(a, b - a, DATA, at, file, depth + k)
                    break

    def _stream_pipe(self, disk):
        """Front to back: the blocks in file order (ascending in what vhd-tool and qemu-img
        write), skipping what lies between. A differencing disk merges each block with its
        parents' (files, read at random), then gives the blocks only the parents hold."""
        src = self.source
        bs = self.header.block_size
        order = self._file_order()
        buf = memoryview(bytearray(self.bitmap_size + bs))
        spb = self.sectors_per_block
        layers = self._layers() if self.parent is not None else None
        for entry, index in order:
            off = entry * SECTOR
            if off < src.offset:
                raise FormatError(
                    f"{src.name}: block {index} at offset {off} overlaps data already read"
                )
            src.skip(off - src.offset, f"VHD block {index}")
            src.readinto_exact(buf, f"VHD block {index}")
            base = index * bs
            limit = min(bs, disk.size - base)
            if limit <= 0:
                continue
            bitmap = bytes(buf[: self.bitmap_size])
            if layers is not None:
                mine = (bitmap, buf[self.bitmap_size :])
                yield from (
                    (disk, at, data) for at, data in self._block_pieces(index, layers, mine=mine)
                )
                continue
            for first, count in bitmap_runs(bitmap, min(spb, -(-limit // SECTOR))):
                a, b = first * SECTOR, min((first + count) * SECTOR, limit)
                yield disk, base + a, buf[self.bitmap_size + a : self.bitmap_size + b]
        if layers is not None:  # what only the parents hold
            for index in range(-(-disk.size // bs)):
                if index >= len(self.bat) or self.bat[index] == UNALLOCATED:
                    yield from ((disk, at, data) for at, data in self._block_pieces(index, layers))

    def _file_order(self) -> list[tuple[int, int]]:
        """(BAT entry, block index) of the allocated blocks, in file order."""
        return sorted((entry, i) for i, entry in enumerate(self.bat) if entry != UNALLOCATED)

    def _check_trailing_footer(self):
        """A stream's footer, checked as completely as a file's: checksum, and agreement
        with the copy at the start."""
        src = self.source
        rest = src.read_upto(64 << 20)
        tail = rest[-FOOTER:]
        if not tail.startswith(COOKIE):
            tail = rest[-(FOOTER - 1) :]
            if not tail.startswith(COOKIE):
                raise FormatError(
                    f"{src.name}: no VHD footer at the end of the stream "
                    f"(offset {src.offset}): truncated?"
                )
        if src.read_upto(1):
            raise FormatError(f"{src.name}: data after the VHD footer at offset {src.offset}")
        footer = Footer(tail, f"{src.name}: footer at offset {src.offset - len(tail)}")
        if not footer.checksum_ok:
            raise IntegrityError(
                f"{src.name}: footer at offset {src.offset - len(tail)}: "
                f"checksum mismatch (stored {footer.checksum:#010x}, "
                f"computed {checksum(footer.raw, 64):#010x})"
            )
        if footer.raw != self.head_footer.raw:
            raise FormatError(
                f"{src.name}: the footer at the end of the stream differs from "
                "the footer copy at offset 0"
            )


# -- writing ------------------------------------------------------------------------------
BLOCK_SIZE = 2 << 20
CREATOR = b"qem2"  # size = current_size for qemu and XenServer alike (see SIZE_BY_CURRENT)


def make_footer(size: int, disk_type: int, data_offset: int, uid: bytes, ts: int) -> bytes:
    c, h, s = covering_chs(size)
    raw = bytearray(FOOTER)
    FOOTER_FIELDS.pack_into(
        raw,
        0,
        COOKIE,
        2,
        0x00010000,
        data_offset,
        ts,
        CREATOR,
        0x00050003,
        b"Wi2k",
        size,
        size,
        c,
        h,
        s,
        disk_type,
        0,
        uid,
        0,
    )
    struct.pack_into(">I", raw, FOOTER_CHECKSUM_AT, checksum(raw, FOOTER_CHECKSUM_AT))
    return bytes(raw)


def make_header(entries: int, table_offset: int) -> bytes:
    raw = bytearray(HEADER)
    HEADER_FIELDS.pack_into(
        raw,
        0,
        HEADER_COOKIE,
        0xFFFFFFFFFFFFFFFF,
        table_offset,
        0x00010000,
        entries,
        BLOCK_SIZE,
        0,
        bytes(16),
        0,
    )
    struct.pack_into(">I", raw, HEADER_CHECKSUM_AT, checksum(raw, HEADER_CHECKSUM_AT))
    return bytes(raw)


class VhdWriter:
    """Dynamic (blocks of 2 MiB in ascending order, all-ones bitmaps, as vhd-tool and
    qemu-img write them) or fixed. The size is kept exact (current_size; creator 'qem2'
    so qemu reads current_size, a geometry that covers it for CHS readers).

    Each block's data starts on a 4 KiB boundary of the file (its bitmap sector just
    before), so that the all-zero 4 KiB runs inside a block stay holes in a new file, as
    qemu-img leaves them. On a target that held data (a device, -n) blocks are written
    whole instead. On a device the footer also goes to the device's last sector, where
    readers look for it.

    To a file: blocks are appended as they complete and the BAT written at the end. To a
    stream: the BAT comes first, so the allocated blocks must be known in advance
    (allocated=set of block indexes, from a first pass).
    """

    def __init__(self, out, size: int, subformat: str = "dynamic", allocated=None):
        if size % SECTOR:
            raise UsageError(
                f"a VHD holds whole 512-byte sectors; {size} bytes is not a multiple of 512"
            )
        if size > MAX_SIZE // 2:
            raise UsageError(f"{size} bytes is past the VHD limit of about 2 TiB")
        self.out = out
        self.size = size
        self.fixed = subformat == "fixed"
        self.uid = uuidlib.uuid4().bytes
        self.ts = max(0, int(time.time()) - VHD_EPOCH)
        self.fd = out.fd
        self.stream = out.is_stream
        self.pos = 0  # stream: bytes written so far
        if self.fixed:  # raw data then the footer
            out.reserve(size + FOOTER)
            self.raw = RawWriter(out, size)
            self.footer = make_footer(size, FIXED, 0xFFFFFFFFFFFFFFFF, self.uid, self.ts)
            return
        self.entries = -(-size // BLOCK_SIZE)
        self.bat = [UNALLOCATED] * self.entries
        bat_bytes = -(-4 * self.entries // SECTOR) * SECTOR
        self.data_start = 3 * SECTOR + bat_bytes
        self.footer = make_footer(size, DYNAMIC, SECTOR, self.uid, self.ts)
        self.bitmap = b"\xff" * SECTOR  # 4096 sectors of a 2 MiB block, all present
        self.next_block = self._aligned(self.data_start)
        self.data_end = self.data_start
        self.asm = ClusterAssembler(BLOCK_SIZE, size, self._put_block)
        self.last_index = -1
        if self.stream:
            if allocated is None:
                raise UsageError("streaming a dynamic VHD needs the allocated blocks first")
            self.allocated = allocated
            pos = self.next_block
            for i in sorted(allocated):
                self.bat[i] = pos // SECTOR
                pos = self._aligned(pos + SECTOR + BLOCK_SIZE)
            self.end = pos
            self._write(self._head())

    @staticmethod
    def _aligned(pos: int) -> int:
        """Where the next block's bitmap goes: its data then starts on a 4 KiB boundary."""
        return -(-(pos + SECTOR) // HOLE) * HOLE - SECTOR

    def _head(self) -> bytes:
        bat = struct.pack(f">{self.entries}I", *self.bat)
        return (
            self.footer
            + make_header(self.entries, 3 * SECTOR)
            + bat
            + b"\xff" * (self.data_start - 3 * SECTOR - len(bat))
        )

    def _write(self, data) -> None:
        write_all(self.fd, data)
        self.pos += len(data)

    def _zeros(self, n: int) -> None:
        write_zeros(self.fd, n)
        self.pos += n

    def write(self, offset: int, data) -> None:
        if self.fixed:
            self.raw.write(offset, data)
        else:
            self.asm.add(offset, data)

    def _put_block(self, index: int, data) -> None:
        if index < self.last_index:
            raise RuntimeError("VHD blocks must come in ascending order")
        self.last_index = index
        if self.stream:
            if index not in self.allocated:
                if not is_zero(data):
                    raise RuntimeError(f"block {index} holds data the first pass did not see")
                return
            self._zeros(self.bat[index] * SECTOR - self.pos)
            self._write(self.bitmap)
            self._write(data)
            self._zeros(BLOCK_SIZE - len(data))
            return
        runs = list(data_runs(data, 0))
        if not runs:
            return
        at = self.next_block
        self.bat[index] = at // SECTOR
        if not self.out.fresh or runs == [(0, BLOCK_SIZE)]:  # the whole block, one call
            parts = [self.bitmap, data]
            if len(data) < BLOCK_SIZE:
                parts.append(memoryview(ZERO_CHUNK)[: BLOCK_SIZE - len(data)])
            if os.pwritev(self.fd, parts, at) != SECTOR + BLOCK_SIZE:
                pwrite_all(self.fd, b"".join(bytes(p) for p in parts), at)
        else:  # a new file: zero 4 KiB runs stay holes
            pwrite_all(self.fd, self.bitmap, at)
            for a, b in runs:
                pwrite_all(self.fd, data[a:b], at + SECTOR + a)
        self.data_end = at + SECTOR + BLOCK_SIZE
        self.next_block = self._aligned(self.data_end)

    def finish(self) -> None:
        if self.fixed:
            self.raw.finish()  # the size reached: zeros on stdout, a hole in a file
            if self.stream:
                write_all(self.fd, self.footer)
            else:
                self._put_footer(self.size)
            return
        self.asm.flush()
        if self.stream:
            self._zeros(self.end - self.pos)
            self._write(self.footer)
            return
        pwrite_all(self.fd, self._head(), 0)
        self._put_footer(self.data_end)

    def _put_footer(self, at: int) -> None:
        """The footer after the data; on a larger device, also in its last sector."""
        self.out.set_size(at + FOOTER)
        pwrite_all(self.fd, self.footer, at)
        dev = self.out.device_size
        if dev is not None and dev >= at + 2 * FOOTER:
            pwrite_all(self.fd, self.footer, dev - FOOTER)


def allocated_blocks(stream) -> set[int]:
    """Indexes of the 2 MiB blocks that hold non-zero data (first pass for stdout)."""
    found = set()
    for _disk, offset, data in stream:
        pos = 0
        while pos < len(data):
            index = (offset + pos) // BLOCK_SIZE
            stop = min(len(data), (index + 1) * BLOCK_SIZE - offset)
            if index not in found and not is_zero(data[pos:stop]):
                found.add(index)
            pos = stop
    return found


# -- a VHD inside a tar (how XenServer tooling streams VHDs: os-xenapi, docs/formats/vhd.md)
def _tar_of_vhd(head: bytes) -> bool:
    """A tar archive whose first member is a .vhd file."""
    pos = 0
    while pos + 512 <= len(head) and head[pos : pos + 512] != bytes(512):
        try:
            name, size, kind = parse_header(head[pos : pos + 512], "probe")
        except Exception:
            return False
        if kind not in (b"x", b"g", b"L"):  # past pax / GNU long-name records
            return name.lower().endswith(".vhd")
        pos += 512 + -(-size // 512) * 512
    return False


class _MemberStream:
    """The data of the current tar member as a plain stream."""

    def __init__(self, reader, member):
        self.reader, self.member = reader, member

    def readinto(self, view) -> int:
        n = min(len(view), self.reader._left)
        if n:
            self.reader.readinto(view[:n], self.member)
        return n


class VhdTarArchive(VhdArchive):
    """The one VHD a .tar / .tgz holds, read front to back like a VHD from a pipe."""

    access = STREAM  # the tar's member is read as a stream; random access spools it
    layered = False

    @classmethod
    def probe(cls, head: bytes) -> bool:
        return _tar_of_vhd(head)

    @classmethod
    def probe_tail(cls, tail: bytes) -> bool:
        return False

    def __init__(self, source):
        reader = TarReader(source)
        member = reader.next()
        if member is None or not member.name.lower().endswith(".vhd"):
            raise FormatError(f"{source.name}: the tar's first member is not a .vhd file")
        self.outer = source
        inner = Source(
            _MemberStream(reader, member),
            name=f"{source.name}:{member.name}",
            compression=source.compression,
        )
        super().__init__(inner)

    def close(self):
        super().close()
        self.outer.close()


READERS = {"vhd": VhdArchive, "vhd-tar": VhdTarArchive}
