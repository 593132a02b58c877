"""One adapter per file-system parser of the dissect family, each giving the same Entry:
name, type, size, mode, owner, mtime, symlink target, children, contents and where the
contents are sparse. The parsers are imported only when a volume of their type is opened.

What a parser raises on a broken structure becomes FileSystemError (exit 2, naming the
volume and the path); a damaged or lost chunk of the source under a file stays the
source's CorruptError, with the volume and path added by the caller.
"""

from __future__ import annotations

import io
import stat
import struct
from collections.abc import Iterator

from ..errors import CorruptError, UnsupportedError, VmarcError
from .volumes import Volume

FILE, DIR, LINK, OTHER = "file", "directory", "symlink", "other"
KINDS = {stat.S_IFREG: FILE, stat.S_IFDIR: DIR, stat.S_IFLNK: LINK}


class FileSystemError(CorruptError):
    """A file system's own structure is broken where a path needs it."""


class Entry:
    """A file, directory or symlink of a guest file system (lstat-like: not followed)."""

    name: str
    mode: int  # st_mode: type and permissions
    size: int
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0

    @property
    def kind(self) -> str:
        return KINDS.get(stat.S_IFMT(self.mode), OTHER)

    @property
    def target(self) -> str | None:
        """A symlink's target, as stored."""
        return None

    def children(self) -> Iterator[Entry]:
        """The directory's entries, without . and .."""
        raise NotImplementedError

    def open(self):
        """The file's bytes as a file object."""
        raise NotImplementedError

    def holes(self) -> list[tuple[int, int]]:
        """(offset, length) of the stretches the file system stores nothing for."""
        return []


class FileSystem:
    """An opened file system on a volume."""

    def __init__(self, volume: Volume):
        self.volume = volume
        self.dirty: str | None = None  # why recent changes may be missing, when they may

    def root(self) -> Entry:
        """The root directory (what a parser raises on the way is FileSystemError)."""
        try:
            return self._root()
        except VmarcError:
            raise
        except Exception as e:
            raise FileSystemError(f"{self.volume.name}: root directory unreadable: {e}") from None

    def _root(self) -> Entry:
        raise NotImplementedError


def open_filesystem(volume: Volume) -> FileSystem:
    """The file system on a volume, through its parser (ImportError names the extra)."""
    opener = OPENERS.get(volume.fstype)
    if opener is None:
        why = volume.note or f"{volume.fstype or 'unknown'} volumes cannot be read"
        raise UnsupportedError(f"{volume.name}: {why}")
    try:
        return opener(volume)
    except ImportError:
        raise UnsupportedError(
            "reading guest file systems needs the files extra: pip install 'vmarc[files]'"
        ) from None
    except VmarcError:
        raise
    except Exception as e:
        raise FileSystemError(f"{volume.name}: {volume.fstype} does not open: {e}") from None


def _runs_to_holes(runs, block: int, size: int) -> list[tuple[int, int]]:
    """(block or None, count) runs, as the ext and XFS parsers give them -> holes."""
    holes, pos = [], 0
    for start, count in runs:
        length = count * block
        if start is None and pos < size:
            holes.append((pos, min(length, size - pos)))
        pos += length
    return holes


# ext2/3/4 and XFS: the two parsers' inodes share one shape -----------------------------


class _InodeEntry(Entry):
    """An inode of dissect.extfs or dissect.xfs (filename, size, mtime_ns, link,
    iterdir, open, dataruns); the subclasses read the on-disk fields that differ."""

    def __init__(self, fs, inode, name: str):
        self.fs, self.inode, self.name = fs, inode, name
        self.size, self.mtime_ns = inode.size, inode.mtime_ns
        self._fields(inode.inode)

    def _fields(self, raw) -> None:
        """mode, uid and gid from the raw on-disk inode."""
        raise NotImplementedError

    def _runs(self):
        """(block or None, count) runs, or None when the data lies in the inode."""
        raise NotImplementedError

    @property
    def target(self):
        return self.inode.link if self.kind == LINK else None

    def children(self):
        for node in self.inode.iterdir():
            if node.filename not in (".", ".."):
                yield type(self)(self.fs, node, node.filename)

    def open(self):
        return self.inode.open()

    def holes(self):
        runs = self._runs()
        return [] if runs is None else _runs_to_holes(runs, self.fs.block_size, self.size)


class _ExtEntry(_InodeEntry):
    def _fields(self, raw) -> None:
        self.mode = raw.i_mode
        self.uid = raw.i_uid | raw.i_uid_high << 16
        self.gid = raw.i_gid | raw.i_gid_high << 16

    def _runs(self):
        if self.inode.inode.i_flags & 0x10000000:  # inline data
            return None
        return self.inode.dataruns()


