"""vmarc verify: exit 0 intact, 2 damaged (each problem named), 3 intact with leaked
clusters (qcow2, as qemu-img check), 1 could not run."""

from __future__ import annotations

import sys

from ..errors import CorruptError, FormatError, IntegrityError, TruncatedError, UsageError
from ..formats import open_archive
from ..ops.verify import verify
from .common import add_progress_arg, add_source_args, layers, print_json


def add_parser(sub):
    p = sub.add_parser("verify", help="check every checksum and structure rule")
    add_source_args(p)
    p.add_argument("--output", choices=["human", "json"], default="human")
    add_progress_arg(p)
    tree = p.add_argument_group("a whole tree of backups (-r)")
    tree.add_argument(
        "-r",
        "--recursive",
        action="store_true",
        help="SOURCE is a directory: verify every backup under it, a line each and a summary",
    )
    tree.add_argument("--jobs", type=int, default=1, help="backups verified at once (processes)")
    tree.add_argument("--since", help="only backups modified since this date (2026-11-01[T12:00])")
    tree.add_argument(
        "--deep",
        action="store_true",
        help="also find each guest's root file system and what its /etc/fstab mounts "
        "(or Windows' registry hive)",
    )
    p.set_defaults(run=run)


def run(args) -> int:
    if args.recursive:
        from .verify_tree import run_tree  # (the tree job's own module)

        return run_tree(args)
    if args.jobs != 1 or args.since or args.deep:
        raise UsageError("--jobs, --since and --deep go with -r (a tree of backups)")
    try:
        archive = open_archive(args.source, args.fmt, **layers(args))
    except CorruptError as e:  # damaged before the disks could even be listed
        return report(args, None, [e], stopped=True)
    with archive:
        checks = verify(archive, progress=args.progress)
        done = {"stream": archive.stream_checks(), "disks": archive.checked()}
    return report(
        args, archive, checks.problems, checks.stopped, checks.warnings, done, checks.leaks
    )


CAUSES = ((IntegrityError, "checksum"), (TruncatedError, "truncated"), (FormatError, "structure"))


def problem(err: CorruptError) -> dict:
    """A problem as docs/json.md has it: the message, a cause, and where it lies (the
    first damaged stretch it names; all of them under damage)."""
    cause = next((c for cls, c in CAUSES if isinstance(err, cls)), "damaged")
    first = err.damage[0].as_dict() if err.damage else {}
    return {
        "message": str(err),
        "cause": cause,
        "disk": first.get("disk"),
        "offset": first.get("offset"),
        "length": first.get("length"),
        "source": first.get("source"),
        "damage": [d.as_dict() for d in err.damage],
    }


def report(args, archive, problems, stopped, warnings=(), done=None, leaks=()) -> int:
    """Exit 0 intact, 2 damaged, 3 intact but with leaked clusters (qemu-img check's)."""
    ok = not problems
    if args.output == "json":
        out = {
            "ok": ok,
            "source": args.source,
            "format": None,
            "compression": None,
            "disks": [],
            "problems": [problem(p) for p in problems],
            "stopped_early": stopped,
            "warnings": list(warnings),
            "leaks": list(leaks),
            "checked": done if ok else None,
        }
        if archive is not None:
            out.update(
                {
                    "source": archive.source.name,
                    "format": archive.format,
                    "compression": archive.compression,
                    "disks": [d.as_dict() for d in archive.disks],
                }
            )
        print_json("verify", out)
    else:
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
        for p in problems:
            print(p)
        for leak in leaks:
            print(leak)
        if ok:
            comp = f" ({archive.compression})" if archive.compression else ""
            print(f"ok: {archive.format}{comp}, {len(archive.disks)} disk(s); checked:")
            for item in done["stream"]:
                print(f"  the stream: {item}")
            for d in archive.disks:
                what = done["disks"].get(d.id, {"checked": [], "unchecked": []})
                for item in what["checked"]:
                    print(f"  {d.device or d.id}: {item}")
                for item in what["unchecked"]:
                    print(f"  {d.device or d.id}: not checked: {item}")
            if leaks:
                print(
                    "leaked clusters: space allocated that nothing uses; no harm to the "
                    "data (qemu-img check -r leaks reclaims it)"
                )
        else:
            print(
                f"damaged: {len(problems)} problem(s)"
                + ("; reading could not go on past one of them" if stopped else ""),
                file=sys.stderr,
            )
    return 2 if not ok else 3 if leaks else 0
