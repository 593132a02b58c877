"""VHDX structures written from [MS-VHDX] for what qemu-img cannot make: differencing
disks (qemu has no VHDX backing files) and log entries (qemu flushes its log before it
closes). Independent of src/vmarc: its own layouts, from the spec's tables."""

import struct
import uuid

import google_crc32c

KiB, MiB = 1 << 10, 1 << 20
SECTOR = 512
BAT_GUID = uuid.UUID("2dc27766-f623-4200-9d64-115e9bfd4a08")
META_GUID = uuid.UUID("8b7ca206-4790-4b9a-b8fe-575f050f886e")
ITEMS = {
    "file_parameters": uuid.UUID("caa16737-fa36-4d43-b3b6-33f0aa44e76b"),
    "virtual_size": uuid.UUID("2fa54224-cd1b-4876-b211-5dbed83bf4b8"),
    "disk_id": uuid.UUID("beca12ab-b2e6-4523-93ef-c309e000c746"),
    "logical_sector": uuid.UUID("8141bf1d-a96f-4709-ba47-f233a8faab5f"),
    "physical_sector": uuid.UUID("cda348c7-445d-4471-9cc9-e9885251c556"),
    "parent_locator": uuid.UUID("a8d35f2d-b30b-454d-abf7-d3d84834ab0c"),
}
LOCATOR_TYPE = uuid.UUID("b04aefb7-d19e-4a81-b789-25b8e9445913")


def crc(data: bytes) -> int:
    """CRC-32C with the checksum field (bytes 4..8) as zero."""
    return google_crc32c.value(data[:4] + bytes(4) + data[8:])


def seal(block: bytearray) -> bytearray:
    struct.pack_into("<I", block, 4, crc(bytes(block)))
    return block


def header(seq, data_write, log_guid=bytes(16), log_offset=MiB, log_length=MiB):
    h = bytearray(4 * KiB)
    struct.pack_into(
        "<4sIQ16s16s16sHHIQ",
        h,
        0,
        b"head",
        0,
        seq,
        uuid.uuid4().bytes_le,
        data_write.bytes_le,
        log_guid,
        0,
        1,
        log_length,
        log_offset,
    )
    return seal(h)


def read_header(raw: bytes, at: int) -> dict:
    sig, _c, seq, fw, dw, lg, lv, ver, llen, loff = struct.unpack_from(
        "<4sIQ16s16s16sHHIQ", raw, at
    )
    return {
        "seq": seq,
        "data_write": uuid.UUID(bytes_le=dw),
        "log_length": llen,
        "log_offset": loff,
    }


def _utf16(s: str) -> bytes:
    return s.encode("utf-16-le")