class ExtFileSystem(FileSystem):
    def __init__(self, volume: Volume):
        super().__init__(volume)
        from dissect.extfs import ExtFS

        self.fs = ExtFS(volume.stream)
        if self.fs.sb.s_feature_incompat & 0x4:  # needs_recovery: the journal holds changes
            self.dirty = (
                "its journal was not replayed (a live backup): recent changes may be missing"
            )

    def _root(self):
        return _ExtEntry(self.fs, self.fs.root, "/")


# XFS ------------------------------------------------------------------------------------


class _XfsEntry(_InodeEntry):
    def _fields(self, raw) -> None:
        self.mode, self.uid, self.gid = raw.di_mode, raw.di_uid, raw.di_gid

    def _runs(self):
        if self.inode.inode.di_format == 1:  # local: in the inode
            return None
        return self.inode.dataruns


class XfsFileSystem(FileSystem):
    def __init__(self, volume: Volume):
        super().__init__(volume)
        from dissect.xfs import XFS

        self.fs = XFS(volume.stream)
        if xfs_log_dirty(volume.stream):
            self.dirty = "its log was not replayed (a live backup): recent changes may be missing"

    def _root(self):
        return _XfsEntry(self.fs, self.fs.root, "/")


XLOG_MAGIC = 0xFEEDBABE
XLOG_UNMOUNT_TRANS = 0x20
BB = 512


