"""Assembling a disk's (offset, bytes) pieces into fixed-size clusters for writers that
store whole clusters (VMA 64 KiB, qcow2 64 KiB, VHD 2 MiB blocks).

Readers promise that the pieces of one cluster come one after another (they never
return to a cluster they left), so at most one partly filled cluster is held per disk.
A cluster never given is all zeros: the writer decides what a zero cluster becomes.
"""

from __future__ import annotations


class ClusterAssembler:
    def __init__(self, cluster_size: int, disk_size: int, put):
        self.cluster_size = cluster_size
        self.disk_size = disk_size
        self.put = put                    # put(cluster_index, view): len = cluster, or less at the end
        self._partial: tuple[int, bytearray] | None = None
        self.seen = bytearray(-(-disk_size // cluster_size))  # clusters handed to put

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
                self._partial[1][within:within + step] = data[:step]
            data = data[step:]
            offset += step

    def _put(self, cluster: int, view) -> None:
        if self.seen[cluster]:
            raise RuntimeError(f"cluster {cluster} given twice: the reader broke its order promise")
        self.seen[cluster] = 1
        self.put(cluster, view)

    def flush(self) -> None:
        """Hand over the partly filled cluster (its missing bytes are zeros)."""
        if self._partial is not None:
            cluster, buf = self._partial
            self._partial = None
            self._put(cluster, memoryview(buf))

    def missing(self):
        """Cluster indexes never handed over (all zeros), in order; call after flush()."""
        seen = self.seen
        i = seen.find(0)
        while i >= 0:
            yield i
            i = seen.find(0, i + 1)
