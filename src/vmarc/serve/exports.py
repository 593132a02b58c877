"""What an opened archive looks like from outside, defined here only: its disks under
their ids (and the names a user may type for them), each disk's partitions, and its
configs. serve/nbd.py and serve/fuse.py adapt this one view to their protocols."""

from __future__ import annotations

import os

from ..access.partitions import partitions
from ..model import Archive, DiskView


class PartitionView(DiskView):
    """A window of a disk (a partition), read through the disk's view."""

    def __init__(self, view: DiskView, offset: int, size: int, name: str):
        super().__init__(view.disk)
        self.view, self.offset, self.size, self.name = view, offset, size, name
        self.store_fd = view.store_fd

    def extents(self, offset: int = 0, length: int | None = None):
        for e in self.view.extents(self.offset + offset, self._clip(offset, length)):
            yield e._replace(start=e.start - self.offset)

    def read_at(self, offset: int, n: int) -> bytes:
        return self.view.read_at(self.offset + offset, max(0, min(n, self.size - offset)))

    def verify(self, offset: int, n: int) -> None:
        self.view.verify(self.offset + offset, n)


class BlobView:
    """A config file held in memory (qemu-server.conf, ova.xml)."""

    store_fd = None

    def __init__(self, data: bytes):
        self.data, self.size = data, len(data)

    def read_at(self, offset: int, n: int) -> bytes:
        return self.data[offset : offset + n]

    def in_place(self, offset: int, n: int):
        return None


class Exports:
    """The exports of one opened archive (access.Opened)."""

    def __init__(self, opened, default: str | None = None):
        archive: Archive = opened.archive
        self.opened = opened
        # NBD: export name (the disk id) -> view; the empty name is the default export
        self.disks: dict[str, DiskView] = {d.disk.id: d for d in opened.disks}
        self.default = (
            opened.select(default)
            if default or len(self.disks) == 1
            else (opened.disks[0] if opened.disks else None)
        )
        self.aliases: dict[str, DiskView] = {}
        for d in opened.disks:  # xvda, scsi0, names and indexes work as export names too
            for alias in d.disk.selectors() | archive.extra_selectors(d.disk):
                self.aliases.setdefault(alias, d)

    def find(self, name: str) -> DiskView | None:
        """The disk an NBD client asks for by name."""
        if name == "":
            return self.default
        return self.disks.get(name) or self.aliases.get(name)

    def files(self) -> dict:
        """File name -> view, for a file-system front end: each disk by its device (xvda)
        or id (drive-scsi0), its partitions (xvda-part1), and the configs."""
        files = {}
        for d in self.opened.disks:
            # not extract's per-format file names: the device or the id as it is
            stem = Archive.disk_filename(self.opened.archive, d.disk)[: -len(".raw")]
            while stem in files:
                stem = f"{stem}-{d.disk.index}"
            files[stem] = d
            for number, off, size in partitions(d):
                name = f"{stem}-part{number}"
                files[name] = PartitionView(d, off, size, name)
        for name, blob in self.opened.archive.configs.items():
            files.setdefault(os.path.basename(name), BlobView(blob))
        return files
