"""Random access to the disks of any archive or image, without extracting them.

`open_disks()` gives one DiskView (model.py) per disk. How it gets there depends on what
the format declares (Archive.access) and what the source allows:

- plain XVA/VMA (SCAN): an index (each disk's extent map into the archive) built by one
  scan that reads headers only and seeks over data; saved in a cache directory (or at
  --index) keyed by the archive's identity and reused on the next open (index.py);
- gzip XVA/VMA: the same index over the decompressed bytes, read through rapidgzip's
  seek checkpoints (stores.py; its own index is saved beside ours);
- raw, qcow2, VHD files (RANDOM): their own tables (views.ImageView, no index);
- anything else that cannot seek (zstd, lzop, gzip without rapidgzip, a compressed
  image): each disk is spooled once to a sparse file in the cache, and vmarc says so.
"""

from __future__ import annotations

import os
import stat

from ..errors import SourceError, UsageError
from ..formats import name_of, open_archive, reader_for
from ..formats.raw import RawWriter
from ..io.hashing import xxh64_text
from ..io.output import OutputFile, writing
from ..io.remote import is_url
from ..io.source import BLOCK, next_data
from ..model import DATA, RANDOM, SCAN, Checks, Disk, DiskView
from ..notices import notice, warn
from .chunks import ChunkChecks
from .index import identity, index_path, load_index, save_index
from .maps import BAD, DiskMap, merged_ranges, overlaps
from .stores import FileStore, GzipStore, open_store
from .views import ImageView, MappedDisk


class Opened:
    """The disks of one source, ready for random reads; plus its metadata."""

    def __init__(self, archive, disks: list[DiskView], stores: list, how: str):
        self.archive = archive  # the opened Archive (metadata: vm, configs, disks)
        self.disks = disks
        self.how = how  # "index", "index (reused)", "tables", "spool"...
        self._stores = stores

    def select(self, selector: str | None) -> DiskView:
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


def open_disks(
    path: str,
    fmt: str | None = None,
    *,
    index: str | None = None,
    parent: str | None = None,
    no_backing: bool = False,
    quiet: bool = False,
    verify: bool = True,
) -> Opened:
    """Open a file for random reads of its disks (see the module docstring)."""
    if path in ("-", None):
        raise UsageError("random access needs a file, not a pipe")
    if not is_url(path):  # (a URL is read in place by range requests)
        try:
            mode = os.stat(path).st_mode
        except OSError as e:
            raise SourceError(f"{path}: cannot open: {e.strerror}") from None
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode) or stat.S_ISDIR(mode)):
            # a FIFO would block, then not seek (a directory: Xen Orchestra's VHD directory)
            raise UsageError(f"{path}: random access needs a regular file or a block device")
    archive = open_archive(path, fmt, parent=parent, no_backing=no_backing)
    try:
        return _open_disks(archive, path, index, quiet, verify)
    except BaseException:
        archive.close()
        raise


def _open_disks(archive, path: str, index: str | None, quiet: bool, verify: bool) -> Opened:
    fmt = archive.format
    comp = archive.compression
    if comp is None and fmt == "raw":
        store = open_store(path)
        maps = {archive.disks[0].id: _data_map(store.fd, archive.disks[0].size)}
        return Opened(archive, _mapped(archive, store, maps, verify), [store], "file")
    if comp is None and archive.access == RANDOM and archive.source.seekable:
        return Opened(archive, [ImageView(d, archive) for d in archive.disks], [], "tables")
    images = archive.disk_images()
    if images is not None:  # each disk an image of its own, read through its tables
        return Opened(archive, [ImageView(d, images[d.id]) for d in archive.disks], [], "tables")

    ident = identity(path, archive.source.remote)
    idx = index_path(ident, index)
    gz = comp == "gzip" and archive.access == SCAN and _have_rapidgzip()
    found = load_index(idx, ident)
    if found and found[0] == fmt and {d.id for d in archive.disks} <= set(found[2]):
        _, how, maps, note = found
        stores = _reuse_stores(path, idx, how)
        if stores is not None:
            if note and not quiet:
                warn(note)
            return Opened(
                archive, _mapped(archive, stores[0], maps, verify), stores, how + " (reused)"
            )

    if comp is None and archive.access == SCAN:
        store = open_store(path)
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


def scan_maps(archive, checks: Checks) -> dict[str, DiskMap]:
    """Each disk's map (not finished) from the archive's header scan (access SCAN), with
    its chunk checksums; problems go to checks."""
    maps = {d.id: DiskMap() for d in archive.disks}
    for disk, start, n, at, checksum in archive.scan(checks):
        m = maps.get(disk.id)
        if m is None:
            continue
        m.add(start, n, at)
        if checksum is not None:
            if m.checks is None:
                m.checks = ChunkChecks()
            m.checks.add(start, *checksum)
    return maps


def _scan(scan_archive, quiet: bool) -> tuple[dict[str, DiskMap], str | None]:
    """Every disk's map from one header scan. Damage does not stop it (as --salvage):
    what the archive lost becomes BAD stretches, so every other byte stays readable."""
    checks = Checks(salvage=True)
    maps = scan_maps(scan_archive, checks)
    note = _warn_damage(checks, quiet)
    return {d.id: _with_lost(maps[d.id], checks, d) for d in scan_archive.disks}, note


def _with_lost(m: DiskMap, checks: Checks, disk: Disk) -> DiskMap:
    """The map with the disk's damaged stretches (checks.damage) as BAD runs in place
    of whatever was stored there."""
    bad = merged_ranges(
        [(d.offset, d.length) for d in checks.damage if d.length and d.disk.id == disk.id]
    )
    if not bad:
        return m.finish()
    runs = [r for r in zip(m.starts, m.lengths, m.offsets) if not overlaps(bad, r[0], r[1])]
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
        warn(note)
    return note


def _reuse_stores(path, idx, how):
    if how == "index":
        return [open_store(path)]
    if how == "gzip-index" and _have_rapidgzip():
        return [GzipStore(path, idx + ".gzidx")]
    if how == "spool":
        spool = idx + ".spool"
        if os.path.exists(spool):
            return [FileStore(spool)]
    return None


def _mapped(archive, store, maps, verify: bool) -> list[DiskView]:
    # a spool is vmarc's own cache file, not the user's archive: say which is damaged
    damaged = (
        "the archive is damaged"
        if store.path in (archive.source.path, archive.source.name)
        else f"the spool file {store.path} is damaged (delete it: it is built again)"
    )
    return [
        MappedDisk(d, store, maps[d.id], archive.source.name, verify, damaged)
        for d in archive.disks
    ]


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
            notice(
                f"cannot save the index to {idx}: {e.strerror}; it will be built again next time"
            )


def _spool(archive, path, idx, ident, quiet, verify) -> Opened:
    """Every disk, one after the other, into one sparse spool file next to the index."""
    spool = idx + ".spool"
    what = archive.compression or f"{archive.format} in this form"
    if not quiet:
        notice(
            f"{archive.source.name}: {what} input cannot be read at random; "
            f"spooling its disks once to {spool} (sparse; reused next time)"
        )
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
        for e in _data_map(store.fd, d.size, bases[d.id]).extents(0, d.size):
            if e.kind == DATA:
                m.add(e.start, e.length, e.at)
        m.checks = _spool_checks(store, m)
        maps[d.id] = _with_lost(m, checks, d)
    note = _warn_damage(checks, quiet)
    _try_save(idx, ident, archive.format, "spool", maps, quiet, note=note)
    # the archive was streamed: open it again for its metadata
    fresh = open_archive(path, name_of(archive))  # a VHD in a tar is not a plain VHD
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
