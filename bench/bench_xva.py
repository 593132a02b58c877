#!/usr/bin/env python3
"""XVA -> raw against `cat` and against decompression alone, on the same data, one run.

Builds a ~1 GiB single-disk XVA (a third of the chunks zero, the rest half-compressible),
its gzip and zstd variants, then times each command several times and prints medians,
ratios and vmarc's peak RSS. Usage: python -m bench.bench_xva [--size-mib 1024] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time

from tests.support import xvagen  # the tests' independent generator

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

MiB = 1 << 20
VMARC = [sys.executable, "-m", "vmarc"]
# An installed vmarc runs from compiled bytecode (pip writes it); a shell that forbids
# writing .pyc files would charge every command ~40 ms of recompiling instead.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


def make_disk(size_mib: int) -> xvagen.XDisk:
    """A third of the chunks zero; the rest a mix of entropies as real disks hold:
    incompressible (media, compressed files), ~4 bits/byte (text, code) and ~2 bits/byte
    with zero runs (binaries, file system metadata)."""
    rnd = random.Random(42)
    text = bytes.maketrans(
        bytes(range(256)), bytes(b"etaoinshrdlucmfw"[i % 16] for i in range(256))
    )
    low = bytes.maketrans(
        bytes(range(256)), bytes(b"\0\0\0\0\x01\x02\xff@"[i % 8] for i in range(256))
    )
    chunks = {}
    for c in range(size_mib):
        if c % 3 == 1 and c not in (0, size_mib - 1):
            continue  # zero chunk: skipped by the exporter
        noise = rnd.randbytes(MiB)
        kind = (c // 3) % 3
        chunks[c] = noise if kind == 0 else noise.translate(text if kind == 1 else low)
    return xvagen.XDisk("Ref:1", None, size=size_mib * MiB, sparse=chunks)


def archive_paths(work: str) -> dict[str, str]:
    return {
        "plain": os.path.join(work, "vm.xva"),
        "gzip": os.path.join(work, "vm.xva.gz"),
        "zstd": os.path.join(work, "vm.xva.zst"),
    }


def build(work: str, size_mib: int) -> dict[str, str]:
    paths = archive_paths(work)
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    build_in_child("bench.bench_xva", size_mib, work)
    return paths


def build_in_child(module: str, size_mib: int, work: str) -> None:
    """Run module's --build-only in a child process: the generators hold the disk in
    memory, and a forked child's peak RSS would otherwise include it."""
    subprocess.run(
        [sys.executable, "-m", module, "--build-only", "--size-mib", str(size_mib), "--work", work],
        check=True,
        cwd=os.path.dirname(HERE),
    )


def build_files(paths, size_mib: int) -> None:
    spec = xvagen.XvaSpec(disks=[make_disk(size_mib)])
    with open(paths["plain"], "wb") as f:
        xvagen.write_to(f, spec)
    subprocess.run(f"gzip -1 -c {paths['plain']} > {paths['gzip']}", shell=True, check=True)
    subprocess.run(
        ["zstd", "-q", "-3", "-T0", "-f", paths["plain"], "-o", paths["zstd"]], check=True
    )
    return paths


def timed(cmd, shell=False) -> tuple[float, int]:
    """Wall time and peak RSS (KiB) of one command."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, shell=shell, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"bench: command failed: {cmd}")
    return elapsed, usage.ru_maxrss


def warm_memory(mib: int = 2048) -> None:
    """Touch and free memory just before a timed job. On this project's VMs the guest
    hands freed pages back to the host (free page reporting, a 2 s delay); a job that
    writes its output into such pages pays a host fault per page, 0.5 s to 1.5 s per
    GiB at random. Pages freed a moment ago are still the guest's, so every job (the
    baselines alike) writes at memory speed and only its own cost is measured."""
    # in a child: a fork of a process that once held 2 GiB would report that as the
    # peak RSS of every command timed after it
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"n = {mib << 20}; b = bytearray(n); b[::4096] = bytes([1]) * len(range(0, n, 4096))",
        ],
        check=True,
    )


def interleaved(jobs: dict, runs: int, cleanup) -> dict:
    """Run every job once per round, rounds repeated: disk and page-cache weather on a
    shared machine then hits every job alike. Returns {name: (median s, min s, peak RSS KiB)}."""
    times = {k: [] for k in jobs}
    rss = {k: 0 for k in jobs}
    for _ in range(runs):
        for name, cmd in jobs.items():
            cleanup()
            os.sync()  # no dirty pages left by the previous run
            warm_memory()
            t, r = timed(cmd, isinstance(cmd, str))
            times[name].append(t)
            rss[name] = max(rss[name], r)
    return {k: (statistics.median(v), min(v), rss[k]) for k, v in times.items()}


def report(res: dict, pairs, target: float | None = 1.3) -> None:
    """Print every job's median, min and peak RSS, then vmarc/baseline ratios. A pair
    (vmarc job, baseline[, target]) may carry its own target; None prints none."""
    print(f"{'command':34} {'median':>8} {'min':>7} {'peak RSS':>9}")
    for name, (med, low, rss) in res.items():
        print(f"{name:34} {med:7.2f}s {low:6.2f}s {rss / 1024:6.0f} MiB")
    print("\nratios (median / median)")
    for vm, base, *own in pairs:
        goal = own[0] if own else target
        print(
            f"  {vm:34} / {base:30} {res[vm][0] / res[base][0]:5.2f}"
            + (f"   (target <= {goal})" if goal else "")
        )
    print(f"peak RSS of vmarc: {max(r[2] for k, r in res.items() if 'vmarc' in k) / 1024:.0f} MiB")


def allocation(rows, out_dir: str) -> None:
    """Print the allocated size (du) of vmarc's output beside qemu-img's for the same
    disk. rows: (label, vmarc argv writing OUT, qemu-img argv writing OUT, or a raw
    disk file that `qemu-img convert -O raw` copies sparse). One untimed run each."""
    print("\nallocated size of the output (st_blocks), vmarc / qemu-img on the same disk")
    for label, mine, theirs in rows:
        sizes = []
        for k, cmd in enumerate((mine, theirs)):
            out = os.path.join(out_dir, f"alloc{k}.out")
            if isinstance(cmd, str):  # a raw disk: qemu-img's sparse copy of it
                cmd = ["qemu-img", "convert", "-f", "raw", "-O", "raw", cmd, "OUT"]
            subprocess.run(
                [out if a == "OUT" else a for a in cmd], check=True, stdout=subprocess.DEVNULL
            )
            sizes.append(os.stat(out).st_blocks * 512)
            os.unlink(out)
        print(
            f"  {label:34} {sizes[0] / MiB:9.1f} MiB {sizes[1] / MiB:9.1f} MiB "
            f"{sizes[0] / sizes[1]:6.3f}"
        )


def bench_args(size_mib: int, size_help: str | None = None) -> argparse.ArgumentParser:
    """The options every benchmark script takes."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=size_mib, help=size_help)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--work", default=os.path.join(HERE, "work"))
    ap.add_argument(
        "--out-dir",
        default="/dev/shm" if os.path.isdir("/dev/shm") else None,
        help="where outputs go (default tmpfs: this project's VMs share a disk "
        "whose speed swings 10x between runs, which would drown our own cost)",
    )
    return ap


