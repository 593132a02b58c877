#!/usr/bin/env python3
"""VMA -> raw against `cat`, and .vma.zst -> raw against `zstd -dc` alone, same data, one run.

Builds a 1 GiB single-disk VMA with the tests' independent generator (clusters shuffled
as Proxmox writes them; a third of the clusters and one 4 KiB block in five zero), runs
the commands in interleaved rounds and prints medians, ratios and vmarc's peak RSS.
Usage: bench/bench_vma.py [--size-mib 1024] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
sys.path.insert(0, HERE)
from bench_xva import VMARC, interleaved, report  # noqa: E402  (same harness)


def build(work: str, size_mib: int) -> tuple[str, str]:
    plain, zst = os.path.join(work, "vm.vma"), os.path.join(work, "vm.vma.zst")
    if not (os.path.exists(plain) and os.path.exists(zst)):
        # a child process: the generator holds the disk in memory (see bench_xva)
        subprocess.run([sys.executable, __file__, "--build-only", "--size-mib", str(size_mib),
                        "--work", work], check=True)
    return plain, zst


def build_files(work: str, size_mib: int) -> None:
    import vmagen
    data = vmagen.disk_bytes(size_mib << 20, seed=7)
    with open(os.path.join(work, "vm.vma"), "wb") as f:
        f.write(vmagen.build([("drive-scsi0", data)]))
    subprocess.run(["zstd", "-q", "-3", "-T0", "-f", os.path.join(work, "vm.vma"), "-o",
                    os.path.join(work, "vm.vma.zst")], check=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--work", default=os.path.join(HERE, "work"))
    ap.add_argument("--out-dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    if args.build_only:
        build_files(args.work, args.size_mib)
        return 0
    plain, zst = build(args.work, args.size_mib)
    out = os.path.join(args.out_dir or args.work, "out.raw")

    def rm():
        if os.path.exists(out):
            os.unlink(out)

    for p in (plain, zst):
        subprocess.run(["cat", p], stdout=subprocess.DEVNULL, check=True)
    jobs = {
        "cat > file": f"cat {plain} > {out}",
        "vma: vmarc convert --no-sync": VMARC + ["convert", "--no-sync", plain, out],
        "zstd -dc > /dev/null": f"zstd -dc {zst} > /dev/null",
        "zstd -dc > file": f"zstd -dc {zst} > {out}",
        "vma.zst: vmarc convert --no-sync": VMARC + ["convert", "--no-sync", zst, out],
    }
    print(f"archive: {os.path.getsize(plain) >> 20} MiB vma, {os.path.getsize(zst) >> 20} MiB "
          f"vma.zst; disk {args.size_mib} MiB; median of {args.runs} interleaved runs; output "
          f"in {os.path.dirname(out)}")
    res = interleaved(jobs, args.runs, rm)
    rm()
    report(res, [("vma: vmarc convert --no-sync", "cat > file"),
                 ("vma.zst: vmarc convert --no-sync", "zstd -dc > /dev/null"),
                 ("vma.zst: vmarc convert --no-sync", "zstd -dc > file")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
