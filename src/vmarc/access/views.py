"""The DiskViews access/ builds (model.DiskView is the interface):

- MappedDisk: a disk of an archive read through its extent map from a store (an
  indexed XVA/VMA, a gzip file through checkpoints, a spool file);
- ImageView: a raw, qcow2 or VHD file read through its own tables (Archive.access
  RANDOM), its extents taken once from those tables.
"""

from __future__ import annotations

import threading

from ..errors import CorruptError
from ..model import LOST, Disk, DiskView
from .chunks import ChunkChecks
from .maps import BAD, DiskMap
from .stores import FileStore


class MappedDisk(DiskView):
    def __init__(
        self,
        disk: Disk,
        store,
        dmap: DiskMap,
        where: str,
        verify: bool = True,
        damaged: str = "the archive is damaged",
    ):
        super().__init__(disk)
        self.store = store
        # a plain file (the archive or a spool) can hand its bytes out by fd; gzip
        # checkpoints cannot
        self.store_fd = store.fd if isinstance(store, FileStore) else None
        self.map = dmap
        self.where = f"{where}: {disk.describe()}"
        self.damaged = damaged
        self.checks: ChunkChecks | None = dmap.checks if verify else None

    def extents(self, offset: int = 0, length: int | None = None):
        return self.map.extents(offset, self._clip(offset, length), self.store.path)

    def check_chunks(self, offset: int, n: int) -> None:
        """Check the chunks of [offset, offset + n) not checked before (IntegrityError)."""
        if self.checks is not None:
            self.checks.check(offset, n, self._chunk, self.where, self.damaged)

    def _chunk(self, start: int, size: int) -> bytes:
        at = next(self.map.extents(start, 1)).at
        return self.store.pread(size, at)  # a chunk's member data is contiguous

    def verify(self, offset: int, n: int) -> None:
        """Refuse a lost stretch, check the chunks not checked before (CorruptError)."""
        for e in self.map.extents(offset, n):
            if e.kind == LOST:
                raise self._lost(e.start, e.length)
        self.check_chunks(offset, n)

    def _lost(self, start: int, length: int) -> CorruptError:
        return CorruptError(
            f"{self.where}: disk offset {start} lies in a stretch the "
            f"archive lost ({length} bytes here; `vmarc verify` names the "
            "damage)"
        )

    def read_at(self, offset: int, n: int) -> bytes:
        n = max(0, min(n, self.size - offset))
        self.check_chunks(offset, n)
        parts = []
        for start, length, at in self.map.runs(offset, n):  # one walk: lost stretches too
            if at is None:
                parts.append(bytes(length))
            elif at >= BAD:
                raise self._lost(start, length)
            else:
                parts.append(self.store.pread(length, at))
        return parts[0] if len(parts) == 1 else b"".join(parts)


class ImageView(DiskView):
    """The one disk of a raw, qcow2 or VHD file (with its chain) read through the
    format's own tables. The extents are taken from the tables once, at open, into a
    map (reads are serialised: the format readers keep small caches)."""

    def __init__(self, disk: Disk, archive):
        super().__init__(disk)
        self.archive = archive
        self._lock = threading.Lock()
        self._extents = _ExtentList(archive.extents())

    def extents(self, offset: int = 0, length: int | None = None):
        return self._extents.cover(offset, self._clip(offset, length))

    def read_at(self, offset: int, n: int) -> bytes:
        n = max(0, min(n, self.size - offset))
        with self._lock:
            return self.archive.read_at(offset, n)


class _ExtentList:
    """Extents kept merged (neighbours of one kind, file and depth, contiguous in their
    file) and found by bisection."""

    def __init__(self, extents):
        self.items = []
        for e in extents:
            last = self.items[-1] if self.items else None
            if (
                last is not None
                and last.kind == e.kind
                and last.file == e.file
                and last.depth == e.depth
                and last.start + last.length == e.start
                and (last.at is None) == (e.at is None)
                and (e.at is None or last.at + last.length == e.at)
            ):
                self.items[-1] = last._replace(length=last.length + e.length)
            else:
                self.items.append(e)
        self.starts = [e.start for e in self.items]

    def cover(self, offset: int, length: int):
        import bisect

        end = offset + length
        i = max(bisect.bisect_right(self.starts, offset) - 1, 0)
        while i < len(self.items) and self.items[i].start < end:
            e = self.items[i]
            a, b = max(e.start, offset), min(e.start + e.length, end)
            if a < b:
                yield e._replace(
                    start=a, length=b - a, at=None if e.at is None else e.at + (a - e.start)
                )
            i += 1