def make_differencing(path, parent_path, size, writes, parent_name, block_size=MiB, sector=SECTOR):
    """A differencing VHDX over parent_path: writes is [(offset, bytes)] in logical
    sectors of `sector` bytes; blocks wholly written are fully present, others partially
    present with the chunk's sector bitmap (bit n of the bitmap, lowest bit of each byte
    first, is sector n). Returns the bytes the child reads as, given the parent's."""
    SECTOR = sector  # noqa: N806 (the logical sector size of this disk)
    with open(parent_path, "rb") as f:
        parent = f.read()
    ph = max(
        (read_header(parent, 64 * KiB), read_header(parent, 128 * KiB)), key=lambda h: h["seq"]
    )
    chunk_ratio = (1 << 23) * sector // block_size
    blocks = -(-size // block_size)
    chunks = -(-blocks // chunk_ratio)
    entries = chunks * (chunk_ratio + 1)
    meta_at, bat_at, log_at = 2 * MiB, 3 * MiB, MiB
    bat_len = -(-entries * 8 // MiB) * MiB
    data_at = bat_at + bat_len
    # which sectors each block holds
    present: dict[int, bytearray] = {}
    content: dict[int, bytearray] = {}
    for off, data in writes:
        assert off % SECTOR == 0 and len(data) % SECTOR == 0
        for s in range(off // SECTOR, (off + len(data)) // SECTOR):
            b, k = divmod(s * SECTOR, block_size)
            present.setdefault(b, bytearray(block_size // SECTOR))[k // SECTOR] = 1
            blk = content.setdefault(b, bytearray(block_size))
            src = (s * SECTOR) - off
            blk[k : k + SECTOR] = data[src : src + SECTOR]
    out = bytearray(data_at)
    out[:8] = b"vhdxfile"
    out[8 : 8 + 14] = _utf16("vhdxgen")
    out[64 * KiB : 68 * KiB] = header(1, uuid.uuid4(), log_offset=log_at)
    out[128 * KiB : 132 * KiB] = header(2, uuid.uuid4(), log_offset=log_at)
    region = bytearray(64 * KiB)
    struct.pack_into("<4sIII", region, 0, b"regi", 0, 2, 0)
    struct.pack_into("<16sQII", region, 16, BAT_GUID.bytes_le, bat_at, bat_len, 1)
    struct.pack_into("<16sQII", region, 48, META_GUID.bytes_le, meta_at, MiB, 1)
    seal(region)
    out[192 * KiB : 256 * KiB] = region
    out[256 * KiB : 320 * KiB] = region
    # metadata: table, then the items from 64 KiB on
    locator = _locator(
        {
            "parent_linkage": "{" + str(ph["data_write"]) + "}",
            "relative_path": ".\\" + parent_name,
            "absolute_win32_path": "C:\\vms\\" + parent_name,
        }
    )
    items = [
        ("file_parameters", struct.pack("<II", block_size, 2), 4),
        ("virtual_size", struct.pack("<Q", size), 6),
        ("disk_id", uuid.uuid4().bytes_le, 6),
        ("logical_sector", struct.pack("<I", sector), 6),
        ("physical_sector", struct.pack("<I", 4096), 6),
        ("parent_locator", locator, 4),
    ]
    meta = bytearray(MiB)
    struct.pack_into("<8sHH", meta, 0, b"metadata", 0, len(items))
    pos = 64 * KiB
    for i, (name, raw, flags) in enumerate(items):
        struct.pack_into(
            "<16sIIII", meta, 32 + 32 * i, ITEMS[name].bytes_le, pos, len(raw), flags, 0
        )
        meta[pos : pos + len(raw)] = raw
        pos += -(-len(raw) // 8) * 8
    out[meta_at : meta_at + MiB] = meta
    bat = [0] * entries
    file_end = data_at
    bitmaps: dict[int, bytearray] = {}
    for b in sorted(present):
        bits = present[b]
        at = file_end
        file_end += block_size
        out += content[b]
        full = all(bits)
        bat[b + b // chunk_ratio] = (at >> 20) << 20 | (6 if full else 7)
        if not full:
            c = b // chunk_ratio
            bm = bitmaps.setdefault(c, bytearray(MiB))
            first = (b % chunk_ratio) * (block_size // SECTOR)
            for k, bit in enumerate(bits):
                if bit:
                    n = first + k
                    bm[n // 8] |= 1 << (n % 8)
    for c, bm in sorted(bitmaps.items()):
        at = file_end
        file_end += MiB
        out += bm
        bat[(c + 1) * (chunk_ratio + 1) - 1] = (at >> 20) << 20 | 6
    out[bat_at : bat_at + entries * 8] = struct.pack(f"<{entries}Q", *bat)
    with open(path, "wb") as f:
        f.write(out)
    want = bytearray(size)
    for off, data in writes:
        want[off : off + len(data)] = data
    return want


def _locator(pairs: dict) -> bytes:
    head = LOCATOR_TYPE.bytes_le + struct.pack("<HH", 0, len(pairs))
    table_len = 12 * len(pairs)
    strings = b""
    table = b""
    base = len(head) + table_len
    for k, v in pairs.items():
        kb, vb = _utf16(k), _utf16(v)
        koff = base + len(strings)
        strings += kb
        voff = base + len(strings)
        strings += vb
        table += struct.pack("<IIHH", koff, voff, len(kb), len(vb))
    return head + table + strings


# -- the log ---------------------------------------------------------------------------
def log_entry(seq, log_guid, ops, tail=0, flushed=0, last=0, torn=False):
    """One log entry: ops are ("data", file offset, 4096 bytes) or ("zero", file
    offset, length). torn: the CRC is spoilt, as by a write cut short."""
    descs, datas = [], []
    for op in ops:
        if op[0] == "data":
            _, off, sector = op
            assert len(sector) == 4096
            lead = struct.unpack_from("<Q", sector, 0)[0]
            trail = struct.unpack_from("<I", sector, 4092)[0]
            descs.append(struct.pack("<4sIQQQ", b"desc", trail, lead, off, seq))
            datas.append(
                struct.pack("<4sI", b"data", seq >> 32)
                + sector[8:4092]
                + struct.pack("<I", seq & 0xFFFFFFFF)
            )
        else:
            _, off, n = op
            descs.append(struct.pack("<4sIQQQ", b"zero", 0, n, off, seq))
    head_len = -(-(64 + 32 * len(descs)) // 4096) * 4096
    total = head_len + 4096 * len(datas)
    entry = bytearray(total)
    struct.pack_into(
        "<4sIIIQII16sQQ",
        entry,
        0,
        b"loge",
        0,
        total,
        tail,
        seq,
        len(descs),
        0,
        log_guid,
        flushed,
        last,
    )
    for i, d in enumerate(descs):
        entry[64 + 32 * i : 96 + 32 * i] = d
    for i, d in enumerate(datas):
        entry[head_len + 4096 * i : head_len + 4096 * (i + 1)] = d
    seal(entry)
    if torn:
        entry[-1] ^= 0xFF
    return bytes(entry)


def write_log(path, entries_at: list[tuple[int, bytes]], log_guid: bytes):
    """Put entries at offsets inside the log region and set the log GUID in both headers
    (a new sequence number each, as a writer does)."""
    with open(path, "r+b") as f:
        raw = f.read(256 * KiB)
        hs = [read_header(raw, at) for at in (64 * KiB, 128 * KiB)]
        for at, h in zip((64 * KiB, 128 * KiB), hs):
            f.seek(at)
            f.write(
                header(h["seq"] + 2, h["data_write"], log_guid, h["log_offset"], h["log_length"])
            )
        loff = hs[0]["log_offset"]
        for pos, entry in entries_at:
            f.seek(loff + pos)
            f.write(entry)
    return hs[0]["log_offset"]


def apply_and_clear(path, ops_in_order):
    """What a replay leaves on disk: the ops written into the file, the log GUID cleared
    (so that qemu-img, which will not replay read-only, reads the expected state)."""
    with open(path, "r+b") as f:
        for op in ops_in_order:
            f.seek(op[1])
            f.write(op[2] if op[0] == "data" else bytes(op[2]))
        f.seek(0)
        raw = f.read(256 * KiB)
        for at in (64 * KiB, 128 * KiB):
            h = read_header(raw, at)
            f.seek(at)
            f.write(
                header(h["seq"] + 4, h["data_write"], bytes(16), h["log_offset"], h["log_length"])
            )


def bat_of(path) -> tuple[int, int]:
    """(file offset of the BAT, block size) from the region table and metadata."""
    with open(path, "rb") as f:
        raw = f.read(320 * KiB)
        count = struct.unpack_from("<I", raw, 192 * KiB + 8)[0]
        regions = {}
        for i in range(count):
            g, off, length, _ = struct.unpack_from("<16sQII", raw, 192 * KiB + 16 + 32 * i)
            regions[uuid.UUID(bytes_le=g)] = off
        f.seek(regions[META_GUID])
        meta = f.read(MiB)
    n = struct.unpack_from("<H", meta, 10)[0]
    for i in range(n):
        g, off, length, _, _ = struct.unpack_from("<16sIIII", meta, 32 + 32 * i)
        if uuid.UUID(bytes_le=g) == ITEMS["file_parameters"]:
            return regions[BAT_GUID], struct.unpack_from("<I", meta, off)[0]
    raise AssertionError("no file parameters")
