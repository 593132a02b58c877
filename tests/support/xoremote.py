"""Xen Orchestra backup remotes written by Xen Orchestra's own code (tests/oracles/
xo-remote.js: @xen-orchestra/fs and vhd-lib 4), with the backup metadata in the shape
XO's IncrementalRemoteWriter gives it. The disk states come from here, so every backup's
disk is known byte for byte."""

import json
import os
import random
import subprocess
import uuid

from tests.support.helpers import ROOT, need

MiB = 1 << 20
BLOCK = 2 * MiB
ORACLE = os.path.join(ROOT, "tests", "oracles", "xo-remote.js")
VM_UUID = "5e1f4c1a-0b7e-4c4e-9a55-2f3c1d0e7a11"
JOB = "0f3a7e52-7a3b-4f27-9d0c-5c1b2a9e8d01"


def _changed(a: bytes, b: bytes) -> list[int]:
    return [
        i
        for i in range(-(-len(b) // BLOCK))
        if a[i * BLOCK : (i + 1) * BLOCK] != b[i * BLOCK : (i + 1) * BLOCK]
    ]


def states(count: int, sizes=(12 * MiB, 6 * MiB), seed=1) -> list[list[bytes]]:
    """count successive states of each disk: random data in some MiBs, then each
    backup changes a few places (a sector, a run across a block edge, a zeroed block)."""
    rnd = random.Random(seed)
    first = []
    for size in sizes:
        d = bytearray(size)
        for m in range(0, size, MiB):
            if (m // MiB) % 3 != 2:
                d[m : m + 8192] = rnd.randbytes(8192)
        first.append(d)
    out = [[bytes(d) for d in first]]
    for _ in range(1, count):
        nxt = []
        for d in out[-1]:
            d = bytearray(d)
            at = rnd.randrange(0, len(d) - 4096) // 512 * 512
            d[at : at + 512] = rnd.randbytes(512)
            edge = rnd.randrange(1, len(d) // BLOCK) * BLOCK - 1000
            d[edge : edge + 2000] = rnd.randbytes(2000)
            z = rnd.randrange(0, len(d) // BLOCK) * BLOCK
            d[z : z + BLOCK] = bytes(min(BLOCK, len(d) - z))
            nxt.append(bytes(d))
        out.append(nxt)
    return out


def metadata(k: int, basename: str, vhds: dict, sizes) -> dict:
    """What IncrementalRemoteWriter stores for one delta backup."""
    refs = [f"OpaqueRef:vdi-{i}" for i in range(len(sizes))]
    return {
        "isVhdDifferencing": {f"{r}.vhd": k > 0 for r in refs},
        "jobId": JOB,
        "mode": "delta",
        "scheduleId": "8a2f9d10-2a1e-4d55-b6a7-4e4f0a1b2c3d",
        "timestamp": 1767225600000 + k * 86400000,
        "vbds": {
            f"OpaqueRef:vbd-{i}": {
                "VDI": r,
                "userdevice": str(i),
                "type": "Disk",
                "bootable": i == 0,
                "mode": "RW",
            }
            for i, r in enumerate(refs)
        },
        "vdis": {
            r: {
                "uuid": f"0000000{i}-aaaa-4bbb-8ccc-00000000000{i}",
                "name_label": f"disk {i}",
                "virtual_size": sizes[i],
                "$snapshot_of$uuid": f"0000000{i}-aaaa-4bbb-8ccc-00000000000{i}",
            }
            for i, r in enumerate(refs)
        },
        "version": "2.0.0",
        "vifs": {
            "OpaqueRef:vif-0": {
                "MAC": "7a:2c:11:00:00:01",
                "device": "0",
                "network": "OpaqueRef:net-0",
                "MTU": "1500",
            }
        },
        "vhds": vhds,
        "vm": {
            "$ref": "OpaqueRef:vm",
            "uuid": VM_UUID,
            "name_label": "xo-web01",
            "memory_static_max": str(1024 * MiB),
            "memory_dynamic_min": str(1024 * MiB),
            "VCPUs_max": "2",
            "VCPUs_at_startup": "2",
            "HVM_boot_params": {"order": "cd"},
            "VBDs": [f"OpaqueRef:vbd-{i}" for i in range(len(sizes))],
            "VIFs": ["OpaqueRef:vif-0"],
            "other_config": {"base_template_name": "Debian Bookworm 12"},
        },
        "vmSnapshot": {"uuid": str(uuid.UUID(int=k + 1))},
    }


def build(
    root,
    count=3,
    directory=True,
    compression=None,
    key: bytes | None = None,
    seed=1,
    given: list[list[bytes]] | None = None,
):
    """A remote at root with `count` delta backups of a two-disk VM (the first holds every
    block, the others the blocks changed since the one before, chained to it), or of the
    states given. Returns [(metadata path, [disk states])] in time order."""
    need("node")
    root = str(root)
    work = root + ".work"
    os.makedirs(work, exist_ok=True)
    all_states = given or states(count, seed=seed)
    sizes = [len(d) for d in all_states[0]]
    vm_dir = f"xo-vm-backups/{VM_UUID}"
    spec = {"root": root, "directory": directory, "compression": compression, "backups": []}
    if key:
        spec["encryptionKey"] = key.hex()
    out, prev = [], [None] * len(sizes)
    for k, disks in enumerate(all_states):
        basename = f"2026010{k + 1}T000000Z" if k < 9 else f"202601{k + 1}T000000Z"
        entry_disks, vhds = [], {}
        for i, data in enumerate(disks):
            raw = os.path.join(work, f"b{k}-d{i}.raw")
            with open(raw, "wb") as f:
                f.write(data)
            vdi = f"0000000{i}-aaaa-4bbb-8ccc-00000000000{i}"
            name = f"{basename}.alias.vhd" if directory else f"{basename}.vhd"
            rel = f"vdis/{JOB}/{vdi}/{name}"
            path = f"{vm_dir}/{rel}"
            blocks = None if k == 0 else _changed(all_states[k - 1][i], data)
            entry_disks.append(
                {
                    "path": path,
                    "raw": raw,
                    "blocks": blocks,
                    "parent": prev[i],
                    "dataId": str(uuid.UUID(int=(k << 8) + i + 1)),
                }
            )
            vhds[f"OpaqueRef:vdi-{i}"] = rel
            prev[i] = path
        spec["backups"].append(
            {
                "vmDir": vm_dir,
                "metadataName": f"{basename}.json",
                "metadata": metadata(k, basename, vhds, sizes),
                "disks": entry_disks,
            }
        )
        out.append((os.path.join(root, vm_dir, f"{basename}.json"), disks))
    spec_path = os.path.join(work, "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    subprocess.run(["node", ORACLE, spec_path], check=True, capture_output=True, cwd=ROOT)
    for k in range(count):  # the raw states stay in memory; the copies go
        for i in range(len(sizes)):
            os.unlink(os.path.join(work, f"b{k}-d{i}.raw"))
    return out
