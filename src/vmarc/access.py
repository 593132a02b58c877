"""Random access to the disks of any archive or image, without extracting them.

`open_disks()` gives one DiskAccess per disk: read(offset, length) and pieces() (which
stretches hold data, for NBD block status and `map`). How it gets there depends on what
the source allows:

- plain XVA/VMA: an index (each disk's extent map into the archive) built by one scan
  that reads headers only and seeks over data; saved in a cache directory (or at
  --index) keyed by the archive's identity and reused on the next open;
- gzip XVA/VMA: the same index over the decompressed bytes, read through rapidgzip's
  seek checkpoints (its own index is saved beside ours);
- raw, qcow2, VHD files: their own tables (no index needed);
- anything else that cannot seek (zstd, lzop, gzip without rapidgzip, a compressed
  image): each disk is spooled once to a sparse file in the cache, and vmarc says so.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import stat
import sys
import threading
from array import array

from .errors import CorruptError, IntegrityError, SourceError, UsageError, VmarcError
from . import open as open_archive
from .formats import reader_for
from .formats.raw import RawWriter
from .hashing import DIGESTS, xxh64_text
from .model import Checks, Disk
from .output import OutputFile, writing
from .source import BLOCK, Source, next_data

INDEX_MAGIC = b"vmarc-index 3\n"  # 2: chunk checksums; 3: damaged stretches
BAD = 1 << 63  # the store offset of a damaged stretch: data nobody can read (EIO)
INDEXED_FORMATS = ("xva", "vma")


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vmarc")


# -- extent maps ----------------------------------------------------------------------------
class DiskMap:
    """Where each stored stretch of one disk lies in its store: sorted, merged runs of
    (disk offset, length, store offset). Everything else reads as zeros. A stretch the
    archive lost (cut short, a cluster missing) has store offset BAD: it counts as data
    (block status never calls it zeros) and reading it fails."""

    def __init__(self, starts=None, lengths=None, offsets=None, checks=None):
        self.starts = starts or array("Q")
        self.lengths = lengths or array("Q")
        self.offsets = offsets or array("Q")
        self.checks: ChunkChecks | None = checks  # XVA: each chunk's checksum

    def add(self, start: int, length: int, offset: int) -> None:
        if self.starts:  # extend the last run when this one follows it on disk and in store
            i = len(self.starts) - 1
            if self.starts[i] + self.lengths[i] == start and \
                    self.offsets[i] + self.lengths[i] == offset:
                self.lengths[i] += length
                return
        self.starts.append(start)
        self.lengths.append(length)
        self.offsets.append(offset)

    def finish(self) -> "DiskMap":
        """Sort (VMA clusters come in any order) and merge; overlaps are refused."""
        order = sorted(range(len(self.starts)), key=self.starts.__getitem__)
        if any(order[i] > order[i + 1] for i in range(len(order) - 1)):
            runs = [(self.starts[i], self.lengths[i], self.offsets[i]) for i in order]
            self.starts, self.lengths, self.offsets = array("Q"), array("Q"), array("Q")
            for run in runs:
                self.add(*run)
        for i in range(1, len(self.starts)):
            if self.starts[i - 1] + self.lengths[i - 1] > self.starts[i]:
                raise VmarcError(f"two stored runs overlap at disk offset {self.starts[i]}")
        if self.checks is not None:
            self.checks.finish()
        return self

    def pieces(self, offset: int, length: int):
        """(disk offset, length, store offset or None for zeros) covering the range."""
        end = offset + length
        i = max(bisect.bisect_right(self.starts, offset) - 1, 0)
        pos = offset
        while pos < end:
            if i < len(self.starts) and self.starts[i] + self.lengths[i] <= pos:
                i += 1
                continue
            if i >= len(self.starts) or self.starts[i] >= end:
                yield pos, end - pos, None
                return
            s = self.starts[i]
            if s > pos:
                yield pos, s - pos, None
                pos = s
            stop = min(s + self.lengths[i], end)
            yield pos, stop - pos, self.offsets[i] + (pos - s)
            pos = stop
            i += 1


class ChunkChecks:
    """The stored checksum of every chunk of one disk (XVA: XXH64 or SHA-1 per 1 MiB
    chunk). Random reads check a chunk the first time they touch it, so serve and mount
    never hand out damaged data even when `verify` was never run; a chunk is hashed once."""

    WIDTH = 20  # bytes kept per digest: SHA-1's; XXH64 uses the first 8
    ALGOS = tuple(DIGESTS)  # the index stores a digest's position in this tuple

    def __init__(self, starts=None, sizes=None, algos=None, digests=None):
        self.starts = starts or array("Q")    # disk offset of each chunk
        self.sizes = sizes or array("Q")      # the member's size (what the digest covers)
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
            stored = self.digests[i * self.WIDTH:i * self.WIDTH + len(got) // 2]
            if bytes.fromhex(got) != stored:
                raise IntegrityError(
                    f"{where}: the chunk at disk offset {self.starts[i]} fails its "
                    f"{name} checksum (stored {stored.hex()}, computed {got.lower()}); "
                    f"{damaged}")
            self.checked[i] = 1
        finally:
            if busy is None:
                with self._lock:
                    self._busy.pop(i).set()


# -- stores: where the bytes are read from ---------------------------------------------------
class FileStore:
    """A plain file read with pread (thread-safe by nature)."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise SourceError(f"{path}: cannot open: {e.strerror}") from None

    def pread(self, n: int, offset: int) -> bytes:
        data = os.pread(self.fd, n, offset)
        while len(data) < n:  # short reads happen on some file systems
            more = os.pread(self.fd, n - len(data), offset + len(data))
            if not more:
                raise SourceError(f"{self.path}: file ends at offset {offset + len(data)}, "
                                  "inside data the index points at (changed since indexed?)")
            data += more
        return data

    def close(self) -> None:
        os.close(self.fd)


