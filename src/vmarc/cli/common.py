"""Pieces every subcommand shares."""

from __future__ import annotations


def add_source_args(p) -> None:
    p.add_argument("source", help="archive or image path, or - for stdin")
    p.add_argument(
        "-f",
        "--format",
        dest="fmt",
        help="input format (found by content if omitted; raw only with -f raw or a .raw/.img name)",
    )
    add_layer_args(p)


def add_layer_args(p) -> None:
    """What lies under a differencing VHD or a qcow2 overlay."""
    p.add_argument(
        "--parent",
        help="the parent of a differencing VHD or the backing file of "
        "a qcow2, instead of the one the image names (may be raw)",
    )
    p.add_argument(
        "--no-backing",
        action="store_true",
        help="read a differencing VHD or qcow2 overlay alone, without what lies under it",
    )
    p.add_argument(
        "--key-file",
        help="the key of an encrypted Xen Orchestra remote (32 bytes, or 64 hex digits)",
    )


def layers(args) -> dict:
    """open()'s keywords for --parent and --no-backing (and --key-file, which applies to
    every file of an encrypted remote the source reaches, is registered here)."""
    if args.key_file:
        from ..formats.vhddir import set_key_file

        set_key_file(args.key_file)
    return {"parent": args.parent, "no_backing": args.no_backing}


def add_progress_arg(p) -> None:
    p.add_argument(
        "-p",
        "--progress",
        action="store_true",
        help="show progress (bytes, rate, ETA) on a terminal",
    )


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def add_verify_arg(p, what: str = "checksums") -> None:
    p.add_argument(
        "--no-verify", dest="verify", action="store_false", help=f"do not check {what} on the way"
    )


def add_sync_arg(p) -> None:
    p.add_argument(
        "--no-sync",
        dest="sync",
        action="store_false",
        help="do not fsync output before renaming it into place (faster; the "
        "output may be lost in a crash, never half-written)",
    )


def add_random_access_args(p) -> None:
    """Options of the commands that read disks in place (map, serve, mount)."""
    p.add_argument("source", help="archive or image file (random access: not a pipe)")
    p.add_argument("-f", "--format", dest="fmt", help="input format (found by content if omitted)")
    p.add_argument(
        "--index",
        help="index file to use or create (default: in "
        "~/.cache/vmarc, keyed by the archive's size, mtime and head)",
    )
    add_layer_args(p)


def add_target_args(p) -> None:
    """How an existing output is written (as qemu-img convert's -n and --target-is-zero)."""
    p.add_argument(
        "-n",
        "--no-create",
        action="store_true",
        help="write into an existing file or device in place, without creating "
        "it or cutting it short (qemu-img convert -n)",
    )
    p.add_argument(
        "--target-is-zero",
        action="store_true",
        help="the target device or -n file already reads as zeros: skip zeroing "
        "what the disk leaves empty",
    )


def add_salvage_args(p) -> None:
    p.add_argument(
        "--salvage",
        action="store_true",
        help="go on past damage: a bad chunk's bytes as read, zeros for what is "
        "missing; writes a JSON damage report and exits 2 if the output is damaged",
    )
    p.add_argument(
        "--report",
        metavar="PATH",
        help="where --salvage writes its report (default: OUTPUT.damage.json beside the output)",
    )


JSON_VERSION = 1  # docs/json.md: bumped when a key changes meaning or goes away


def print_json(command: str, doc: dict) -> None:
    """One JSON document on stdout, in the shape docs/json.md describes."""
    import json

    print(json.dumps({"vmarc_json": JSON_VERSION, "command": command, **doc}, indent=2))


def add_json_summary_arg(p) -> None:
    """--output json for the commands whose positional output is named output too."""
    p.add_argument(
        "--output",
        dest="output_json",
        choices=["human", "json"],
        default="human",
        help="json: a summary on stdout (docs/json.md)",
    )


def output_entry(path: str, disk: str | None, fmt: str) -> dict:
    """One output of convert, extract or create as --output json lists it: its size and
    the bytes it allocates (null where that means nothing: a device, stdout)."""
    import os
    import stat

    try:
        st = os.stat(path)
    except OSError:
        return {"path": path, "disk": disk, "format": fmt, "size": None, "allocated": None}
    regular = stat.S_ISREG(st.st_mode)
    return {
        "path": path,
        "disk": disk,
        "format": fmt,
        "size": st.st_size if regular else None,
        "allocated": st.st_blocks * 512 if regular else None,
    }


def summary(
    archives,
    outputs: list[dict],
    started: float,
    verify: bool,
    data_bytes: int,
    warnings: list[str],
) -> dict:
    """What convert, extract and create print with --output json (docs/json.md)."""
    import time

    return {
        "sources": [
            {
                "path": a.source.name,
                "format": a.format,
                "compression": a.compression,
                "bytes_read": a.source.offset + a.source.pread_bytes,
            }
            for a in archives
        ],
        "outputs": outputs,
        "data_bytes": data_bytes,
        "seconds": round(time.monotonic() - started, 3),
        "checked": [
            {"source": a.source.name, "stream": a.stream_checks(), "disks": a.checked()}
            for a in archives
        ]
        if verify
        else None,
        "warnings": warnings,
    }


def add_guest_args(p, path_help: str | None = None) -> None:
    """Options of the commands that read files inside the guest (ls, cat, copy-out)."""
    add_random_access_args(p)
    p.add_argument(
        "--fs",
        metavar="VOL",
        help="the volume to read (xvda1, scsi0-part2, vg0/root; see `vmarc filesystems`); "
        "default: the only file system, else the guest's tree from its /etc/fstab",
    )
    p.add_argument(
        "--subvol",
        metavar="NAME",
        help="a btrfs subvolume by its path (@home) instead of the default one; with --fs",
    )
    add_verify_arg(p, "each XVA chunk's checksum the first time a read touches it")


def open_guest(args):
    """The Guest (files/guest.py) of args.source, inside the Opened that holds its disks:
    use as `with open_guest(args) as guest:`."""
    from contextlib import contextmanager

    from ..access import open_disks
    from ..files.guest import Guest

    @contextmanager
    def opened_guest():
        with open_disks(
            args.source, args.fmt, index=args.index, **layers(args), verify=args.verify
        ) as opened:
            yield Guest(opened)

    return opened_guest()
