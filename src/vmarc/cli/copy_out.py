"""vmarc copy-out: files or whole trees from inside the guest into a local directory
(virt-copy-out); files/copy.py does the copying."""

from __future__ import annotations

import os
import sys

from ..errors import UsageError
from .common import add_guest_args, open_guest


def add_parser(sub):
    p = sub.add_parser(
        "copy-out",
        help="copy files or directories from inside the guest into a local directory",
    )
    add_guest_args(p)
    p.add_argument("paths", nargs="+", metavar="PATH", help="guest paths (or VOL:/path), then DEST")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..files.copy import CopyOut
    from ..files.guest import NotFound

    if len(args.paths) < 2:
        raise UsageError("copy-out needs at least one guest PATH and a DEST directory")
    *paths, dest = args.paths
    try:
        dest_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise UsageError(f"{dest}: not a directory to copy into ({e.strerror})") from None
    failed, damaged, copied = [], False, 0
    try:
        with open_guest(args) as guest:
            for spec in paths:
                tree, path = guest.split(spec, args.fs, args.subvol)
                try:
                    fs, entry, where = tree.lookup(path, follow=False)
                except NotFound as e:
                    failed.append(str(e))
                    continue
                job = CopyOut(tree, dest_fd)
                job.copy(fs, entry, where)
                copied += job.copied
                failed += [reason for _, reason, _ in job.failed]
                damaged = damaged or any(bad for _, _, bad in job.failed)
    finally:
        os.close(dest_fd)
    if failed:
        print(f"vmarc: copied {copied}; could not copy {len(failed)}:", file=sys.stderr)
        for reason in failed:
            print(f"vmarc:   {reason}", file=sys.stderr)
        return 2 if damaged else 1
    return 0
