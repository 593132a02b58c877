"""Seeded mutations of small archives and images run through `vmarc verify` and `vmarc
convert`, in one worker process (no interpreter start per case), recording each case's
exit code and stderr. tests/test_fuzz.py runs a few hundred; for a long run:

    python tests/fuzz.py --hours 2 [--seed N] [--work DIR]

prints how many cases ran and every finding (a traceback, an exit code other than 0, 1
or 2, a file left behind, a wrong output where the format checksums the bytes)."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import resource
import shutil
import subprocess
import sys
import time

MiB = 1 << 20


def samples(work: str) -> dict[str, tuple[bytes, bytes | None]]:
    """name -> (file bytes, the disk when the format checksums it, else None)."""
    from tests.support import vmagen
    from tests.support import xvagen as g

    rnd = random.Random(1)
    disk = bytearray(rnd.randbytes(2 * MiB))
    disk[MiB // 2 : MiB] = bytes(MiB // 2)
    disk = bytes(disk)
    out = {
        "xva": (g.build(g.XvaSpec(disks=[g.XDisk("Ref:1", disk, "d", "0")])), disk),
        "vma": (vmagen.build([("drive-scsi0", disk)], per_extent=7), None),
    }
    raw = os.path.join(work, "src.raw")
    with open(raw, "wb") as f:
        f.write(disk)
    for name, opts in (
        ("vhd", ["-O", "vpc", "-o", "force_size=on"]),
        ("qcow2", ["-O", "qcow2"]),
        ("vmdk", ["-O", "vmdk"]),
        ("so.vmdk", ["-O", "vmdk", "-o", "subformat=streamOptimized"]),
        ("vhdx", ["-O", "vhdx", "-o", "block_size=1M"]),
    ):
        path = os.path.join(work, f"src.{name}")
        subprocess.run(["qemu-img", "convert", "-f", "raw", *opts, raw, path], check=True)
        with open(path, "rb") as f:
            out[name] = (f.read(), None)
    from tests.support import ovagen

    ova = os.path.join(work, "src.ova")
    ovagen.build_ova(ova, "fz", [("fz-disk1.vmdk", out["so.vmdk"][0], len(disk))])
    with open(ova, "rb") as f:
        out["ova"] = (f.read(), disk)  # the manifest's digests cover the disk
    return out


def xo_remote(work: str, disk: bytes) -> tuple[str, str, list[str]]:
    """A Xen Orchestra remote (two delta backups of a one-disk VM, gzip VHD directories,
    written by XO's code): (its root, the last backup's metadata, every part file)."""
    from tests.support import xoremote

    later = bytearray(disk)
    later[5000:9000] = bytes(range(256)) * 15 + bytes(160)
    root = os.path.join(work, "xo")
    backups = xoremote.build(root, 2, True, "gzip", given=[[disk], [bytes(later)]])
    parts = [
        os.path.join(top, f)
        for top, _, files in os.walk(root)
        for f in files
        if f.endswith(".alias.vhd") or os.sep + "data" + os.sep in os.path.join(top, f)
    ] + [m for m, _ in backups]
    return root, backups[-1][0], sorted(parts)


def mutate(data: bytes, rnd: random.Random) -> bytes:
    """One seeded mutation: byte flips, a run of random bytes, or a cut."""
    b = bytearray(data)
    kind = rnd.randrange(4)
    if kind == 0:
        for _ in range(rnd.randint(1, 4)):
            b[rnd.randrange(len(b))] ^= 1 << rnd.randrange(8)
    elif kind == 1:
        at = rnd.randrange(len(b))
        n = rnd.randint(2, 64)
        b[at : at + n] = rnd.randbytes(min(n, len(b) - at))
    elif kind == 2:  # the metadata at the start, where structure lives
        at = rnd.randrange(min(len(b), 16384))
        b[at] = rnd.randrange(256)
    else:
        del b[rnd.randrange(1, len(b)) :]
    return bytes(b)


def run_case(path: str, out_dir: str, cmd: str) -> tuple[int, str]:
    """vmarc in this process: (exit code, stderr)."""
    from vmarc.cli.main import main

    err = io.StringIO()
    args = (
        ["verify", path] if cmd == "verify" else ["convert", path, os.path.join(out_dir, "o.raw")]
    )
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(args)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException as e:  # anything that escapes main() is a finding
            import traceback

            return -1, "".join(traceback.format_exception(e))
    return code, err.getvalue()


def fuzz(work: str, seed: int, cases: int | None, hours: float | None) -> dict:
    os.makedirs(work, exist_ok=True)
    base = samples(work)
    xo_root, xo_meta, xo_parts = xo_remote(work, base["xva"][1])
    rnd = random.Random(seed)
    findings, ran = [], 0
    deadline = time.time() + hours * 3600 if hours else None
    names = sorted(base) + ["xo-remote"]
    while (cases is None or ran < cases) and (deadline is None or time.time() < deadline):
        name = names[ran % len(names)]
        if name == "xo-remote":  # one part of a copy of the remote mutated (or removed)
            copy = os.path.join(work, "case-xo")
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(xo_root, copy)
            part = rnd.choice(xo_parts).replace(xo_root, copy, 1)
            with open(part, "rb") as f:
                mutated = mutate(f.read(), rnd)
            with open(part, "wb") as f:
                f.write(mutated)
            path, disk = xo_meta.replace(xo_root, copy, 1), None
        else:
            data, disk = base[name]
            case = mutate(data, rnd)
            path = os.path.join(work, f"case.{name}")
            with open(path, "wb") as f:
                f.write(case)
        out_dir = os.path.join(work, "out")
        shutil.rmtree(out_dir, ignore_errors=True)
        os.makedirs(out_dir)
        for cmd in ("verify", "convert"):
            code, err = run_case(path, out_dir, cmd)
            left = sorted(os.listdir(out_dir))
            what = f"{name} case {ran} ({cmd})"
            if code not in (0, 1, 2, 3) or "Traceback" in err:
                findings.append(f"{what}: exit {code}: {err.strip()[-500:]}")
            if cmd == "convert" and code != 0 and left:
                findings.append(f"{what}: exit {code} left {left}")
            if cmd == "convert" and code == 0 and disk is not None:
                with open(os.path.join(out_dir, "o.raw"), "rb") as f:
                    if f.read() != disk:
                        findings.append(f"{what}: exit 0 with a wrong disk")
        ran += 1
    return {
        "cases": ran,
        "findings": findings,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hours", type=float, help="run for this long")
    ap.add_argument("--cases", type=int, help="run this many cases")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args()
    work = args.work or os.path.join(os.environ.get("TMPDIR", "/tmp"), f"vmarc-fuzz-{os.getpid()}")
    try:
        res = fuzz(work, args.seed, args.cases if args.cases or args.hours else 200, args.hours)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        import json

        print(json.dumps(res))
    else:
        print(
            f"{res['cases']} cases, seed {args.seed}, peak RSS {res['peak_rss_mib']:.0f} MiB, "
            f"{len(res['findings'])} findings"
        )
        for f in res["findings"]:
            print(f"  {f}")
    return 1 if res["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
