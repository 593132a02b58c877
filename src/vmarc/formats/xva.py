"""XVA: XenServer / XCP-ng VM export (a tar of ova.xml plus 1 MiB disk chunks).

Chunk placement follows XAPI's importer (xen-api ocaml/xapi/stream_vdi.ml, recv_all_vdi)
rather than "chunk N lives at N MiB": a gap in the numbering stands for skipped 1 MiB
zero chunks, a member advances the position by its own length, and a zero-length
keepalive member takes a number without taking space. Disks arrive one after the other
in string order of their `Ref:N` directory; a disk is complete once the position reaches
its virtual size (the last chunk is always written), and data past that size is dropped
(Xen Orchestra pads the last chunk to a full MiB).
"""

from __future__ import annotations

import re
from functools import partial

from ..errors import CorruptError, FormatError, TruncatedError
from ..io.hashing import DIGEST_NAME, INLINE, HashRing, sha1_text, xxh64_text
from ..model import SCAN, Archive, Checks, Damage, Disk, is_zero
from ..settings import xapi
from .tar import TarReader

CHUNK = 1 << 20
MAGIC = b"ova.xml\0"

DATA_NAME = re.compile(r"(?P<disk>[^/]+)/(?P<num>[0-9]+)")
# extension -> (hash function, text form the importer compares against)
CHECKSUMS = {
    ".xxhash": (xxh64_text, re.compile(r"[0-9A-F]{16}")),
    ".checksum": (sha1_text, re.compile(r"[0-9a-f]{40}")),
}


class _DiskState:
    __slots__ = ("pos", "last_suffix", "chunks")

    def __init__(self):
        self.pos = 0  # importer's write position
        self.last_suffix = "-1"  # the importer starts from "-1"
        self.chunks = 0  # chunk members seen (keepalives included)


