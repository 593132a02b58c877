"""copy-out: files and trees from the guest into a local directory, as `cp -a` would
leave them (modes, mtimes, symlinks as symlinks, holes as holes; owners when run as
root) and never over anything already there.

Everything is created relative to directory file descriptors with O_NOFOLLOW, so a
name from the guest can never lead outside DEST: a name with a slash, `.` or `..` is
refused, and a symlink the copy itself made is never walked through. Each file is
written under a temporary name and linked into place only when complete (link() fails
rather than replace what is there)."""

from __future__ import annotations

import errno
import os
import posixpath
import stat

from ..errors import CorruptError, VmarcError
from ..notices import notice
from .filesystems import DIR, FILE, LINK

STEP = 1 << 20


class CopyOut:
    """Copies entries of one Tree into the directory open as dest_fd; what could not be
    copied is kept in failed as (guest path, reason, damaged)."""

    def __init__(self, tree, dest_fd: int):
        self.tree, self.dest_fd = tree, dest_fd
        self.failed: list[tuple[str, str, bool]] = []
        self.copied = 0
        self.as_root = os.geteuid() == 0

    def copy(self, fs, entry, where: str, dir_fd: int | None = None) -> None:
        dir_fd = self.dest_fd if dir_fd is None else dir_fd
        name = entry.name if where != "/" else "."
        if where != "/" and (not name or "/" in name or name in (".", "..") or "\0" in name):
            self.failed.append((where, f"unsafe name {name!r}: refused", False))
            return
        try:
            if entry.kind == DIR:
                self._directory(fs, entry, where, name, dir_fd)
            elif entry.kind == LINK:
                os.symlink(entry.target or "", name, dir_fd=dir_fd)
                self._times(name, entry, dir_fd)
                self.copied += 1
            elif entry.kind == FILE:
                self._file(entry, where, name, dir_fd)
            else:
                notice(f"{where}: special file ({stat.filemode(entry.mode)[0]}): not copied")
        except CorruptError as e:
            self.failed.append((where, str(e), True))
        except VmarcError as e:
            self.failed.append((where, str(e), False))
        except OSError as e:
            why = "already exists: not replaced" if e.errno == errno.EEXIST else e.strerror
            self.failed.append((where, f"{where}: {why}", False))

    def _directory(self, fs, entry, where: str, name: str, dir_fd: int) -> None:
        if name != ".":
            try:
                os.mkdir(name, 0o700, dir_fd=dir_fd)
            except FileExistsError:
                pass  # an existing directory is filled in, never a symlink followed
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
        try:
            for child in self.tree.children(fs, entry, where):
                here = posixpath.join(where, child.name)
                inner = self.tree.at(here) or fs
                self.copy(inner, child, here, fd)
            self._owner_mode(fd, entry)
            os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
        finally:
            os.close(fd)
        self.copied += 1

    def _file(self, entry, where: str, name: str, dir_fd: int) -> None:
        temp = f".{name[:200]}.vmarc-partial-{os.getpid()}"
        fd = os.open(
            temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd
        )
        try:
            try:
                self._contents(entry, where, fd)
                self._owner_mode(fd, entry)
                os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
            finally:
                os.close(fd)
            os.link(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        finally:
            os.unlink(temp, dir_fd=dir_fd)
        self.copied += 1

    def _contents(self, entry, where: str, fd: int) -> None:
        """The file's bytes; its holes left unwritten, so they stay holes."""
        pos = 0
        with self.tree.opener(entry, where) as f:
            for start, end in _data_ranges(f.holes(), entry.size):
                f.seek(start)
                pos = start
                while pos < end:
                    data = f.read(min(STEP, end - pos))
                    if not data:
                        raise CorruptError(f"{where}: ends at {pos} of {entry.size} bytes")
                    os.pwrite(fd, data, pos)
                    pos += len(data)
        os.ftruncate(fd, entry.size)

    def _owner_mode(self, fd: int, entry) -> None:
        if self.as_root:
            os.fchown(fd, entry.uid, entry.gid)
        os.fchmod(fd, stat.S_IMODE(entry.mode) & (0o7777 if self.as_root else 0o777))

    def _times(self, name: str, entry, dir_fd: int) -> None:
        if self.as_root:
            os.chown(name, entry.uid, entry.gid, dir_fd=dir_fd, follow_symlinks=False)
        os.utime(name, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=dir_fd, follow_symlinks=False)


def _data_ranges(holes: list[tuple[int, int]], size: int):
    """[start, end) of what is not a hole."""
    pos = 0
    for start, length in sorted(holes):
        if start > pos:
            yield pos, min(start, size)
        pos = max(pos, start + length)
    if pos < size:
        yield pos, size
