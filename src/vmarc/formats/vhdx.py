"""VHDX (Hyper-V, [MS-VHDX]): fixed, dynamic and differencing. Layout and rules:
docs/formats/vhdx.md (the spec; qemu block/vhdx.c and vhdx-log.c).

Opening checks both headers (CRC-32C, the higher sequence number wins), the region
table, and the metadata items. A non-empty log is replayed in memory first, as Hyper-V
and qemu do before anything else is trusted; the source is never written. Then the BAT
maps each payload block (and, for differencing disks, each chunk's sector bitmap).
"""

from __future__ import annotations

import os
import struct
import uuid as uuidlib
from array import array

from ..errors import FormatError, IntegrityError, SourceError, UnsupportedError
from ..io.source import open_source
from ..model import DATA, ZERO, Checks, Damage, Disk
from ..notices import warn
from .mapped import PARENT, MappedImage, Run

KiB, MiB = 1 << 10, 1 << 20
FILE_ID = b"vhdxfile"
HEADER_AT = (64 * KiB, 128 * KiB)
REGION_AT = (192 * KiB, 256 * KiB)
# header: signature, checksum, sequence, file write GUID, data write GUID, log GUID,
# log version, version, log length, log offset (then reserved to 4 KiB)
HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")
REGION_HEADER = struct.Struct("<4sIII")  # signature, checksum, entry count, reserved
REGION_ENTRY = struct.Struct("<16sQII")  # GUID, file offset, length, required
META_HEADER = struct.Struct("<8sHH20x")  # signature, reserved, entry count
META_ENTRY = struct.Struct("<16sIIII")  # item GUID, offset, length, flags, reserved
LOG_ENTRY = struct.Struct("<4sIIIQII16sQQ")  # loge, checksum, length, tail, sequence,
# descriptor count, reserved, log GUID, flushed file offset, last file offset
LOG_DESC = struct.Struct("<4sIQQQ")  # desc|zero, trailing (or reserved), leading (or
# zero length), file offset, sequence
LOG_DATA = struct.Struct("<4sI4084sI")  # data, sequence high, bytes 8..4092, sequence low
LOG_SECTOR = 4096

BAT_GUID = uuidlib.UUID("2dc27766-f623-4200-9d64-115e9bfd4a08")
META_GUID = uuidlib.UUID("8b7ca206-4790-4b9a-b8fe-575f050f886e")
FILE_PARAMETERS = uuidlib.UUID("caa16737-fa36-4d43-b3b6-33f0aa44e76b")
VIRTUAL_SIZE = uuidlib.UUID("2fa54224-cd1b-4876-b211-5dbed83bf4b8")
DISK_ID = uuidlib.UUID("beca12ab-b2e6-4523-93ef-c309e000c746")
LOGICAL_SECTOR = uuidlib.UUID("8141bf1d-a96f-4709-ba47-f233a8faab5f")
PHYSICAL_SECTOR = uuidlib.UUID("cda348c7-445d-4471-9cc9-e9885251c556")
PARENT_LOCATOR = uuidlib.UUID("a8d35f2d-b30b-454d-abf7-d3d84834ab0c")
VHDX_LOCATOR_TYPE = uuidlib.UUID("b04aefb7-d19e-4a81-b789-25b8e9445913")
KNOWN_REGIONS = (BAT_GUID, META_GUID)

NOT_PRESENT, UNDEFINED, ZERO_STATE, UNMAPPED, FULLY_PRESENT, PARTIALLY_PRESENT = 0, 1, 2, 3, 6, 7
SB_PRESENT = 6
MAX_SIZE = 64 << 40
MAX_CHAIN = 32
MAX_ZERO_RUN = 256 * MiB  # one log zero descriptor
ZERO_SECTOR = bytes(LOG_SECTOR)


def crc32c(data: bytes, at: int = 4) -> int:
    """CRC-32C of a structure with its 4-byte checksum field (at `at`) taken as zero."""
    import google_crc32c  # (when a VHDX is opened, not at every start)

    return google_crc32c.value(bytes(data[:at]) + b"\0\0\0\0" + bytes(data[at + 4 :]))