class GzipStore:
    """The decompressed bytes of a gzip file, read through rapidgzip's seek checkpoints:
    a read decompresses from the nearest checkpoint only."""

    def __init__(self, path: str, gz_index: str | None):
        import rapidgzip
        self.path = path
        self._lock = threading.Lock()
        self.file = rapidgzip.RapidgzipFile(path, parallelization=os.cpu_count() or 1)
        if gz_index and os.path.exists(gz_index):
            try:
                self.file.import_index(gz_index)
            except Exception:  # stale or damaged: build it again
                self.file.close()
                self.file = rapidgzip.RapidgzipFile(path, parallelization=os.cpu_count() or 1)

    def export_checkpoints(self, path: str) -> None:
        """gztool's format keeps each checkpoint's 32 KiB window sparse and compressed:
        ~1 KiB a checkpoint instead of ~20, on disk and again in memory once imported
        (17 MiB against 40 MiB for a 4 GiB disk), so a mount of a large .gz stays small."""
        import rapidgzip
        fmt = getattr(getattr(rapidgzip, "IndexFormat", None), "GZTOOL", None)
        if fmt is None:  # an older rapidgzip: its own format
            self.file.export_index(path)
        else:
            self.file.export_index(path, fmt)

    def pread(self, n: int, offset: int) -> bytes:
        with self._lock:
            self.file.seek(offset)
            data = self.file.read(n)
        if len(data) < n:
            raise SourceError(f"{self.path}: decompressed data ends at offset "
                              f"{offset + len(data)}, inside data the index points at")
        return data

    def source(self, name: str) -> Source:
        """A seekable Source over the decompressed bytes, for the header scan."""
        size = self.file.seek(0, os.SEEK_END)
        self.file.seek(0)
        lent = _Unclosed(self.file)
        return Source(lent, name=name, compression=None, path=self.path, file_size=size,
                      raw_file=lent)

    def close(self) -> None:
        self.file.close()


class _Unclosed:
    """Lends a file to a Source without letting it close it."""

    def __init__(self, f):
        self._f = f

    def __getattr__(self, name):
        if name == "close":
            return lambda: None
        return getattr(self._f, name)


ZEROS = "zeros"  # DiskAccess.in_place(): the range is a hole


