#!/usr/bin/env python3
"""This checkout against an earlier version of vmarc, on the same data in the same run.

The machines behind the benches change from day to day, so a ratio against `cat` from
another session says little; this times `vmarc convert` of the benches' archives with the
working tree and with REV (checked out in a temporary git worktree), interleaved, and
prints new / old; also raw -> qcow2, raw -> VHD and `create -O vma` from the benches' raw
disk. Build the data first with bench_xva, bench_vma and bench_images.
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

# (label, input, the command with {src} and {out}, output name)
JOBS = [
    *(
        (name, name, "convert --no-sync {src} {out}", "versions.raw")
        for name in ("vm.xva", "vm.xva.gz", "vm.xva.zst", "vm.vma", "vm.vma.zst", "disk.vhd")
    ),
    ("raw -> qcow2", "disk.raw", "convert --no-sync -f raw -O qcow2 {src} {out}", "versions.qcow2"),
    ("raw -> vhd", "disk.raw", "convert --no-sync -f raw -O vhd {src} {out}", "versions.vhd"),
    (
        "create -O vma",
        "disk.raw",
        "create --no-sync -O vma --disk scsi0={src} {out}",
        "versions.vma",
    ),
    (
        "create -O vma, zstd",
        "disk.raw",
        "create --no-sync -O vma --disk scsi0={src} {out}",
        "versions.vma.zst",
    ),
]


def main() -> int:
    ap = bench_args(1024)
    ap.add_argument("--rev", required=True, help="the earlier version (a git revision)")
    ap.add_argument("--only", help="time only the jobs whose label contains this")
    args = ap.parse_args()
    have = [
        j
        for j in JOBS
        if os.path.exists(os.path.join(args.work, j[1])) and (args.only or "") in j[0]
    ]
    if not have:
        raise SystemExit(
            f"bench: no archives in {args.work}; run bench_xva, bench_vma and bench_images first"
        )
    outs = [os.path.join(args.out_dir or args.work, j[3]) for j in have]
    old = tempfile.mkdtemp(prefix="vmarc-old-")
    subprocess.run(
        ["git", "-C", ROOT, "worktree", "add", "-q", "--detach", old, args.rev], check=True
    )
    # both versions start from compiled modules (PYTHONDONTWRITEBYTECODE would otherwise
    # make one of them compile its modules in every timed run)
    for src in (os.path.join(old, "src"), os.path.join(ROOT, "src")):
        subprocess.run(
            [sys.executable, "-m", "compileall", "-q", src], check=True, stdout=subprocess.DEVNULL
        )
    try:
        py = sys.executable
        jobs, pairs = {}, []
        for (label, name, command, _), out in zip(have, outs):
            cmd = command.format(src=os.path.join(args.work, name), out=out)
            jobs[f"{label}: new vmarc"] = f"{py} -m vmarc {cmd}"
            jobs[f"{label}: old vmarc"] = f"PYTHONPATH={old}/src {py} -m vmarc {cmd}"
            pairs.append((f"{label}: new vmarc", f"{label}: old vmarc", None))

        def rm():
            for out in outs:
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
