#!/usr/bin/env python3
"""Random access in place: index time, NBD and FUSE sequential reads against reading the
converted raw file, 4 KiB random reads per second, first read from a .xva.gz.

Uses the XVA of bench_xva.py (built if missing). Usage: bench/bench_access.py [--runs 3]
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))
sys.path.insert(0, HERE)
from bench_xva import MiB, VMARC, bench_args, build  # noqa: E402

from vmarc.access import open_disks  # noqa: E402


def seconds(cmd, shell=False) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, shell=shell, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def random_reads(read, size: int, duration: float = 2.0) -> float:
    rnd = random.Random(1)
    n = 0
    t = time.perf_counter()
    while time.perf_counter() - t < duration:
        read(rnd.randrange(0, size // 4096) * 4096)
        n += 1
    return n / (time.perf_counter() - t)


def main() -> int:
    ap = bench_args(1536, "disk size of the XVA built by bench_xva.py")
    args = ap.parse_args()
    paths = build(args.work, args.size_mib)
    plain, gz = paths["plain"], paths["gzip"]
    cache = tempfile.mkdtemp(prefix="vmarc-bench-cache-")
    os.environ["XDG_CACHE_HOME"] = cache
    # the converted disk lives beside the archive (same file system, page cache warm)
    raw = os.path.join(args.work, "converted.raw")
    if not os.path.exists(raw):
        subprocess.run(VMARC + ["convert", "--no-sync", plain, raw], check=True)
    for p in (plain, gz, raw):
        subprocess.run(["cat", p], stdout=subprocess.DEVNULL, check=True)
    size = os.path.getsize(raw)
    print(f"archive {os.path.getsize(plain) / MiB:.0f} MiB plain, disk {size / MiB:.0f} MiB; "
          f"median of {args.runs} runs")

    def timed_open(path):
        t = time.perf_counter()
        opened = open_disks(path, quiet=True)
        return opened, time.perf_counter() - t

    idx_first, idx_again = [], []
    for _ in range(args.runs):
        shutil.rmtree(cache, ignore_errors=True)
        o, t1 = timed_open(plain)
        o.close()
        o, t2 = timed_open(plain)
        o.close()
        idx_first.append(t1)
        idx_again.append(t2)
    print(f"index a plain XVA (headers only):   {statistics.median(idx_first):6.3f} s; "
          f"reopen with the saved index {statistics.median(idx_again):6.3f} s")

    shutil.rmtree(cache, ignore_errors=True)
    t = time.perf_counter()
    o, _ = timed_open(gz)
    o.disks[0].read(size // 2, 4096)
    first_gz = time.perf_counter() - t
    o.close()
    t = time.perf_counter()
    o, _ = timed_open(gz)
    o.disks[0].read(size // 3, 4096)
    again_gz = time.perf_counter() - t
    rps_gz = random_reads(lambda off: o.disks[0].read(off, 4096), size)
    o.close()
    print(f"first random read from .xva.gz:     {first_gz:6.3f} s (builds the index and "
          f"gzip checkpoints); with them saved {again_gz:6.3f} s")

    o, _ = timed_open(plain)
    rps_plain = random_reads(lambda off: o.disks[0].read(off, 4096), size)
    o.close()
    with open(raw, "rb") as f:
        rps_raw = random_reads(lambda off: os.pread(f.fileno(), 4096, off), size)
    print(f"4 KiB random reads/s (Python API):  plain XVA {rps_plain:8.0f}, .xva.gz "
          f"{rps_gz:8.0f}, raw file {rps_raw:8.0f}")

    sock = os.path.join(cache, "nbd.sock")
    server = subprocess.Popen(VMARC + ["serve", plain, "--socket", sock],
                              stderr=subprocess.DEVNULL)
    mnt = tempfile.mkdtemp(prefix="vmarc-bench-mnt-")
    nbdkit = None
    try:
        while not os.path.exists(sock):
            time.sleep(0.05)
        url = f"nbd+unix:///?socket={sock}"
        subprocess.run(VMARC + ["mount", plain, mnt], check=True)
        fuse_file = os.path.join(mnt, "xvda")
        rows = {"cat raw file > /dev/null": [], "nbdcopy (skips holes) > null": [],
                "nbdcopy --no-extents > null": [], "cat FUSE file > /dev/null": [],
                "cat FUSE --kernel-cache, 1st read": []}
        # the same read from nbdkit's C file plugin serving the converted raw file: what an
        # NBD server reaches on this machine, whatever it is written in
        ksock = os.path.join(cache, "nbdkit.sock")
        if shutil.which("nbdkit"):
            nbdkit = subprocess.Popen(["nbdkit", "-f", "-r", "-U", ksock, "file", raw],
                                      stderr=subprocess.DEVNULL)
            while not os.path.exists(ksock):
                time.sleep(0.05)
            rows["nbdcopy from nbdkit file (raw)"] = []
        for _ in range(args.runs):
            if nbdkit:
                rows["nbdcopy from nbdkit file (raw)"].append(
                    seconds(["nbdcopy", f"nbd+unix:///?socket={ksock}", "null:"]))
            rows["cat raw file > /dev/null"].append(seconds(f"cat {raw} > /dev/null", True))
            rows["nbdcopy (skips holes) > null"].append(seconds(["nbdcopy", url, "null:"]))
            rows["nbdcopy --no-extents > null"].append(
                seconds(["nbdcopy", "--no-extents", url, "null:"]))
            # a fresh mount for each first read: with --kernel-cache a second cat of the
            # same mount is served by the page cache and would not measure vmarc at all
            for row, extra in (("cat FUSE file > /dev/null", []),
                               ("cat FUSE --kernel-cache, 1st read", ["--kernel-cache"])):
                subprocess.run(["fusermount3", "-u", mnt], check=True)
                subprocess.run(VMARC + ["mount", plain, mnt, *extra], check=True)
                rows[row].append(seconds(f"cat {fuse_file} > /dev/null", True))
        base = statistics.median(rows["cat raw file > /dev/null"])
        print("\nsequential read of the whole disk (acceptance: >= 50% of the raw file's speed)")
        for name, ts in rows.items():
            med = statistics.median(ts)
            print(f"  {name:32} {med:6.2f} s  {size / med / MiB:7.0f} MiB/s  "
                  f"{base / med * 100:5.0f}% of raw")
        subprocess.run(["fusermount3", "-u", mnt], check=True)
        subprocess.run(VMARC + ["mount", plain, mnt], check=True)  # direct I/O: no cache
        with open(fuse_file, "rb") as f:
            rps_fuse = random_reads(lambda off: os.pread(f.fileno(), 4096, off), size)
        print(f"4 KiB random reads/s through FUSE:  {rps_fuse:8.0f}")
    finally:
        if nbdkit:
            nbdkit.terminate()
            nbdkit.wait()
        subprocess.run(["fusermount3", "-u", mnt], capture_output=True)
        server.terminate()
        server.wait()
        shutil.rmtree(cache, ignore_errors=True)
        os.rmdir(mnt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