# -- per-disk access -------------------------------------------------------------------------
class DiskAccess:
    """Random reads of one disk. pieces() yields (offset, length, is_data)."""

    def __init__(self, disk: Disk):
        self.disk = disk
        self.size = disk.size

    map: DiskMap  # the stretches that hold data (for MappedDisk also where they lie)
    store_fd: int | None = None  # the plain file the stored runs are read from, if any

    def read(self, offset: int, n: int) -> bytes:
        raise NotImplementedError

    def verify(self, offset: int, n: int) -> None:
        """Check what [offset, offset + n) holds against its stored checksums before the
        bytes are handed out another way than read() (only XVA chunks have them)."""

    def pieces(self, offset: int = 0, length: int | None = None):
        length = self.size - offset if length is None else min(length, self.size - offset)
        for start, n, at in self.map.pieces(offset, length):
            yield start, n, at is not None

    def in_place(self, offset: int, n: int):
        """Where [offset, offset + n) can be read without Python touching the bytes:
        ZEROS when it is all hole, (fd, position) when it is one stored run of a plain
        file, else None. Lets FUSE hand the copy to libfuse."""
        first = next(iter(self.map.pieces(offset, n)), None)
        if first is None or first[1] != n:
            return None
        if first[2] is None:
            return ZEROS
        return None if self.store_fd is None else (self.store_fd, first[2])


class MappedDisk(DiskAccess):
    def __init__(self, disk: Disk, store, dmap: DiskMap, where: str, verify: bool = True,
                 damaged: str = "the archive is damaged"):
        super().__init__(disk)
        self.store = store
        self.store_fd = getattr(store, "fd", None)  # a FileStore; not gzip checkpoints
        self.map = dmap
        self.where = f"{where}: {disk.describe()}"
        self.damaged = damaged
        self.checks = dmap.checks if verify else None

    def check_chunks(self, offset: int, n: int) -> None:
        """Check the chunks of [offset, offset + n) not checked before (IntegrityError)."""
        if self.checks is not None:
            self.checks.check(offset, n, self._chunk, self.where, self.damaged)

    def _chunk(self, start: int, size: int) -> bytes:
        at = next(iter(self.map.pieces(start, 1)))[2]
        return self.store.pread(size, at)  # a chunk's member data is contiguous

    def verify(self, offset: int, n: int) -> None:
        """Before bytes are handed out another way than read() (NBD sendfile, FUSE fd):
        refuse a lost stretch, check the chunks not checked before (CorruptError)."""
        for start, length, at in self.map.pieces(offset, n):
            if at is not None and at >= BAD:
                raise self._lost(start, length)
        self.check_chunks(offset, n)

    def _lost(self, start: int, length: int) -> CorruptError:
        return CorruptError(f"{self.where}: disk offset {start} lies in a stretch the "
                            f"archive lost ({length} bytes here; `vmarc verify` names the "
                            "damage)")

    def in_place(self, offset: int, n: int):
        self.verify(offset, n)
        return super().in_place(offset, n)

    def read(self, offset: int, n: int) -> bytes:
        n = max(0, min(n, self.size - offset))
        self.check_chunks(offset, n)
        parts = []
        for start, length, at in self.map.pieces(offset, n):  # one walk: lost stretches too
            if at is not None and at >= BAD:
                raise self._lost(start, length)
            parts.append(bytes(length) if at is None else self.store.pread(length, at))
        return b"".join(parts)

    def store_pieces(self, offset: int = 0):
        """(offset, length, store offset, None for zeros, >= BAD for lost): for dmsetup."""
        return self.map.pieces(offset, self.size - offset)


class ImageDisk(DiskAccess):
    """A qcow2 or VHD file read through its own tables (read_at); allocation from them.
    Reads are serialised: the format readers keep small caches."""

    def __init__(self, disk: Disk, archive):
        super().__init__(disk)
        self.archive = archive
        self._lock = threading.Lock()
        self.map = DiskMap()
        for g, n, *_ in archive.mapping():  # what some layer of the chain stores
            self.map.add(g, n, g)  # the offset only marks "data here"; reads go via read_at
        self.map.finish()

    def sources(self):
        """(disk offset, length, file offset or None, file) of the stored stretches."""
        for g, n, at, path, _depth in self.archive.mapping():
            yield g, n, at, path

    def read(self, offset: int, n: int) -> bytes:
        n = max(0, min(n, self.size - offset))
        with self._lock:
            return self.archive.read_at(offset, n)


