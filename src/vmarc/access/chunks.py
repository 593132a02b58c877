"""Stored checksums of an archive's chunks (XVA: one per 1 MiB member), checked the
first time a random read touches a chunk."""

from __future__ import annotations

import bisect
import threading
from array import array

from ..errors import IntegrityError, VmarcError
from ..io.hashing import DIGESTS


class ChunkChecks:
    """The stored checksum of every chunk of one disk (XVA: XXH64 or SHA-1 per 1 MiB
    chunk). Random reads check a chunk the first time they touch it, so serve and mount
    never hand out damaged data even when `verify` was never run; a chunk is hashed once."""

    WIDTH = 20  # bytes kept per digest: SHA-1's; XXH64 uses the first 8
    ALGOS = tuple(DIGESTS)  # the index stores a digest's position in this tuple

    def __init__(self, starts=None, sizes=None, algos=None, digests=None):
        self.starts = starts or array("Q")  # disk offset of each chunk
        self.sizes = sizes or array("Q")  # the member's size (what the digest covers)
        self.algos = algos or array("B")
        self.digests = digests or bytearray()
        self.checked = bytearray(len(self.starts))
        self._lock = threading.Lock()
        self._busy: dict[int, threading.Event] = {}  # chunks being hashed right now

    def add(self, start: int, algo: str, text: str, size: int) -> None:
        self.starts.append(start)
        self.sizes.append(size)
        self.algos.append(self.ALGOS.index(algo))
        self.digests += bytes.fromhex(text).ljust(self.WIDTH, b"\0")

    def finish(self) -> None:
        if any(self.starts[i] >= self.starts[i + 1] for i in range(len(self.starts) - 1)):
            raise VmarcError("chunk checksums out of disk order")  # XVA chunks ascend
        self.checked = bytearray(len(self.starts))

    def check(self, offset: int, n: int, read_chunk, where: str, damaged: str) -> None:
        """Hash every chunk [offset, offset + n) touches that was not checked yet; a
        mismatch says where, then `damaged` (which file, what to do)."""
        end = offset + n
        i = max(bisect.bisect_right(self.starts, offset) - 1, 0)
        while i < len(self.starts) and self.starts[i] < end:
            if not self.checked[i] and self.starts[i] + self.sizes[i] > offset:
                self._check_once(i, read_chunk, where, damaged)
            i += 1

    def _check_once(self, i: int, read_chunk, where: str, damaged: str) -> None:
        """One thread hashes chunk i; others reading it meanwhile (nbdcopy's connections
        read neighbouring pieces of one chunk at once) wait for its verdict."""
        with self._lock:
            if self.checked[i]:
                return
            busy = self._busy.get(i)
            if busy is None:
                self._busy[i] = threading.Event()
        if busy is not None:
            busy.wait()
            if self.checked[i]:
                return
            # it failed there: fail here too, with the same message
        try:
            name = self.ALGOS[self.algos[i]]
            got = DIGESTS[name](read_chunk(self.starts[i], self.sizes[i]))
            stored = self.digests[i * self.WIDTH : i * self.WIDTH + len(got) // 2]
            if bytes.fromhex(got) != stored:
                raise IntegrityError(
                    f"{where}: the chunk at disk offset {self.starts[i]} fails its "
                    f"{name} checksum (stored {stored.hex()}, computed {got.lower()}); "
                    f"{damaged}"
                )
            self.checked[i] = 1
        finally:
            if busy is None:
                with self._lock:
                    self._busy.pop(i).set()
