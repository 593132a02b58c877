#!/usr/bin/env python3
"""verify -r over a tree of backups: --jobs 1 against --jobs 2 (and the cores there are),
median of interleaved runs, with peak RSS per run.

The tree: compressed XVA and VMA backups and qemu-img's streamOptimized VMDKs of model
disks (bench_vma's mix of entropies), 128 MiB each by default.
Usage: python -m bench.bench_verify_tree [--runs 3] [--size-mib 128] [--count 8]
"""

from __future__ import annotations

import os
import subprocess
import sys

from bench.bench_xva import VMARC, bench_args, interleaved, report

HERE = os.path.dirname(os.path.abspath(__file__))


def build(tree: str, size_mib: int, count: int) -> None:
    sys.path.insert(0, os.path.dirname(HERE))
    from tests.support import ovagen, vmagen
    from tests.support import xvagen as g

    os.makedirs(tree, exist_ok=True)
    for i in range(count):
        kind = ("xva.gz", "vma.zst", "vmdk")[i % 3]
        path = os.path.join(tree, f"backup{i}.{kind}")
        if os.path.exists(path):
            continue
        data = vmagen.disk_bytes(size_mib << 20, seed=100 + i)
        if kind == "xva.gz":
            g.write(path, g.XvaSpec(disks=[g.XDisk("Ref:1", data, "d", "0")], compress="gzip"))
            continue
        raw = os.path.join(tree, "tmp.raw")
        with open(raw, "wb") as f:
            f.write(data)
        if kind == "vmdk":
            ovagen.stream_optimized(raw, path)  # qemu-img's, as the tests make them
        else:
            subprocess.run(
                [
                    *VMARC,
                    "create",
                    "--no-sync",
                    "-O",
                    "vma",
                    path,
                    "-f",
                    "raw",
                    "--disk",
                    f"scsi0={raw}",
                ],
                check=True,
            )
        os.unlink(raw)


def main() -> int:
    ap = bench_args(128, "size of each backup's disk")
    ap.add_argument("--count", type=int, default=9)
    args = ap.parse_args()
    tree = os.path.join(args.work, f"tree-{args.size_mib}-{args.count}")
    build(tree, args.size_mib, args.count)
    subprocess.run(f"cat {tree}/* > /dev/null", shell=True, check=True)
    cores = os.cpu_count() or 1
    jobs = {
        f"vmarc verify -r --jobs {n}": [*VMARC, "verify", "-r", tree, "--jobs", str(n)]
        for n in sorted({1, 2, cores})
    }
    total = sum(os.path.getsize(os.path.join(tree, f)) for f in os.listdir(tree))
    print(
        f"tree: {args.count} backups, {total >> 20} MiB; {cores} cores; median of {args.runs} interleaved runs"
    )
    res = interleaved(jobs, args.runs, lambda: None)
    report(
        res,
        [
            (f"vmarc verify -r --jobs {n}", "vmarc verify -r --jobs 1", None)
            for n in sorted({2, cores})
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
