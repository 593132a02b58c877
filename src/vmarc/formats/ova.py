"""OVA and OVF (DMTF DSP0243): a VM as an OVF descriptor, an optional manifest and its
disks, either in one tar (.ova) or as files beside the descriptor (.ovf). Layout and
rules: docs/formats/ova.md.

An OVA is read in one pass, from a file or a pipe: the descriptor first, then each
member in turn; a streamOptimized VMDK is inflated by its markers as it passes (any
other disk is spooled to a temporary file and read by its tables), and every member is
hashed on the way so the manifest's SHA-1/SHA-256 digests are checked, wherever in the
archive the manifest lies. The writer makes what VMware's exports hold: the .ovf, the
.mf, then one streamOptimized VMDK per disk.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile

from ..errors import FormatError, IntegrityError, TruncatedError, UsageError
from ..io.output import pwrite_all, temp_writes
from ..model import STREAM, ZERO_CHUNK, Archive, Checks, Damage, Disk, is_zero
from ..notices import notice, warn
from .disk_order import DiskSequencer
from .tar import BLOCK, TarReader, make_header, parse_header
from .vmdk import MAGIC as VMDK_MAGIC
from .vmdk import SparseHeader, VmdkWriter, stream_markers

MANIFEST_LINE = re.compile(r"^\s*(SHA1|SHA256|SHA512)\s*\((.+)\)\s*=\s*([0-9A-Fa-f]+)\s*$")
ALGORITHMS = {"SHA1": "sha1", "SHA256": "sha256", "SHA512": "sha512"}
SCRATCH = 1 << 20
MAX_MANIFEST = 1 << 20  # a line per file: a few KiB


def parse_manifest(text: str, where: str) -> dict[str, tuple[str, str]]:
    """file name -> (algorithm, lower-case hex digest)."""
    found = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        m = MANIFEST_LINE.match(line)
        if not m:
            raise FormatError(f"{where}: manifest line not understood: {line[:80]!r}")
        found[m[2].strip()] = (ALGORITHMS[m[1]], m[3].lower())
    return found


def _is_ovf(head: bytes) -> bool:
    text = head.lstrip()
    return text.startswith(b"<") and b"Envelope" in head and b"dmtf.org/ovf/envelope" in head


class _MemberReader:
    """One tar member front to back for stream_markers: readinto_exact, skip and offset
    (from the member's start), every byte hashed as it passes."""

    def __init__(self, tar: TarReader, member, hashes, where: str):
        self.tar, self.member, self.hashes, self.name = tar, member, hashes, where
        self.offset = 0
        self._scratch = None

    def readinto_exact(self, view, what: str) -> None:
        if self.offset + len(view) > self.member.size:
            raise TruncatedError(
                f"{self.name}: {self.member.name} ends at {self.member.size} bytes, inside {what}"
            )
        self.tar.readinto(view, self.member)
        for h in self.hashes:
            h.update(view)
        self.offset += len(view)

    def readinto_upto(self, view) -> int:
        n = min(len(view), self.member.size - self.offset)
        self.readinto_exact(view[:n], "the member")
        return n

    def skip(self, n: int, what: str) -> None:
        if self._scratch is None:
            self._scratch = memoryview(bytearray(SCRATCH))
        while n > 0:
            step = min(n, SCRATCH)
            self.readinto_exact(self._scratch[:step], what)
            n -= step

    def rest(self) -> None:
        self.skip(self.member.size - self.offset, "the rest of the member")


class OvaArchive(Archive):
    """An .ova (tar) or an .ovf descriptor with its files beside it."""

    format = "ova"
    access = STREAM

    @classmethod
    def probe(cls, head: bytes) -> bool:
        if _is_ovf(head[:4096]):
            return True
        if len(head) < BLOCK:
            return False
        try:
            name, _size, _type = parse_header(head[:BLOCK], "probe")
        except FormatError:
            return False
        return name.lower().endswith(".ovf")

    def __init__(self, source):
        from ..settings import ovf as ovf_settings  # (when an OVA is opened, not at start)

        super().__init__(source)
        name = source.name
        self.manifest: dict[str, tuple[str, str]] = {}
        self.manifest_name = None
        self.digests: dict[str, dict[str, str]] = {}  # file -> algorithm -> hex, as read
        self.tar = None
        self.members: dict[str, tuple[int, int]] = {}  # seekable OVA: name -> (data at, size)
        if _is_ovf(source.peek(4096)):
            self.ovf_name = os.path.basename(source.path or "vm.ovf")
            data = source.read_upto(ovf_settings.MAX_OVF + 1)
            self.base = os.path.dirname(os.path.abspath(source.path or "-"))
        else:
            self.tar = TarReader(source)
            first = self.tar.next()
            if first is None or not first.name.lower().endswith(".ovf"):
                raise FormatError(f"{name}: an OVA starts with its .ovf descriptor")
            if first.size > ovf_settings.MAX_OVF:
                raise FormatError(f"{name}: a {first.size}-byte OVF descriptor is implausible")
            self.ovf_name = first.name
            data = self.tar.read(first)
        self.digests[self.ovf_name] = _hash_all(data)
        self.configs[self.ovf_name] = data
        self.ovf = ovf_settings.read_ovf(data, f"{name}: {self.ovf_name}")
        self.vm = {"name": self.ovf.settings.name, "memory": self.ovf.settings.memory}
        self.by_file: dict[str, Disk] = {}
        for i, (disk_id, href, capacity, label, slot) in enumerate(self.ovf.disks):
            if not href:
                raise FormatError(f"{name}: disk {disk_id} has no file (an empty disk)")
            if href in self.by_file:
                raise FormatError(f"{name}: two disks name the file {href}")
            disk = Disk(id=disk_id, name=href, size=capacity, index=i, meta={"slot": slot})
            disk.meta["ovf_capacity"] = capacity
            self.disks.append(disk)
            self.by_file[href] = disk
        if self.tar is None:
            self._open_beside()
        elif source.seekable:
            self._scan()

    # -- opening -------------------------------------------------------------------------
    def _own_size(self, disk: Disk, size: int, where: str) -> None:
        """The OVF capacity and the disk's own size disagree: the larger, and a warning."""
        if size == disk.size:
            return
        warn(
            f"{where}: the OVF gives disk {disk.id} {disk.size} bytes, the disk itself "
            f"{size}; using {max(size, disk.size)}"
        )
        disk.size = max(size, disk.size)

    def _open_beside(self):
        """An .ovf with its files: the manifest beside it (same stem, .mf), each disk's
        own size from its header."""
        from . import open_archive

        stem = os.path.splitext(self.ovf_name)[0]
        mf = os.path.join(self.base, stem + ".mf")
        if os.path.isfile(mf):
            with open(mf, "rb") as f:
                text = f.read(MAX_MANIFEST).decode("utf-8", "replace")
            self.manifest = parse_manifest(text, f"{self.source.name}: {stem}.mf")
            self.manifest_name = stem + ".mf"
        for href, disk in self.by_file.items():
            path = self._path(href)
            with open_archive(path) as inner:
                self._own_size(disk, inner.disks[0].size, href)

    def _path(self, href: str) -> str:
        if "/" in href.replace("\\", "/") or href in ("", ".", ".."):
            raise FormatError(f"{self.source.name}: file reference {href!r} leaves the directory")
        path = os.path.join(self.base, href)
        if not os.path.isfile(path):
            raise FormatError(f"{self.source.name}: file {href} named by the OVF is missing")
        return path

    def _scan(self):
        """A seekable OVA: the members' places from their headers (the data is seeked
        over), the manifest read wherever it is, and each VMDK's own capacity."""
        src = self.source
        pos = self.tar.next_offset()
        while pos + BLOCK <= src.file_size:
            block = src.pread(BLOCK, pos, "tar header")
            if block == bytes(BLOCK):
                break
            mname, size, typeflag = parse_header(block, f"{src.name}: tar header at offset {pos}")
            if typeflag in (b"x", b"L", b"g"):
                break  # long names: the streaming pass reads them
            self.members[mname] = (pos + BLOCK, size)
            pos += BLOCK + size + (-size % BLOCK)
        for mname, (at, size) in self.members.items():
            if mname.lower().endswith(".mf") and size <= MAX_MANIFEST:
                text = src.pread(size, at, "manifest").decode("utf-8", "replace")
                self.manifest = parse_manifest(text, f"{src.name}: {mname}")
                self.manifest_name = mname
            disk = self.by_file.get(mname)
            if disk is not None and size >= BLOCK:
                head = src.pread(BLOCK, at, "disk header")
                if head[:4] == VMDK_MAGIC:
                    h = SparseHeader(head, f"{src.name}: {mname}")
                    self._own_size(disk, h.capacity * 512, mname)

    def stream_order(self) -> list[Disk]:
        if self.members:
            return sorted(self.disks, key=lambda d: self.members.get(d.name, (1 << 62, 0))[0])
        return list(self.disks)

    # -- reading -------------------------------------------------------------------------
    def settings(self):
        from ..settings.neutral import DiskSlot

        s = self.ovf.settings
        s.disks = [
            DiskSlot(d, size=d.size, label=label or d.id, source_slot=slot)
            for d, (_id, _href, _cap, label, slot) in zip(self.disks, self.ovf.disks)
        ]
        return s

    def details(self) -> dict:
        d = {"ovf": self.ovf_name, "files": sorted(self.ovf.files.values())}
        if self.manifest_name:
            algs = sorted({a for a, _ in self.manifest.values()})
            d["manifest"] = {"name": self.manifest_name, "algorithms": algs}
        return d

    def checked(self):
        items = ["the OVF descriptor (disks, hardware items, references)"]
        if self.manifest:
            algs = "/".join(sorted({a.upper() for a, _ in self.manifest.values()}))
            items.append(f"the manifest's {algs} digest of each of its {len(self.manifest)} files")
        items.append("each disk as its format checks it (streamOptimized: every grain marker)")
        unchecked = ["the disks' data beyond the manifest: OVF keeps no other checksum"]
        if not self.manifest:
            unchecked.insert(0, "no manifest: the files carry no digest")
        return self.every_disk(items, unchecked)

    def _hashers(self, fname: str, verify: bool) -> list:
        if not verify:
            return []
        if fname in self.manifest:
            return [hashlib.new(self.manifest[fname][0])]
        if self.manifest_name is None:  # the manifest may still come: both usual ones
            return [hashlib.sha256(), hashlib.sha1()]
        return []

    def _check_digest(self, fname: str, hashes, checks: Checks) -> None:
        self.digests[fname] = {h.name: h.hexdigest() for h in hashes}
        self._compare(fname, checks)

    def _compare(self, fname: str, checks: Checks) -> None:
        if fname not in self.manifest or fname not in self.digests:
            return
        alg, want = self.manifest[fname]
        got = self.digests[fname].get(alg)
        if got is not None and got != want:
            disk = self.by_file.get(fname)
            damage = [Damage(disk, 0, disk.size, "checksum", file=fname)] if disk else []
            checks.fail(
                IntegrityError(
                    f"{self.source.name}: {fname}: {alg.upper()} digest {got} does not match the "
                    f"manifest's {want}",
                    damage,
                )
            )

    def stream(self, disks=None, checks: Checks | None = None, verify: bool = True):
        checks = checks or Checks()
        wanted = set(map(id, disks if disks is not None else self.disks))
        if self.tar is None:
            yield from self._stream_beside(wanted, checks, verify)
        else:
            yield from self._stream_tar(wanted, checks, verify)
        for fname in self.manifest:
            if (
                fname not in self.digests
                and verify
                and (self.tar is not None or fname in self.by_file)
            ):
                checks.fail(
                    FormatError(
                        f"{self.source.name}: the manifest lists {fname}, not in the archive"
                    )
                )
        self._compare(self.ovf_name, checks)

    def _stream_tar(self, wanted, checks: Checks, verify: bool):
        seen = set()
        while (m := self.tar.next()) is not None:
            if m.name.lower().endswith(".mf"):
                if m.size > MAX_MANIFEST:
                    raise FormatError(
                        f"{self.source.name}: a {m.size}-byte manifest is implausible"
                    )
                text = self.tar.read(m).decode("utf-8", "replace")
                self.manifest = parse_manifest(text, f"{self.source.name}: {m.name}")
                self.manifest_name = m.name
                for fname in list(self.digests):
                    self._compare(fname, checks)
                continue
            disk = self.by_file.get(m.name)
            hashes = self._hashers(m.name, verify)
            reader = _MemberReader(self.tar, m, hashes, f"{self.source.name}: {m.name}")
            if disk is not None and m.name in seen:
                raise FormatError(f"{self.source.name}: {m.name} appears twice in the archive")
            if disk is not None and id(disk) in wanted:
                seen.add(m.name)
                yield from self._disk_member(disk, reader)
            if hashes:
                reader.rest()
                self._check_digest(m.name, hashes, checks)
        missing = [f for f, d in self.by_file.items() if id(d) in wanted and f not in seen]
        if missing:
            checks.fail(
                FormatError(
                    f"{self.source.name}: the OVF names {', '.join(missing)}, not in the archive",
                    [Damage(self.by_file[f], 0, self.by_file[f].size, "missing") for f in missing],
                )
            )

    def _disk_member(self, disk: Disk, reader: _MemberReader):
        where = reader.name
        head = bytearray(BLOCK)
        if reader.member.size >= BLOCK:
            reader.readinto_exact(memoryview(head), "disk header")
        if head[:4] == VMDK_MAGIC:
            h = SparseHeader(head, where)
            if h.stream_optimized:
                yield from self._within(disk, stream_markers(reader, h, disk, where), where)
                reader.rest()
                return
        yield from self._spooled_member(disk, reader, bytes(head[: reader.offset]))

    @staticmethod
    def _within(disk: Disk, pieces, where: str):
        """From a pipe the disk's size is the OVF's (a writer took it before the disk
        came): data past it is refused, zeros past it (a size rounded up) are dropped."""
        for _d, offset, data in pieces:
            if offset + len(data) > disk.size:
                keep = max(0, disk.size - offset)
                if not is_zero(data[keep:]):
                    raise FormatError(
                        f"{where}: data at disk offset {disk.size} and on, past the "
                        f"{disk.size} bytes the OVF gives; read the OVA from a file to use "
                        "the disk's own size"
                    )
                data = data[:keep]
                if not keep:
                    continue
            yield disk, offset, data

    def _spooled_member(self, disk: Disk, reader: _MemberReader, head: bytes):
        """A disk that is not streamOptimized: copied to a temporary file, read there."""
        from . import open_archive

        notice(f"{reader.name}: not a streamOptimized VMDK; spooling it to a temporary file")
        with temp_writes():
            tmp = tempfile.NamedTemporaryFile(prefix="vmarc-ova-", suffix="-" + reader.member.name)
        with tmp:
            buf = memoryview(bytearray(SCRATCH))
            with temp_writes():
                tmp.write(head)
            left = reader.member.size - reader.offset
            while left:
                n = min(left, SCRATCH)
                reader.readinto_exact(buf[:n], "disk data")
                with temp_writes():
                    tmp.write(buf[:n])
                left -= n
            tmp.flush()
            with open_archive(tmp.name) as inner:
                self._own_size(disk, inner.disks[0].size, reader.name)
                for _d, offset, data in inner.stream():
                    yield disk, offset, data

    def _stream_beside(self, wanted, checks: Checks, verify: bool):
        from . import open_archive

        for href, disk in self.by_file.items():
            if id(disk) not in wanted:
                continue
            path = self._path(href)
            hashes = self._hashers(href, verify)
            if hashes:
                with open(path, "rb") as f:
                    while chunk := f.read(SCRATCH):
                        for h in hashes:
                            h.update(chunk)
                self._check_digest(href, hashes, checks)
            with open_archive(path) as inner:
                for _d, offset, data in inner.stream(checks=checks, verify=verify):
                    yield disk, offset, data


def _hash_all(data: bytes) -> dict[str, str]:
    return {a: hashlib.new(a, data).hexdigest() for a in ("sha1", "sha256")}


# -- writing ------------------------------------------------------------------------------
CHUNK = 1 << 20


class OvaWriter:
    """An OVA as VMware exports one: the .ovf, the .mf (SHA-256 of each file), then one
    streamOptimized VMDK per disk. The archive writers' calls: add(disk, offset, data) in
    source order, finish_disk(disk), close(); disks are written one after the other in
    the order given (disk_order.DiskSequencer holds what comes out of turn).

    Each VMDK's size is known only once it is written, so its tar header and the
    manifest are filled in afterwards: the output must be a file, not a stream."""

    def __init__(self, out, disks: list[tuple[str, Disk]], ovf: bytes, ovf_name: str, covered=None):
        if out.file.is_stream:
            raise UsageError(
                f"{out.path}: an OVA is written to a file (each disk's size in its tar header "
                "is known only after it is written)"
            )
        self.out = out
        self.fd = out.file.fd
        self.pos = 0
        self.names = [n for n, _ in disks]
        self.disks = [d for _, d in disks]
        self.ovf_name = ovf_name
        self.digests = {ovf_name: hashlib.sha256(ovf).hexdigest()}
        self._member(ovf_name, ovf)
        self.mf_name = os.path.splitext(ovf_name)[0] + ".mf"
        lines = [ovf_name] + self.names
        self.mf_size = sum(len(f"SHA256({n})= {'0' * 64}\n".encode()) for n in lines)
        self.mf_at = self._member(self.mf_name, bytes(self.mf_size))
        self._order = DiskSequencer(self.disks, self._chunk, self._disk_done, covered, CHUNK)
        self._current = None  # (index, header offset, VmdkWriter, hash)

    def _write(self, data) -> None:
        self.out.write(data)
        self.pos += len(data)

    def _member(self, name: str, data: bytes) -> int:
        self._write(make_header(name, len(data), "ustar"))
        at = self.pos
        self._write(data)
        self._write(ZERO_CHUNK[: -len(data) % BLOCK])
        return at

    def add(self, disk: Disk, offset: int, data) -> None:
        self._order.add(disk, offset, data)

    def finish_disk(self, disk: Disk) -> None:
        self._order.finish_disk(disk)

    def _start(self, i: int):
        if self._current is not None and self._current[0] == i:
            return self._current
        header_at = self.pos
        self._write(bytes(BLOCK))  # the member's header, once its size is known
        digest = hashlib.sha256()

        def emit(data):
            digest.update(data)
            self._write(data)

        writer = VmdkWriter(emit, self.disks[i].size, self.names[i])
        self._current = (i, header_at, writer, digest)
        return self._current

    def _chunk(self, i: int, n: int, data) -> None:
        self._start(i)[2].write(n * CHUNK, data)

    def _disk_done(self, i: int) -> None:
        _, header_at, writer, digest = self._start(i)
        writer.finish()
        size = self.pos - header_at - BLOCK
        self._write(ZERO_CHUNK[: -size % BLOCK])
        self._pwrite(make_header(self.names[i], size, "ustar"), header_at)
        self.digests[self.names[i]] = digest.hexdigest()
        self._current = None

    def _pwrite(self, data: bytes, at: int) -> None:
        try:
            pwrite_all(self.fd, data, at)
        except OSError as e:
            raise self.out.failed(e) from None

    def close(self) -> None:
        self._order.close()
        if len(self.digests) != len(self.names) + 1:
            raise RuntimeError("OVA closed before every disk was finished")
        text = "".join(f"SHA256({n})= {self.digests[n]}\n" for n in [self.ovf_name] + self.names)
        self._pwrite(text.encode(), self.mf_at)
        self._write(ZERO_CHUNK[: 2 * BLOCK])


READERS = {"ova": OvaArchive}
