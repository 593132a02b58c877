"""Pieces of several disks in source order in; whole chunks out, disk after disk, in
ascending order (what an XVA needs: each disk's 1 MiB chunks in order, one disk after
the other).

Chunks of the disk being written go straight through a one-chunk buffer while the source
gives them in order. Anything the writer cannot take yet (a later disk's data, a cluster
the source gave ahead of its turn, as a live backup's copy-before-write does) is held: in
memory up to HOLD_MEMORY (a live backup pulls a few clusters forward at a time), beyond
that in a sparse temporary file, and merged in when its chunk's turn comes. The source says how far it has
given a disk: ordered readers by their order, VMA by Archive.covered(), and every reader
when it ends a disk (finish_disk); a chunk is written only once the source can no longer
add to it, so nothing is ever written twice or wrong. The XVA writer orders its disks
through one of these.
"""

from __future__ import annotations

import os
import tempfile

from ..io.output import pwrite_all, temp_writes
from ..model import ZERO_CHUNK
from ..notices import notice

# VMARC_HOLD_MEMORY (bytes) moves the bound; 0 sends everything held to the file
HOLD_MEMORY = int(os.environ.get("VMARC_HOLD_MEMORY", 32 << 20))
IN_MEMORY, IN_FILE = 1, 2  # values of _Track.held per chunk
ORDERED = -1  # what a covered() callback says of a disk whose pieces come in order


