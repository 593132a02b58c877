"""vmarc verify -r TREE: every backup under a directory, a line each as it is done, then a
summary (ops/verify_tree.py). Exit 0 when every one is intact, 2 when any is damaged,
unreadable or (with --deep) would not find its root file system."""

from __future__ import annotations

import os
import sys
import time
from datetime import datetime

from ..errors import UsageError
from ..ops.verify_tree import summary, verify_tree
from .common import human_size, layers, print_json


def _since(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise UsageError(
            f"--since {text}: expected a date as 2026-11-01 or 2026-11-01T12:00"
        ) from None


def run_tree(args) -> int:
    tree = args.source
    if not os.path.isdir(tree):
        raise UsageError(f"{tree}: -r needs a directory")
    if args.jobs < 1:
        raise UsageError("--jobs: at least 1")
    layers(args)  # --key-file, for every backup of an encrypted remote
    records, pool, start = verify_tree(tree, args.jobs, _since(args.since), args.deep)
    done = []
    try:
        for rec in records:
            done.append(rec)
            if args.output == "human":
                _line(rec, tree)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    totals = summary(done, time.monotonic() - start)
    if args.output == "json":
        print_json("verify-tree", {"tree": tree, "backups": done, "summary": totals})
    else:
        _summary(totals, tree)
    bad = totals["damaged"] + totals["unreadable"] + totals["not_bootable"]
    return 2 if bad else 0


def _line(rec: dict, tree: str) -> None:
    rel = os.path.relpath(rec["path"], tree)
    status = {"ok": "ok", "damaged": "DAMAGED", "unreadable": "UNREADABLE"}[rec["status"]]
    boot = rec.get("boot")
    if boot is not None and not boot["ok"]:
        status = "NO-BOOT"
    size = human_size(rec.get("bytes", 0))
    line = f"{status:10} {rec['format'] or '?':5} {size:>10} {rec['seconds']:7.2f}s  {rel}"
    if rec["problems"]:
        line += f": {rec['problems'][0]}"
    elif boot is not None:
        line += f" ({boot['found']})"
    print(line, flush=True)


def _summary(t: dict, tree: str) -> None:
    print(
        f"\n{t['backups']} backups, {human_size(t['bytes'])} in {t['seconds']:.1f} s: "
        f"{t['ok']} intact, {t['damaged']} damaged, {t['unreadable']} unreadable"
        + (f", {t['not_bootable']} would not boot" if t["not_bootable"] else "")
    )
    for path, first in t["first_problems"].items():
        print(f"  {os.path.relpath(path, tree)}: {first}")
    if not t["backups"]:
        print(f"no backups found under {tree}", file=sys.stderr)
