#!/usr/bin/env python3
"""VMA -> raw against `cat`, .vma.zst -> raw against `zstd -dc` alone, and raw -> VMA
(create) against `cat` and against `zstd -T0` alone; same data, one run.

Builds a 1 GiB single-disk VMA with the tests' independent generator from a disk modelled
on real ones (bench_xva's mix of entropies; a third of the clusters zero, one data cluster
in eight with some zero 4 KiB blocks) in the order a live backup writes (in order, one
cluster in twenty pulled forward by copy-before-write). `--worst` also times the
pathological archive: every cluster shuffled and one 4 KiB block in five zero, which
costs one small write per stretch. Runs the commands in interleaved rounds and prints
medians, ratios and vmarc's peak RSS.
Usage: python -m bench.bench_vma [--size-mib 1024] [--runs 5]
"""

from __future__ import annotations

import argparse
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


def build(work: str, size_mib: int) -> tuple[str, str, str]:
    plain, zst = os.path.join(work, "vm.vma"), os.path.join(work, "vm.vma.zst")
    disk = os.path.join(work, "disk.raw")
    if not all(os.path.exists(p) for p in (plain, zst, disk, os.path.join(work, "worst.vma"))):
        build_in_child("bench.bench_vma", size_mib, work)
    return plain, zst, disk


CONF = os.path.join(HERE, "qemu-server.conf")


def realistic_disk(size_mib: int) -> bytearray:
    import random

    from bench.bench_xva import make_disk

    xdisk = make_disk(size_mib)
    data = bytearray(size_mib << 20)
    for c, chunk in xdisk.sparse.items():
        data[c << 20 : (c + 1) << 20] = chunk
    rnd = random.Random(5)
    for cl in range(0, len(data), 65536):
        if rnd.random() < 0.12:  # a partly used cluster: a few zero 4 KiB blocks
            for b in rnd.sample(range(16), rnd.randint(1, 6)):
                data[cl + b * 4096 : cl + (b + 1) * 4096] = bytes(4096)
    return data


def build_files(work: str, size_mib: int) -> None:
    from tests.support import vmagen

    data = realistic_disk(size_mib)
    with open(os.path.join(work, "vm.vma"), "wb") as f:
        f.write(vmagen.build([("drive-scsi0", data)], order="backup"))
    worst = vmagen.disk_bytes(size_mib << 20, seed=7)
    with open(os.path.join(work, "worst.vma"), "wb") as f:
        f.write(vmagen.build([("drive-scsi0", worst)], order="shuffle"))
    with open(os.path.join(work, "disk.raw"), "wb") as f:  # the same disk as a raw file
        f.write(data)
    subprocess.run(
        [
            "zstd",
            "-q",
            "-3",
            "-T0",
            "-f",
            os.path.join(work, "vm.vma"),
            "-o",
            os.path.join(work, "vm.vma.zst"),
        ],
        check=True,
    )


def main() -> int:
    ap = bench_args(1024)
    ap.add_argument("--worst", action="store_true", help="also time the pathological archive")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    if args.build_only:
        build_files(args.work, args.size_mib)
        return 0
    plain, zst, disk = build(args.work, args.size_mib)
    out = os.path.join(args.out_dir or args.work, "out.raw")
    out_vma = os.path.join(args.out_dir or args.work, "out.vma")

    def rm():
        for p in (out, out_vma, out_vma + ".zst"):
            if os.path.exists(p):
                os.unlink(p)

    for p in (plain, zst, disk):
        subprocess.run(["cat", p], stdout=subprocess.DEVNULL, check=True)
    jobs = {
        "cat > file": f"cat {plain} > {out}",
        "vma: vmarc convert --no-sync": VMARC + ["convert", "--no-sync", plain, out],
        "zstd -dc > /dev/null": f"zstd -dc {zst} > /dev/null",
        "zstd -dc > file": f"zstd -dc {zst} > {out}",
        "vma.zst: vmarc convert --no-sync": VMARC + ["convert", "--no-sync", zst, out],
        "cat raw > file": f"cat {disk} > {out_vma}",
        "create: vmarc create --no-sync": VMARC
        + [
            "create",
            "-O",
            "vma",
            "--no-sync",
            out_vma,
            "--disk",
            f"scsi0={disk}",
            "--config",
            CONF,
        ],
        "zstd -T0 raw > file": f"zstd -q -T0 -c {disk} > {out_vma}.zst",
        "create .zst: vmarc create --no-sync": VMARC
        + [
            "create",
            "-O",
            "vma",
            "--no-sync",
            out_vma + ".zst",
            "--disk",
            f"scsi0={disk}",
            "--config",
            CONF,
        ],
    }
    pairs = [
        ("vma: vmarc convert --no-sync", "cat > file"),
        ("vma.zst: vmarc convert --no-sync", "zstd -dc > /dev/null"),
        ("vma.zst: vmarc convert --no-sync", "zstd -dc > file"),
        ("create: vmarc create --no-sync", "cat raw > file", 1.5),
        ("create .zst: vmarc create --no-sync", "zstd -T0 raw > file", 1.5),
    ]
    if args.worst:
        worst = os.path.join(args.work, "worst.vma")
        jobs["worst: cat > file"] = f"cat {worst} > {out}"
        jobs["worst: vmarc convert --no-sync"] = VMARC + ["convert", "--no-sync", worst, out]
        pairs.append(("worst: vmarc convert --no-sync", "worst: cat > file"))
    print(
        f"archive: {os.path.getsize(plain) >> 20} MiB vma, {os.path.getsize(zst) >> 20} MiB "
        f"vma.zst; disk {args.size_mib} MiB; median of {args.runs} interleaved runs; output "
        f"in {os.path.dirname(out)}"
    )
    res = interleaved(jobs, args.runs, rm)
    rm()
    report(res, pairs)
    allocation(
        [("vma -> raw", VMARC + ["convert", "--no-sync", plain, "OUT"], disk)], os.path.dirname(out)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
