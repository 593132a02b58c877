#!/usr/bin/env python3
"""Random access in place: index time, NBD and FUSE sequential reads against reading the
converted raw file, 4 KiB random reads per second, first read from a .xva.gz.

Uses the XVA of bench_xva.py (built if missing). Usage: python -m bench.bench_access [--runs 3]
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from bench.bench_xva import VMARC, MiB, bench_args, build, warm_memory
from vmarc.access import open_disks

HERE = os.path.dirname(os.path.abspath(__file__))


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
    print(
        f"archive {os.path.getsize(plain) / MiB:.0f} MiB plain, disk {size / MiB:.0f} MiB; "
        f"median of {args.runs} runs"
    )

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
    print(
        f"index a plain XVA (headers only):   {statistics.median(idx_first):6.3f} s; "
        f"reopen with the saved index {statistics.median(idx_again):6.3f} s"
    )

    shutil.rmtree(cache, ignore_errors=True)
    t = time.perf_counter()
    o, _ = timed_open(gz)
    o.disks[0].read_at(size // 2, 4096)
    first_gz = time.perf_counter() - t
    o.close()
    t = time.perf_counter()
    o, _ = timed_open(gz)
    o.disks[0].read_at(size // 3, 4096)
    again_gz = time.perf_counter() - t
    rps_gz = random_reads(lambda off: o.disks[0].read_at(off, 4096), size)
    o.close()
    print(
        f"first random read from .xva.gz:     {first_gz:6.3f} s (builds the index and "
        f"gzip checkpoints); with them saved {again_gz:6.3f} s"
    )

    o, _ = timed_open(plain)
    rps_plain = random_reads(lambda off: o.disks[0].read_at(off, 4096), size)
    o.close()
    with open(raw, "rb") as f:
        rps_raw = random_reads(lambda off: os.pread(f.fileno(), 4096, off), size)
    print(
        f"4 KiB random reads/s (Python API):  plain XVA {rps_plain:8.0f}, .xva.gz "
        f"{rps_gz:8.0f}, raw file {rps_raw:8.0f}"
    )

    try:
        sequential(args, plain, raw, size, cache)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return 0


# -- sequential reads: NBD and FUSE against cat of the raw file -------------------------------
DIRECT = ("cat raw file > /dev/null", "dd bs=1M raw file > /dev/null")  # the baselines


def sequential(args, plain: str, raw: str, size: int, cache: str) -> None:
    """Whole-disk reads, interleaved, each after the memory warm-up: with the page cache
    warm (archive and raw file both cached: the transports' own cost) and, as root, cold
    (caches dropped before each read: what reading a backup from its disk costs).
    References no one tuned for vmarc show what the kernel's transports allow here."""
    sock = os.path.join(cache, "nbd.sock")
    mnt = tempfile.mkdtemp(prefix="vmarc-bench-mnt-")
    helpers, rss = [], {}
    try:
        fuse_file = os.path.join(mnt, "xvda")

        # a fresh server or mount for every read: each measures a first read, chunk
        # checksums included (a long-running one checks each chunk once, then never again;
        # with --kernel-cache a second cat would be served by the page cache)
        def fuse_read(*extra):
            def run():
                proc = mount(plain, mnt, *extra)
                try:
                    return read_timed(f"cat {fuse_file} > /dev/null")
                finally:
                    rss["mount"] = max(rss.get("mount", 0), peak_rss(proc.pid))
                    unmount(mnt, proc)

            return run

        def nbd_read(*extra, serve_args=()):
            def run():
                if os.path.exists(sock):  # a server killed before it could remove it
                    os.unlink(sock)
                server = subprocess.Popen(
                    VMARC + ["serve", plain, "--socket", sock, *serve_args],
                    stderr=subprocess.DEVNULL,
                )
                try:
                    wait_for(lambda: os.path.exists(sock), server)
                    return read_timed(["nbdcopy", *extra, f"nbd+unix:///?socket={sock}", "null:"])
                finally:
                    rss["serve"] = max(rss.get("serve", 0), peak_rss(server.pid))
                    server.terminate()
                    server.wait()

            return run

        rows = {
            "cat raw file > /dev/null": lambda: read_timed(f"cat {raw} > /dev/null"),
            "dd bs=1M raw file > /dev/null": lambda: read_timed(
                ["dd", f"if={raw}", "of=/dev/null", "bs=1M", "status=none"]
            ),
            "vmarc serve: nbdcopy > null": nbd_read(),
            "vmarc serve: nbdcopy --no-extents": nbd_read("--no-extents"),
            "vmarc serve --no-verify: nbdcopy": nbd_read(serve_args=["--no-verify"]),
            "vmarc mount: cat > /dev/null": fuse_read(),
            "vmarc mount --no-verify: cat": fuse_read("--no-verify"),
            "vmarc mount --kernel-cache: cat": fuse_read("--kernel-cache"),
        }
        refs = references(raw, cache, helpers)
        cold_rows = (*DIRECT, "vmarc serve: nbdcopy > null", "vmarc mount: cat > /dev/null")
        print(
            f"\nsequential read of the whole disk, median of {args.runs} "
            "(acceptance: >= 50% of reading the raw file directly)"
        )
        table(
            interleave({**rows, **refs}, args.runs, cold=False),
            size,
            "page cache warm (archive and raw file both cached)",
        )
        if os.access("/proc/sys/vm/drop_caches", os.W_OK):
            table(
                interleave({k: rows[k] for k in cold_rows}, args.runs, cold=True),
                size,
                "page cache cold (dropped before each read: a backup read from disk)",
            )
        else:
            print("  (cold-cache reads need root to drop the page cache: not measured)")
        print("peak RSS: " + ", ".join(f"{k} {v / 1024:.0f} MiB" for k, v in rss.items()))

        proc = mount(plain, mnt)  # direct I/O: no page cache between reads
        try:
            with open(fuse_file, "rb") as f:
                rps_fuse = random_reads(lambda off: os.pread(f.fileno(), 4096, off), size)
        finally:
            unmount(mnt, proc)
        print(f"4 KiB random reads/s through FUSE:  {rps_fuse:8.0f}")
    finally:
        for h in helpers:
            h.terminate()
            h.wait()
        subprocess.run(["fusermount3", "-u", mnt], capture_output=True)
        os.rmdir(mnt)


def references(raw: str, cache: str, helpers: list) -> dict:
    """Rows no vmarc code runs in: nbdkit's C file plugin serving the raw file (a C NBD
    server), nbdkit's null plugin (NBD with no data read at all: the transport's floor)
    and fuse_floor.c serving the raw file (FUSE with nothing but the kernel's copy)."""
    refs = {}
    if shutil.which("nbdkit"):
        for plugin, args_, extra in (
            ("file", [raw], []),
            ("null", [f"{os.path.getsize(raw)}"], ["--no-extents"]),
        ):
            ksock = os.path.join(cache, f"nbdkit-{plugin}.sock")
            helpers.append(
                subprocess.Popen(
                    ["nbdkit", "-f", "-r", "-U", ksock, plugin, *args_], stderr=subprocess.DEVNULL
                )
            )
            wait_for(lambda s=ksock: os.path.exists(s))
            refs[f"ref: nbdkit {plugin}, nbdcopy {' '.join(extra)}".rstrip()] = (
                lambda u=f"nbd+unix:///?socket={ksock}", e=extra: read_timed(
                    ["nbdcopy", *e, u, "null:"]
                )
            )
    else:
        print("(nbdkit not installed: no NBD reference rows)")
    floor = build_fuse_floor(cache)
    if floor:
        fmnt = tempfile.mkdtemp(prefix="vmarc-bench-floor-", dir=cache)

        def floor_read():
            # its best case: a pipe that holds a whole 1 MiB reply, so it can splice
            with sysctl("/proc/sys/fs/pipe-max-size", 2 << 20):
                proc = subprocess.Popen([floor, fmnt, raw], stderr=subprocess.DEVNULL)
                wait_for(lambda: os.path.ismount(fmnt), proc)  # it sizes its pipe first
            try:
                return read_timed(f"cat {fmnt}/f > /dev/null")
            finally:
                unmount(fmnt, proc)

        refs["ref: fuse_floor.c (C, splice): cat"] = floor_read
    return refs


def build_fuse_floor(cache: str) -> str | None:
    if os.geteuid() != 0 or not shutil.which("cc"):
        print("(fuse_floor reference needs root and a C compiler: not measured)")
        return None
    exe = os.path.join(cache, "fuse_floor")
    r = subprocess.run(
        ["cc", "-O2", "-o", exe, os.path.join(HERE, "fuse_floor.c")], capture_output=True, text=True
    )
    if r.returncode:
        print(f"(fuse_floor.c did not build: {r.stderr.strip().splitlines()[-1:]})")
        return None
    return exe


@contextlib.contextmanager
def sysctl(path: str, value: int):
    """A kernel setting raised for a moment (the pipe size is fixed when it is set)."""
    with open(path) as f:
        old = f.read().strip()
    with open(path, "w") as f:
        f.write(str(max(value, int(old))))
    try:
        yield
    finally:
        with open(path, "w") as f:
            f.write(old)


def interleave(rows: dict, runs: int, cold: bool) -> dict:
    """Every row once per round, rounds repeated, so machine weather hits all alike."""
    times = {k: [] for k in rows}
    for _ in range(runs):
        for name, run in rows.items():
            os.sync()
            if cold:
                with open("/proc/sys/vm/drop_caches", "w") as f:
                    f.write("3")
            times[name].append(run())
    return times


def read_timed(cmd) -> float:
    warm_memory()  # see bench_xva.warm_memory: page-cache fills pay no host faults
    return seconds(cmd, isinstance(cmd, str))


def table(times: dict, size: int, title: str) -> None:
    """Ratios against the faster of the direct reads (1 MiB reads beat cat's 128 KiB)."""
    base = min(statistics.median(times[k]) for k in DIRECT)
    print(f" {title}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"  {name:38} {med:6.2f} s  {size / med / MiB:7.0f} MiB/s  "
            f"{base / med * 100:5.0f}% of direct"
        )


def mount(archive: str, mnt: str, *extra) -> subprocess.Popen:
    """vmarc mount in the foreground, as a child whose peak RSS can be read."""
    proc = subprocess.Popen(
        VMARC + ["mount", "-F", archive, mnt, *extra], stderr=subprocess.DEVNULL
    )
    wait_for(lambda: os.path.ismount(mnt), proc)
    return proc


def unmount(mnt: str, proc: subprocess.Popen) -> None:
    subprocess.run(
        ["umount", mnt] if os.geteuid() == 0 else ["fusermount3", "-u", mnt], capture_output=True
    )
    proc.wait()


def wait_for(ready, proc: subprocess.Popen | None = None, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not ready():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        if time.monotonic() > end:
            raise RuntimeError("timed out waiting for a server or mount")
        time.sleep(0.02)


def peak_rss(pid: int) -> int:
    """VmHWM of a live process, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
