#!/usr/bin/env python3
"""Files inside the guest (issue 17): `vmarc cat` of a 256 MiB file from an ext4 guest
inside a plain XVA against `debugfs -R dump` of the same file from the raw disk, the
`vmarc ls -R` of a 20,000-file tree, and the first `vmarc ls /` of a .xva.gz whose
gzip checkpoints are already saved; with each command's peak RSS.

Usage: python -m bench.bench_files [--runs 5] [--work bench/work]
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from bench.bench_xva import VMARC, MiB, bench_args, warm_memory

FILES = 20_000
BIG = 256 * MiB


def build(work: str) -> dict:
    """The guest disk (one MBR partition, ext4 by mke2fs -d) and its XVAs, made once."""
    d = os.path.join(work, "files")
    paths = {
        k: os.path.join(d, n)
        for k, n in (("raw", "disk.raw"), ("plain", "vm.xva"), ("gzip", "vm.xva.gz"))
    }
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    shutil.rmtree(d, ignore_errors=True)
    tree = os.path.join(d, "tree")
    os.makedirs(os.path.join(tree, "etc"))
    with open(os.path.join(tree, "etc/hostname"), "w") as f:
        f.write("bench\n")
    with open(os.path.join(tree, "big.bin"), "wb") as f:
        for _ in range(BIG // MiB):
            f.write(os.urandom(MiB))
    for i in range(FILES):
        sub = os.path.join(tree, "many", f"d{i // 200:03d}")
        os.makedirs(sub, exist_ok=True)
        with open(os.path.join(sub, f"f{i:05d}"), "w") as f:
            f.write(f"file {i}\n")
    fs = os.path.join(d, "fs.img")
    with open(fs, "wb") as f:
        f.truncate(400 * MiB)
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-N", "30000", "-d", tree, fs], check=True)
    shutil.rmtree(tree)
    with open(paths["raw"], "wb") as f:
        f.truncate(402 * MiB)
    subprocess.run(["sfdisk", "-q", paths["raw"]], input=b"label: dos\n2048,,L\n", check=True)
    with open(fs, "rb") as src, open(paths["raw"], "r+b") as dst:
        dst.seek(MiB)
        shutil.copyfileobj(src, dst, 8 * MiB)
    os.unlink(fs)
    for key in ("plain", "gzip"):
        subprocess.run(
            VMARC
            + ["create", "-O", "xva", "--disk", f"root={paths['raw']}", "-f", "raw", paths[key]],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return paths


def timed(cmd: list[str], stdout=subprocess.DEVNULL) -> tuple[float, int]:
    """Seconds and peak RSS (KiB) of one command."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    took = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return took, usage.ru_maxrss


def main() -> int:
    args = bench_args(0).parse_args()
    paths = build(args.work)
    out_dir = args.out_dir or tempfile.gettempdir()
    cache = tempfile.mkdtemp(prefix="vmarc-bench-cache-")
    os.environ["XDG_CACHE_HOME"] = cache
    plain, gz, raw = paths["plain"], paths["gzip"], paths["raw"]
    for p in paths.values():
        subprocess.run(["cat", p], stdout=subprocess.DEVNULL, check=True)
    # the index of each archive is built once, as a first open does, and not timed
    for p in (plain, gz):
        subprocess.run(VMARC + ["ls", p, "/"], check=True, stdout=subprocess.DEVNULL)
    ours, theirs = os.path.join(out_dir, "cat.vmarc"), os.path.join(out_dir, "cat.debugfs")
    jobs = {
        "vmarc cat (plain XVA)": lambda: _to(VMARC + ["cat", plain, "/big.bin"], ours),
        "debugfs dump (raw)": lambda: timed(
            ["debugfs", "-R", f"dump /big.bin {theirs}", f"{raw}?offset={MiB}"]
        ),
        "vmarc ls -R (20,000 files)": lambda: timed(VMARC + ["ls", "-R", plain, "/many"]),
        "vmarc ls -lR (20,000 files)": lambda: timed(VMARC + ["ls", "-lR", plain, "/many"]),
        "vmarc ls / (.xva.gz, saved)": lambda: timed(VMARC + ["ls", gz, "/"]),
    }
    results = {name: [] for name in jobs}
    for _ in range(args.runs):
        for name, job in jobs.items():  # interleaved: the machine's swings hit all alike
            warm_memory(512)
            results[name].append(job())
    with open(ours, "rb") as a, open(theirs, "rb") as b:
        same = a.read() == b.read()
    for p in (ours, theirs):
        os.unlink(p)
    shutil.rmtree(cache, ignore_errors=True)
    print(
        f"guest: ext4 on xvda1, {BIG // MiB} MiB file, {FILES} small files; "
        f"median of {args.runs} interleaved runs"
    )
    med = {n: statistics.median(t for t, _ in r) for n, r in results.items()}
    for name, runs in results.items():
        peak = max(rss for _, rss in runs) / 1024
        print(f"  {name:30s} {med[name]:7.3f} s   peak RSS {peak:6.1f} MiB")
    ratio = med["vmarc cat (plain XVA)"] / med["debugfs dump (raw)"]
    print(f"  cat / debugfs dump: {ratio:.2f}x (target <= 1.5); same bytes: {same}")
    return 0


def _to(cmd, path):
    with open(path, "wb") as f:
        return timed(cmd, stdout=f)


if __name__ == "__main__":
    sys.exit(main())
