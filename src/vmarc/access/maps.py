"""Extent maps: where each stored stretch of a disk lies in its store (an archive, a
decompressed stream, a spool file), kept as three arrays so that a map of millions of
runs costs 24 bytes a run."""

from __future__ import annotations

import bisect
from array import array

from ..errors import VmarcError
from ..model import DATA, LOST, ZERO, Extent
from .chunks import ChunkChecks

BAD = 1 << 63  # the store offset of a damaged stretch: data nobody can read (EIO)


class DiskMap:
    """Where each stored stretch of one disk lies in its store: sorted, merged runs of
    (disk offset, length, store offset). Everything else reads as zeros. A stretch the
    archive lost (cut short, a cluster missing) has store offset BAD: it counts as data
    (block status never calls it zeros) and reading it fails."""

    def __init__(self, starts=None, lengths=None, offsets=None, checks=None):
        self.starts = starts or array("Q")
        self.lengths = lengths or array("Q")
        self.offsets = offsets or array("Q")
        self.checks: ChunkChecks | None = checks  # XVA: each chunk's checksum

    def add(self, start: int, length: int, offset: int) -> None:
        if self.starts:  # extend the last run when this one follows it on disk and in store
            i = len(self.starts) - 1
            if (
                self.starts[i] + self.lengths[i] == start
                and self.offsets[i] + self.lengths[i] == offset
            ):
                self.lengths[i] += length
                return
        self.starts.append(start)
        self.lengths.append(length)
        self.offsets.append(offset)

    def finish(self) -> DiskMap:
        """Sort (VMA clusters come in any order) and merge; overlaps are refused."""
        order = sorted(range(len(self.starts)), key=self.starts.__getitem__)
        if any(order[i] > order[i + 1] for i in range(len(order) - 1)):
            runs = [(self.starts[i], self.lengths[i], self.offsets[i]) for i in order]
            self.starts, self.lengths, self.offsets = array("Q"), array("Q"), array("Q")
            for run in runs:
                self.add(*run)
        for i in range(1, len(self.starts)):
            if self.starts[i - 1] + self.lengths[i - 1] > self.starts[i]:
                raise VmarcError(f"two stored runs overlap at disk offset {self.starts[i]}")
        if self.checks is not None:
            self.checks.finish()
        return self

    def extents(self, offset: int, length: int, file: str | None = None):
        """Extents covering the range: DATA at their store offset, ZERO, LOST (BAD)."""
        new = tuple.__new__  # Extents made in C: this runs for every block status
        for start, n, at in self.runs(offset, length):
            if at is None:
                yield new(Extent, (start, n, ZERO, None, file, 0))
            elif at >= BAD:
                yield new(Extent, (start, n, LOST, None, file, 0))
            else:
                yield new(Extent, (start, n, DATA, at, file, 0))

    def runs(self, offset: int, length: int):
        """The map's own form of extents(): (disk offset, length, store offset, None for
        zeros, >= BAD for lost) covering the range. Only the view reading through this
        map uses it (MappedDisk.read_at, the hot path of random reads); everything else
        asks extents()."""
        starts, lengths, offsets = self.starts, self.lengths, self.offsets
        count = len(starts)
        end = offset + length
        i = max(bisect.bisect_right(starts, offset) - 1, 0)
        pos = offset
        while pos < end:
            if i < count and starts[i] + lengths[i] <= pos:
                i += 1
                continue
            if i >= count or starts[i] >= end:
                yield pos, end - pos, None
                return
            s = starts[i]
            if s > pos:
                yield pos, s - pos, None
                pos = s
            stop = min(s + lengths[i], end)
            yield pos, stop - pos, offsets[i] + (pos - s)
            pos = stop
            i += 1


def merged_ranges(ranges) -> list[tuple[int, int]]:
    """(start, length) ranges sorted, with overlapping and touching ones joined."""
    out = []
    for a, n in sorted(ranges):
        if out and a <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], a + n - out[-1][0])
        else:
            out.append([a, n])
    return [tuple(r) for r in out]


def overlaps(ranges, start: int, n: int) -> bool:
    """Whether [start, start + n) meets one of the sorted, merged ranges."""
    i = bisect.bisect_right(ranges, (start, float("inf"))) - 1
    return any(a < start + n and start < a + m for a, m in ranges[max(i, 0) : i + 2])
