#!/usr/bin/env python3
"""VMware's formats against qemu-img on the same data in the same run (median of
interleaved runs, ratios, peak RSS):

- streamOptimized VMDK (qemu-img's) -> raw: `vmarc convert` against `qemu-img convert`;
- an OVA of that VMDK -> .vma.zst in one `vmarc convert -O vma`, against the two-step
  path people use now: `qemu-img convert` to raw, then `vmarc create` of the raw.

The disk is bench_vma's model of a real one (a mix of entropies, a third of it zero),
1 GiB by default. Usage: python -m bench.bench_vmdk [--runs 5]
"""

from __future__ import annotations

import os
import subprocess
import sys

from bench.bench_xva import VMARC, bench_args, build_in_child, interleaved, report

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    ap = bench_args(1024)
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    disk = os.path.join(args.work, "disk.raw")
    if not os.path.exists(disk):  # shared with bench_vma and bench_images
        build_in_child("bench.bench_vma", args.size_mib, args.work)
    vmdk = os.path.join(args.work, "disk-so.vmdk")
    if not os.path.exists(vmdk):
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized"]
            + [disk, vmdk],
            check=True,
        )
    ova = os.path.join(args.work, "vm.ova")
    if not os.path.exists(ova):
        sys.path.insert(0, os.path.dirname(HERE))
        from tests.support import ovagen

        with open(vmdk, "rb") as f:
            data = f.read()
        ovagen.build_ova(ova, "bench", [("bench-disk1.vmdk", data, os.path.getsize(disk))])
    outd = args.out_dir or args.work
    raw_out = os.path.join(outd, "out.raw")
    step_raw = os.path.join(outd, "step.raw")
    vma_a = os.path.join(outd, "vzdump-qemu-100-2026_01_01-00_00_00.vma.zst")
    vma_b = os.path.join(outd, "vzdump-qemu-101-2026_01_01-00_00_00.vma.zst")

    def rm():
        for p in (raw_out, step_raw, vma_a, vma_b):
            if os.path.exists(p):
                os.unlink(p)

    for p in (vmdk, ova):
        subprocess.run(["cat", p], stdout=subprocess.DEVNULL, check=True)
    conf = os.path.join(HERE, "qemu-server.conf")
    two_step = (
        f"qemu-img convert -f vmdk -O raw {vmdk} {step_raw} && "
        + " ".join(VMARC)
        + f" create --no-sync -O vma {vma_b} --config qemu-server.conf={conf} "
        f"--disk scsi0={step_raw}"
    )
    jobs = {
        "vmdk->raw: qemu-img convert": ["qemu-img", "convert", "-f", "vmdk", "-O", "raw"]
        + [vmdk, raw_out],
        "vmdk->raw: vmarc convert": VMARC + ["convert", "--no-sync", vmdk, raw_out],
        "ova->vma.zst: qemu-img + vmarc create": two_step,
        "ova->vma.zst: vmarc convert": VMARC + ["convert", "--no-sync", "-O", "vma", ova, vma_a],
    }
    print(
        f"disk: {args.size_mib} MiB raw, {os.path.getsize(vmdk) >> 20} MiB as streamOptimized "
        f"VMDK; median of {args.runs} interleaved runs; output in {outd}; qemu-img flushes "
        "nothing by default, so vmarc runs with --no-sync"
    )
    res = interleaved(jobs, args.runs, rm)
    rm()
    report(
        res,
        [
            ("vmdk->raw: vmarc convert", "vmdk->raw: qemu-img convert", 1.2),
            ("ova->vma.zst: vmarc convert", "ova->vma.zst: qemu-img + vmarc create", 1.0),
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
