"""Writing XVA archives the way XAPI's exporter writes them (xen-api stream_vdi.ml).

A tar stream: ova.xml first, then each disk's 1 MiB chunks `Ref:N/%08d`, each followed by
its checksum member (`.xxhash`: XXH64 as 16 uppercase hex digits; `.checksum`: SHA-1 for
hosts older than Citrix Hypervisor 8.1). Disks follow each other in string order of their
refs. All-zero chunks are left out (a gap in the numbering) except the first and the last,
which XAPI's importer needs to see; the last chunk is exactly `size mod 1 MiB` long. No
keepalive members are written, so chunk N always sits at N MiB.

ova.xml comes from settings/xapi.py (every field XAPI's importer requires:
docs/formats/xva.md). The writer orders the disks it is given itself (disk_order.py).
"""

from __future__ import annotations

from ..errors import UsageError
from ..io.hashing import sha1_text, xxh64_text
from ..model import ZERO_CHUNK, Disk, is_zero
from .disk_order import DiskSequencer
from .tar import make_header

CHUNK = 1 << 20
BLOCK = 512
CHECKSUMS = {"xxhash": (".xxhash", xxh64_text), "sha1": (".checksum", sha1_text)}
HEADERS = ("v7", "ustar")


class XvaWriter:
    """Writes to out (anything with write(bytes-like)). Disks are given as (ref, Disk) in
    the order they will be written, which must be the string order of their refs.

    add(disk, offset, data) takes any disk's pieces in source order; finish_disk(disk)
    says the source gave all of one; close() ends the tar stream. An XVA stores its disks
    one after the other, each in chunk order: the writer orders what it is given itself
    (disk_order.py), and covered(disk) says how far an unordered source has given a disk
    (Archive.covered, or disk_order.ORDERED; None when every disk comes in order).
    """

    def __init__(
        self,
        out,
        ova_xml: bytes,
        disks: list[tuple[str, Disk]],
        checksum: str = "xxhash",
        header: str = "v7",
        covered=None,
    ):
        if checksum not in CHECKSUMS:
            raise UsageError(f"-o checksum={checksum}: XVA checksums are xxhash or sha1")
        if header not in HEADERS:
            raise UsageError(f"-o header={header}: XVA tar headers are v7 or ustar")
        refs = [r for r, _ in disks]
        if refs != sorted(refs) or len(set(refs)) != len(refs):
            raise ValueError(f"disk refs must be unique and in string order: {refs}")
        self.out = out
        self.disks = [(ref, d.size) for ref, d in disks]
        self._order = DiskSequencer([d for _, d in disks], self._chunk, self._disk_done, covered)
        self.style = header
        self.suffix, self.digest = CHECKSUMS[checksum]
        self._last = [-1] * len(disks)  # last chunk number written per disk
        self._current = 0
        self.chunks_written = 0
        self._member("ova.xml", ova_xml)

    def _member(self, name: str, data) -> None:
        self.out.write(make_header(name, len(data), self.style))
        if len(data):
            self.out.write(data)
        pad = -len(data) % BLOCK
        if pad:
            self.out.write(ZERO_CHUNK[:pad])

    def _write_chunk(self, i: int, n: int, data) -> None:
        name = f"{self.disks[i][0]}/{n:08d}"
        self._member(name, data)
        self._member(name + self.suffix, self.digest(data).encode())
        self._last[i] = n
        self.chunks_written += 1

    def add(self, disk: Disk, offset: int, data) -> None:
        self._order.add(disk, offset, data)

    def finish_disk(self, disk: Disk) -> None:
        self._order.finish_disk(disk)

    def _chunk(self, i: int, n: int, data) -> None:
        if i != self._current:
            raise RuntimeError(f"disk {i} written while disk {self._current} is open")
        if n <= self._last[i]:
            raise RuntimeError(f"chunk {n} of disk {i} after chunk {self._last[i]}")
        size = self.disks[i][1]
        last = -(-size // CHUNK) - 1
        if n != 0 and n != last and is_zero(data):
            return  # a skipped zero chunk: the gap in the numbering says it
        if self._last[i] < 0 and n > 0:
            self._write_chunk(i, 0, ZERO_CHUNK[: min(CHUNK, size)])
        self._write_chunk(i, n, data)

    def _disk_done(self, i: int) -> None:
        size = self.disks[i][1]
        last = -(-size // CHUNK) - 1
        if self._last[i] < 0 and last > 0:
            self._write_chunk(i, 0, ZERO_CHUNK[:CHUNK])
        if self._last[i] < last:
            self._write_chunk(i, last, ZERO_CHUNK[: size - last * CHUNK])
        self._current = i + 1

    def close(self) -> None:
        self._order.close()
        if self._current != len(self.disks):
            raise RuntimeError("XVA closed before every disk was finished")
        self.out.write(ZERO_CHUNK[: 2 * BLOCK])