# -- opening --------------------------------------------------------------------------------
class Opened:
    """The disks of one source, ready for random reads; plus its metadata."""

    def __init__(self, archive, disks: list[DiskAccess], stores: list, how: str):
        self.archive = archive        # the opened Archive (metadata: vm, configs, disks)
        self.disks = disks
        self.how = how                # "index", "index (reused)", "tables", "spool"...
        self._stores = stores

    def select(self, selector: str | None) -> DiskAccess:
        disk = self.archive.select(selector)
        return next(d for d in self.disks if d.disk.id == disk.id)

    def close(self) -> None:
        for s in self._stores:
            try:
                s.close()
            except Exception:
                pass
        self.archive.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def identity(path: str) -> dict:
    """What makes an index valid: the file's size, mtime and a hash of its head."""
    st = os.stat(path)
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    return {"path": os.path.realpath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "head_sha256": hashlib.sha256(head).hexdigest()}


def _index_path(ident: dict, explicit: str | None) -> str:
    if explicit:
        return explicit
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]
    return os.path.join(cache_dir(), key + ".idx")


def save_index(path: str, ident: dict, fmt: str, how: str, maps: dict[str, DiskMap],
               note: str | None = None) -> None:
    """magic, a JSON header line, then per disk: its three run arrays (little-endian
    u64) and, when it has chunk checksums, their offsets and sizes (u64), algorithms
    (u8) and digests (ChunkChecks.WIDTH bytes each). The header holds the body's XXH64:
    a cache file damaged on disk is built again, never trusted."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    body = bytearray()
    for m in maps.values():
        arrays = [m.starts, m.lengths, m.offsets]
        if m.checks:
            arrays += [m.checks.starts, m.checks.sizes]
        for arr in arrays:
            a = array("Q", arr)
            if sys.byteorder != "little":
                a.byteswap()
            body += a.tobytes()
        if m.checks:
            body += m.checks.algos.tobytes() + m.checks.digests
    head = {"identity": ident, "format": fmt, "store": how, "digests": ChunkChecks.ALGOS,
            "disks": [{"id": k, "runs": len(m.starts),
                       "chunks": len(m.checks.starts) if m.checks else None}
                      for k, m in maps.items()],
            "body_xxh64": xxh64_text(body),
            "damage": note}  # the archive's damage, said again whenever the index is used
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(INDEX_MAGIC + json.dumps(head).encode() + b"\n")
        f.write(body)
    os.replace(tmp, path)


def load_index(path: str, ident: dict):
    """(format, store kind, {disk id: DiskMap}, damage note) or None when absent, stale
    or damaged."""
    try:
        with open(path, "rb") as f:
            if f.read(len(INDEX_MAGIC)) != INDEX_MAGIC:
                return None
            head = json.loads(f.readline())
            if head.get("identity") != ident or head.get("digests") != list(ChunkChecks.ALGOS):
                return None
            body = memoryview(f.read())
        if xxh64_text(body) != head["body_xxh64"]:
            return None
        pos = 0

        def take(n: int) -> memoryview:
            nonlocal pos
            if pos + n > len(body):
                raise ValueError("index ends early")
            pos += n
            return body[pos - n:pos]

        def u64s(n: int) -> array:
            a = array("Q")
            a.frombytes(take(8 * n))
            if sys.byteorder != "little":
                a.byteswap()
            return a

        maps = {}
        for d in head["disks"]:
            dmap = DiskMap(*(u64s(d["runs"]) for _ in range(3)))
            n = d["chunks"]
            if n is not None:
                starts, sizes = u64s(n), u64s(n)
                algos = array("B", bytes(take(n)))
                dmap.checks = ChunkChecks(starts, sizes, algos,
                                          bytearray(take(n * ChunkChecks.WIDTH)))
            maps[d["id"]] = dmap.finish()  # refuses runs out of order or overlapping
        return head["format"], head["store"], maps, head.get("damage")
    except (OSError, ValueError, KeyError, TypeError, VmarcError):
        return None


def open_disks(path: str, fmt: str | None = None, *, index: str | None = None,
               parent: str | None = None, no_backing: bool = False, quiet: bool = False,
               verify: bool = True) -> Opened:
    """Open a file for random reads of its disks (see the module docstring)."""
    if path in ("-", None):
        raise UsageError("random access needs a file, not a pipe")
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise SourceError(f"{path}: cannot open: {e.strerror}") from None
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):  # a FIFO would block, then not seek
        raise UsageError(f"{path}: random access needs a regular file or a block device")
    archive = open_archive(path, fmt, parent=parent, no_backing=no_backing)
    try:
        return _open_disks(archive, path, index, quiet, verify)
    except BaseException:
        archive.close()
        raise


def _open_disks(archive, path: str, index: str | None, quiet: bool,
                verify: bool) -> Opened:
    fmt = archive.format
    comp = archive.compression
    if comp is None and fmt == "raw":
        store = FileStore(path)
        maps = {archive.disks[0].id: _data_map(store.fd, archive.disks[0].size)}
        return Opened(archive, _mapped(archive, store, maps, verify), [store], "file")
    if comp is None and hasattr(archive, "read_at") and archive.source.seekable:
        return Opened(archive, [ImageDisk(d, archive) for d in archive.disks], [], "tables")

    ident = identity(path)
    idx = _index_path(ident, index)
    gz = comp == "gzip" and fmt in INDEXED_FORMATS and _have_rapidgzip()
    found = load_index(idx, ident)
    if found and found[0] == fmt and {d.id for d in archive.disks} <= set(found[2]):
        _, how, maps, note = found
        stores = _reuse_stores(path, idx, how)
        if stores is not None:
            if note and not quiet:
                print(f"vmarc: warning: {note}", file=sys.stderr)
            return Opened(archive, _mapped(archive, stores[0], maps, verify), stores,
                          how + " (reused)")

    if comp is None and fmt in INDEXED_FORMATS:
        store = FileStore(path)
        scan_archive = archive  # its source seeks over the data
        how = "index"
    elif gz:
        store = GzipStore(path, idx + ".gzidx")
        scan_archive = reader_for(fmt)(store.source(archive.source.name))
        how = "gzip-index"
    else:
        return _spool(archive, path, idx, ident, quiet, verify)
    try:
        maps, note = _scan(scan_archive, quiet)
        _try_save(idx, ident, fmt, how, maps, quiet, store if gz else None, note)
    except BaseException:
        store.close()
        raise
    return Opened(archive, _mapped(archive, store, maps, verify), [store], how)


def _scan(scan_archive, quiet: bool) -> tuple[dict[str, DiskMap], str | None]:
    """Every disk's map from one header scan. Damage does not stop it (as --salvage):
    what the archive lost becomes BAD stretches, so every other byte stays readable."""
    maps = {d.id: DiskMap() for d in scan_archive.disks}
    checks = Checks(salvage=True)
    for disk, start, n, at, checksum in scan_archive.scan(checks):
        m = maps.get(disk.id)
        if m is None:
            continue
        m.add(start, n, at)
        if checksum is not None:
            if m.checks is None:
                m.checks = ChunkChecks()
            m.checks.add(start, *checksum)
    note = _warn_damage(checks, quiet)
    return {d.id: _with_lost(maps[d.id], checks, d) for d in scan_archive.disks}, note


def _with_lost(m: DiskMap, checks: Checks, disk: Disk) -> DiskMap:
    """The map with the disk's damaged stretches (checks.damage) as BAD runs in place
    of whatever was stored there."""
    bad = _merged([(d.offset, d.length) for d in checks.damage
                   if d.length and d.disk.id == disk.id])
    if not bad:
        return m.finish()
    runs = [r for r in zip(m.starts, m.lengths, m.offsets) if not _overlaps(bad, r[0], r[1])]
    out = DiskMap(checks=m.checks)
    for start, n, at in sorted(runs + [(a, n, BAD) for a, n in bad]):
        out.add(start, n, at)
    return out.finish()


def _warn_damage(checks: Checks, quiet: bool) -> str | None:
    """One line on the archive's damage (None when intact); returned for the index."""
    if not checks.seen:
        return None
    n = sum(1 for d in checks.damage if d.length)
    note = f"{checks.seen[0]}" + (f"; {n} damaged stretch(es) read as I/O errors" if n else "")
    if not quiet:
        print(f"vmarc: warning: {note}", file=sys.stderr)
    return note


