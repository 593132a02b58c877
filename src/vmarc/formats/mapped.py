"""What qcow2, VMDK and VHDX share: an image read through its own tables, layered over a
parent.

A subclass says what each stretch of its disk holds, in guest order (`runs`):

- DATA at a place in a file (`source`, `at`): read with pread, neighbours merged;
- CODED: a unit (a compressed grain) decoded by `decode(key)` into the bytes of the
  disk from `base` on;
- ZERO: reads as zeros here, whatever the parent holds;
- PARENT: falls through to the parent (zeros when there is none).

Everything else (extents through the chain, read_at, the streaming pass in guest order)
is written once here.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from ..errors import FormatError, SourceError
from ..model import DATA, RANDOM, ZERO, Archive, Checks, Extent, is_zero
from ..notices import notice

CODED = "coded"
PARENT = "parent"
MAX_READ = 4 << 20  # largest merged read
MAX_CHAIN = 32


class Run(NamedTuple):
    start: int  # disk offset
    length: int
    kind: str  # DATA, CODED, ZERO or PARENT
    source: object = None  # DATA: the Source holding the bytes
    at: int = 0  # DATA: file offset; CODED: the key decode() takes
    base: int = 0  # CODED: the disk offset the decoded unit starts at


class MappedImage(Archive):
    access = RANDOM
    layered = True
    size = 0
    parent: Archive | None = None

    def runs(self, start: int, end: int):
        """Runs covering at least [start, end), in disk order (subclasses)."""
        raise NotImplementedError

    def decode(self, key: int, base: int) -> bytes:
        """The bytes of a CODED unit whose run names no holder of its own (base: the disk
        offset it starts at)."""
        raise NotImplementedError

    def lower(self):
        return self.parent

    def chain(self) -> list[str]:
        """The files read under this one, nearest first."""
        out, layer = [], self.parent
        while layer is not None:
            out.append(layer.source.path or layer.source.name)
            layer = layer.lower()
        return out

    def close(self):
        if self.parent is not None:
            self.parent.close()
        super().close()

    def beside(self, fname: str, what: str, chain: tuple, hint: str = "") -> str:
        """A file the image names (a backing file or parent, a data file): relative to
        the image's own directory (from a pipe: the current one), a regular file, not one
        already in the chain (chain: the real paths of the images above this one)."""
        name = self.source.name
        me = os.path.realpath(self.source.path or "-")
        if len(chain) >= MAX_CHAIN:
            raise FormatError(f"{name}: backing chain deeper than {MAX_CHAIN}")
        path = fname if os.path.isabs(fname) else os.path.join(os.path.dirname(me), fname)
        if os.path.realpath(path) in chain + (me,):
            raise FormatError(f"{name}: backing chain loops back to {path}")
        if not os.path.isfile(path):
            raise SourceError(
                f"{name}: {what} {fname} not found or not a regular file ({path}){hint}"
            )
        return path

    def _merged(self, start: int, end: int):
        """The runs clipped to [start, end), neighbouring DATA runs of one file merged
        up to MAX_READ, and neighbouring ZERO or PARENT runs merged."""
        cur = None
        for r in self.runs(start, end):
            a, b = max(r.start, start), min(r.start + r.length, end)
            if a >= b:
                if r.start >= end:
                    break
                continue
            if a != r.start or b != r.start + r.length:
                at = r.at + (a - r.start) if r.kind == DATA else r.at
                r = r._replace(start=a, length=b - a, at=at)
            if (
                cur is not None
                and cur.kind == r.kind
                and cur.start + cur.length == r.start
                and (
                    r.kind in (ZERO, PARENT)
                    or (
                        r.kind == DATA
                        and r.source is cur.source
                        and cur.at + cur.length == r.at
                        and cur.length + r.length <= MAX_READ
                    )
                )
            ):
                cur = cur._replace(length=cur.length + r.length)
                continue
            if cur is not None:
                yield cur
            cur = r
        if cur is not None:
            yield cur

    def extents(self, offset: int = 0, length: int | None = None, depth: int = 0):
        end = self.size if length is None else min(self.size, offset + length)
        here = self.source.path or self.source.name
        for r in self._merged(offset, end):
            a, b = r.start, r.start + r.length
            if r.kind == DATA:
                yield Extent(a, b - a, DATA, r.at, r.source.path or r.source.name, depth)
            elif r.kind == CODED:
                yield Extent(a, b - a, DATA, None, here, depth)
            elif r.kind == PARENT and self.parent is not None:
                psize = self.parent.disks[0].size
                if a < psize:
                    yield from self.parent.extents(a, min(b, psize) - a, depth + 1)
                if b > psize:
                    yield Extent(max(a, psize), b - max(a, psize), ZERO, None, here, depth + 1)
            else:
                yield Extent(a, b - a, ZERO, None, here, depth)

    def _pieces(self, start: int, end: int):
        """(disk offset, bytes) of every stretch that may hold data, in disk order (a
        parent's all-zero stretches left out)."""
        end = min(end, self.size)
        for r in self._merged(start, end):
            a, b = r.start, r.start + r.length
            if r.kind == DATA:  # (a flat extent is one run: read it in steps)
                for pos in range(a, b, MAX_READ):
                    n = min(MAX_READ, b - pos)
                    yield pos, r.source.pread(n, r.at + pos - a, f"data at disk offset {pos}")
            elif r.kind == CODED:
                unit = (r.source or self).decode(r.at, r.base)  # its holder, or the image
                yield a, memoryview(unit)[a - r.base : b - r.base]
            elif r.kind == PARENT and self.parent is not None:
                b = min(b, self.parent.disks[0].size)
                while a < b:
                    step = min(MAX_READ, b - a)
                    data = self.parent.read_at(a, step)
                    if not is_zero(memoryview(data)):  # (what no layer stores reads as zeros)
                        yield a, data
                    a += step

    def read_at(self, offset: int, n: int) -> bytes:
        out = bytearray(n)
        for at, data in self._pieces(offset, offset + n):
            out[at - offset : at - offset + len(data)] = data
        return bytes(out)

    def stream(self, disks=None, checks: Checks | None = None, verify: bool = True):
        disk = self.disks[0]
        if disks is not None and disk not in disks:
            return
        if self.parent is not None:
            notice(
                f"{self.source.name}: reading through its backing chain: "
                + " -> ".join(self.chain())
            )
        for at, data in self._pieces(0, self.size):
            yield disk, at, memoryview(data)