def guid(raw: bytes) -> uuidlib.UUID:
    return uuidlib.UUID(bytes_le=bytes(raw))


class VhdxHeader:
    def __init__(self, raw: bytes, at: int):
        (
            self.signature,
            self.checksum,
            self.sequence,
            self.file_write_guid,
            self.data_write_guid,
            self.log_guid,
            self.log_version,
            self.version,
            self.log_length,
            self.log_offset,
        ) = HEADER.unpack_from(raw)
        self.at = at
        self.ok = self.signature == b"head" and crc32c(raw[:LOG_SECTOR]) == self.checksum
        self.data_write = guid(self.data_write_guid)


class LoggedFile:
    """The source as it reads after the log is replayed: sectors the log writes are
    served from memory, the rest from the file (zeros past its end, up to the size the
    log says the file has)."""

    def __init__(self, source, sectors: dict[int, bytes], size: int):
        self.source = source
        self.sectors = sectors
        self.name, self.path = source.name, source.path
        self.file_size = size
        self.pread_bytes = 0

    def pread(self, n: int, offset: int, what: str) -> bytes:
        if offset + n > self.file_size:
            raise FormatError(
                f"{self.name}: {what} at offset {offset} lies past the end of the file "
                f"({self.file_size} bytes after the log's replay)"
            )
        have = max(0, min(n, self.source.file_size - offset))
        out = bytearray(self.source.pread(have, offset, what) if have else b"")
        out += bytes(n - len(out))
        first = offset - offset % LOG_SECTOR
        for s in range(first, offset + n, LOG_SECTOR):
            data = self.sectors.get(s)
            if data is not None:
                a, b = max(s, offset), min(s + LOG_SECTOR, offset + n)
                out[a - offset : b - offset] = data[a - s : b - s]
        return bytes(out)