def _merged(ranges):
    out = []
    for a, n in sorted(ranges):
        if out and a <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], a + n - out[-1][0])
        else:
            out.append([a, n])
    return [tuple(r) for r in out]


def _overlaps(bad, start: int, n: int) -> bool:
    i = bisect.bisect_right(bad, (start, float("inf"))) - 1
    return any(a < start + n and start < a + m for a, m in bad[max(i, 0):i + 2])


def _reuse_stores(path, idx, how):
    if how == "index":
        return [FileStore(path)]
    if how == "gzip-index" and _have_rapidgzip():
        return [GzipStore(path, idx + ".gzidx")]
    if how == "spool":
        spool = idx + ".spool"
        if os.path.exists(spool):
            return [FileStore(spool)]
    return None


def _mapped(archive, store, maps, verify: bool) -> list[DiskAccess]:
    # a spool is vmarc's own cache file, not the user's archive: say which is damaged
    damaged = ("the archive is damaged" if store.path == archive.source.path else
               f"the spool file {store.path} is damaged (delete it: it is built again)")
    return [MappedDisk(d, store, maps[d.id], archive.source.name, verify, damaged)
            for d in archive.disks]


def _have_rapidgzip() -> bool:
    try:
        import rapidgzip  # noqa: F401
        return True
    except ImportError:
        return False


