"""An independent XVA generator for the tests (imports nothing from vmarc).

It writes what XAPI's exporter writes (xen-api stream_vdi.ml send_one) and what Xen
Orchestra writes (@xen-orchestra/xva), quirks included, and lets a test break any part.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
from dataclasses import dataclass, field

import xxhash

MiB = 1 << 20


@dataclass
class XDisk:
    ref: str  # "Ref:5"
    data: bytes | None  # the whole disk content (small disks), or None with size+sparse
    label: str = "disk"
    userdevice: str = "0"
    device: str = ""
    size: int = 0  # for sparse disks: the virtual size
    sparse: dict = field(default_factory=dict)  # chunk number -> 1 MiB (or last) of data

    def __post_init__(self):
        if self.data is not None:
            self.size = len(self.data)

    def read(self, offset: int, n: int) -> bytes:
        if self.data is not None:
            return self.data[offset : offset + n]
        return self.sparse.get(offset // MiB, bytes(n))[:n].ljust(n, b"\0")


@dataclass
class XvaSpec:
    disks: list[XDisk]
    vm_name: str = "test-vm"
    memory: int = 2 * 1024 * MiB
    vcpus: int = 2
    with_cd: bool = True
    header: str = "v7"  # v7 (XAPI) or ustar (Xen Orchestra)
    checksum: str = "xxhash"  # xxhash or sha1 (".checksum")
    keepalives: dict = field(
        default_factory=dict
    )  # ref -> set of chunk numbers that are keepalives
    write_zero_chunks: bool = False  # VHD-backed VDIs: allocated zero chunks are written
    xo_style: bool = False  # pad last chunk to 1 MiB; unpadded name for a zero last chunk
    compress: str | None = None  # None, gzip, zstd
    ova_xml: bytes | None = None  # replace the generated ova.xml


def _octal(n: int, width: int) -> bytes:
    return (b"%0*o" % (width - 1, n)) + b"\0"


def tar_header(name: str, size: int, style: str = "v7") -> bytes:
    h = bytearray(512)
    nb = name.encode()
    assert len(nb) <= 100
    h[0 : len(nb)] = nb
    h[100:108] = _octal(0o400, 8)
    h[108:116] = _octal(0, 8)
    h[116:124] = _octal(0, 8)
    h[124:136] = _octal(size, 12)
    h[136:148] = _octal(0, 12)
    if style == "ustar":
        h[156:157] = b"0"
        h[257:263] = b"ustar\0"
        h[263:265] = b"00"
        h[265:269] = b"root"
        h[297:301] = b"root"
    else:
        h[156:157] = b"\0"  # XAPI: V7 header, type flag NUL, no magic
    h[148:156] = b" " * 8
    csum = sum(h)
    h[148:156] = b"%06o\0 " % csum
    return bytes(h)


def tar_member(name: str, data: bytes, style: str = "v7") -> bytes:
    return tar_header(name, len(data), style) + data + bytes(-len(data) % 512)


def checksum_member(name: str, data: bytes, kind: str, style: str) -> bytes:
    if kind == "xxhash":
        text = "%016X" % xxhash.xxh64_intdigest(data)
        return tar_member(name + ".xxhash", text.encode(), style)
    return tar_member(name + ".checksum", hashlib.sha1(data).hexdigest().encode(), style)


def chunk_members(disk: XDisk, spec: XvaSpec) -> list[tuple[str, bytes]]:
    """(name, data) of each chunk member, in order, as the chosen exporter writes them."""
    out = []
    size = disk.size
    keep = spec.keepalives.get(disk.ref, set())
    num, offset = 0, 0
    written_last = False
    while offset < size:
        this = min(MiB, size - offset)
        last = this == size - offset
        first_or_last = num == 0 or last
        name = f"{disk.ref}/{num:08d}"
        if num in keep and not first_or_last:
            out.append((name, b""))  # keepalive: takes the number, not the space
            num += 1
            continue
        if (
            disk.data is None
            and num not in disk.sparse
            and not first_or_last
            and not spec.write_zero_chunks
        ):
            num += 1  # a hole of a sparse test disk: skipped
            offset += MiB
            continue
        data = disk.read(offset, this)
        zero = data.count(0) == len(data)
        if spec.xo_style:
            if num == 0 or not zero:
                out.append((name, data.ljust(MiB, b"\0")))
                written_last = True
            else:
                written_last = False
        elif first_or_last or spec.write_zero_chunks or not zero:
            out.append((name, data))
        num += 1
        offset += MiB
    if spec.xo_style and not written_last and size:
        out.append((f"{disk.ref}/{num}", bytes(size - (num - 1) * MiB)))
    return out


def _v(x) -> str:
    if isinstance(x, bool):
        return f"<value><boolean>{int(x)}</boolean></value>"
    if isinstance(x, dict):
        return (
            "<value><struct>"
            + "".join(f"<member><name>{k}</name>{_v(v)}</member>" for k, v in x.items())
            + "</struct></value>"
        )
    if isinstance(x, list):
        return "<value><array><data>" + "".join(_v(v) for v in x) + "</data></array></value>"
    return f"<value>{x}</value>"


def ova_xml(spec: XvaSpec) -> bytes:
    objs = []
    vbds = []
    for i, d in enumerate(spec.disks):
        vbd = f"Ref:{1000 + i}"
        vbds.append(vbd)
        objs.append(
            {
                "class": "VBD",
                "id": vbd,
                "snapshot": {
                    "uuid": f"vbd-{i}",
                    "VM": "Ref:0",
                    "VDI": d.ref,
                    "userdevice": d.userdevice,
                    "device": d.device,
                    "bootable": i == 0,
                    "mode": "RW",
                    "type": "Disk",
                    "empty": False,
                    "other_config": {},
                },
            }
        )
        objs.append(
            {
                "class": "VDI",
                "id": d.ref,
                "snapshot": {
                    "uuid": f"vdi-{i}",
                    "name_label": d.label,
                    "SR": "Ref:900",
                    "virtual_size": str(d.size),
                    "type": "user",
                    "sharable": False,
                    "read_only": False,
                    "other_config": {},
                },
            }
        )
    if spec.with_cd:
        objs.append(
            {
                "class": "VBD",
                "id": "Ref:1999",
                "snapshot": {
                    "uuid": "vbd-cd",
                    "VM": "Ref:0",
                    "VDI": "Ref:950",
                    "userdevice": "3",
                    "type": "CD",
                    "empty": False,
                },
            }
        )
        objs.append(
            {
                "class": "VDI",
                "id": "Ref:950",
                "snapshot": {
                    "uuid": "iso",
                    "name_label": "install.iso",
                    "SR": "Ref:901",
                    "virtual_size": "123456789",
                },
            }
        )
        objs.append(
            {
                "class": "SR",
                "id": "Ref:901",
                "snapshot": {"uuid": "sr-iso", "content_type": "iso", "type": "iso"},
            }
        )
        vbds.append("Ref:1999")
    objs.append(
        {
            "class": "SR",
            "id": "Ref:900",
            "snapshot": {"uuid": "sr-1", "content_type": "user", "type": "lvm"},
        }
    )
    objs.insert(
        0,
        {
            "class": "VM",
            "id": "Ref:0",
            "snapshot": {
                "uuid": "0e3b2a5c-1111-4222-8333-944455556666",
                "name_label": spec.vm_name,
                "name_description": "made by tests",
                "memory_static_max": str(spec.memory),
                "VCPUs_max": str(spec.vcpus),
                "VBDs": vbds,
                "is_control_domain": False,
            },
        },
    )
    top = {
        "version": {
            "hostname": "test",
            "product_version": "8.2.1",
            "export_vsn": "2",
            "xapi_major": "1",
            "xapi_minor": "20",
        },
        "objects": objs,
    }
    return _v(top).encode()


def write_to(f, spec: XvaSpec) -> None:
    """Write the uncompressed archive to a binary file object, member by member."""
    f.write(
        tar_member(
            "ova.xml", spec.ova_xml if spec.ova_xml is not None else ova_xml(spec), spec.header
        )
    )
    for disk in sorted(spec.disks, key=lambda d: d.ref):  # XAPI: string order of the refs
        for name, data in chunk_members(disk, spec):
            f.write(tar_member(name, data, spec.header))
            f.write(checksum_member(name, data, spec.checksum, spec.header))
    f.write(bytes(1024))


def build(spec: XvaSpec) -> bytes:
    """The whole archive (uncompressed, or compressed as spec.compress says)."""
    out = io.BytesIO()
    write_to(out, spec)
    return compress(out.getvalue(), spec.compress)


def compress(data: bytes, how: str | None) -> bytes:
    if how == "gzip":
        return gzip.compress(data, compresslevel=1)
    if how == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=1).compress(data)
    return data


def pattern_disk(size: int, zero_chunks=(), seed: int = 1) -> bytes:
    """Distinct, non-zero bytes in every 1 MiB chunk except those listed as zero."""
    buf = bytearray(size)
    for c in range((size + MiB - 1) // MiB):
        if c in zero_chunks:
            continue
        start, end = c * MiB, min(size, (c + 1) * MiB)
        block = hashlib.sha256(b"%d-%d" % (seed, c)).digest()
        piece = (block * ((end - start) // 32 + 1))[: end - start]
        buf[start:end] = piece
    return bytes(buf)


def write(path, spec: XvaSpec) -> bytes:
    data = build(spec)
    with open(path, "wb") as f:
        f.write(data)
    return data


def random_bytes(n: int) -> bytes:
    return os.urandom(n)
