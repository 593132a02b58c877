#!/usr/bin/env python3
"""This checkout against an earlier version of vmarc, on the same data in the same run.

The machines behind the benches change from day to day, so a ratio against `cat` from
another session says little; this times `vmarc convert` of the benches' archives with the
working tree and with REV (checked out in a temporary git worktree), interleaved, and
prints new / old. Build the data first with bench_xva.py, bench_vma.py and bench_images.py.
Usage: python -m bench.bench_versions --rev f0d103a [--runs 5]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from bench.bench_xva import bench_args, interleaved, report  # the same harness

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

INPUTS = ["vm.xva", "vm.xva.gz", "vm.xva.zst", "vm.vma", "vm.vma.zst", "disk.vhd"]


def main() -> int:
    ap = bench_args(1024)
    ap.add_argument("--rev", required=True, help="the earlier version (a git revision)")
    args = ap.parse_args()
    have = [i for i in INPUTS if os.path.exists(os.path.join(args.work, i))]
    if not have:
        raise SystemExit(
            f"bench: no archives in {args.work}; run bench_xva.py, bench_vma.py "
            "and bench_images.py first"
        )
    out = os.path.join(args.out_dir or args.work, "versions.raw")
    old = tempfile.mkdtemp(prefix="vmarc-old-")
    subprocess.run(
        ["git", "-C", ROOT, "worktree", "add", "-q", "--detach", old, args.rev], check=True
    )
    try:
        py = sys.executable
        jobs, pairs = {}, []
        for name in have:
            src = os.path.join(args.work, name)
            jobs[f"{name}: new vmarc"] = f"{py} -m vmarc convert --no-sync {src} {out}"
            jobs[f"{name}: old vmarc"] = (
                f"PYTHONPATH={old}/src {py} -m vmarc convert --no-sync {src} {out}"
            )
            pairs.append((f"{name}: new vmarc", f"{name}: old vmarc", None))

        def rm():
            if os.path.exists(out):
                os.unlink(out)

        print(f"this checkout against {args.rev}; median of {args.runs} interleaved runs")
        res = interleaved(jobs, args.runs, rm)
        rm()
        report(res, pairs, target=None)
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", old], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
