"""An independent VHD generator for the tests (imports nothing from vmarc).

qemu-img cannot write VHD parents, so differencing chains are built here: dynamic and
differencing VHDs with partial sector bitmaps and W2ru / W2ku / MacX parent locators.
"""

from __future__ import annotations

import os
import struct
import uuid as uuidlib

SECTOR = 512


def _checksum(raw: bytes) -> int:
    return ~sum(raw) & 0xFFFFFFFF


def footer(size: int, disk_type: int, uid: bytes, creator=b"tap\0") -> bytes:
    raw = bytearray(512)
    struct.pack_into(
        ">8sIIQI4sI4sQQHBBI",
        raw,
        0,
        b"conectix",
        2,
        0x00010000,
        512 if disk_type != 2 else 0xFFFFFFFFFFFFFFFF,
        700000000,
        creator,
        0x00010003,
        b"Wi2k",
        size,
        size,
        65535,
        16,
        255,
        disk_type,
    )
    raw[68:84] = uid
    struct.pack_into(">I", raw, 64, _checksum(raw))
    return bytes(raw)


def build(
    size: int,
    sectors: dict[int, bytes],
    block_size: int = 2 << 20,
    parent: tuple[bytes, str, list] | None = None,
    uid: bytes | None = None,
) -> bytes:
    """sectors: {sector number: 512 bytes} present in this layer (others absent).
    parent: (parent uuid, parent name, [(code, text)] locators) for a differencing disk."""
    uid = uid or uuidlib.uuid4().bytes
    spb = block_size // SECTOR
    entries = -(-size // block_size)
    bitmap_size = -(-spb // 8 // SECTOR) * SECTOR
    bat_off = 1536
    bat_bytes = -(-entries * 4 // SECTOR) * SECTOR
    loc_data = []
    pos = bat_off + bat_bytes
    for code, text in parent[2] if parent else []:
        enc = text.encode("utf-8" if code == b"MacX" else "utf-16-le")
        loc_data.append((code, enc, pos))
        pos += -(-len(enc) // SECTOR) * SECTOR
    blocks = sorted({s // spb for s in sectors})
    bat = [0xFFFFFFFF] * entries
    body = bytearray()
    for b in blocks:
        bat[b] = (pos + len(body)) // SECTOR
        bitmap = bytearray(bitmap_size)
        data = bytearray(block_size)
        for s in range(spb):
            got = sectors.get(b * spb + s)
            if got is not None:
                bitmap[s // 8] |= 0x80 >> (s % 8)
                data[s * SECTOR : (s + 1) * SECTOR] = got
        body += bitmap + data
    hdr = bytearray(1024)
    struct.pack_into(
        ">8sQQIII",
        hdr,
        0,
        b"cxsparse",
        0xFFFFFFFFFFFFFFFF,
        bat_off,
        0x00010000,
        entries,
        block_size,
    )
    if parent:
        hdr[40:56] = parent[0]
        name = parent[1].encode("utf-16-be")[:510]
        hdr[64 : 64 + len(name)] = name
        for i, (code, enc, off) in enumerate(loc_data):
            struct.pack_into(
                ">4sIIIQ", hdr, 576 + 24 * i, code, -(-len(enc) // SECTOR), len(enc), 0, off
            )
    struct.pack_into(">I", hdr, 36, _checksum(hdr))
    foot = footer(size, 4 if parent else 3, uid)
    out = bytearray(foot + hdr + struct.pack(f">{entries}I", *bat).ljust(bat_bytes, b"\xff"))
    for _code, enc, off in loc_data:
        out += enc.ljust(-(-len(enc) // SECTOR) * SECTOR, b"\0")
    assert len(out) == pos
    return bytes(out + body + foot)


def uuid_of(vhd: bytes) -> bytes:
    return vhd[-512 + 68 : -512 + 84]


def locators_for(child_path: str, parent_path: str, kinds=("W2ru", "W2ku", "MacX")):
    rel = os.path.relpath(parent_path, os.path.dirname(child_path))
    out = []
    for k in kinds:
        if k == "W2ru":
            out.append((b"W2ru", rel.replace("/", "\\")))
        elif k == "W2ku":
            out.append((b"W2ku", os.path.abspath(parent_path)))
        else:
            out.append((b"MacX", "file://" + os.path.abspath(parent_path)))
    return out
