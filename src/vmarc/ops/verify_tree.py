"""verify -r: every backup under a directory tree, several at once (one process each),
each archive read once, one record per backup and a summary.

What is a backup here, by name:
- .xva, .vma, .ova, .ovf (any compression suffix), .qcow2, .vhdx, .vmdk (not the raw
  -flat/-fNNN extents a descriptor names), .vhd files, and Xen Orchestra's VHD
  directories: each verified fully on its own (a differencing VHD or qcow2 layer alone,
  so a chain's base is read once, not once per child);
- Xen Orchestra's backup metadata (`xo-vm-backups/<vm>/<time>.json`): its disks' chains
  must resolve to the files, which are verified as the items above;
- .alias.vhd and .checksum files are parts of others.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor

from ..errors import CorruptError, VmarcError

SUFFIXES = re.compile(
    r"\.(xva|vma|ova|ovf|qcow2|vhdx|vmdk|vhd)(\.(gz|zst|lzo))?$|\.json$", re.IGNORECASE
)
VMDK_RAW_EXTENT = re.compile(r"-(flat|f\d{3})\.vmdk$", re.IGNORECASE)
LAYERED = (".vhd", ".qcow2", ".vmdk", ".vhdx")


def find_backups(tree: str, since: float | None = None) -> list[str]:
    """The backups under tree, in path order (modified at or after since, if given)."""
    found = []
    for top, dirs, files in os.walk(tree):
        dirs.sort()
        for d in list(dirs):
            path = os.path.join(top, d)
            if d.endswith(".vhd") and os.path.isfile(os.path.join(path, "footer")):
                dirs.remove(d)  # an XO VHD directory: one backup part, not a tree
                found.append(path)
        for f in sorted(files):
            path = os.path.join(top, f)
            if f.endswith(".alias.vhd") or VMDK_RAW_EXTENT.search(f):
                continue
            if f.endswith(".json") and "xo-vm-backups" not in path.split(os.sep):
                continue
            if f in ("encryption.json", "metadata.json", "cache.json.gz"):
                continue
            if SUFFIXES.search(f):
                found.append(path)
    if since is not None:
        found = [p for p in found if _mtime(p) >= since]
    return sorted(found)


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(
            os.path.getsize(os.path.join(top, f)) for top, _, files in os.walk(path) for f in files
        )
    return os.path.getsize(path)


def verify_one(path: str, deep: bool = False) -> dict:
    """One backup's record: path, format, status (ok, damaged, unreadable), problems
    (their first lines), problem count, bytes, seconds, and with deep the boot check."""
    from ..formats import open_archive
    from .verify import verify

    start = time.monotonic()
    rec = {"path": path, "format": None, "status": "ok", "problems": [], "count": 0}
    try:
        rec["bytes"] = _size(path)
        layered = path.lower().endswith(LAYERED) or os.path.isdir(path)
        with open_archive(path, no_backing=layered) as archive:
            rec["format"] = archive.format
            if archive.format == "xo":  # its files are items of their own: they resolve
                rec["disks"] = len(archive.disks)
            else:
                checks = verify(archive)
                if checks.problems:
                    rec["status"] = "damaged"
                    rec["problems"] = [str(p) for p in checks.problems[:5]]
                    rec["count"] = len(checks.problems)
        # the boot check is the VM's: an XO remote's VHDs are parts of the backups its
        # metadata files describe (a data disk alone would have no root)
        part = "xo-vm-backups" in path.split(os.sep) and rec["format"] != "xo"
        if deep and rec["status"] == "ok" and not part:
            rec["boot"] = _boot(path)
    except CorruptError as e:
        rec.update(status="damaged", problems=[str(e)], count=1)
    except VmarcError as e:
        # not readable as a backup: missing parent, not an archive, unsupported...
        rec.update(status="unreadable", problems=[str(e)], count=1)
    rec["seconds"] = round(time.monotonic() - start, 3)
    return rec


def _boot(path: str) -> dict:
    """The guest's root and what it mounts, read from the backup in place."""
    from ..access import open_disks
    from ..files.guest import Guest

    try:
        with open_disks(path, quiet=True) as opened:
            ok, text = Guest(opened).boot_check()
    except VmarcError as e:
        ok, text = False, str(e)
    return {"ok": ok, "found": text}


def verify_tree(tree: str, jobs: int = 1, since: float | None = None, deep: bool = False):
    """(records, pool, start): the backups' records in path order, each as soon as it and
    those before it are done; the process pool to shut down (None with one job); when
    the work started (time.monotonic, for the summary)."""
    paths = find_backups(tree, since)
    start = time.monotonic()
    if jobs <= 1 or len(paths) <= 1:
        records = (verify_one(p, deep) for p in paths)
        pool = None
    else:
        # fork: the workers inherit what the command set up (the remote's key)
        pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork"))
        records = pool.map(verify_one, paths, [deep] * len(paths))
    return records, pool, start


def summary(records: list[dict], seconds: float) -> dict:
    by = {s: [r for r in records if r["status"] == s] for s in ("ok", "damaged", "unreadable")}
    boot_bad = [r for r in records if r.get("boot") and not r["boot"]["ok"]]
    return {
        "backups": len(records),
        "ok": len(by["ok"]),
        "damaged": len(by["damaged"]),
        "unreadable": len(by["unreadable"]),
        "not_bootable": len(boot_bad),
        "bytes": sum(r.get("bytes", 0) for r in records),
        "seconds": round(seconds, 3),
        "first_problems": {r["path"]: r["problems"][0] for r in by["damaged"] + by["unreadable"]},
    }
