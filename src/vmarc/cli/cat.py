"""vmarc cat: one file from inside the guest to stdout (virt-cat)."""

from __future__ import annotations

import sys

from .common import add_guest_args, open_guest

STEP = 1 << 20


def add_parser(sub):
    p = sub.add_parser("cat", help="write a file from inside the guest to stdout")
    add_guest_args(p)
    p.add_argument("path", help="absolute path in the guest, or VOL:/path")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..files.filesystems import DIR
    from ..files.guest import NotFound

    with open_guest(args) as guest:
        tree, path = guest.split(args.path, args.fs, args.subvol)
        _, entry, where = tree.lookup(path)
        if entry.kind == DIR:
            raise NotFound(f"{args.path}: is a directory")
        out = sys.stdout.buffer
        with tree.opener(entry, where) as f:
            while True:
                data = f.read(STEP)
                if not data:
                    break
                out.write(data)
        out.flush()
    return 0
