"""Assembling a disk's (offset, bytes) pieces into fixed-size clusters for writers that
store whole clusters (VMA 64 KiB, qcow2 64 KiB, VHD 2 MiB blocks).

Readers promise that the pieces of one cluster come one after another (they never
return to a cluster they left), so at most one partly filled cluster is held per disk.
A cluster never given is all zeros: the writer decides what a zero cluster becomes.
"""

from __future__ import annotations

import re

DENSE_LIMIT = 1 << 26  # flags kept one byte each up to this many clusters (64 MiB)


def cluster_flags(n: int, total: int | None = None):
    """Flags for n clusters: a plain byte each (indexing at C speed) while the clusters
    of everything tracked at once (total) stay under DENSE_LIMIT, else paged."""
    return DenseFlags(n) if (n if total is None else total) <= DENSE_LIMIT else ClusterFlags(n)


class DenseFlags(bytearray):
    """ClusterFlags' interface over one byte per cluster."""

    def __init__(self, n: int):
        super().__init__(n)

    def set(self, i: int) -> None:
        self[i] = 1

    @property
    def set_count(self) -> int:
        return self.count(1)

    def find_unset(self, start: int = 0) -> int:
        return self.find(0, start)

    def unset_runs(self):
        for m in re.finditer(b"\0+", self):
            yield m.start(), m.end()


class ClusterFlags:
    """One flag per cluster of a disk, each set once. Kept in pages made on first touch and
    dropped once every flag in them is set, so memory follows the clusters in flight, not
    the size a header claims (254 devices of 1 TiB in a 16 KiB VMA header cost nothing)."""

    BITS = 16  # clusters per page: 1 << BITS
    MASK = (1 << BITS) - 1

    def __init__(self, n: int):
        self.n = n
        self.set_count = 0
        self._pages: dict[int, bytearray] = {}
        self._counts: dict[int, int] = {}
        self._full: set[int] = set()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        k = i >> self.BITS
        page = self._pages.get(k)
        if page is not None:
            return page[i & self.MASK]
        return 1 if k in self._full else 0

    def __setitem__(self, i: int, value: int) -> None:
        if value:
            self.set(i)

    def set(self, i: int) -> None:
        k = i >> self.BITS
        page = self._pages.get(k)
        if page is None:
            if k in self._full:
                return
            page = self._pages[k] = bytearray(min(1 << self.BITS, self.n - (k << self.BITS)))
            self._counts[k] = 0
        j = i & self.MASK
        if page[j]:
            return
        page[j] = 1
        self.set_count += 1
        self._counts[k] += 1
        if self._counts[k] == len(page):  # every flag set: nothing to keep
            del self._pages[k], self._counts[k]
            self._full.add(k)

    def find_unset(self, start: int = 0) -> int:
        """The first cluster at or after start whose flag is not set, or -1."""
        i = start
        while i < self.n:
            k = i >> self.BITS
            if k in self._full:
                i = (k + 1) << self.BITS
                continue
            page = self._pages.get(k)
            if page is None:
                return i
            j = page.find(0, i & self.MASK)
            if j >= 0:
                return (k << self.BITS) + j
            i = (k + 1) << self.BITS
        return -1

    def unset_runs(self):
        """(first, end) of every run of clusters whose flag is not set, in order."""
        run = None
        for k in range(-(-self.n // (1 << self.BITS))):
            base = k << self.BITS
            length = min(1 << self.BITS, self.n - base)
            if k in self._full:
                pieces = []
            elif k not in self._pages:
                pieces = [(0, length)]
            else:
                pieces = [(m.start(), m.end()) for m in re.finditer(b"\0+", self._pages[k])]
            for a, b in pieces:
                if run is not None and run[1] == base + a:
                    run[1] = base + b
                    continue
                if run is not None:
                    yield tuple(run)
                run = [base + a, base + b]
        if run is not None:
            yield tuple(run)


class ClusterAssembler:
    def __init__(self, cluster_size: int, disk_size: int, put):
        self.cluster_size = cluster_size
        self.disk_size = disk_size
        self.put = put  # put(cluster_index, view): len = cluster, or less at the end
        self._partial: tuple[int, bytearray] | None = None
        self.seen = cluster_flags(-(-disk_size // cluster_size))  # clusters handed to put

    def add(self, offset: int, data) -> None:
        size, csize = self.disk_size, self.cluster_size
        if offset < 0 or offset + len(data) > size:
            raise ValueError(f"piece [{offset}, {offset + len(data)}) outside a {size}-byte disk")
        while data:
            cluster, within = divmod(offset, csize)
            if self._partial is not None and self._partial[0] != cluster:
                self.flush()
            cluster_len = min(csize, size - cluster * csize)
            if self._partial is None and within == 0 and len(data) >= cluster_len:
                self._put(cluster, data[:cluster_len])
                step = cluster_len
            else:
                if self._partial is None:
                    self._partial = (cluster, bytearray(cluster_len))
                step = min(len(data), cluster_len - within)
                self._partial[1][within : within + step] = data[:step]
            data = data[step:]
            offset += step

    def _put(self, cluster: int, view) -> None:
        if self.seen[cluster]:
            raise RuntimeError(f"cluster {cluster} given twice: the reader broke its order promise")
        self.seen.set(cluster)
        self.put(cluster, view)

    def flush(self) -> None:
        """Hand over the partly filled cluster (its missing bytes are zeros)."""
        if self._partial is not None:
            cluster, buf = self._partial
            self._partial = None
            self._put(cluster, memoryview(buf))

    def missing(self):
        """Cluster indexes never handed over (all zeros), in order; call after flush()."""
        i = self.seen.find_unset()
        while i >= 0:
            yield i
            i = self.seen.find_unset(i + 1)
