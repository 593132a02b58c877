"""vmarc ls: a directory inside the guest (virt-ls): names, or with -l type, mode,
owner, size, mtime and symlink targets; -R walks the tree, across mount points."""

from __future__ import annotations

import posixpath
import stat
import sys
import time

from .common import add_guest_args, open_guest, print_json


def add_parser(sub):
    p = sub.add_parser("ls", help="list a directory inside the guest")
    add_guest_args(p)
    p.add_argument("path", nargs="?", default="/", help="directory or file (default: /)")
    p.add_argument("-l", "--long", action="store_true", help="mode, owner, size, mtime, target")
    p.add_argument("-R", "--recursive", action="store_true", help="the whole tree below, as paths")
    p.add_argument("--output", choices=["human", "json"], default="human")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..files.filesystems import DIR

    with open_guest(args) as guest:
        tree, path = guest.split(args.path, args.fs, args.subvol)
        fs, entry, where = tree.lookup(path)
        if entry.kind != DIR:
            fs, entry, where = tree.lookup(path, follow=False)
            listing = [(where, entry)]
        else:
            listing = _walk(tree, fs, entry, where, args.recursive)
        if args.output == "json":
            entries = [_as_dict(p, e) for p, e in listing]
            print_json("ls", {"path": where, "entries": entries})
            return 0
        out = sys.stdout
        full = args.recursive or entry.kind != DIR
        for p, e in listing:
            name = p if full else e.name
            out.write(_long(name, e) if args.long else name + "\n")
    return 0


def _walk(tree, fs, entry, where: str, recursive: bool):
    """(guest path, entry) of a directory's entries; with recursive, depth first."""
    from ..files.filesystems import DIR

    for child in sorted(tree.children(fs, entry, where), key=lambda c: c.name):
        here = posixpath.join(where, child.name)
        yield here, child
        if recursive and child.kind == DIR:
            inner = tree.at(here)
            yield from _walk(tree, inner or fs, child, here, True)


def _long(name: str, e) -> str:
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(e.mtime_ns / 1e9))
    target = f" -> {e.target}" if e.target is not None else ""
    return f"{stat.filemode(e.mode)} {e.uid:>5} {e.gid:>5} {e.size:>12} {when} {name}{target}\n"


def _as_dict(path: str, e) -> dict:
    return {
        "path": path,
        "name": e.name,
        "type": e.kind,
        "size": e.size,
        "mode": stat.S_IMODE(e.mode),
        "uid": e.uid,
        "gid": e.gid,
        "mtime_ns": e.mtime_ns,
        "target": e.target,
    }