def main() -> int:
    ap = bench_args(1536, "disk size (the archive holds two thirds of it)")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    if args.build_only:
        build_files(archive_paths(args.work), args.size_mib)
        return 0
    paths = build(args.work, args.size_mib)
    out = os.path.join(args.out_dir or args.work, "out.raw")

    def rm():
        if os.path.exists(out):
            os.unlink(out)

    print(
        f"archive: {os.path.getsize(paths['plain']) / MiB:.0f} MiB plain, "
        f"{os.path.getsize(paths['gzip']) / MiB:.0f} MiB gzip, "
        f"{os.path.getsize(paths['zstd']) / MiB:.0f} MiB zstd; disk {args.size_mib} MiB; "
        f"median of {args.runs} interleaved runs; output in {os.path.dirname(out)}"
    )
    for p in paths.values():  # warm the page cache
        subprocess.run(["cat", p], stdout=subprocess.DEVNULL, check=True)

    P, G, Z = paths["plain"], paths["gzip"], paths["zstd"]
    jobs = {
        "cat > file": f"cat {P} > {out}",
        "cat > file && sync": f"cat {P} > {out} && sync {out}",
        "plain: vmarc convert": VMARC + ["convert", P, out],
        "plain: vmarc convert --no-sync": VMARC + ["convert", "--no-sync", P, out],
        "gzip -dc > /dev/null": f"gzip -dc {G} > /dev/null",
        "igzip (isal) -dc > /dev/null": f"{sys.executable} -m isal.igzip -d -c {G} > /dev/null",
        "gzip: vmarc convert --no-sync": VMARC + ["convert", "--no-sync", G, out],
        "igzip (isal) -dc > file": f"{sys.executable} -m isal.igzip -d -c {G} > {out}",
        "zstd -dc > /dev/null": f"zstd -dc {Z} > /dev/null",
        "zstd -dc > file": f"zstd -dc {Z} > {out}",
        "zstd: vmarc convert --no-sync": VMARC + ["convert", "--no-sync", Z, out],
    }
    res = interleaved(jobs, args.runs, rm)
    rm()
    report(
        res,
        [
            ("plain: vmarc convert --no-sync", "cat > file"),
            ("plain: vmarc convert", "cat > file && sync"),
            ("gzip: vmarc convert --no-sync", "gzip -dc > /dev/null"),
            ("gzip: vmarc convert --no-sync", "igzip (isal) -dc > /dev/null"),
            ("gzip: vmarc convert --no-sync", "igzip (isal) -dc > file"),
            ("zstd: vmarc convert --no-sync", "zstd -dc > /dev/null"),
            ("zstd: vmarc convert --no-sync", "zstd -dc > file"),
        ],
    )
    # qemu-img cannot read an XVA: it copies the disk vmarc extracted (itself sparse)
    subprocess.run(VMARC + ["convert", "--no-sync", P, out], check=True)
    full = os.path.join(os.path.dirname(out), "full.raw")
    subprocess.run(["cp", "--sparse=never", out, full], check=True)
    allocation(
        [("xva -> raw", VMARC + ["convert", "--no-sync", P, "OUT"], full)], os.path.dirname(out)
    )
    os.unlink(full)
    rm()
    return 0


if __name__ == "__main__":
    sys.exit(main())
