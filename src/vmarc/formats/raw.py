"""Raw disk images: the bytes of the disk, nothing else. Written sparse."""

from __future__ import annotations

import os

from ..model import ZERO_CHUNK, is_zero
from ..output import OutputFile


class RawWriter:
    """Writes a disk given as (offset, data) pieces; zero pieces become holes.

    To a file the pieces may come in any order (pwrite) and the size is set at the end,
    so untouched ranges stay unallocated. To stdout they must come in ascending order
    and gaps are written out as zeros.
    """

    def __init__(self, out: OutputFile, size: int):
        self.out = out
        self.size = size
        self.fd = out.fd
        self.pos = 0  # stdout only: bytes written so far

    def write(self, offset: int, data: memoryview) -> None:
        if self.out.is_stdout:
            self._write_stream(offset, data)
            return
        if is_zero(data):
            return
        while data:
            n = os.pwrite(self.fd, data, offset)
            data = data[n:]
            offset += n

    def _write_stream(self, offset: int, data: memoryview) -> None:
        if offset < self.pos:
            raise ValueError("stream output needs data in ascending order")
        self._zeros(offset - self.pos)
        while data:
            n = os.write(self.fd, data)
            data = data[n:]
            self.pos += n

    def _zeros(self, count: int) -> None:
        while count:
            n = os.write(self.fd, memoryview(ZERO_CHUNK)[:min(count, len(ZERO_CHUNK))])
            count -= n
            self.pos += n

    def finish(self) -> None:
        if self.out.is_stdout:
            self._zeros(self.size - self.pos)
        else:
            os.ftruncate(self.fd, self.size)
