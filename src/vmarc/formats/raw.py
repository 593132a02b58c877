"""Raw disk images: the bytes of the disk, nothing else. Read skipping holes, written
sparse."""

from __future__ import annotations

import os

from ..io.output import OutputFile, pwrite_all, write_all, write_zeros
from ..model import DATA, HOLE, RANDOM, Archive, Disk, Extent, data_runs, filled

READ_SIZE = 4 << 20


class RawWriter:
    """Writes a disk given as (offset, data) pieces, sparse: every all-zero 4 KiB block
    (hole_size) is left out, as `qemu-img convert` leaves it out.

    To a file or a device the pieces may come in any order (pwrite). On a target that
    held data (a device, or a file written in place with -n) what is left out is zeroed:
    everything between the highest byte written so far and the next data, and the rest
    at the end. A piece below that mark lands on bytes already zeroed (a reader gives
    each byte once), so any order works with one pass. To a stream (stdout, /dev/null,
    a FIFO) the pieces must come in ascending order and gaps are written out as zeros.
    """

    def __init__(self, out: OutputFile, size: int, hole_size: int = HOLE):
        out.reserve(size)
        self.out = out
        self.size = size
        self.fd = out.fd
        self.hole_size = hole_size
        self.pos = 0  # stream: bytes written so far; else: everything below is settled
        self.end = 0  # the end of the data given: a salvaged tail past size grows the output

    def write(self, offset: int, data: memoryview) -> None:
        self.end = max(self.end, offset + len(data))
        if self.out.is_stream:
            self._write_stream(offset, data)
            return
        fresh = self.out.fresh
        for a, b in data_runs(data, offset, self.hole_size):
            at = offset + a
            if not fresh and at > self.pos:
                self.out.zero(self.pos, at - self.pos)
            pwrite_all(self.fd, data[a:b], at)
            self.pos = max(self.pos, offset + b)

    def _write_stream(self, offset: int, data: memoryview) -> None:
        if offset < self.pos:
            raise ValueError("stream output needs data in ascending order")
        write_zeros(self.fd, offset - self.pos)
        write_all(self.fd, data)
        self.pos = offset + len(data)

    def finish(self) -> None:
        size = max(self.size, self.end)
        if self.out.is_stream:
            write_zeros(self.fd, size - self.pos)
            return
        if not self.out.fresh:
            self.out.zero(self.pos, size - self.pos)
        self.out.set_size(size)


class RawArchive(Archive):
    """A raw image as an archive of one disk. The size must be known up front (a file or
    a block device; not a pipe), because every writer puts it in its header. Holes of a
    sparse file are skipped with SEEK_DATA instead of being read."""

    format = "raw"
    access = RANDOM

    def __init__(self, source):
        super().__init__(source)
        size = source.file_size  # a pipe or a compressed image: spooled first (needs_file)
        stem = os.path.basename(source.path or "disk")
        self.disks.append(Disk(id="disk", name=stem, size=size))

    @classmethod
    def needs_file(
        cls, head: bytes, unsized: bool = False, parent: str | None = None
    ) -> str | None:
        return "a raw image has no size known before its end"

    def checked(self):
        return self.every_disk(
            [], ["nothing to verify: a raw image has no metadata and no checksums"]
        )

    def stream(self, disks=None, checks=None, verify=True):
        disk = self.disks[0]
        if disks is not None and disk not in disks:
            return
        src = self.source
        buf = memoryview(bytearray(READ_SIZE))
        pos = 0
        while pos < disk.size:
            data_at, hole_at = src.data_extent(pos)
            if data_at is None or data_at >= disk.size:
                return
            if data_at > pos:
                src.skip(data_at - pos, "raw image")
                pos = data_at
            while pos < min(hole_at, disk.size):
                n = min(READ_SIZE, hole_at - pos, disk.size - pos)
                src.readinto_exact(buf[:n], f"raw image at offset {pos}")
                yield disk, pos, buf[:n]
                pos += n

    def extents(self, offset: int = 0, length: int | None = None, depth: int = 0):
        """What the file stores (SEEK_DATA) and its holes: as a backing file, or in place."""
        size = self.disks[0].size
        end = size if length is None else min(offset + length, size)
        name = self.source.path or self.source.name
        return filled(self._stored(offset, end, name, depth), offset, end, name, depth)

    def _stored(self, start: int, end: int, name: str, depth: int):
        pos = start
        while pos < end:
            data_at, hole_at = self.source.next_data(pos)
            if data_at is None or data_at >= end:
                return
            stop = min(hole_at, end)
            yield Extent(data_at, stop - data_at, DATA, data_at, name, depth)
            pos = stop

    def read_at(self, offset: int, n: int) -> bytes:
        """n bytes of the disk at offset (zeros past the end of the file)."""
        n = max(0, min(n, self.disks[0].size - offset))
        return self.source.pread(n, offset, f"raw image at offset {offset}") if n else b""


READERS = {"raw": RawArchive}
