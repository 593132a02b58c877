"""qcow2 (qemu's docs/interop/qcow2.txt): read versions 2 and 3 (zlib- and zstd-compressed
clusters, zero clusters, backing files) and write version 3 with 64 KiB clusters.

Reading needs a file (L1 and L2 tables are read where they lie); the stream goes in guest
order, coalescing clusters that are contiguous in the file into one read.
"""

from __future__ import annotations

import os
import struct
import sys
import zlib
from array import array
from collections import OrderedDict

from ..errors import FormatError, UnknownFormatError, UnsupportedError, UsageError
from ..io.output import pwrite_all
from ..io.source import open_source
from ..model import DATA, RANDOM, ZERO, Checks, Disk, is_zero
from . import detect, open_archive
from .clusters import ClusterAssembler
from .mapped import CODED, PARENT, MappedImage, Run
from .qcow2_layout import (
    COMPRESSED,
    COPIED,
    EXT_BACKING_FORMAT,
    EXT_DATA_FILE,
    HEADER_V2,
    HEADER_V3,
    KNOWN_INCOMPATIBLE,
    MAGIC,
    OFFSET_MASK,
    ZERO_FLAG,
)
from .qcow2check import check_refcounts

MAX_SIZE = 1 << 56
MAX_CHAIN = 32
MAX_READ = 4 << 20  # largest coalesced read
BACKING_FORMATS = {"raw": "raw", "qcow2": "qcow2", "vpc": "vhd", "vhd": "vhd"}


