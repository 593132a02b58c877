"""Checksums computed off the main thread, over a ring of reusable read buffers.

The reader fills buffer i, starts its hash on the pool and hands the bytes on to the
writer; buffer i is only refilled once its hash has been compared. hashlib and xxhash
release the GIL for large inputs, so reading, hashing and writing overlap on two cores.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import xxhash

from .errors import IntegrityError
from .model import Checks


def xxh64_text(data) -> str:
    """XAPI's form: XXH64 seed 0 as 16 uppercase hex digits (printf %016LX)."""
    return xxhash.xxh64_hexdigest(data).upper()


def sha1_text(data) -> str:
    return hashlib.sha1(data).hexdigest()


def md5_digest(data) -> bytes:
    return hashlib.md5(data).digest()


class HashRing:
    """A ring of buffers whose pending checksums are settled before reuse."""

    def __init__(self, checks: Checks, count: int = 8, size: int = 1 << 20, workers: int = 2):
        self.checks = checks
        self._bufs = [bytearray(size) for _ in range(count)]
        self._views = [memoryview(b) for b in self._bufs]
        self._pending: list[tuple | None] = [None] * count
        self._next = 0
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vmarc-hash")

    def take(self) -> tuple[int, memoryview]:
        """The next free buffer (waits for the hash that still uses it)."""
        i = self._next
        self._next = (i + 1) % len(self._bufs)
        self._settle(i)
        return i, self._views[i]

    def check(self, i: int, length: int, func, expected: str, where: str) -> None:
        """Hash bytes [0, length) of buffer i with func; compare with expected later."""
        fut = self._pool.submit(func, self._views[i][:length])
        self._pending[i] = (fut, expected, where)

    def _settle(self, i: int) -> None:
        item = self._pending[i]
        if item is None:
            return
        self._pending[i] = None
        fut, expected, where = item
        got = fut.result()
        if got != expected:
            self.checks.fail(IntegrityError(f"{where}: checksum mismatch (stored {expected}, "
                                            f"computed {got})"))

    def finish(self) -> None:
        """Settle every pending hash, oldest first."""
        n = len(self._bufs)
        for k in range(n):
            self._settle((self._next + k) % n)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