def _try_save(idx, ident, fmt, how, maps, quiet, gzip_store=None, note=None) -> None:
    try:
        save_index(idx, ident, fmt, how, maps, note)
        if gzip_store is not None:  # rapidgzip's checkpoints, beside our index
            gzip_store.export_checkpoints(idx + ".gzidx")
    except OSError as e:
        if not quiet:
            print(f"vmarc: cannot save the index to {idx}: {e.strerror}; it will be built "
                  "again next time", file=sys.stderr)


def _spool(archive, path, idx, ident, quiet, verify) -> Opened:
    """Every disk, one after the other, into one sparse spool file next to the index."""
    spool = idx + ".spool"
    what = archive.compression or f"{archive.format} in this form"
    if not quiet:
        print(f"vmarc: {archive.source.name}: {what} input cannot be read at random; "
              f"spooling its disks once to {spool} (sparse; reused next time)", file=sys.stderr)
    os.makedirs(os.path.dirname(os.path.abspath(spool)), exist_ok=True)
    bases, total = {}, 0
    for d in archive.disks:  # each disk at a 1 MiB-aligned base in the spool
        bases[d.id] = total
        total += -(-d.size // BLOCK) * BLOCK
    checks = Checks(salvage=True)  # damage becomes BAD stretches, as in _scan
    with writing(OutputFile(spool)) as out:
        writer = RawWriter(out, total, hole_size=BLOCK)  # holes of whole MiBs: a short map
        for disk, offset, data in archive.stream(None, checks):
            writer.write(bases[disk.id] + offset, data)
        writer.finish()
        out.commit(sync=False)
    store = FileStore(spool)
    maps = {}
    for d in archive.disks:
        m = DiskMap()
        for start, n, at in _data_map(store.fd, d.size, bases[d.id]).pieces(0, d.size):
            if at is not None:
                m.add(start, n, at)
        m.checks = _spool_checks(store, m)
        maps[d.id] = _with_lost(m, checks, d)
    note = _warn_damage(checks, quiet)
    _try_save(idx, ident, archive.format, "spool", maps, quiet, note=note)
    # the archive was streamed: open it again for its metadata
    fresh = open_archive(path, archive.format)
    archive.close()
    return Opened(fresh, _mapped(fresh, store, maps, verify), [store], "spool")


def _spool_checks(store: FileStore, dmap: DiskMap) -> ChunkChecks:
    """XXH64 of each 1 MiB-aligned stretch of a spool's data, taken just after it was
    written from the checked stream. The spool is a cache file on a disk that can fail:
    when it is reused, its stretches are checked as an archive's chunks are."""
    checks = ChunkChecks()
    for start, length, at in zip(dmap.starts, dmap.lengths, dmap.offsets):
        pos = start
        while pos < start + length:
            stop = min(start + length, (pos // BLOCK + 1) * BLOCK)
            data = store.pread(stop - pos, at + pos - start)
            checks.add(pos, "xxh64", xxh64_text(data), stop - pos)
            pos = stop
    checks.finish()
    checks.checked[:] = b"\1" * len(checks.checked)  # hashed from what was just written
    return checks


def _data_map(fd: int, size: int, base: int = 0) -> DiskMap:
    """SEEK_DATA / SEEK_HOLE over [base, base + size) of a file, as a disk map."""
    m = DiskMap()
    pos = base
    end = base + size
    while pos < end:
        start, stop = next_data(fd, pos)
        if start is None or start >= end:
            break
        stop = min(stop, end)
        m.add(start - base, stop - start, start)
        pos = stop
    return m