def xfs_log_dirty(stream) -> bool:
    """Whether an XFS internal log holds changes (xfs_logprint's DIRTY): the last log
    record before the head is not an unmount record. XFS has no clean flag; the head is
    where the cycle number stamped on each 512-byte log block drops (xlog_find_head, in
    short). False when the log is external or cannot be made out."""
    sb = _read(stream, 0, BB)
    if sb[:4] != b"XFSB":
        return False
    blocksize, logstart, agblocks = (
        struct.unpack_from(">I", sb, 4)[0],
        struct.unpack_from(">Q", sb, 48)[0],
        struct.unpack_from(">I", sb, 84)[0],
    )
    logblocks, agblklog = struct.unpack_from(">I", sb, 96)[0], sb[124]
    if not logstart or not blocksize or agblklog > 31:
        return False  # an external log: not on this disk
    base = ((logstart >> agblklog) * agblocks + (logstart & ((1 << agblklog) - 1))) * blocksize
    count = logblocks * blocksize // BB
    if count < 2:
        return False

    def cycle(i: int) -> int:  # a record header keeps it after its magic
        word, second = struct.unpack(">II", _read(stream, base + i * BB, 8))
        return second if word == XLOG_MAGIC else word

    first, last = cycle(0), cycle(count - 1)
    head = 0
    if first != last:  # [first ... first, last ... last]: the head is the first `last`
        lo, hi = 0, count - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if cycle(mid) == first:
                lo = mid + 1
            else:
                hi = mid
        head = lo
    for back in range(1, min(count, 8192) + 1):  # the last record header before the head
        at = base + ((head - back) % count) * BB
        block = _read(stream, at, BB)
        if struct.unpack_from(">I", block, 0)[0] != XLOG_MAGIC:
            continue
        version, logops = (
            struct.unpack_from(">I", block, 8)[0],
            struct.unpack_from(">I", block, 40)[0],
        )
        size = struct.unpack_from(">I", block, 320)[0] if version & 2 else 0
        header_bbs = max(1, -(-size // 32768)) if size > 32768 else 1
        op = _read(stream, base + ((head - back + header_bbs) % count) * BB, BB)
        return not (logops == 1 and op[9] & XLOG_UNMOUNT_TRANS)
    return False


def _read(stream, offset: int, n: int) -> bytes:
    stream.seek(offset)
    data = stream.read(n)
    return data + bytes(n - len(data))


# btrfs ----------------------------------------------------------------------------------


class _BtrfsEntry(Entry):
    def __init__(self, inode, name: str):
        self.inode, self.name = inode, name
        self.mode, self.size = inode.mode, inode.size
        self.uid, self.gid, self.mtime_ns = inode.uid, inode.gid, inode.mtime_ns

    @property
    def target(self):
        return self.inode.link if self.kind == LINK else None

    def children(self):
        for name, node in self.inode.iterdir():
            if name not in (".", ".."):
                yield _BtrfsEntry(node, name)

    def open(self):
        return self.inode.open()

    def holes(self):
        extents = self.inode.extents()
        if not extents:
            return []
        holes, pos = [], 0
        for e in extents:  # in file order; a hole is an extent with no place on disk
            if e.disk_offset == 0 and pos < self.size:
                holes.append((pos, min(e.length, self.size - pos)))
            pos += e.length
        return holes


class BtrfsFileSystem(FileSystem):
    """The default subvolume; another by name with --fs VOL:SUBVOL... (subvolume())."""

    def __init__(self, volume: Volume, subvolume: str | None = None):
        super().__init__(volume)
        from dissect.btrfs import Btrfs

        self.fs = Btrfs(volume.stream)
        self.tree = self.fs.default_subvolume
        if self.fs.sb.log_root:
            self.dirty = "its log tree was not replayed: recent fsyncs may be missing"

    def subvolumes(self) -> list[str]:
        return [s.path for s in self.fs.subvolumes() if s.path]

    def use_subvolume(self, path: str) -> None:
        found = self.fs.find_subvolume(path.strip("/"))
        if found is None:
            raise UnsupportedError(f"{self.volume.name}: no btrfs subvolume {path}")
        self.tree = found

    def _root(self):
        return _BtrfsEntry(self.tree.root, "/")


# NTFS -----------------------------------------------------------------------------------


INTERIX_LINK = b"IntxLNK\x01"  # ntfs-3g's own symlinks: a system file holding the target


class _NtfsEntry(Entry):
    def __init__(self, record, name: str):
        self.record, self.name = record, name
        self._interix = None
        link = record.is_symlink() or self._interix_link()
        self.mode = (
            stat.S_IFLNK | 0o777
            if link
            else stat.S_IFDIR | 0o755
            if record.is_dir()
            else stat.S_IFREG | 0o644
        )
        self.size = 0 if link or record.is_dir() else record.size()
        try:
            self.mtime_ns = record.attributes[0x10].last_modification_time_ns
        except KeyError:  # no $STANDARD_INFORMATION
            pass

    def _interix_link(self) -> bool:
        record = self.record
        if record.is_dir() or not 8 < record.size() <= 8 + 2 * 4096:
            return False
        try:
            if not record.attributes[0x10].file_attributes & 0x4:  # FILE_ATTRIBUTE_SYSTEM
                return False
        except KeyError:
            return False
        head = record.open().read(8 + 2 * 4096)
        if not head.startswith(INTERIX_LINK):
            return False
        self._interix = head[8:].decode("utf-16-le", "replace")
        return True

    @property
    def target(self):
        if self.kind != LINK:
            return None
        if self._interix is not None:
            return self._interix
        name = self.record.reparse_point_substitute_name
        if name.startswith("\\??\\"):  # an absolute target: drop the NT prefix and drive
            name = name[4:].split(":", 1)[-1]
        return name.replace("\\", "/")

    def children(self):
        for entry in self.record.iterdir(ignore_dos=True):
            name = entry.attribute.file_name
            if name == "." or (name.startswith("$") and self.record.segment == 5):
                continue  # the root's metadata files ($MFT...) are not the guest's files
            yield _NtfsEntry(entry.dereference(), name)

    def open(self):
        return self.record.open()


class NtfsFileSystem(FileSystem):
    def __init__(self, volume: Volume):
        super().__init__(volume)
        from dissect.ntfs import NTFS

        self.fs = NTFS(volume.stream)
        volume.label = volume.label or self.fs.volume_name or None
        flags = _ntfs_volume_flags(self.fs)
        if flags & 0x1:
            self.dirty = "it is marked dirty (not cleanly unmounted): recent changes may be missing"

    def _root(self):
        return _NtfsEntry(self.fs.mft.get(5), "/")


def _ntfs_volume_flags(fs) -> int:
    """$Volume's VOLUME_INFORMATION flags (bit 0: dirty)."""
    try:
        data = fs.mft.get(3).attributes[0x70].data()  # $VOLUME_INFORMATION
        return struct.unpack_from("<H", data, 10)[0]
    except Exception:
        return 0


# FAT ------------------------------------------------------------------------------------


class _FatEntry(Entry):
    def __init__(self, dirent, name: str):
        self.dirent, self.name = dirent, name
        directory = dirent.is_directory()
        perm = 0o555 if dirent.is_readonly() else 0o755
        self.mode = stat.S_IFDIR | perm if directory else stat.S_IFREG | (perm & 0o666)
        self.size = 0 if directory else dirent.size
        try:
            self.mtime_ns = int(dirent.mtime.timestamp() * 1e9) if dirent.mtime else 0
        except (ValueError, OverflowError, OSError):
            self.mtime_ns = 0

    def children(self):
        for d in self.dirent.iterdir():
            if d.is_volume_id() or d.name in (".", ".."):
                continue
            yield _FatEntry(d, _fat_name(d))

    def open(self):
        return self.dirent.open() if self.size else io.BytesIO(b"")


def _fat_name(d) -> str:
    """The long name, else the 8.3 name in the case Windows and Linux show: NTRes bits 3
    and 4 say the base and the extension were lower case (mtools and Windows set them)."""
    if d.ldirents:
        return d.name
    flags = d.dirent.DIR_NTRes
    base, dot, ext = d.short_name.partition(".")
    base = base.lower() if flags & 0x08 else base
    ext = ext.lower() if flags & 0x10 else ext
    return base + dot + ext


class FatFileSystem(FileSystem):
    def __init__(self, volume: Volume):
        super().__init__(volume)
        from dissect.fat import FATFS

        self.fs = FATFS(volume.stream)
        # A damaged FAT can chain clusters into a loop, which the parser would follow
        # for ever: no chain is longer than the volume has clusters.
        chain, limit = self.fs.fat.chain, volume.size // self.fs.cluster_size + 2

        def bounded(cluster):
            for n, c in enumerate(chain(cluster)):
                if n > limit:
                    raise FileSystemError(f"{volume.name}: a FAT cluster chain loops")
                yield c

        self.fs.fat.chain = bounded

    def _root(self):
        return _FatEntry(self.fs.root, "/")


# exFAT ----------------------------------------------------------------------------------


class _ExfatEntry(Entry):
    """A node of the tree dissect.fat's ExFAT parses at open: (FILE record, children)."""

    def __init__(self, fs, node, name: str):
        self.fs, self.name = fs, name
        self.file, self.kids = node
        directory = self.kids is not None
        meta = self.file.metadata if self.file is not None else None
        perm = 0o555 if meta is not None and meta.attributes.read_only else 0o755
        self.mode = stat.S_IFDIR | perm if directory else stat.S_IFREG | (perm & 0o666)
        self.size = 0 if directory else self.file.stream.data_length
        self.mtime_ns = _exfat_time(meta) if meta is not None else 0

    def children(self):
        for name, node in (self.kids or {}).items():
            yield _ExfatEntry(self.fs, node, name.rstrip("/"))

    def open(self):
        if not self.size:
            return io.BytesIO(b"")
        from dissect.util.stream import RunlistStream

        stream = self.file.stream
        whole = bool(stream.flags.not_fragmented)
        runs = self.fs.runlist(stream.location, whole, self.size if whole else None)
        return RunlistStream(self.fs.filesystem, runs, self.size, self.fs.sector_size)


def _exfat_time(meta) -> int:
    """Modified time in ns since the epoch: a DOS date and time, 10 ms units, and the
    offset from UTC in 15-minute steps when its top bit says it is set."""
    import calendar

    stamp, tz = meta.modified_time, meta.modified_timezone
    date, clock = stamp >> 16, stamp & 0xFFFF
    try:
        seconds = calendar.timegm(
            (
                1980 + (date >> 9),
                (date >> 5) & 15,
                date & 31,
                clock >> 11,
                (clock >> 5) & 63,
                (clock & 31) * 2,
                0,
                0,
                0,
            )
        )
    except (ValueError, OverflowError):
        return 0
    if tz & 0x80:  # the offset is valid: local time = UTC + offset
        offset = tz & 0x7F
        seconds -= (offset - 128 if offset & 0x40 else offset) * 15 * 60
    return (seconds * 100 + meta.modified_offset) * 10_000_000


class ExfatFileSystem(FileSystem):
    def __init__(self, volume: Volume):
        super().__init__(volume)
        from dissect.fat.exfat import ExFAT

        limit = volume.size // 512 + 2

        class _Bounded(ExFAT):  # a looping cluster chain would be followed for ever
            def get_cluster_chain(self, starting_cluster: int) -> list[int]:
                chain = []
                for c in _chain(self.fat, starting_cluster):
                    chain.append(c)
                    if len(chain) > min(limit, self.cluster_count + 2):
                        raise FileSystemError(f"{volume.name}: an exFAT cluster chain loops")
                return chain

        self.fs = _Bounded(volume.stream)

    def _root(self):
        return _ExfatEntry(self.fs, self.fs.files["/"], "/")


def _chain(fat, cluster: int):
    """exFAT's FAT from cluster on: 32-bit entries, 0xFFFFFFFF ends a chain."""
    while 2 <= cluster < 0xFFFFFFF7:
        yield cluster
        fat.seek(cluster * 4)
        cluster = struct.unpack("<I", fat.read(4).ljust(4, b"\xff"))[0]


OPENERS = {
    "ext2": ExtFileSystem,
    "ext3": ExtFileSystem,
    "ext4": ExtFileSystem,
    "xfs": XfsFileSystem,
    "btrfs": BtrfsFileSystem,
    "ntfs": NtfsFileSystem,
    "vfat": FatFileSystem,
    "exfat": ExfatFileSystem,
}