def replay_log(source, header: VhdxHeader, where: str):
    """The sectors the active log sequence writes (qemu's rule: of the runs of valid
    entries with consecutive sequence numbers, the one ending highest), with the file
    size it leaves; None when no valid entry is found. An entry that fails its CRC, its
    GUID or its sequence numbers ends a run and is not applied."""
    length, base = header.log_length, header.log_offset
    if header.log_version != 0:
        raise UnsupportedError(f"{where}: log version {header.log_version}")
    if length % MiB or base % MiB or not length or base + length > source.file_size:
        raise FormatError(f"{where}: log of {length} bytes at offset {base} is not in the file")
    log = source.pread(length, base, "VHDX log")

    def entry_at(pos: int, want_seq: int | None):
        if pos + LOG_ENTRY.size > length:
            return None
        sig, checksum, elen, _tail, seq, count, _r, lguid, _flushed, last = LOG_ENTRY.unpack_from(
            log, pos
        )
        if sig != b"loge" or elen % LOG_SECTOR or not elen or pos + elen > length:
            return None
        if lguid != header.log_guid or (want_seq is not None and seq != want_seq) or not seq:
            return None
        desc_sectors = -(-(64 + 32 * count) // LOG_SECTOR)
        data = log[pos : pos + elen]
        if crc32c(data) != checksum:
            return None
        ops, next_data = [], desc_sectors * LOG_SECTOR
        for i in range(count):
            kind, trailing, lead, offset, dseq = LOG_DESC.unpack_from(data, 64 + 32 * i)
            if dseq != seq or offset % LOG_SECTOR:
                return None
            if kind == b"zero":
                if lead % LOG_SECTOR or lead > MAX_ZERO_RUN:
                    return None
                ops.append((offset, None, lead))
            elif kind == b"desc":
                if next_data + LOG_SECTOR > elen:
                    return None
                dsig, high, middle, low = LOG_DATA.unpack_from(data, next_data)
                if dsig != b"data" or (high << 32 | low) != seq:
                    return None
                next_data += LOG_SECTOR
                sector = struct.pack("<Q", lead) + middle + struct.pack("<I", trailing)
                ops.append((offset, sector, LOG_SECTOR))
            else:
                return None
        return seq, elen, ops, last

    best = None
    for start in range(0, length, LOG_SECTOR):
        first = entry_at(start, None)
        if first is None:
            continue
        run, pos, seq = [first], start + first[1], first[0]
        while (more := entry_at(pos, seq + 1)) is not None:
            run.append(more)
            pos, seq = pos + more[1], more[0]
        if best is None or seq > best[-1][0]:
            best = run
    if best is None:
        return None
    sectors: dict[int, bytes] = {}
    size = source.file_size
    for _seq, _len, ops, last in best:
        size = max(size, last)
        for offset, data, n in ops:
            for s in range(offset, offset + n, LOG_SECTOR):
                sectors[s] = data if data is not None else ZERO_SECTOR
            size = max(size, offset + n)
    return sectors, size, len(best), best[-1][0]


class VhdxArchive(MappedImage):
    format = "vhdx"

    @classmethod
    def probe(cls, head: bytes) -> bool:
        return head.startswith(FILE_ID)

    @classmethod
    def needs_file(
        cls, head: bytes, unsized: bool = False, parent: str | None = None
    ) -> str | None:
        return "VHDX is read through its block allocation table"

    def __init__(
        self, source, parent: str | None = None, no_backing: bool = False, _chain: tuple = ()
    ):
        super().__init__(source)
        self.problems: list[str] = []  # what verify reports beyond the reading itself
        self.replayed = None
        name = source.name
        if source.file_size < 1 * MiB:
            raise FormatError(f"{name}: {source.file_size} bytes is too small for a VHDX")
        self._headers()
        self.file = source
        h = self.header
        if h.log_guid != bytes(16) and h.log_length:
            found = replay_log(source, h, f"{name}: log")
            if found is not None:
                sectors, size, entries, seq = found
                self.file = LoggedFile(source, sectors, size)
                self.replayed = (entries, seq, len(sectors))
                warn(
                    f"{name}: the log holds {entries} entries not yet written to the file "
                    f"(up to sequence {seq}); they are replayed in memory, the file is not "
                    "changed"
                )
        self._regions()
        self._metadata()
        self._bat_read()
        disk = Disk(
            id=str(self.disk_id),
            name=os.path.basename(source.path or name),
            size=self.size,
            meta={"subformat": self.subformat, "block_size": self.block_size},
        )
        self.disks.append(disk)
        if self.has_parent and not no_backing:
            self._open_parent(parent, _chain)
            disk.meta["parent"] = self.parent.source.path

    # -- opening -------------------------------------------------------------------------
    def _headers(self):
        src = self.source
        if src.pread(8, 0, "VHDX file identifier") != FILE_ID:
            raise FormatError(f"{src.name}: no VHDX file identifier")
        heads = [VhdxHeader(src.pread(LOG_SECTOR, at, "VHDX header"), at) for at in HEADER_AT]
        good = [h for h in heads if h.ok]
        for h in heads:
            if not h.ok:
                self.problems.append(
                    f"{src.name}: header at offset {h.at}: "
                    + ("bad signature" if h.signature != b"head" else "CRC-32C mismatch")
                )
        if not good:
            raise IntegrityError(
                f"{src.name}: both VHDX headers (offsets {HEADER_AT[0]} and {HEADER_AT[1]}) "
                "fail their CRC-32C"
            )
        self.header = max(good, key=lambda h: h.sequence)
        if self.header.version != 1:
            raise UnsupportedError(f"{src.name}: VHDX header version {self.header.version}")

    def _regions(self):
        name = self.source.name
        tables = []
        for at in REGION_AT:
            raw = self.file.pread(64 * KiB, at, "VHDX region table")
            sig, checksum, count, _ = REGION_HEADER.unpack_from(raw)
            if sig != b"regi" or crc32c(raw) != checksum or count > 2047:
                self.problems.append(f"{name}: region table at offset {at}: bad signature or CRC")
                continue
            tables.append((at, raw[: REGION_HEADER.size + count * REGION_ENTRY.size]))
        if not tables:
            raise IntegrityError(f"{name}: both VHDX region tables fail their CRC-32C")
        if len(tables) == 2 and tables[0][1] != tables[1][1]:
            self.problems.append(f"{name}: the two region tables differ")
        raw = tables[0][1]
        self.regions = {}
        for i in range(REGION_HEADER.unpack_from(raw)[2]):
            g, offset, length, required = REGION_ENTRY.unpack_from(
                raw, REGION_HEADER.size + i * REGION_ENTRY.size
            )
            g = guid(g)
            if g not in KNOWN_REGIONS and required & 1:
                raise UnsupportedError(f"{name}: required region {g} is not known")
            if offset % MiB or length % MiB or offset + length > self.file.file_size:
                raise FormatError(
                    f"{name}: region {g} at offset {offset} ({length} bytes) is unaligned or "
                    "outside the file"
                )
            self.regions[g] = (offset, length)
        for g, what in ((BAT_GUID, "BAT"), (META_GUID, "metadata")):
            if g not in self.regions:
                raise FormatError(f"{name}: no {what} region")

    def _metadata(self):
        name = self.source.name
        moff, mlen = self.regions[META_GUID]
        table = self.file.pread(64 * KiB, moff, "VHDX metadata table")
        sig, _r, count = META_HEADER.unpack_from(table)
        if sig != b"metadata" or count > 2047:
            raise FormatError(f"{name}: metadata table at offset {moff}: bad signature or count")
        items = {}
        for i in range(count):
            g, off, length, flags, _ = META_ENTRY.unpack_from(table, 32 + 32 * i)
            g = guid(g)
            if off + length > mlen or (length and off < 64 * KiB):
                raise FormatError(f"{name}: metadata item {g} lies outside the metadata region")
            if g not in (
                FILE_PARAMETERS,
                VIRTUAL_SIZE,
                DISK_ID,
                LOGICAL_SECTOR,
                PHYSICAL_SECTOR,
                PARENT_LOCATOR,
            ) and (flags & 4):
                raise UnsupportedError(f"{name}: required metadata item {g} is not known")
            items[g] = self.file.pread(length, moff + off, f"metadata item {g}") if length else b""
        for g, what in (
            (FILE_PARAMETERS, "file parameters"),
            (VIRTUAL_SIZE, "virtual disk size"),
            (LOGICAL_SECTOR, "logical sector size"),
        ):
            if len(items.get(g, b"")) < (8 if g != LOGICAL_SECTOR else 4):
                raise FormatError(f"{name}: metadata item '{what}' is missing or short")
        self.block_size, flags = struct.unpack_from("<II", items[FILE_PARAMETERS])
        self.has_parent = bool(flags & 2)
        self.leave_allocated = bool(flags & 1)
        self.size = struct.unpack_from("<Q", items[VIRTUAL_SIZE])[0]
        self.logical_sector = struct.unpack_from("<I", items[LOGICAL_SECTOR])[0]
        self.disk_id = guid(items[DISK_ID][:16]) if len(items.get(DISK_ID, b"")) >= 16 else None
        self.disk_id = self.disk_id or uuidlib.UUID(int=0)
        bs = self.block_size
        if bs < MiB or bs > 256 * MiB or bs & (bs - 1):
            raise FormatError(f"{name}: block size {bs} is not a power of two of 1-256 MiB")
        if self.logical_sector not in (512, 4096):
            raise FormatError(f"{name}: logical sector size {self.logical_sector}")
        if not self.size or self.size > MAX_SIZE or self.size % self.logical_sector:
            raise FormatError(f"{name}: virtual disk size {self.size}")
        self.locator = {}
        if self.has_parent:
            self.locator = self._parse_locator(items.get(PARENT_LOCATOR, b""))
        self.subformat = "differencing" if self.has_parent else "dynamic"

    def _parse_locator(self, raw: bytes) -> dict[str, str]:
        name = self.source.name
        if len(raw) < 20 or guid(raw[:16]) != VHDX_LOCATOR_TYPE:
            raise FormatError(f"{name}: differencing VHDX without a VHDX parent locator")
        count = struct.unpack_from("<H", raw, 18)[0]
        found = {}
        for i in range(count):
            at = 20 + 12 * i
            if at + 12 > len(raw):
                raise FormatError(f"{name}: parent locator entry {i} is cut short")
            koff, voff, klen, vlen = struct.unpack_from("<IIHH", raw, at)
            if koff + klen > len(raw) or voff + vlen > len(raw):
                raise FormatError(f"{name}: parent locator entry {i} points outside the item")
            key = raw[koff : koff + klen].decode("utf-16-le", "replace")
            found[key] = raw[voff : voff + vlen].decode("utf-16-le", "replace")
        return found

    def _bat_read(self):
        name = self.source.name
        bs, size = self.block_size, self.size
        self.chunk_ratio = (1 << 23) * self.logical_sector // bs
        self.blocks = -(-size // bs)
        if self.has_parent:
            entries = -(-self.blocks // self.chunk_ratio) * (self.chunk_ratio + 1)
        else:
            entries = self.blocks + (self.blocks - 1) // self.chunk_ratio
        off, length = self.regions[BAT_GUID]
        if entries * 8 > length:
            raise FormatError(
                f"{name}: a BAT region of {length} bytes cannot hold {entries} entries"
            )
        self.bat = array("Q", self.file.pread(entries * 8, off, "VHDX BAT"))
        if struct.pack("=H", 1) != struct.pack("<H", 1):  # pragma: no cover - big-endian
            self.bat.byteswap()
        self.data_end = self.file.file_size
        # fixed: made with LeaveBlocksAllocated and every block present (Hyper-V, qemu)
        if (
            self.leave_allocated
            and not self.has_parent
            and all(
                self.bat[i + i // self.chunk_ratio] & 7 == FULLY_PRESENT for i in range(self.blocks)
            )
        ):
            self.subformat = "fixed"

    def _open_parent(self, given: str | None, chain: tuple):
        name = self.source.name
        me = os.path.realpath(self.source.path or "-")
        if len(chain) >= MAX_CHAIN:
            raise FormatError(f"{name}: parent chain deeper than {MAX_CHAIN}")
        base = os.path.dirname(me)
        tried, candidates = [], []
        if given:
            candidates.append(("--parent", given))
        else:
            for key in ("relative_path", "absolute_win32_path", "volume_path"):
                text = self.locator.get(key, "").replace("\\", "/")
                if not text:
                    continue
                if key == "relative_path":
                    candidates.append((key, os.path.normpath(os.path.join(base, text))))
                candidates.append(
                    (f"{key}, beside the disk", os.path.join(base, text.split("/")[-1]))
                )
        links = {
            v.strip("{}").lower()
            for k, v in self.locator.items()
            if k in ("parent_linkage", "parent_linkage2")
        }
        for how, path in candidates:
            if not os.path.isfile(path):
                tried.append(f"{path} ({how}: missing)")
                continue
            if os.path.realpath(path) in chain + (me,):
                raise FormatError(f"{name}: parent chain loops back to {path}")
            parent = VhdxArchive(open_source(path), _chain=chain + (me,))
            got = str(parent.header.data_write)
            if links and got not in links and how != "--parent":
                parent.close()
                tried.append(f"{path} ({how}: data write GUID {got}, not the linkage)")
                continue
            self.parent = parent
            return
        raise SourceError(
            f"{name}: parent VHDX not found; tried {'; '.join(tried) or 'no locator'}; give it "
            "with --parent"
        )

    def details(self) -> dict:
        d = {
            "subformat": self.subformat,
            "block_size": self.block_size,
            "logical_sector_size": self.logical_sector,
        }
        if self.replayed:
            d["log_replayed"] = {"entries": self.replayed[0], "last_sequence": self.replayed[1]}
        if self.parent is not None:
            d["backing_chain"] = self.chain()
        return d

    # -- reading -------------------------------------------------------------------------
    def _block_offset(self, entry: int, what: str) -> int:
        at = (entry >> 20) << 20
        if at < MiB or at >= self.data_end:
            raise FormatError(
                f"{self.source.name}: {what} at offset {at} lies outside the file "
                f"({self.data_end} bytes)"
            )
        return at

    def runs(self, start: int, end: int):
        bs, cr = self.block_size, self.chunk_ratio
        for i in range(start // bs, min(self.blocks, -(-end // bs))):
            pos = i * bs
            n = min(bs, self.size - pos)
            entry = self.bat[i + i // cr]
            state = entry & 7
            if state == FULLY_PRESENT:
                at = self._block_offset(entry, f"block {i}")
                if at + n > self.data_end:
                    raise FormatError(
                        f"{self.source.name}: block {i} at offset {at} runs past the end of "
                        f"the file ({self.data_end} bytes)"
                    )
                yield Run(pos, n, DATA, self.file, at)
            elif state == NOT_PRESENT and self.has_parent:
                yield Run(pos, n, PARENT)
            elif state in (NOT_PRESENT, UNDEFINED, ZERO_STATE, UNMAPPED):
                yield Run(pos, n, ZERO)
            elif state == PARTIALLY_PRESENT and self.has_parent:
                yield from self._partial(i, pos, n, entry)
            else:
                raise FormatError(f"{self.source.name}: BAT entry for block {i} has state {state}")

    def _partial(self, i: int, pos: int, n: int, entry: int):
        """A block partly here: the chunk's sector bitmap (a bit per logical sector, the
        lowest bit first) says which sectors."""
        cr, ls = self.chunk_ratio, self.logical_sector
        at = self._block_offset(entry, f"block {i}")
        sb = self.bat[(i // cr + 1) * (cr + 1) - 1]
        if sb & 7 != SB_PRESENT:
            raise FormatError(
                f"{self.source.name}: block {i} is partly present but its sector bitmap "
                f"(state {sb & 7}) is not"
            )
        per_block = self.block_size // ls
        bits_at = self._block_offset(sb, f"sector bitmap of block {i}") + (i % cr) * per_block // 8
        bitmap = self.file.pread(per_block // 8, bits_at, f"sector bitmap of block {i}")
        bits = bin(int.from_bytes(bitmap, "little") | 1 << per_block)[:2:-1]  # sector order
        sectors = -(-n // ls)
        s = 0
        while s < sectors:
            here = bits[s]
            e = s + 1
            while e < sectors and bits[e] == here:
                e += 1
            a, b = pos + s * ls, min(pos + e * ls, pos + n)
            if here == "1":
                yield Run(a, b - a, DATA, self.file, at + s * ls)
            else:
                yield Run(a, b - a, PARENT)
            s = e

    # -- checks --------------------------------------------------------------------------
    def checked(self):
        items = [
            "both headers' CRC-32C (the one with the higher sequence number is used)",
            "both region tables' CRC-32C, and that they agree",
            "metadata items (block size, virtual size, sector size"
            + (", parent locator" if self.has_parent else "")
            + ")",
            "every BAT entry's state, and its block inside the file",
        ]
        if self.replayed:
            items.append(
                f"the log: {self.replayed[0]} entries' CRC-32C and sequence numbers, "
                "replayed in memory"
            )
        if self.parent is not None:
            items.append("the parent's data write GUID against the child's parent linkage")
        return self.every_disk(items, ["the disk's data: VHDX keeps no checksum of it"])

    def check_more(self, checks: Checks) -> None:
        disk = self.disks[0]
        for text in self.problems:
            checks.fail(IntegrityError(text, [Damage(disk, 0, 0, "metadata")]))
        bs = self.block_size
        for i in range(self.blocks):
            try:
                for _ in self.runs(i * bs, i * bs + 1):
                    pass
            except FormatError as e:
                n = min(bs, self.size - i * bs)
                checks.fail(FormatError(str(e), [Damage(disk, i * bs, n, "structure", block=i)]))


READERS = {"vhdx": VhdxArchive}
