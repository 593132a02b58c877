"""The one model every format reader produces and every writer consumes.

An Archive is a set of Disks plus named config blobs and a summary of the VM. A Disk is
a size and an id; its contents are reached two ways:

- the *streaming pass* (`Archive.stream`) yields (disk, offset, bytes) in source order,
  so every command that only needs one pass works from a pipe and a compressed stream;
- *random access* (`DiskView`): `extents(offset, length)` says what each stretch holds
  (`Extent`: data at a place in a file, zeros, or lost) and `read_at(offset, n)` reads
  it. map, NBD block status, FUSE and the writers' first passes all ask `extents`.

Which of these a format offers beyond streaming, it declares in `Archive.access`
(qemu's BlockDriver table, in short): RANDOM (its own tables reach any offset: raw,
qcow2, VHD), SCAN (a header-only pass maps where each disk lies in the file: XVA, VMA)
or STREAM (neither: random access spools it). access/ turns each into DiskViews.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import NamedTuple

from .errors import CorruptError, FormatError, UnsupportedError, UsageError

ZERO_CHUNK = bytes(1 << 20)


def is_zero(view: memoryview) -> bool:
    """True when every byte is zero, at memcmp speed (comparing a memoryview to bytes
    with == goes element by element and is fifty times slower)."""
    # bytes.startswith takes any buffer and compares with memcmp, without a copy.
    step = len(ZERO_CHUNK)
    if len(view) <= step:
        return ZERO_CHUNK.startswith(view)
    return all(ZERO_CHUNK.startswith(view[i : i + step]) for i in range(0, len(view), step))


HOLE = 4096  # the smallest hole an output leaves: qemu-img convert's default -S 4k


def data_runs(view: memoryview, offset: int, block: int = HOLE) -> list[tuple[int, int]]:
    """(start, end) within view of the stretches worth writing: view is cut into blocks
    aligned on the disk (view[0] lies at disk offset `offset`) and the all-zero blocks
    are left out. A list, not a generator: this runs for every piece written."""
    n = len(view)
    if n == 0 or is_zero(view):
        return []
    head = min(n, (-offset) % block)  # the partial block before the first boundary
    full = (n - head) // block  # whole blocks after it
    body_end = head + full * block
    empty = [
        (s, s + block) for s in _maybe_zero(view, head, full, block) if is_zero(view[s : s + block])
    ]
    if head and is_zero(view[:head]):
        empty.insert(0, (0, head))
    if body_end < n and is_zero(view[body_end:]):
        empty.append((body_end, n))
    if not empty:
        return [(0, n)]
    runs, pos = [], 0
    for a, b in empty:
        if a > pos:
            runs.append((pos, a))
        pos = b
    if pos < n:
        runs.append((pos, n))
    return runs


_ZERO_WORD = bytes(8)


def _maybe_zero(view: memoryview, head: int, full: int, block: int) -> list[int]:
    """Starts of the whole blocks that may be all zero: those whose first 8 bytes are.
    One strided copy takes every block's first word at once, and a search for a zero
    word finds the few candidates, so a piece costs a few operations, not one per block."""
    if not full:
        return []
    if head % 8 or block % 8 or view.format not in ("B", "b", "c"):
        return [head + i * block for i in range(full)]  # no word view: every block
    firsts = bytes(view[head : head + full * block].cast("B").cast("Q")[:: block // 8])
    found = []
    pos = firsts.find(_ZERO_WORD)
    while pos >= 0:
        if pos % 8 == 0:
            found.append(head + pos // 8 * block)
        pos = firsts.find(_ZERO_WORD, (pos // 8 + 1) * 8)
    return found


# -- random access ------------------------------------------------------------------------
DATA = "data"  # stored bytes (at: their offset in file, None when not plain: compressed)
ZERO = "zero"  # reads as zeros: a hole, or a stretch no layer of a chain stores
LOST = "lost"  # the archive lost it (cut short, damaged): reading it fails (EIO)

# how a format reaches its disks besides stream() (Archive.access)
STREAM, SCAN, RANDOM = "stream", "scan", "random"


class Extent(NamedTuple):
    """One stretch of a disk as random access sees it (qemu's block_status)."""

    start: int  # disk offset
    length: int
    kind: str  # DATA, ZERO or LOST
    at: int | None = None  # DATA: where the bytes lie in file (None: not in plain form)
    file: str | None = None  # the file (or store) holding them
    depth: int = 0  # the layer of a chain it comes from (0: the image itself)


def filled(
    extents, offset: int, end: int, file: str | None = None, depth: int = 0
) -> Iterator[Extent]:
    """The extents with the gaps between them (and up to end) as ZERO: data-only lists
    (what a layer stores) made into the full cover DiskView.extents promises."""
    pos = offset
    for e in extents:
        if e.start > pos:
            yield Extent(pos, e.start - pos, ZERO, None, file, depth)
        yield e
        pos = e.start + e.length
    if pos < end:
        yield Extent(pos, end - pos, ZERO, None, file, depth)


class DiskView:
    """Random reads of one disk: the one interface serve, mount, map and the writers'
    first passes use, whatever the format and the store behind it."""

    def __init__(self, disk: Disk):
        self.disk = disk
        self.size = disk.size

    # the plain file DATA extents' `at` point into, when bytes may be handed out by
    # (fd, offset) without Python touching them (NBD sendfile, FUSE read_buf); else None
    store_fd: int | None = None

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """Extents covering [offset, offset + length) (to the disk's end by default), in
        order, without gaps."""
        raise NotImplementedError

    def read_at(self, offset: int, n: int) -> bytes:
        """n bytes at offset (fewer past the disk's end); CorruptError on a lost stretch
        or a bad checksum."""
        raise NotImplementedError

    def stream(self, step: int = 4 << 20) -> Iterator[tuple[Disk, int, memoryview]]:
        """What Archive.stream gives for this disk, read through extents and read_at:
        (disk, offset, data) of every stretch not ZERO, in disk order, step bytes at most
        (a writer's first pass over an image; an interleaved archive read disk by disk)."""
        for e in self.extents():
            if e.kind == ZERO:
                continue
            end = e.start + e.length
            for pos in range(e.start, end, step):
                yield self.disk, pos, memoryview(self.read_at(pos, min(step, end - pos)))

    def verify(self, offset: int, n: int) -> None:
        """Check [offset, offset + n) before its bytes are handed out another way than
        read_at (by store_fd): refuse lost stretches, check stored checksums."""

    def in_place(self, offset: int, n: int):
        """Where [offset, offset + n) can be read without Python touching the bytes:
        ZERO when it is all zeros, (fd, position) when it is one plain stored run, else
        None. Verifies first."""
        self.verify(offset, n)
        first = next(iter(self.extents(offset, n)), None)
        if first is None or first.length != n:
            return None
        if first.kind == ZERO:
            return ZERO
        if first.kind == DATA and self.store_fd is not None and first.at is not None:
            return (self.store_fd, first.at)
        return None

    def _clip(self, offset: int, length: int | None) -> int:
        return self.size - offset if length is None else max(0, min(length, self.size - offset))


class Disk:
    def __init__(
        self,
        id: str,
        name: str,
        size: int,
        device: str | None = None,
        index: int = 0,
        meta: dict | None = None,
    ):
        self.id = id  # the format's own id: "Ref:5" (XVA), "drive-scsi0" (VMA)
        self.name = name  # human label (VDI name_label, drive name)
        self.size = size  # virtual size in bytes
        self.device = device  # slot: xvda, scsi0...
        self.index = index  # position in the archive's disk list
        self.meta = meta or {}  # format-specific extras shown by info

    def __repr__(self):
        return f"Disk({self.id!r}, size={self.size}, device={self.device!r})"

    def selectors(self) -> set[str]:
        sel = {self.id, self.name, str(self.index)}
        if self.device:
            sel.add(self.device)
        return sel

    def describe(self) -> str:
        extra = f" ({self.device})" if self.device and self.device != self.id else ""
        return f"disk {self.id}{extra}"

    def as_dict(self) -> dict:
        """The same keys for every format; what only this format has is in details."""
        return {
            "id": self.id,
            "name": self.name,
            "size": self.size,
            "device": self.device,
            "index": self.index,
            "details": dict(self.meta),
        }


class Damage:
    """A stretch of a disk that could not be read as it was stored: cause "checksum"
    (the bytes kept as read), "missing" (zeros: truncated, a chunk or cluster absent) or
    "structure" (metadata broken: what it governs is read as far as it can be placed).
    where names the place in the source (member, cluster, block, archive offset)."""

    __slots__ = ("disk", "offset", "length", "cause", "where")

    def __init__(self, disk: Disk, offset: int, length: int, cause: str, **where):
        self.disk, self.offset, self.length, self.cause, self.where = (
            disk,
            offset,
            length,
            cause,
            where,
        )

    def as_dict(self) -> dict:
        return {
            "disk": self.disk.id,
            "device": self.disk.device,
            "offset": self.offset,
            "length": self.length,
            "cause": self.cause,
            "source": self.where,
        }


class Checks:
    """Where structural and checksum problems go.

    - default: raised at once (convert, extract without --salvage);
    - collect: recorded, so that one `verify` run names every problem it can reach (and,
      past a point the reader cannot go beyond, what each disk is missing);
    - keep (a set of disk ids): damage that spoils only other disks is recorded in
      `elsewhere` and the pass goes on, so intact disks come out of a damaged archive;
    - salvage: everything is recorded and readers go on past all they can (write the
      bytes of a bad chunk as read, zeros for what is missing).

    A reader that cannot go on (the input ends, a structure it needs is broken) calls
    stop(): raised unless collecting, keeping or salvaging; then the reader ends its pass
    and reports through fail() what each disk is missing.
    """

    def __init__(self, collect: bool = False, limit: int = 1000, keep=None, salvage: bool = False):
        self.collect = collect
        self.limit = limit
        self.keep = None if keep is None else set(keep)
        self.salvage = salvage
        self.problems: list[CorruptError] = []  # spoiling the kept disks, or everything
        self.elsewhere: list[CorruptError] = []  # spoiling other disks only (keep)
        self.stopped_by: CorruptError | None = None
        self.seen: list[CorruptError] = []  # every problem, in the order met
        self.leaks: list[str] = []  # space allocated and unused: not damage
        self.warnings: list[str] = []
        self._raised: CorruptError | None = None

    def _only_elsewhere(self, err: CorruptError) -> bool:
        return (
            self.keep is not None
            and bool(err.damage)
            and all(d.disk.id not in self.keep for d in err.damage)
        )

    def fail(self, err: CorruptError) -> None:
        self.seen.append(err)
        if self._only_elsewhere(err):
            self.elsewhere.append(err)
            return
        if not (self.collect or self.salvage):
            # the kept disk is spoiled: say why the pass stopped, when that is the cause
            self._raised = self.stopped_by if self.stopped_by is not None else err
            raise self._raised
        self.problems.append(err)
        if len(self.problems) >= self.limit:
            raise CorruptError(f"more than {self.limit} problems; stopped")

    def stop(self, err: CorruptError) -> None:
        if err is self._raised or not (self.salvage or self.collect or self.keep is not None):
            raise err  # a verdict of fail(), or no one to go on for
        self.seen.append(err)
        self.stopped_by = err

    def warn(self, text: str) -> None:
        self.warnings.append(text)

    @property
    def damage(self) -> list[Damage]:
        """The damaged stretches of the kept disks (or of every disk)."""
        return [d for e in self.problems for d in e.damage]


class Archive:
    """Base of every reader. Subclasses fill the fields and implement stream()."""

    format: str = "?"
    access: str = STREAM  # what it offers besides stream(): SCAN, RANDOM (see the top)
    layered: bool = False  # reads through other files (--parent, --no-backing apply)

    @classmethod
    def probe(cls, head: bytes) -> bool:
        """Whether an input starting with head (up to 4 KiB) is this format."""
        return False

    @classmethod
    def probe_tail(cls, tail: bytes) -> bool:
        """Whether a seekable input ending with tail (512 bytes) is this format (a fixed
        VHD: raw data and a footer)."""
        return False

    # True when each disk's pieces come in ascending offset order (writers that need
    # that, such as VHD, spool the others to a temporary file first).
    ordered: bool = True

    def __init__(self, source):
        self.source = source
        self.disks: list[Disk] = []
        self.configs: dict[str, bytes] = {}
        self.vm: dict = {}
        # damage seen while opening: stream() reports it, info warns of it
        self.open_problems: list[CorruptError] = []

    @property
    def compression(self):
        return self.source.compression

    @classmethod
    def needs_file(
        cls, head: bytes, unsized: bool = False, parent: str | None = None
    ) -> str | None:
        """Why an input that starts with head cannot be read front to back (vmarc.open
        then copies it to a temporary file first), or None when it can. unsized: the
        caller takes a disk whose size is known only at the end of the stream."""
        return None

    def stream(
        self, disks=None, checks: Checks | None = None, verify: bool = True
    ) -> Iterator[tuple[Disk, int, memoryview]]:
        """Yield (disk, offset, data) in source order for the chosen disks (all if None).
        Areas never yielded read as zeros. The data view is valid only until the next
        item is requested. Raises CorruptError (or reports it to checks) on damage."""
        raise NotImplementedError

    def checked(self) -> dict[str, dict[str, list[str]]]:
        """After a verifying pass: per disk id, what was "checked" and what the format
        keeps no way to check ("unchecked"); `verify` prints it."""
        return self.every_disk([], [])

    def every_disk(self, checked: list[str], unchecked: list[str]) -> dict:
        """checked() when every disk had the same checks."""
        return {d.id: {"checked": checked, "unchecked": unchecked} for d in self.disks}

    def check_more(self, checks: Checks) -> None:
        """verify's checks beyond the streaming pass (qcow2: refcounts, as qemu-img check)."""

    def stream_checks(self) -> list[str]:
        """What the decompressor checked of the whole stream."""
        return {
            None: [],
            "gzip": ["gzip CRC-32 and length of every member"],
            "zstd": ["zstd frames, and their content checksums where the writer stored them"],
            "lzop": ["lzop block checksums where the writer stored them"],
        }.get(self.compression, [])

    def settings(self):
        """The VM's settings (settings.neutral.VmSettings); a bare image gives its disks only."""
        from .settings.neutral import DiskSlot, VmSettings  # dataclasses: only when asked

        return VmSettings(
            name=self.vm.get("name", ""),
            memory=self.vm.get("memory", 0),
            disks=[DiskSlot(d, size=d.size, label=d.name) for d in self.disks],
        )

    def stream_order(self) -> list[Disk]:
        """The disks in the order stream() finishes them (writers that store disks one
        after the other follow it to avoid reordering)."""
        return list(self.disks)

    def covered(self, disk: Disk) -> int | None:
        """During stream(): the offset below which the disk's data has all been yielded
        (the rest of it zero), or None when the reader cannot tell before the end.
        Ordered readers need not say: their pieces come in ascending order."""
        return None

    def scan(self, checks: Checks | None = None):
        """access SCAN: (disk, disk offset, length, file offset, checksum or None) of each
        stored run, from a pass that reads headers and seeks over data."""
        raise UnsupportedError(f"{self.format} cannot be scanned")

    def extents(
        self, offset: int = 0, length: int | None = None, depth: int = 0
    ) -> Iterator[Extent]:
        """access RANDOM (one disk): extents covering the range, through every layer of a
        chain (each Extent says its depth and file)."""
        raise UnsupportedError(f"{self.format} cannot be read at random")

    def read_at(self, offset: int, n: int) -> bytes:
        """access RANDOM (one disk): n bytes at offset, zeros past the end."""
        raise UnsupportedError(f"{self.format} cannot be read at random")

    def lower(self) -> Archive | None:
        """The image this one reads through (a backing file, a parent), if any."""
        return None

    def disk_images(self) -> dict[str, Archive] | None:
        """Disk id -> an image of access RANDOM holding that one disk, when each disk of
        this archive is such an image in its own right (Xen Orchestra's delta backup:
        a VHD chain per disk); random access then reads them directly."""
        return None

    def select(self, selector: str | None) -> Disk:
        """One disk by id, name, device or index; required when there are several."""
        if selector is None:
            if len(self.disks) == 1:
                return self.disks[0]
            if not self.disks:
                raise UsageError(f"{self.source.name}: the archive has no disks")
            ids = ", ".join(d.device or d.id for d in self.disks)
            raise UsageError(
                f"{self.source.name}: {len(self.disks)} disks ({ids}); choose one with --disk"
            )
        found = [d for d in self.disks if selector in d.selectors()]
        if not found:
            found = [d for d in self.disks if selector in self.extra_selectors(d)]
        if len(found) == 1:
            return found[0]
        if not found:
            ids = ", ".join(d.device or d.id for d in self.disks) or "none"
            raise UsageError(f"{self.source.name}: no disk matches {selector!r} (disks: {ids})")
        raise UsageError(
            f"{self.source.name}: {selector!r} matches several disks; use the id or the index"
        )

    def disk_filename(self, disk: Disk) -> str:
        """File name for a disk in `extract`: its device (xvda), else its id made safe."""
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", disk.device or disk.id).strip(".-")
        return f"{stem or f'disk{disk.index}'}.raw"

    def extra_streams(self) -> list[tuple[Disk, str]]:
        """Byte streams extract writes besides the disks (VMA: the VM memory state)."""
        return []

    def extra_selectors(self, disk: Disk) -> set[str]:
        """Other names a user may use for a disk (VMA: scsi0 for drive-scsi0)."""
        return set()

    def info(self, configs: bool = False) -> dict:
        """What `info --output json` prints (docs/json.md): the same keys for every format,
        what only this format has in details; configs by name and size (with their text
        when configs is True)."""
        return {
            "format": self.format,
            "compression": self.compression,
            "source": self.source.name,
            "vm": self.vm,
            "disks": [d.as_dict() for d in self.disks],
            "configs": [
                dict(
                    {"name": k, "size": len(v)},
                    **({"content": v.decode("utf-8", "replace")} if configs else {}),
                )
                for k, v in self.configs.items()
            ],
            "settings": self._settings_summary(),
            "details": self.details(),
        }

    def details(self) -> dict:
        """Facts only this format has (info's details)."""
        return {}

    def _settings_summary(self) -> dict | None:
        """The neutral settings (what convert -O vma|xva carries), None if unreadable."""
        try:
            s = self.settings()
        except FormatError:
            return None
        out = s.summary()
        out["not_carried"] = s.lost
        return out

    def close(self):
        self.source.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