class _Track:
    __slots__ = (
        "disk",
        "size",
        "chunks",
        "next",
        "buf",
        "dirty",
        "spool",
        "held",
        "memory",
        "covered",
        "complete",
    )

    def __init__(self, disk, chunk: int):
        self.disk = disk
        self.size = disk.size
        self.chunks = -(-disk.size // chunk)
        self.next = 0  # next chunk to hand to the writer
        self.buf = None  # chunk `next` being assembled
        self.dirty = False
        self.spool = None  # temporary file of data held for later
        self.held = bytearray(self.chunks)  # 0, IN_MEMORY or IN_FILE per chunk
        self.memory: dict[int, list] = {}  # chunk -> [(offset in chunk, bytes)]
        self.covered = 0  # ordered sources: the end of the last piece
        self.complete = False  # finish_disk: the source gave all of it


class DiskSequencer:
    def __init__(self, disks, emit, finish, covered=None, chunk: int = 1 << 20):
        """disks in output order; emit(index, chunk number, view) for each chunk that may
        hold data (skipped chunks are zero), finish(index) when a disk is complete.
        covered(disk) says how far the source has given a disk (Archive.covered), or
        ORDERED for a disk whose pieces come in ascending order; None when every disk's
        do. Disks are matched by identity: the objects the reader yields."""
        self.covered = covered
        self.chunk = chunk
        self.emit = emit
        self.finish = finish
        self.tracks = [_Track(d, chunk) for d in disks]
        self.index = {id(d): i for i, d in enumerate(disks)}
        self.current = 0
        self.memory_bytes = 0
        self.spooled_bytes = 0

    def add(self, disk, offset: int, data) -> None:
        i = self.index[id(disk)]
        t = self.tracks[i]
        view = memoryview(data)
        end = offset + len(view)
        if end > t.covered:
            t.covered = end
        csize = self.chunk
        while view:
            j, within = divmod(offset, csize)
            step = min(len(view), csize - within)
            part = view[:step]
            if i == self.current:
                self._advance(i, min(j * csize, self._covered(t)))
                if j < t.next:
                    raise RuntimeError(
                        f"{disk.id}: data for chunk {j} after it was written "
                        "(the reader broke its coverage promise)"
                    )
            if i == self.current and j == t.next and t.held[j] != IN_FILE:
                if (
                    within == 0
                    and step == min(csize, t.size - j * csize)
                    and not t.dirty
                    and not t.held[j]
                ):
                    self.emit(i, j, part)  # a whole chunk: no copy
                    t.next = j + 1
                else:
                    if t.buf is None:
                        t.buf = bytearray(csize)
                    t.buf[within : within + step] = part
                    t.dirty = True
            else:
                self._hold(t, j, offset, part)
            view = view[step:]
            offset += step
        if i == self.current:
            self._advance(i, self._covered(t))
            self._next_disks()

    def finish_disk(self, disk) -> None:
        """The source has given all of this disk."""
        t = self.tracks[self.index[id(disk)]]
        t.complete = True
        t.covered = t.size
        self._next_disks()

    def close(self) -> None:
        """The source has ended: every disk is complete."""
        for t in self.tracks:
            t.covered = t.size
        self._next_disks(end=True)
        for t in self.tracks:
            if t.spool is not None:
                t.spool.close()

    # -- internals ---------------------------------------------------------------------
    def _covered(self, t) -> int:
        if self.covered is None or t.complete:
            return t.covered
        said = self.covered(t.disk)
        return t.covered if said == ORDERED else 0 if said is None else said

    def _next_disks(self, end: bool = False) -> None:
        while self.current < len(self.tracks):
            t = self.tracks[self.current]
            self._advance(self.current, t.size if end else self._covered(t))
            if t.next < t.chunks:
                return
            self.finish(self.current)
            self.current += 1

    def _advance(self, i: int, covered: int) -> None:
        """Hand over every chunk of disk i that ends at or below `covered`."""
        t = self.tracks[i]
        csize = self.chunk
        while t.next < t.chunks:
            j = t.next
            chunk_end = min((j + 1) * csize, t.size)
            if chunk_end > covered:
                return
            length = chunk_end - j * csize
            if t.held[j] == IN_FILE:
                buf = bytearray(length)
                got = os.preadv(t.spool.fileno(), [buf], j * csize)
                if got != length:
                    raise OSError(f"temporary file: short read ({got} of {length} bytes)")
                self.emit(i, j, memoryview(buf))
            elif t.dirty or t.held[j]:
                if t.buf is None:
                    t.buf = bytearray(csize)
                for at, data in t.memory.pop(j, ()):
                    t.buf[at : at + len(data)] = data
                    self.memory_bytes -= len(data)
                self.emit(i, j, memoryview(t.buf)[:length])
                t.buf[:] = ZERO_CHUNK[:csize] if csize <= len(ZERO_CHUNK) else bytes(csize)
                t.dirty = False
            else:
                # nothing for this chunk: jump to the next held chunk or the coverage
                found = [
                    k
                    for k in (t.held.find(IN_MEMORY, j + 1), t.held.find(IN_FILE, j + 1))
                    if k >= 0
                ]
                t.next = max(j + 1, min(covered // csize, min(found, default=t.chunks)))
                continue
            t.held[j] = 0
            t.next = j + 1

    def _hold(self, t, j: int, offset: int, part) -> None:
        csize = self.chunk
        if t.held[j] != IN_FILE and self.memory_bytes + len(part) <= HOLD_MEMORY:
            t.memory.setdefault(j, []).append((offset - j * csize, bytes(part)))
            t.held[j] = IN_MEMORY
            self.memory_bytes += len(part)
            return
        if t.spool is None:
            with temp_writes():
                t.spool = tempfile.TemporaryFile(prefix="vmarc-hold-")
                os.ftruncate(t.spool.fileno(), t.size)
            notice(
                f"{t.disk.describe()}: the source gives data of this disk before "
                f"the output can take it; holding that data in a temporary file in "
                f"{tempfile.gettempdir()} until its turn"
            )
        fd = t.spool.fileno()
        with temp_writes():
            for at, data in t.memory.pop(j, ()):  # the whole chunk goes to one place
                pwrite_all(fd, data, j * csize + at)
                self.memory_bytes -= len(data)
            pwrite_all(fd, part, offset)
        t.held[j] = IN_FILE
        self.spooled_bytes += len(part)
