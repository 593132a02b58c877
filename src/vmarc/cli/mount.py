"""vmarc mount: an archive's disks, their partitions and its configs as read-only files
through FUSE (serve/fuse.py); here only the arguments, the checks on the mount point,
and the background process with its log."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from ..access import cache_dir, open_disks
from ..errors import SourceError, UsageError
from ..serve import fuse
from ..serve.exports import Exports
from .common import add_random_access_args, add_verify_arg, layers

# libfuse 3.14's fuse_main() prints this on every mount (a bug of that release)
LIBFUSE_NOISE = "Ignoring invalid max threads value"


def add_parser(sub):
    p = sub.add_parser(
        "mount",
        help="mount the disks (and their partitions) read-only "
        "with FUSE; unmount with fusermount3 -u",
    )
    add_random_access_args(p)
    p.add_argument("mountpoint")
    p.add_argument(
        "-F",
        "--foreground",
        action="store_true",
        help="stay in the foreground until unmounted (default: background)",
    )
    p.add_argument(
        "--kernel-cache",
        action="store_true",
        help="let the kernel cache what was read: repeated reads of the same "
        "places get faster, a first read slower, and shared mmap() works "
        "(default: direct I/O)",
    )
    p.add_argument(
        "-o", dest="options", default="", help="extra FUSE mount options, e.g. allow_other"
    )
    p.add_argument(
        "--files",
        action="store_true",
        help="show the guest's file systems as directory trees (one per volume, and "
        "root/, the guest's own tree) instead of the disks as files",
    )
    add_verify_arg(p, "each XVA chunk's checksum the first time a read touches it")
    p.set_defaults(run=run)


def run(args) -> int:
    if not os.path.isdir(args.mountpoint):
        raise UsageError(f"{args.mountpoint}: not a directory")
    if os.path.ismount(args.mountpoint):
        raise UsageError(
            f"{args.mountpoint}: already a mount point (a vmarc mount? "
            f"fusermount3 -u {args.mountpoint})"
        )
    try:
        if os.listdir(args.mountpoint):
            raise UsageError(
                f"{args.mountpoint}: not empty; mount on an empty directory "
                "(a mount would hide what is there)"
            )
    except OSError as e:
        raise UsageError(f"{args.mountpoint}: cannot read: {e.strerror}") from None
    if not args.foreground:
        return _background(args)
    lib = fuse.load()
    # kernel_cache: the archive does not change under a read-only mount, so the kernel
    # may keep what it read (a second read of the same place costs no Python call).
    # direct_io: reads go straight into the reader's buffer, no copy into fresh
    # page-cache pages, which cost more than the read itself (a file read once, or a
    # loop device or file system above that keeps its own cache).
    opts = {"kernel_cache": True} if args.kernel_cache else {"direct_io": True}
    for o in filter(None, args.options.split(",")):
        key, _, value = o.partition("=")
        opts[key] = value or True
    with open_disks(
        args.source, args.fmt, index=args.index, **layers(args), verify=args.verify
    ) as opened:
        if args.files:
            from ..files.guest import Guest
            from ..serve.guestfs import mount_files

            mount_files(lib, Guest(opened), args.mountpoint, os.stat(args.source), opts)
        else:
            fuse.mount(lib, Exports(opened), args.mountpoint, os.stat(args.source), opts)
    return 0


def _background(args) -> int:
    """Run the mount in a detached child (`-F`) and return once it is mounted. A child
    process, not a fork: decompressor and index threads do not survive fork(). The
    child's messages (damaged chunks with their offsets, spool notices) go to a log file
    in the cache directory, named when the mount is up."""
    argv = [sys.executable, "-m", "vmarc", "mount", "-F", args.source, args.mountpoint]
    if args.kernel_cache:
        argv.append("--kernel-cache")
    if args.files:
        argv.append("--files")
    if not args.verify:
        argv.append("--no-verify")
    if args.no_backing:
        argv.append("--no-backing")
    for opt, value in (
        ("-f", args.fmt),
        ("--index", args.index),
        ("--parent", args.parent),
        ("--key-file", args.key_file and os.path.abspath(args.key_file)),
        ("-o", args.options or None),
    ):
        if value:
            argv += [opt, value]
    log = _log_path(args.mountpoint)
    try:
        os.makedirs(os.path.dirname(log), exist_ok=True)
        logf = open(log, "w+b")
    except OSError as e:
        raise SourceError(f"{log}: cannot create the mount's log: {e.strerror}") from None
    with logf:
        child = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=logf,
            start_new_session=True,
        )
        while True:
            mounted = os.path.ismount(args.mountpoint)
            rc = None if mounted else child.poll()
            if mounted or rc is not None:
                break
            time.sleep(0.05)
        logf.seek(0)
        said = "".join(
            line
            for line in logf.read().decode(errors="replace").splitlines(keepends=True)
            if not line.startswith(LIBFUSE_NOISE)
        )
    if mounted:
        sys.stderr.write(said)  # what came before the mount: warnings, the spool notice
        print(
            f"vmarc: mounted {args.source} on {args.mountpoint}; its messages go to {log}",
            file=sys.stderr,
        )
        return 0
    os.unlink(log)
    ours = [line for line in said.splitlines() if line.startswith("vmarc")]
    libfuse = "; ".join(
        line.strip() for line in said.splitlines() if line.strip() and not line.startswith("vmarc")
    )
    if not ours:  # libfuse refused during INIT, with no word from vmarc
        ours = [
            f"vmarc: {args.mountpoint}: FUSE mount failed (exit {rc})"
            + ("" if libfuse else "; run with -F to see libfuse's reason")
        ]
    if libfuse:
        ours[-1] += f" [libfuse: {libfuse}]"
    print("\n".join(ours), file=sys.stderr)
    return rc or 1


def _log_path(mountpoint: str) -> str:
    stem = (
        "".join(
            c if c.isalnum() or c in "._-" else "-" for c in os.path.realpath(mountpoint).strip("/")
        )
        or "root"
    )
    return os.path.join(cache_dir(), "mounts", f"{stem}.log")
