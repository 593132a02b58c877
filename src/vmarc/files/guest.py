"""Which file system a path is on, as `guestfish -i` decides it.

`--fs VOL` or a path written `VOL:/path` names the volume. Otherwise one readable file
system is used as it is; with several, the guest is inspected: the root is the one file
system holding /etc/fstab (Linux) or /Windows/System32, the others are placed at their
/etc/fstab mount points (by UUID=, LABEL=, PARTUUID-free device names, /dev/VG/LV or
/dev/mapper/VG-LV), and paths are resolved across that tree, through symlinks.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator

from ..errors import UsageError, VmarcError
from ..notices import notice, warn
from .filesystems import DIR, LINK, Entry, FileSystem, FileSystemError, open_filesystem
from .volumes import Volume, find_volumes

MAX_LINKS = 40  # as Linux's path walk
CASE_BLIND = {"ntfs", "vfat", "exfat"}


class NotFound(VmarcError):
    """A path that is not there, or that goes through a file (exit 1)."""


class Guest:
    """The volumes of an opened source (access.Opened) and their file systems, opened
    the first time they are needed."""

    def __init__(self, opened):
        self.opened = opened
        self.volumes = find_volumes(opened.archive, opened.disks)
        self._filesystems: dict[tuple[str, str | None], FileSystem] = {}
        self._inspected: Tree | None = None

    def volume(self, name: str) -> Volume:
        for v in self.volumes:
            if v.name == name:
                return v
        known = ", ".join(v.name for v in self.volumes) or "none"
        raise UsageError(f"no volume {name} (volumes: {known})")

    def filesystem(self, volume: Volume, subvolume: str | None = None) -> FileSystem:
        key = (volume.name, subvolume)
        fs = self._filesystems.get(key)
        if fs is None:
            fs = open_filesystem(volume)
            if subvolume:
                if volume.fstype != "btrfs":
                    raise UsageError(f"{volume.name}: {volume.fstype} has no subvolumes")
                fs.use_subvolume(subvolume)
            if fs.dirty and not any(k[0] == volume.name for k in self._filesystems):
                warn(f"{volume.name}: read as it is on disk; {fs.dirty}")
            self._filesystems[key] = fs
        return fs

    def readable(self) -> list[Volume]:
        return [v for v in self.volumes if v.readable]

    def tree(self, fs: str | None = None, subvol: str | None = None) -> Tree:
        """The tree paths are resolved in: one volume's (--fs, a btrfs subvolume of it
        with subvol), the only file system's, or the inspected guest's."""
        if subvol and not fs:
            raise UsageError("--subvol needs --fs: the volume the subvolume is on")
        if fs:
            return Tree({"/": self.filesystem(self.volume(fs), subvol)})
        readable = self.readable()
        if len(readable) == 1:
            return Tree({"/": self.filesystem(readable[0])})
        if not readable:
            raise UsageError("no file system vmarc can read on this VM's disks" + self._others())
        return self._inspect(readable)

    def inspect(self) -> Tree | None:
        """The guest's own tree when inspection finds its root, else None (quietly)."""
        try:
            return self._inspect(self.readable())
        except VmarcError:
            return None

    def boot_check(self) -> tuple[bool, str]:
        """Whether the guest would find what it boots from (verify -r --deep): one root
        file system; Linux: every /etc/fstab file system on the disks; Windows: the
        registry's SYSTEM hive. (ok, what was found or what is missing)."""
        readable = self.readable()
        if not readable:
            return False, "no readable file system" + self._others()
        roots = [(v, f, k) for v in readable if (k := _root_kind(f := self.filesystem(v)))]
        if len(roots) != 1:
            return False, ("no" if not roots else "more than one") + " guest root file system"
        vol, fs, kind = roots[0]
        if kind == "windows":
            try:
                Tree({"/": fs}).lookup("/Windows/System32/config/SYSTEM")
            except NotFound:
                return False, f"Windows on {vol.name}, but no /Windows/System32/config/SYSTEM"
            return True, f"Windows on {vol.name}"
        entries = list(_fstab(fs))
        missing = [f"{spec} ({mp})" for spec, mp, _ in entries if self._device(spec) is None]
        if missing:
            return (
                False,
                f"Linux root on {vol.name}; /etc/fstab names {', '.join(missing)}, not on the disks",
            )
        others = (
            f"the {len(entries)} other file systems /etc/fstab mounts are there"
            if entries
            else "/etc/fstab mounts nothing else"
        )
        return True, f"Linux root on {vol.name}; {others}"

    def split(self, spec: str, fs: str | None = None, subvol: str | None = None):
        """`xvda1:/etc/fstab` -> that volume's tree and /etc/fstab; else (tree(fs), spec)."""
        name, sep, path = spec.partition(":")
        if sep and not fs and any(v.name == name for v in self.volumes):
            return self.tree(name, subvol), path or "/"
        return self.tree(fs, subvol), spec

    def _others(self) -> str:
        named = [f"{v.name} ({v.fstype or v.note})" for v in self.volumes if v.note]
        return f"; volumes: {', '.join(named)}" if named else ""

    def _inspect(self, readable: list[Volume]) -> Tree:
        if self._inspected is not None:
            return self._inspected
        roots = []
        for v in readable:
            fs = self.filesystem(v)
            found = _root_kind(fs)
            if found:
                roots.append((v, fs, found))
        names = ", ".join(v.name for v in readable)
        if len(roots) != 1:
            why = "no" if not roots else "more than one"
            raise UsageError(
                f"{why} guest root file system among {names}: name one with --fs VOL or VOL:/path"
            )
        vol, fs, kind = roots[0]
        mounts = {"/": fs}
        if kind == "linux":
            for spec, mountpoint, options in _fstab(fs):
                found = self._device(spec)
                if found is None:
                    notice(f"/etc/fstab: {spec} ({mountpoint}) is not on this VM's disks")
                    continue
                if found is vol and "/" in mounts:
                    continue
                subvol = next(
                    (o.split("=", 1)[1] for o in options if o.startswith("subvol=")), None
                )
                try:
                    mounts[posixpath.normpath(mountpoint)] = self.filesystem(found, subvol)
                except VmarcError as e:
                    warn(f"/etc/fstab: {mountpoint} not placed: {e}")
        self._inspected = Tree(mounts)
        return self._inspected

    def _device(self, spec: str) -> Volume | None:
        """The volume an /etc/fstab device names."""
        key, _, value = spec.partition("=")
        if key in ("UUID", "LABEL") and value:
            value = value.strip('"')
            attr = "uuid" if key == "UUID" else "label"
            for v in self.readable():
                mine = v.uuid if attr == "uuid" else v.label
                if mine and mine.lower() == value.lower():
                    return v
            return None
        for prefix, attr in (("/dev/disk/by-uuid/", "uuid"), ("/dev/disk/by-label/", "label")):
            if spec.startswith(prefix):
                return self._device(f"{attr.upper()}={spec[len(prefix) :]}")
        if spec.startswith("/dev/mapper/"):
            vg_lv = spec[len("/dev/mapper/") :].replace("--", "\0").split("-", 1)
            if len(vg_lv) == 2:
                spec = "/dev/" + "/".join(p.replace("\0", "-") for p in vg_lv)
        if spec.startswith("/dev/"):
            name = spec[len("/dev/") :]
            for v in self.readable():
                if v.name == name:
                    return v
        return None


