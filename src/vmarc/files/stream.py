"""A DiskView, or a window of one, as a seekable read-only file object for the file-system
parsers. Parsers read metadata a few hundred bytes at a time; those reads go through a
small cache of aligned blocks, so an inode table or a directory is fetched (and its
chunks checked) once, not once per entry. Large reads go straight to the view."""

from __future__ import annotations

import io
from collections import OrderedDict

BLOCK = 64 << 10
CACHED_BLOCKS = 256  # 16 MiB at most, whatever the disk's size


class ViewStream(io.RawIOBase):
    def __init__(self, view, offset: int = 0, size: int | None = None):
        super().__init__()
        self.view, self.offset = view, offset
        self.size = view.size - offset if size is None else size
        self.pos = 0
        self._blocks: OrderedDict[int, bytes] = OrderedDict()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + pos)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n is None or n < 0 else min(n, self.size - self.pos)
        if n <= 0:
            return b""
        data = self.pread(self.pos, n)
        self.pos += len(data)
        return data

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def pread(self, pos: int, n: int) -> bytes:
        """n bytes at pos of this window (fewer at its end), without moving the position."""
        n = max(0, min(n, self.size - pos))
        if n >= BLOCK:
            return self.view.read_at(self.offset + pos, n)
        first, last = pos // BLOCK, (pos + n - 1) // BLOCK
        parts = [self._block(b) for b in range(first, last + 1)]
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        skip = pos - first * BLOCK
        return data[skip : skip + n]

    def _block(self, b: int) -> bytes:
        data = self._blocks.get(b)
        if data is None:
            start = b * BLOCK
            data = self.view.read_at(self.offset + start, min(BLOCK, self.size - start))
            self._blocks[b] = data
            if len(self._blocks) > CACHED_BLOCKS:
                self._blocks.popitem(last=False)
        else:
            self._blocks.move_to_end(b)
        return data