class Qcow2Archive(MappedImage):
    format = "qcow2"

    @classmethod
    def probe(cls, head: bytes) -> bool:
        return head.startswith(MAGIC)

    @classmethod
    def needs_file(
        cls, head: bytes, unsized: bool = False, parent: str | None = None
    ) -> str | None:
        return "qcow2 is read through its tables"

    def __init__(
        self, source, parent: str | None = None, no_backing: bool = False, _chain: tuple = ()
    ):
        super().__init__(source)
        name = source.name
        self.file_size = fsize = source.file_size
        head = source.pread(min(fsize, 4096), 0, "qcow2 header")
        if len(head) < HEADER_V2.size:
            raise FormatError(f"{name}: {len(head)} bytes is too small for a qcow2 header")
        (
            magic,
            self.version,
            backing_off,
            backing_len,
            self.cluster_bits,
            size,
            crypt,
            l1_size,
            l1_off,
            self.refcount_table_offset,
            self.refcount_table_clusters,
            self.nb_snapshots,
            self.snapshots_offset,
        ) = HEADER_V2.unpack_from(head)
        self.l1_offset, self.refcount_order = l1_off, 4
        if self.version not in (2, 3):
            raise UnsupportedError(f"{name}: qcow2 version {self.version} (2 and 3 are read)")
        if not 9 <= self.cluster_bits <= 21:
            raise FormatError(f"{name}: qcow2 cluster_bits {self.cluster_bits} outside 9..21")
        if size > MAX_SIZE:
            raise FormatError(f"{name}: qcow2 claims {size} bytes")
        if crypt:
            raise UnsupportedError(f"{name}: encrypted qcow2 (method {crypt}) is not supported")
        cs = self.cluster_size = 1 << self.cluster_bits
        self.cluster_compression = "zlib"
        hdr_len = HEADER_V2.size
        if self.version == 3:
            if len(head) < HEADER_V2.size + HEADER_V3.size:
                raise FormatError(f"{name}: qcow2 v3 header cut short")
            incompat, _compat, _autoclear, self.refcount_order, hdr_len = HEADER_V3.unpack_from(
                head, HEADER_V2.size
            )
            if self.refcount_order > 6:
                raise FormatError(f"{name}: qcow2 refcount_order {self.refcount_order} (0..6)")
            if incompat & ~KNOWN_INCOMPATIBLE:
                raise UnsupportedError(
                    f"{name}: unknown incompatible qcow2 features "
                    f"{incompat & ~KNOWN_INCOMPATIBLE:#x}"
                )
            if incompat & 16:
                raise UnsupportedError(f"{name}: qcow2 with extended L2 entries (subclusters)")
            if incompat & 8:
                if hdr_len < 105 or len(head) < 105:
                    raise FormatError(f"{name}: compression type bit set, header too short")
                ctype = head[104]
                if ctype not in (0, 1):
                    raise UnsupportedError(f"{name}: qcow2 compression type {ctype}")
                self.cluster_compression = ("zlib", "zstd")[ctype]
            if hdr_len < 104 or hdr_len > len(head):
                raise FormatError(f"{name}: qcow2 header_length {hdr_len}")
        self.l2_entries = cs // 8
        per_l1 = cs * self.l2_entries
        if l1_size < -(-size // per_l1) or l1_size > (32 << 20) // 8:
            raise FormatError(
                f"{name}: L1 table of {l1_size} entries does not fit a disk of {size} bytes"
            )
        if l1_off % cs or l1_off + 8 * l1_size > fsize:
            raise FormatError(
                f"{name}: L1 table at offset {l1_off} ({l1_size} entries) is "
                "unaligned or outside the file"
            )
        self.l1 = (
            struct.unpack(f">{l1_size}Q", source.pread(8 * l1_size, l1_off, "L1 table"))
            if l1_size
            else ()
        )
        exts = self._extensions(head, hdr_len)
        backing_format = exts.get(EXT_BACKING_FORMAT)
        self.parent = None  # the backing file (MappedImage reads through it)
        self.data = source  # where data clusters lie: this file, or an external data file
        if self.version == 3 and incompat & 4:
            if EXT_DATA_FILE not in exts:
                raise FormatError(f"{name}: external data file bit set but no data file named")
            self.data = self._open_data_file(exts[EXT_DATA_FILE], _chain)
        self.size = size
        disk = Disk(
            id="disk",
            name=os.path.basename(source.path or name),
            size=size,
            meta={"cluster_size": cs, "compat": "0.10" if self.version == 2 else "1.1"},
        )
        self.disks.append(disk)
        if self.data is not source:
            disk.meta["data_file"] = exts[EXT_DATA_FILE]
        if backing_off:
            if backing_len > 1023 or backing_off + backing_len > fsize:
                raise FormatError(
                    f"{name}: backing file name at {backing_off} ({backing_len} "
                    "bytes) is outside the file"
                )
            raw_name = source.pread(backing_len, backing_off, "backing file name")
            if b"\0" in raw_name:
                raise FormatError(f"{name}: backing file name holds a NUL byte")
            bname = raw_name.decode("utf-8", "replace")
            disk.meta["backing"] = bname
            if not no_backing:
                self._open_backing(parent or bname, backing_format, _chain, given=bool(parent))

    def _extensions(self, head: bytes, pos: int) -> dict[int, str]:
        """The header extensions vmarc uses (backing format, data file name), as text."""
        found = {}
        while pos + 8 <= len(head):
            kind, length = struct.unpack_from(">II", head, pos)
            if kind == 0:
                break
            if kind in (EXT_BACKING_FORMAT, EXT_DATA_FILE):
                found[kind] = head[pos + 8 : pos + 8 + length].decode("utf-8", "replace")
            pos += 8 + (length + 7) // 8 * 8
        return found

    def _open_data_file(self, fname: str, chain: tuple):
        source = open_source(self.beside(fname, "data file", chain))
        if not source.seekable:
            source.close()
            raise UnsupportedError(f"{self.source.name}: data file {fname} is compressed")
        return source

    def _open_backing(self, bname: str, bformat: str | None, chain: tuple, given: bool):
        """The backing file: in the format the header names (backing_fmt), else found by
        content, never raw by guess: a raw backing file needs backing_fmt=raw or the
        user's --parent (given), or any file the name points at would be read."""
        name = self.source.name
        me = os.path.realpath(self.source.path or "-")
        path = self.beside(bname, "backing file", chain)
        fmt = BACKING_FORMATS.get(bformat or "", None)
        if fmt is None:
            with open_source(path) as probe:
                try:
                    fmt = detect(probe)
                except UnknownFormatError:
                    if not given:
                        raise FormatError(
                            f"{name}: backing file {bname} is neither qcow2 nor VHD and the "
                            "image does not say backing_fmt=raw; to read it as raw anyway, "
                            "give it with --parent"
                        ) from None
                    fmt = "raw"
        if fmt == "qcow2":
            self.parent = Qcow2Archive(open_source(path), _chain=chain + (me,))
        else:
            self.parent = open_archive(path, fmt)
        if self.parent.access != RANDOM:
            raise UnsupportedError(
                f"{name}: backing file {bname} in format "
                f"{self.parent.format} cannot be read at random"
            )

    def close(self):
        if self.data is not self.source:
            self.data.close()
        super().close()  # (and the backing chain)

    def details(self) -> dict:
        d = {"cluster_size": self.cluster_size, "compat": self.disks[0].meta["compat"]}
        if "backing" in self.disks[0].meta:
            d["backing"] = self.disks[0].meta["backing"]
            d["backing_chain"] = self.chain()
        return d

    def checked(self):
        items = [
            "header fields; L1 and L2 tables and data clusters inside the file",
            "compressed clusters decompress to a whole cluster",
            "every cluster's refcount against its references (as qemu-img check: "
            "tables, snapshots, data; COPIED flags; leaks)",
        ]
        if self.parent is not None:
            items.append("the backing chain opens (each layer read the same way)")
        return self.every_disk(items, ["the disk's data: qcow2 keeps no checksum of it"])

    def check_more(self, checks: Checks) -> None:
        """What `qemu-img check` checks: refcounts against references (qcow2check.py)."""
        check_refcounts(self, checks)

    # -- mapping -------------------------------------------------------------------------
    def _l2(self, index: int):
        entry = self.l1[index] if index < len(self.l1) else 0
        off = entry & OFFSET_MASK
        if not off:
            return None
        if off % self.cluster_size or off + self.cluster_size > self.file_size:
            raise FormatError(
                f"{self.source.name}: L1 entry {index} points at offset {off}, "
                "unaligned or outside the file"
            )
        return struct.unpack(
            f">{self.l2_entries}Q", self.source.pread(self.cluster_size, off, f"L2 table {index}")
        )

    def _l2_runs(self, start: int = 0):
        """(guest offset, length, kind, host offset or L2 entry) in guest order from the
        L2 table that covers start; kind is 'data', 'zero' (reads as zero here),
        'backing' (from the backing file) or 'compressed'. Contiguous data clusters are
        merged up to MAX_READ."""
        cs = self.cluster_size
        size = self.size
        per_l1 = cs * self.l2_entries
        run = None
        for i in range(start // per_l1, -(-size // per_l1)):
            table = self._l2(i)
            base = i * per_l1
            if table is None:
                if run:
                    yield tuple(run)
                    run = None
                yield base, min(per_l1, size - base), "backing", 0
                continue
            for j, entry in enumerate(table):
                guest = base + j * cs
                if guest >= size:
                    break
                n = min(cs, size - guest)
                if entry & COMPRESSED:
                    if self.data is not self.source:
                        raise FormatError(
                            f"{self.source.name}: compressed cluster at guest "
                            f"offset {guest} in an image with a data file"
                        )
                    kind, host = "compressed", entry
                else:
                    host = entry & OFFSET_MASK
                    if entry & ZERO_FLAG and self.version == 3:
                        kind = "zero"
                    elif host or (self.data is not self.source and entry & COPIED):
                        kind = "data"  # (an external data file's first cluster is at 0)
                        limit = self.data.file_size
                        if host % cs or host + n > limit:
                            raise FormatError(
                                f"{self.source.name}: cluster at guest offset "
                                f"{guest} maps to offset {host}, unaligned or "
                                f"outside the {limit}-byte data"
                            )
                    else:
                        kind = "backing"
                if (
                    run
                    and run[2] == kind
                    and kind in ("data", "zero", "backing")
                    and run[0] + run[1] == guest
                    and run[1] + n <= MAX_READ
                    and (kind != "data" or run[3] + run[1] == host)
                ):
                    run[1] += n
                    continue
                if run:
                    yield tuple(run)
                run = [guest, n, kind, host]
        if run:
            yield tuple(run)

    def runs(self, start: int, end: int):
        kinds = {"data": DATA, "zero": ZERO, "backing": PARENT, "compressed": CODED}
        for guest, n, kind, host in self._l2_runs(start):
            if guest >= end:
                return
            if kind == "data":
                yield Run(guest, n, DATA, self.data, host)
            elif kind == "compressed":  # host: the L2 entry, which says where and how long
                yield Run(guest, n, CODED, None, host, guest)
            else:
                yield Run(guest, n, kinds[kind])

    def decode(self, entry: int, guest: int) -> bytes:
        """A compressed cluster (its L2 entry) that starts at disk offset guest."""
        cs, bits = self.cluster_size, self.cluster_bits
        x = 62 - (bits - 8)
        off = entry & ((1 << x) - 1)
        sectors = ((entry >> x) & ((1 << (bits - 8)) - 1)) + 1
        length = min(sectors * 512 - (off & 511), self.file_size - off)
        if off >= self.file_size or length <= 0:
            raise FormatError(
                f"{self.source.name}: compressed cluster at guest offset {guest} "
                f"points at offset {off}, outside the file"
            )
        raw = self.source.pread(length, off, f"compressed cluster at guest offset {guest}")
        try:
            if self.cluster_compression == "zstd":
                import zstandard

                # one read up to the end of the first frame, one byte past a cluster at
                # most: a frame that gives more is damage (as qemu has it), and a bomb
                # inflating to GiBs costs a cluster (the bytes after the frame belong to
                # the next cluster)
                out = (
                    zstandard.ZstdDecompressor()
                    .stream_reader(raw, read_across_frames=False)
                    .read(cs + 1)
                )
                if len(out) > cs:
                    raise ValueError("it inflates past a cluster")
            else:
                out = zlib.decompressobj(-12).decompress(raw, cs)
        except ImportError:
            raise UnsupportedError(
                f"{self.source.name}: zstd-compressed clusters need the "
                "zstandard package (pip install 'vmarc[zstd]')"
            ) from None
        except Exception as e:
            raise FormatError(
                f"{self.source.name}: compressed cluster at guest offset {guest} "
                f"(file offset {off}) does not decompress: {e}"
            ) from None
        if len(out) < cs:
            raise FormatError(
                f"{self.source.name}: compressed cluster at guest offset {guest} "
                f"decompresses to {len(out)} of {cs} bytes"
            )
        return out[:cs]


# -- writing ------------------------------------------------------------------------------
CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS
L2_ENTRIES = CLUSTER // 8
L2_CACHE = 16  # L2 tables held in memory while writing (64 KiB each)
REFCOUNTS_PER_BLOCK = CLUSTER // 2  # refcount_order 4: 16-bit counts


class Qcow2Writer:
    """qcow2 version 3, 64 KiB clusters, only non-zero clusters allocated.

    Data clusters are appended as they come (any order; the pieces of one cluster
    together). An L2 table gets its cluster in the file when its first data cluster
    arrives; a few tables are kept in memory (L2_CACHE, least recently used written back),
    so memory stays flat whatever the disk size. Refcounts, the L1 table and the header are
    written at the end, when the file's layout is known. Every cluster has refcount 1, so
    every table entry carries COPIED.
    """

    def __init__(self, out, size: int):
        if out.is_stream:
            raise UsageError(
                f"{out.path}: qcow2 cannot be written as a stream (its tables "
                "are written last); give a file or a block device"
            )
        self.out = out
        self.fd = out.fd
        self.size = size
        self.l1_size = -(-size // (CLUSTER * L2_ENTRIES))
        self.l1_clusters = max(1, -(-self.l1_size * 8 // CLUSTER))
        self.next_cluster = 1 + self.l1_clusters
        self.l2_host: dict[int, int] = {}  # L2 index -> file offset of its table
        self.l2_cache: OrderedDict[int, array] = OrderedDict()
        self.asm = ClusterAssembler(CLUSTER, size, self._put)

    def write(self, offset: int, data) -> None:
        self.asm.add(offset, data)

    def _pwrite(self, data, offset: int) -> None:
        pwrite_all(self.fd, data, offset)

    def _table(self, i: int) -> array:
        table = self.l2_cache.get(i)
        if table is not None:
            self.l2_cache.move_to_end(i)
            return table
        table = array("Q")
        if i in self.l2_host:  # written back before: read it again
            table.frombytes(os.pread(self.fd, CLUSTER, self.l2_host[i]))
            if sys.byteorder == "little":
                table.byteswap()
        else:
            table.frombytes(bytes(CLUSTER))
            self.l2_host[i] = self.next_cluster * CLUSTER
            self.next_cluster += 1
        self.l2_cache[i] = table
        if len(self.l2_cache) > L2_CACHE:
            self._write_table(*self.l2_cache.popitem(last=False))
        return table

    def _write_table(self, i: int, table: array) -> None:
        out = array("Q", table)
        if sys.byteorder == "little":
            out.byteswap()  # qcow2 tables are big-endian
        self._pwrite(out.tobytes(), self.l2_host[i])

    def _put(self, index: int, data) -> None:
        if is_zero(data):
            return
        host = self.next_cluster * CLUSTER
        self._pwrite(data, host)
        self.next_cluster += 1
        self._table(index // L2_ENTRIES)[index % L2_ENTRIES] = host | COPIED

    def finish(self) -> None:
        self.asm.flush()
        while self.l2_cache:
            self._write_table(*self.l2_cache.popitem(last=False))
        l1 = [0] * self.l1_size
        for i, host in self.l2_host.items():
            l1[i] = host | COPIED
        cluster = self.next_cluster
        # Refcount blocks and table go last; they count themselves too.
        blocks = table = 0
        while True:
            total = cluster + blocks + table
            need_blocks = -(-total // REFCOUNTS_PER_BLOCK)
            need_table = -(-need_blocks * 8 // CLUSTER)
            if (need_blocks, need_table) == (blocks, table):
                break
            blocks, table = need_blocks, need_table
        total = cluster + blocks + table
        ref_table = []
        for b in range(blocks):
            first = b * REFCOUNTS_PER_BLOCK
            count = min(REFCOUNTS_PER_BLOCK, total - first)
            self._pwrite(b"\0\1" * count + bytes(CLUSTER - 2 * count), (cluster + b) * CLUSTER)
            ref_table.append((cluster + b) * CLUSTER)
        table_off = (cluster + blocks) * CLUSTER
        raw_table = struct.pack(f">{len(ref_table)}Q", *ref_table)
        self._pwrite(raw_table + bytes(table * CLUSTER - len(raw_table)), table_off)
        if self.l1_size:
            self._pwrite(struct.pack(f">{self.l1_size}Q", *l1), CLUSTER)
        header = HEADER_V2.pack(
            MAGIC,
            3,
            0,
            0,
            CLUSTER_BITS,
            self.size,
            0,
            self.l1_size,
            CLUSTER,
            table_off,
            table,
            0,
            0,
        ) + HEADER_V3.pack(0, 0, 0, 4, HEADER_V2.size + HEADER_V3.size)
        self._pwrite(header + bytes(8), 0)  # then the end-of-extensions marker
        self.out.set_size(total * CLUSTER)


READERS = {"qcow2": Qcow2Archive}