class XvaArchive(Archive):
    format = "xva"
    access = SCAN

    @classmethod
    def probe(cls, head: bytes) -> bool:
        return head.startswith(MAGIC)

    def __init__(self, source):
        super().__init__(source)
        self.tar = TarReader(source)
        first = self.tar.next()
        if first is None or first.name != "ova.xml":
            raise FormatError(
                f"{source.name}: first tar member is "
                f"{first.name if first else 'missing'!r}; an XVA starts with ova.xml"
            )
        if first.size > xapi.MAX_OVA_XML:
            raise FormatError(
                f"{source.name}: ova.xml member claims {first.size} bytes "
                f"(limit {xapi.MAX_OVA_XML}) at offset {first.offset}"
            )
        raw = self.tar.read(first)
        self.configs["ova.xml"] = raw
        self._parse_ova(raw, f"{source.name}: ova.xml")
        self._streamed = False
        self._hashed: dict[str, dict] = {}  # disk id -> {hash function: chunks checked}

    # -- ova.xml ----------------------------------------------------------------------
    def _parse_ova(self, raw: bytes, where: str) -> None:
        top = xapi.parse(raw, where)
        self.ova = top
        objs = {o["id"]: o for o in top["objects"]}
        by_class: dict[str, list[dict]] = {}
        for o in top["objects"]:
            by_class.setdefault(o["class"], []).append(o)
        vms = [o for o in by_class.get("VM", []) if not o["snapshot"].get("is_control_domain")]
        vm = vms[0] if vms else None
        self._vm_id = vm["id"] if vm else None
        if vm:
            s = vm["snapshot"]
            self.vm = {
                "name": s.get("name_label", ""),
                "description": s.get("name_description", ""),
                "uuid": s.get("uuid", ""),
                "memory": xapi.to_int(
                    s.get("memory_static_max", "0") or "0", "VM memory_static_max", where
                ),
                "vcpus": xapi.to_int(s.get("VCPUs_max", "0") or "0", "VM VCPUs_max", where),
            }

        # Disks that carry data: the VM's non-CD VBDs' VDIs, plus a suspend image,
        # minus VDIs on ISO SRs (what xen-api's export streams).
        vbds = by_class.get("VBD", [])
        if vm:
            listed = set(vm["snapshot"].get("VBDs") or [])
            vbds = [b for b in vbds if b["id"] in listed or b["snapshot"].get("VM") == vm["id"]]
        slots: dict[str, dict] = {}
        for b in vbds:
            bs = b["snapshot"]
            if str(bs.get("type", "")).lower() == "cd" or bs.get("VDI") not in objs:
                continue
            slots.setdefault(bs["VDI"], bs)
        if vm and vm["snapshot"].get("suspend_VDI") in objs:
            slots.setdefault(vm["snapshot"]["suspend_VDI"], {"device": "suspend"})
        disks = []
        for vdi_id, vbd in slots.items():
            vdi = objs[vdi_id]
            if vdi["class"] != "VDI":
                raise FormatError(f"{where}: VBD names {vdi_id}, which is a {vdi['class']}")
            vs = vdi["snapshot"]
            sr = objs.get(vs.get("SR"))
            if sr and sr["snapshot"].get("content_type") == "iso":
                continue
            if "/" in vdi_id or vdi_id in (".", ".."):
                raise FormatError(f"{where}: VDI id {vdi_id!r} cannot name a tar directory")
            size = xapi.to_int(vs.get("virtual_size", ""), f"VDI {vdi_id} virtual_size", where)
            device = vbd.get("device") or _device_of(vbd.get("userdevice"))
            disks.append(
                Disk(
                    id=vdi_id,
                    name=vs.get("name_label", ""),
                    size=size,
                    device=device,
                    meta={
                        "userdevice": vbd.get("userdevice"),
                        "uuid": vs.get("uuid", ""),
                        "bootable": vbd.get("bootable"),
                    },
                )
            )
        # Slot order for people; the stream itself goes in string order of the ids.
        disks.sort(key=lambda d: (_slot_key(d.meta.get("userdevice")), d.id))
        for i, d in enumerate(disks):
            d.index = i
        self.disks = disks
        self._by_id = {d.id: d for d in disks}

    def settings(self):
        return xapi.read_settings(self.ova, self._vm_id, self.disks, f"{self.source.name}: ova.xml")

    def stream_order(self):
        return sorted(self.disks, key=lambda d: d.id)  # XAPI: string order of "Ref:N"

    # -- the streaming pass ----------------------------------------------------------
    def stream(self, disks=None, checks: Checks | None = None, verify: bool = True):
        checks = checks or Checks()
        wanted = {d.id for d in (disks if disks is not None else self.disks)}
        ring = HashRing(checks)
        name = self.source.name
        self.source.read_ahead()
        inline = not verify  # hashes run at once, so a chunk may be used where it was read
        try:
            for disk, start, m in self._chunks(checks):
                keep = disk.id in wanted
                n = max(0, min(m.size, disk.size - start))  # what lies inside the disk
                where = (
                    f"{name}: {disk.describe()}, chunk {m.name} (disk offset {start}, "
                    f"archive offset {m.data_offset})"
                )
                data = None
                try:
                    # no copy when the read-ahead buffer holds the whole chunk and its hash
                    # (XXH64) is computed at once; else into a ring buffer (SHA-1 pool)
                    data = self.tar.view(m) if inline and (keep or verify) else None
                    viewed = data is not None
                    if not viewed:
                        i, buf = ring.take()
                        data = buf[: m.size]
                        if keep or verify:
                            self.tar.readinto(data, m)
                    func, expected = self._read_checksum(m, disk)
                except CorruptError:
                    self._placed[disk.id].pos = start  # the disk is lost from this chunk
                    if checks.salvage and keep and data is not None:
                        yield from self._cut_chunk(checks, disk, start, m, data, where)
                    raise
                if verify:
                    counts = self._hashed.setdefault(disk.id, {})
                    counts[func] = counts.get(func, 0) + 1
                    damage = partial(chunk_damage, disk, start, n, m) if n else None
                    if viewed:
                        ring.check_now(data, func, expected, where, damage)
                    else:
                        ring.check(i, m.size, func, expected, where, damage)
                    inline = func in INLINE
                tail = n < m.size and (keep or verify) and not is_zero(data[n : m.size])
                if tail:
                    # zero padding is what Xen Orchestra writes; data there, any importer
                    # drops: the archive and its ova.xml disagree about the disk
                    checks.fail(
                        FormatError(
                            f"{where}: {m.size - n} bytes past the disk's size ({disk.size}) hold "
                            "data, not padding: ova.xml's virtual_size is too small for the "
                            "chunks",
                            [
                                Damage(
                                    disk,
                                    disk.size,
                                    m.size - n,
                                    "structure",
                                    member=m.name,
                                    archive_offset=m.data_offset + n,
                                )
                            ],
                        )
                    )
                if keep and (n or tail):
                    # salvage keeps the tail too: a piece past the disk's size, which a raw
                    # output grows to hold (convert and extract clip it for the others)
                    yield disk, start, data[: m.size if tail and checks.salvage else n]
                self.source.release_views()  # the consumer is done with the chunk
            ring.finish()
            if self.source.compression:
                self.source.drain()  # let the decompressor check its own trailer
        except CorruptError as e:
            ring.finish()  # the chunks handed out so far are checked, in order, first
            checks.stop(e)  # raises unless keeping intact disks, collecting or salvaging
        finally:
            ring.close()
        self._report_missing(checks)

    def checked(self):
        out = {}
        for d in self.disks:
            hashed = self._hashed.get(d.id, {})
            items = [
                f"{ {'xxh64': 'XXH64', 'sha1': 'SHA-1'}[DIGEST_NAME[f]] } of {n:,} "
                f"chunk{'s' if n != 1 else ''}"
                for f, n in hashed.items()
            ]
            items.append(
                "chunk placement by XAPI's rules (numbering, keepalives, the disk reaches its size)"
            )
            out[d.id] = {
                "checked": items,
                "unchecked": [] if hashed else ["no chunk of data stored (all zero)"],
            }
        return out

    def _cut_chunk(self, checks, disk, start, m, data, where):
        """Salvage: the part of a chunk read before the input ended or broke, unverified,
        and the disk's position moved to its end."""
        got = max(0, min(self.source.offset - m.data_offset, m.size, disk.size - start))
        if got:
            yield disk, start, data[:got]
        self._placed[disk.id].pos = start + got
        if got:
            checks.fail(
                CorruptError(
                    f"{where}: {got} bytes read before the input broke off; "
                    "written as read, unverified",
                    [chunk_damage(disk, start, got, m, "unverified")],
                )
            )

    def _report_missing(self, checks: Checks) -> None:
        """Every disk must reach its virtual size; the rest of a disk that does not is
        missing (zeros in a salvaged output)."""
        at = self.source.offset
        for d in self.stream_order():
            st = self._placed[d.id]
            if st.pos < d.size:
                checks.fail(
                    TruncatedError(
                        f"{self.source.name}: {d.describe()} is incomplete: its data ends at "
                        f"{st.pos} of {d.size} bytes ({st.chunks} chunk members; the last chunk "
                        "is missing)",
                        [Damage(d, st.pos, d.size - st.pos, "missing", archive_offset=at)],
                    )
                )

    def scan(self, checks: Checks | None = None):
        """(disk, disk offset, length, archive offset, checksum) of every chunk, reading
        headers only: the data is seeked over on a plain file (the index of
        `map`/`serve`/`mount`). checksum is (digest name, digest text, member size):
        random reads check each chunk against it the first time they touch it."""
        checks = checks or Checks()
        try:
            for disk, start, m in self._chunks(checks):
                self._placed[disk.id].pos = start  # lost from here if the chunk is
                func, text = self._read_checksum(m, disk)
                if m.size and start < disk.size:
                    yield (
                        disk,
                        start,
                        min(m.size, disk.size - start),
                        m.data_offset,
                        (DIGEST_NAME[func], text, m.size),
                    )
        except CorruptError as e:
            checks.stop(e)  # raises unless keeping intact disks or salvaging
        self._report_missing(checks)

    def _chunks(self, checks: Checks):
        """(disk, disk offset, member) of every chunk member, with every placement rule
        checked; the caller reads the data (or not) and then the checksum member."""
        if self._streamed:
            raise RuntimeError("an XVA stream can be read once; open the archive again")
        self._streamed = True
        order = self.stream_order()
        state = self._placed = {d.id: _DiskState() for d in order}
        current = 0
        name = self.source.name
        tar = self.tar
        while True:
            m = tar.next()
            if m is None:
                break
            where = f"{name}: member {m.name} at offset {m.offset}"
            match = DATA_NAME.fullmatch(m.name)
            if not match:
                raise FormatError(
                    f"{where}: unexpected member (an XVA holds ova.xml then "
                    "Ref:N/NNNNNNNN chunks, each followed by its checksum)"
                )
            disk_id, suffix = match["disk"], match["num"]
            disk = self._by_id.get(disk_id)
            if disk is None:
                raise FormatError(
                    f"{where}: chunk of {disk_id}, which is not a disk of this VM in ova.xml"
                )
            while current < len(order) and state[order[current].id].pos >= order[current].size:
                current += 1
            if current == len(order) or order[current] is not disk:
                if order.index(disk) < current or current == len(order):
                    raise FormatError(
                        f"{where}: {disk.describe()} is already complete ({disk.size} bytes)"
                    )
                exp = order[current]
                raise FormatError(
                    f"{where}: {exp.describe()} is incomplete (data ends at "
                    f"{state[exp.id].pos} of {exp.size} bytes) but a chunk of {disk_id} follows"
                )
            st = state[disk_id]
            if not suffix > st.last_suffix:
                raise FormatError(
                    f"{where}: chunk suffix {suffix} does not follow "
                    f"{st.last_suffix} in string order"
                )
            gap = int(suffix) - int(st.last_suffix) - 1
            if gap < 0:
                raise FormatError(
                    f"{where}: chunk number {int(suffix)} goes back from {int(st.last_suffix)}"
                )
            if m.size > CHUNK:
                raise FormatError(
                    f"{where}: chunk member of {m.size} bytes; XVA chunks are at most 1 MiB"
                )
            start = st.pos + gap * CHUNK
            yield disk, start, m
            st.last_suffix = suffix
            st.pos = start + m.size
            st.chunks += 1

    def _read_checksum(self, data_member, disk):
        m = self.tar.next()
        if m is None:
            raise TruncatedError(
                f"{self.source.name}: archive ends after chunk "
                f"{data_member.name} without its checksum member"
            )
        ext = m.name[len(data_member.name) :] if m.name.startswith(data_member.name) else ""
        if ext not in CHECKSUMS:
            raise FormatError(
                f"{self.source.name}: member {m.name} at offset {m.offset}: "
                f"expected {data_member.name}.xxhash or .checksum after the chunk"
            )
        func, pattern = CHECKSUMS[ext]
        if m.size > 64:
            raise FormatError(
                f"{self.source.name}: checksum member {m.name} at offset "
                f"{m.offset} claims {m.size} bytes"
            )
        text = self.tar.read(m).decode("ascii", "replace")
        if not pattern.fullmatch(text):
            raise FormatError(
                f"{self.source.name}: {disk.describe()}, checksum member {m.name} "
                f"at offset {m.offset} holds {text!r}, not a {ext[1:]} digest in "
                "XAPI's form"
            )
        return func, text


def chunk_damage(disk: Disk, start: int, n: int, member, cause: str = "checksum") -> Damage:
    return Damage(disk, start, n, cause, member=member.name, archive_offset=member.data_offset)


def _device_of(userdevice) -> str | None:
    try:
        n = int(userdevice)
    except (TypeError, ValueError):
        return None
    return "xvd" + chr(ord("a") + n) if 0 <= n < 26 else None


def _slot_key(userdevice):
    try:
        return int(userdevice)
    except (TypeError, ValueError):
        return 1 << 30


READERS = {"xva": XvaArchive}
