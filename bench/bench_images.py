#!/usr/bin/env python3
"""VHD dynamic -> raw, raw -> qcow2 and raw -> VHD: vmarc against qemu-img on the same data
in the same run (median of interleaved runs, ratios, peak RSS).

The disk is bench_vma's model of a real one (a mix of entropies, a third of it zero,
some partly used clusters), 1 GiB by default. Usage: python -m bench.bench_images [--runs 5]
"""

from __future__ import annotations

import os
import subprocess
import sys

from bench.bench_xva import (  # the same harness
    VMARC,
    allocation,
    bench_args,
    build_in_child,
    interleaved,
    report,
)

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    ap = bench_args(1024)
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    disk = os.path.join(args.work, "disk.raw")
    if not os.path.exists(disk):  # shared with bench_vma
        build_in_child("bench.bench_vma", args.size_mib, args.work)
    vhd = os.path.join(args.work, "disk.vhd")
    if not os.path.exists(vhd):
        subprocess.run(
            ["qemu-img", "convert", "-O", "vpc", "-o", "force_size=on", disk, vhd], check=True
        )
    outd = args.out_dir or args.work
    out = {k: os.path.join(outd, f"out.{k}") for k in ("raw", "qcow2", "vhd")}

    def rm():
        for p in out.values():
            if os.path.exists(p):
                os.unlink(p)

    for p in (disk, vhd):
        subprocess.run(["cat", p], stdout=subprocess.DEVNULL, check=True)
    jobs = {
        "vhd->raw: qemu-img convert": [
            "qemu-img",
            "convert",
            "-f",
            "vpc",
            "-O",
            "raw",
            vhd,
            out["raw"],
        ],
        "vhd->raw: vmarc convert": VMARC + ["convert", "--no-sync", vhd, out["raw"]],
        "raw->qcow2: qemu-img convert": [
            "qemu-img",
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            disk,
            out["qcow2"],
        ],
        "raw->qcow2: vmarc convert": VMARC
        + ["convert", "--no-sync", "-O", "qcow2", disk, out["qcow2"]],
        "raw->vhd: qemu-img convert": [
            "qemu-img",
            "convert",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            "force_size=on",
            disk,
            out["vhd"],
        ],
        "raw->vhd: vmarc convert": VMARC + ["convert", "--no-sync", "-O", "vhd", disk, out["vhd"]],
    }
    print(
        f"disk: {args.size_mib} MiB raw; median of {args.runs} interleaved runs; output in "
        f"{outd}; qemu-img flushes nothing by default, so vmarc runs with --no-sync"
    )
    res = interleaved(jobs, args.runs, rm)
    rm()
    report(
        res,
        [
            (f"{k}: vmarc convert", f"{k}: qemu-img convert")
            for k in ("vhd->raw", "raw->qcow2", "raw->vhd")
        ],
    )
    sub = lambda argv, path: [("OUT" if a == path else a) for a in argv]  # noqa: E731
    allocation(
        [
            (
                k,
                sub(jobs[f"{k}: vmarc convert"], out[o]),
                sub(jobs[f"{k}: qemu-img convert"], out[o]),
            )
            for k, o in (("vhd->raw", "raw"), ("raw->qcow2", "qcow2"), ("raw->vhd", "vhd"))
        ],
        outd,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
