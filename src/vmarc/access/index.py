"""The index file: each disk's extent map (and chunk checksums) of one archive, saved in
the cache directory keyed by the archive's identity and reused while it is unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from array import array

from ..errors import VmarcError
from ..io.hashing import xxh64_text
from .chunks import ChunkChecks
from .maps import DiskMap

INDEX_MAGIC = b"vmarc-index 3\n"  # 2: chunk checksums; 3: damaged stretches


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vmarc")


def identity(path: str, remote=None) -> dict:
    """What makes an index valid: the file's size, mtime and a hash of its head (an
    object at a URL, remote: its URL, size and head)."""
    if remote is not None:
        return {
            "url": path,
            "size": remote.size,
            "head_sha256": hashlib.sha256(remote.pread(1 << 20, 0)).hexdigest(),
        }
    st = os.stat(path)
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    return {
        "path": os.path.realpath(path),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "head_sha256": hashlib.sha256(head).hexdigest(),
    }


def index_path(ident: dict, explicit: str | None) -> str:
    if explicit:
        return explicit
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]
    return os.path.join(cache_dir(), key + ".idx")


def save_index(
    path: str, ident: dict, fmt: str, how: str, maps: dict[str, DiskMap], note: str | None = None
) -> None:
    """magic, a JSON header line, then per disk: its three run arrays (little-endian
    u64) and, when it has chunk checksums, their offsets and sizes (u64), algorithms
    (u8) and digests (ChunkChecks.WIDTH bytes each). The header holds the body's XXH64:
    a cache file damaged on disk is built again, never trusted."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    body = bytearray()
    for m in maps.values():
        arrays = [m.starts, m.lengths, m.offsets]
        if m.checks:
            arrays += [m.checks.starts, m.checks.sizes]
        for arr in arrays:
            a = array("Q", arr)
            if sys.byteorder != "little":
                a.byteswap()
            body += a.tobytes()
        if m.checks:
            body += m.checks.algos.tobytes() + m.checks.digests
    head = {
        "identity": ident,
        "format": fmt,
        "store": how,
        "digests": ChunkChecks.ALGOS,
        "disks": [
            {"id": k, "runs": len(m.starts), "chunks": len(m.checks.starts) if m.checks else None}
            for k, m in maps.items()
        ],
        "body_xxh64": xxh64_text(body),
        "damage": note,
    }  # the archive's damage, said again whenever the index is used
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(INDEX_MAGIC + json.dumps(head).encode() + b"\n")
        f.write(body)
    os.replace(tmp, path)


def load_index(path: str, ident: dict):
    """(format, store kind, {disk id: DiskMap}, damage note) or None when absent, stale
    or damaged."""
    try:
        with open(path, "rb") as f:
            if f.read(len(INDEX_MAGIC)) != INDEX_MAGIC:
                return None
            head = json.loads(f.readline())
            if head.get("identity") != ident or head.get("digests") != list(ChunkChecks.ALGOS):
                return None
            body = memoryview(f.read())
        if xxh64_text(body) != head["body_xxh64"]:
            return None
        pos = 0

        def take(n: int) -> memoryview:
            nonlocal pos
            if pos + n > len(body):
                raise ValueError("index ends early")
            pos += n
            return body[pos - n : pos]

        def u64s(n: int) -> array:
            a = array("Q")
            a.frombytes(take(8 * n))
            if sys.byteorder != "little":
                a.byteswap()
            return a

        maps = {}
        for d in head["disks"]:
            dmap = DiskMap(*(u64s(d["runs"]) for _ in range(3)))
            n = d["chunks"]
            if n is not None:
                starts, sizes = u64s(n), u64s(n)
                algos = array("B", bytes(take(n)))
                dmap.checks = ChunkChecks(
                    starts, sizes, algos, bytearray(take(n * ChunkChecks.WIDTH))
                )
            maps[d["id"]] = dmap.finish()  # refuses runs out of order or overlapping
        return head["format"], head["store"], maps, head.get("damage")
    except (OSError, ValueError, KeyError, TypeError, VmarcError):
        return None
