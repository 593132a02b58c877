"""`mount --files`: the guest's file systems as read-only directory trees through FUSE
(mfusepy, as serve/fuse.py loads it): one top-level directory per readable volume
(vg0/root nests as vg0/root), plus root/, the inspected guest tree, when inspection
finds one. The parsers are not thread-safe: every call runs under one lock."""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections import OrderedDict

from ..errors import SourceError, VmarcError
from ..files.filesystems import DIR, LINK
from ..files.guest import NotFound, Tree
from ..notices import error

LOOKUPS_KEPT = 65536  # path -> entry, so cp -a does not walk each directory per file


def mount_files(mfusepy, guest, mountpoint: str, st: os.stat_result, options: dict) -> None:
    trees: dict[str, Tree] = {}
    for v in guest.readable():
        try:
            trees[v.name] = Tree({"/": guest.filesystem(v)})
        except VmarcError as e:
            error(f"{v.name}: not shown: {e}", "vmarc mount")
    inspected = guest.inspect()
    if inspected is not None and "root" not in trees:
        trees["root"] = inspected
    if not trees:
        raise SourceError("no file system vmarc can read on this VM's disks")
    ops = _operations(mfusepy, trees, st)
    opts = dict({"ro": True, "fsname": "vmarc", "subtype": "vmarc"}, **options)
    try:
        mfusepy.FUSE(ops, mountpoint, foreground=True, nothreads=False, **opts)
    except RuntimeError as e:
        raise SourceError(f"{mountpoint}: FUSE mount failed ({e})") from None


def _operations(mfusepy, trees: dict[str, Tree], st):
    lock = threading.Lock()
    found: OrderedDict[str, tuple] = OrderedDict()
    handles: dict[int, object] = {}
    # directories that only hold volumes: "/" and "/vg0" for vg0/root
    virtual = {"/": set()}
    for name in trees:
        parts = name.split("/")
        for i in range(len(parts)):
            parent = "/" + "/".join(parts[:i]) if i else "/"
            virtual.setdefault(parent.rstrip("/") or "/", set()).add(parts[i])

    def fail(e):
        if isinstance(e, NotFound):
            return mfusepy.FuseOSError(errno.ENOENT)
        error(str(e), "vmarc mount")
        return mfusepy.FuseOSError(errno.EIO)

    def locate(path: str):
        """(tree, fs, entry, path inside the tree) of a mount path under a volume."""
        hit = found.get(path)
        if hit is not None:
            found.move_to_end(path)
            return hit
        for name, tree in trees.items():
            top = "/" + name
            if path == top or path.startswith(top + "/"):
                inner = path[len(top) :] or "/"
                fs, entry, where = tree.lookup(inner, follow=False)
                hit = (tree, fs, entry, where)
                break
        else:
            raise NotFound(path)
        remember(path, hit)
        return hit

    def remember(path, hit):
        found[path] = hit
        if len(found) > LOOKUPS_KEPT:
            found.popitem(last=False)

    def attrs(entry) -> dict:
        t = entry.mtime_ns
        return {
            # read-only, whatever the guest says (a symlink's mode means nothing)
            "st_mode": entry.mode if entry.kind == LINK else entry.mode & ~0o222,
            "st_nlink": 2 if entry.kind == DIR else 1,
            "st_size": entry.size,
            "st_uid": entry.uid,
            "st_gid": entry.gid,
            "st_atime": t,
            "st_mtime": t,
            "st_ctime": t,
            "st_blocks": -(-entry.size // 512),
        }

    class Ops(mfusepy.Operations):
        use_ns = True

        def getattr(self, path, fh=None):
            if path in virtual:
                return {
                    "st_mode": stat.S_IFDIR | 0o555,
                    "st_nlink": 2,
                    "st_uid": st.st_uid,
                    "st_gid": st.st_gid,
                    "st_mtime": st.st_mtime_ns,
                    "st_atime": st.st_mtime_ns,
                    "st_ctime": st.st_mtime_ns,
                }
            with lock:
                try:
                    return attrs(locate(path)[2])
                except VmarcError as e:
                    raise fail(e) from None

        def readdir(self, path, fh):
            if path in virtual:
                return [".", "..", *sorted(virtual[path])]
            with lock:
                try:
                    tree, fs, entry, where = locate(path)
                    if entry.kind != DIR:
                        raise mfusepy.FuseOSError(errno.ENOTDIR)
                    names = []
                    for child in tree.children(fs, entry, where):
                        here = os.path.join(where, child.name)
                        inner = tree.at(here) or fs
                        remember(os.path.join(path, child.name), (tree, inner, child, here))
                        names.append(child.name)
                    return [".", "..", *names]
                except VmarcError as e:
                    raise fail(e) from None

        def readlink(self, path):
            with lock:
                try:
                    entry = locate(path)[2]
                except VmarcError as e:
                    raise fail(e) from None
            if entry.kind != LINK:
                raise mfusepy.FuseOSError(errno.EINVAL)
            return entry.target or ""

        def open(self, path, flags):
            if flags & (os.O_WRONLY | os.O_RDWR):
                raise mfusepy.FuseOSError(errno.EROFS)
            with lock:
                try:
                    tree, _, entry, where = locate(path)
                    if entry.kind == DIR:
                        raise mfusepy.FuseOSError(errno.EISDIR)
                    reader = tree.opener(entry, where)
                except VmarcError as e:
                    raise fail(e) from None
                fh = max(handles, default=0) + 1
                handles[fh] = reader
                return fh

        def read(self, path, size, offset, fh):
            with lock:
                reader = handles.get(fh)
                if reader is None:
                    raise mfusepy.FuseOSError(errno.EBADF)
                try:
                    reader.seek(offset)
                    return reader.read(size)
                except VmarcError as e:
                    raise fail(e) from None

        def release(self, path, fh):
            with lock:
                handles.pop(fh, None)
            return 0

        def statfs(self, path):
            return {"f_bsize": 4096, "f_frsize": 4096, "f_namemax": 255}

    return Ops()
