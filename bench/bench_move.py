#!/usr/bin/env python3
"""Whole-VM moves: XVA -> VMA (plain and .zst) and VMA -> XVA (plain and zstd), against
`cat` of the same input to a file and against the compressor alone on the same input;
same data, one run.

Uses the archives of bench_xva.py (a 1.5 GiB disk, ~1 GiB XVA) and bench_vma.py (a 1 GiB
disk in a live backup's order), building them first if missing. Runs the commands in
interleaved rounds and prints medians, ratios and vmarc's peak RSS (memory must not grow
with the disk: the sequencer holds one 1 MiB chunk, plus a temporary file for what a
source gives out of turn).
Usage: python -m bench.bench_move [--runs 5]
"""

from __future__ import annotations

import os
import subprocess
import sys

from bench import bench_vma, bench_xva
from bench.bench_xva import VMARC, bench_args, interleaved, report

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    args = bench_args(
        0, "unused: the archives of bench_xva.py and bench_vma.py are used"
    ).parse_args()
    os.makedirs(args.work, exist_ok=True)
    xva = bench_xva.build(args.work, 1536)["plain"]
    vma = bench_vma.build(args.work, 1024)[0]
    outd = args.out_dir or args.work
    out = {
        k: os.path.join(outd, f"move-out.{k}") for k in ("vma", "vma.zst", "xva", "xva.zst", "cat")
    }

    def rm():
        for p in out.values():
            if os.path.exists(p):
                os.unlink(p)

    for p in (xva, vma):
        subprocess.run(["cat", p], stdout=subprocess.DEVNULL, check=True)
    nosync = ["--no-sync"]
    jobs = {
        "cat xva > file": f"cat {xva} > {out['cat']}",
        "xva->vma: vmarc convert": VMARC + ["convert", *nosync, xva, out["vma"], "-O", "vma"],
        "zstd -T0 xva > file": f"zstd -q -T0 -c {xva} > {out['cat']}",
        "xva->vma.zst: vmarc convert": VMARC
        + ["convert", *nosync, xva, out["vma.zst"], "-O", "vma"],
        "cat vma > file": f"cat {vma} > {out['cat']}",
        "vma->xva: vmarc convert": VMARC + ["convert", *nosync, vma, out["xva"], "-O", "xva"],
        "zstd -T0 vma > file": f"zstd -q -T0 -c {vma} > {out['cat']}",
        "vma->xva zstd: vmarc convert": VMARC
        + ["convert", *nosync, vma, out["xva.zst"], "-O", "xva", "-o", "compress=zstd"],
    }
    pairs = [
        ("xva->vma: vmarc convert", "cat xva > file"),
        ("xva->vma.zst: vmarc convert", "zstd -T0 xva > file"),
        ("vma->xva: vmarc convert", "cat vma > file"),
        ("vma->xva zstd: vmarc convert", "zstd -T0 vma > file"),
    ]
    print(
        f"xva {os.path.getsize(xva) >> 20} MiB, vma {os.path.getsize(vma) >> 20} MiB; median "
        f"of {args.runs} interleaved runs; output in {outd}"
    )
    res = interleaved(jobs, args.runs, rm)
    rm()
    report(res, pairs, target=None)  # the issue asks for the figures, sets no ratio
    return 0


if __name__ == "__main__":
    sys.exit(main())
