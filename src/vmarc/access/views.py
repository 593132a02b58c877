"""The DiskViews access/ builds (model.DiskView is the interface):

- MappedDisk: a disk of an archive read through its extent map from a store (an
  indexed XVA/VMA, a gzip file through checkpoints, a spool file);
- ImageView: a raw, qcow2 or VHD file read through its own tables (Archive.access
  RANDOM), its extents taken once from those tables.
"""

from __future__ import annotations

import bisect
import threading
from array import array

from ..errors import CorruptError
from ..model import DATA, LOST, ZERO, Disk, DiskView, Extent
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
    file) in arrays, about 30 bytes a run however large the image, and found by
    bisection."""

    KINDS = (DATA, ZERO, LOST)
    NO_AT = (1 << 64) - 1  # `at` is None (not plain, or not data)

    def __init__(self, extents):
        self.starts, self.lengths, self.ats = array("Q"), array("Q"), array("Q")
        self.kinds, self.depths, self.files_at = array("B"), array("B"), array("H")
        self.files: list[str | None] = []
        file_index: dict = {}
        for start, length, kind, at, file, depth in extents:
            k = self.KINDS.index(kind)
            f = file_index.get(file)
            if f is None:
                f = file_index[file] = len(self.files)
                self.files.append(file)
            a = self.NO_AT if at is None else at
            n = len(self.starts) - 1
            if (
                n >= 0
                and self.kinds[n] == k
                and self.files_at[n] == f
                and self.depths[n] == depth
                and self.starts[n] + self.lengths[n] == start
                and (self.ats[n] == self.NO_AT) == (a == self.NO_AT)
                and (a == self.NO_AT or self.ats[n] + self.lengths[n] == a)
            ):
                self.lengths[n] += length
                continue
            self.starts.append(start)
            self.lengths.append(length)
            self.ats.append(a)
            self.kinds.append(k)
            self.depths.append(depth)
            self.files_at.append(f)

    def cover(self, offset: int, length: int):
        end = offset + length
        i = max(bisect.bisect_right(self.starts, offset) - 1, 0)
        new = tuple.__new__
        while i < len(self.starts) and self.starts[i] < end:
            s = self.starts[i]
            a, b = max(s, offset), min(s + self.lengths[i], end)
            if a < b:
                at = self.ats[i]
                yield new(
                    Extent,
                    (
                        a,
                        b - a,
                        self.KINDS[self.kinds[i]],
                        None if at == self.NO_AT else at + (a - s),
                        self.files[self.files_at[i]],
                        self.depths[i],
                    ),
                )
            i += 1