def _root_kind(fs: FileSystem) -> str | None:
    tree = Tree({"/": fs})
    for path, kind in (("/etc/fstab", "linux"), ("/Windows/System32", "windows")):
        try:
            tree.lookup(path)
            return kind
        except NotFound:
            pass
    return None


def _fstab(fs: FileSystem) -> Iterator[tuple[str, str, list[str]]]:
    tree = Tree({"/": fs})
    try:
        _, entry, _ = tree.lookup("/etc/fstab")
        text = tree.read(entry, "/etc/fstab").decode("utf-8", "replace")
    except NotFound:
        return
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 3 or not fields[1].startswith("/") or fields[1] == "/":
            continue
        if fields[2] in ("swap", "proc", "sysfs", "tmpfs", "devpts", "none", "nfs", "cifs"):
            continue
        options = fields[3].split(",") if len(fields) > 3 else []
        if "bind" in options:
            continue
        yield fields[0], fields[1].replace("\\040", " "), options


class Tree:
    """File systems placed at mount points ("/" at least), walked as one tree."""

    def __init__(self, mounts: dict[str, FileSystem]):
        self.mounts = mounts

    def at(self, path: str) -> FileSystem | None:
        return self.mounts.get(path)

    def volume_of(self, path: str) -> str:
        """The volume a (resolved) guest path lies on, for messages."""
        best = max((m for m in self.mounts if _under(path, m)), key=len)
        return self.mounts[best].volume.name

    def lookup(self, path: str, follow: bool = True) -> tuple[FileSystem, Entry, str]:
        """(file system, entry, resolved guest path) of an absolute path; symlinks on the
        way are followed, the last one only with follow. NotFound when not there."""
        if not path.startswith("/"):
            path = "/" + path
        fs = self.mounts["/"]
        entry, where = fs.root(), "/"
        todo = [p for p in path.split("/") if p]
        hops = 0
        while todo:
            part = todo.pop(0)
            if part == ".":
                continue
            if part == "..":
                where = posixpath.dirname(where)
                fs, entry = self._walk_to(where)
                continue
            if entry.kind != DIR:
                raise NotFound(f"{path}: {where} is not a directory")
            child = self.child(fs, entry, part, where)
            if child is None:
                raise NotFound(f"{path}: no such file or directory")
            here = posixpath.join(where, child.name)
            if child.kind == LINK and (todo or follow):
                hops += 1
                if hops > MAX_LINKS:
                    raise NotFound(f"{path}: too many levels of symbolic links")
                target = child.target or ""
                base = "/" if target.startswith("/") else where
                todo = [p for p in posixpath.join(base, target).split("/") if p] + todo
                fs, entry, where = self.mounts["/"], self.mounts["/"].root(), "/"
                continue
            mounted = self.mounts.get(here)
            if mounted is not None:
                fs, entry = mounted, mounted.root()
            else:
                entry = child
            where = here
        return fs, entry, where

    def _walk_to(self, where: str) -> tuple[FileSystem, Entry]:
        fs, entry, _ = self.lookup(where)
        return fs, entry

    def child(self, fs: FileSystem, entry: Entry, name: str, where: str) -> Entry | None:
        blind = fs.volume.fstype in CASE_BLIND
        for c in self.children(fs, entry, where):
            if c.name == name or (blind and c.name.lower() == name.lower()):
                return c
        return None

    def children(self, fs: FileSystem, entry: Entry, where: str) -> Iterator[Entry]:
        """A directory's entries, a mount point showing the root of what is mounted."""
        try:
            for c in entry.children():
                here = posixpath.join(where, c.name)
                mounted = self.mounts.get(here) if self.mounts.keys() != {"/"} else None
                if mounted is not None:
                    root = mounted.root()
                    root.name = c.name
                    yield root
                else:
                    yield c
        except VmarcError as e:
            raise _located(e, fs, where) from None
        except Exception as e:
            raise FileSystemError(f"{fs.volume.name}:{where}: directory unreadable: {e}") from None

    def read(self, entry: Entry, where: str) -> bytes:
        with self.opener(entry, where) as f:
            return f.read()

    def opener(self, entry: Entry, where: str):
        return _Reading(self, entry, where)


class _Reading:
    """A file's contents, with the source's and the parser's errors naming the volume and
    the path (exit 2)."""

    def __init__(self, tree: Tree, entry: Entry, where: str):
        self.tree, self.entry, self.where = tree, entry, where
        self.volume = tree.volume_of(where)
        self.fh = self._call(entry.open)

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except VmarcError as e:
            raise _located(e, self.volume, self.where) from None
        except Exception as e:  # whatever a parser raises on a broken structure
            raise FileSystemError(f"{self.volume}:{self.where}: unreadable: {e}") from None

    def read(self, n: int = -1) -> bytes:
        return self._call(self.fh.read, n)

    def holes(self) -> list[tuple[int, int]]:
        return self._call(self.entry.holes)

    def seek(self, pos: int) -> None:
        self._call(self.fh.seek, pos)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def _located(e: VmarcError, where_fs, path: str) -> VmarcError:
    """The same error, its message prefixed with volume:path."""
    volume = where_fs if isinstance(where_fs, str) else where_fs.volume.name
    located = type(e)(f"{volume}:{path}: {e}")
    located.__dict__.update(e.__dict__)
    return located


def _under(path: str, mount: str) -> bool:
    return mount == "/" or path == mount or path.startswith(mount + "/")
