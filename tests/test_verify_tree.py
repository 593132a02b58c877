"""verify -r: a tree of backups of every kind, some damaged in ways verify detects, is
verified in one command; exactly the damaged ones are named; --jobs, --since, --deep and
JSON."""

import os
import struct
import subprocess

import pytest

from tests.support import guestgen as gg
from tests.support import ovagen, vmagen, xoremote
from tests.support import xvagen as g
from tests.support.helpers import need
from tests.support.helpers import vmarc as run
from tests.test_json import valid

MiB = 1 << 20


def _qemu(*args):
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True)


def _flip(path, at):
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))


def build_tree(root) -> set[str]:
    """At least 30 backups of every kind; returns the paths damaged on purpose."""
    need("qemu-img")
    damaged = set()
    os.makedirs(root)
    raw = os.path.join(root, "..", "src.raw")
    data = vmagen.disk_bytes(5 * MiB, seed=3)
    with open(raw, "wb") as f:
        f.write(data)
    for i in range(4):  # XVA, plain and gzip
        spec = g.XvaSpec(
            disks=[g.XDisk("Ref:1", g.pattern_disk(3 * MiB, seed=i), "d", "0")],
            compress="gzip" if i % 2 else None,
        )
        path = os.path.join(root, "xva", f"vm{i}.xva" + (".gz" if i % 2 else ""))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        g.write(path, spec)
    bad = os.path.join(root, "xva", "vm0.xva")
    _flip(bad, 1024 * 1024 + 3000)  # inside the first chunk's data: its checksum fails
    damaged.add(bad)
    for i in range(4):  # VMA
        path = os.path.join(root, "dump", f"vzdump-qemu-10{i}-2026_01_0{i + 1}-00_00_00.vma")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        blob = vmagen.build([("drive-scsi0", vmagen.disk_bytes(2 * MiB, seed=i))])
        if i == 1:
            blob = blob[: len(blob) // 2 // 512 * 512]  # cut short
            damaged.add(path)
        with open(path, "wb") as f:
            f.write(blob)
    for kind, opts in (
        ("vhd", ["-O", "vpc"]),
        ("qcow2", ["-O", "qcow2"]),
        ("vmdk", ["-O", "vmdk", "-o", "subformat=streamOptimized"]),
        ("vhdx", ["-O", "vhdx"]),
    ):
        for i in range(3):
            path = os.path.join(root, "images", f"disk{i}.{kind}")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            _qemu("convert", "-f", "raw", *opts, raw, path)
        bad = os.path.join(root, "images", f"disk2.{kind}")
        size = os.path.getsize(bad)
        _flip(
            bad,
            {
                "vhd": size - 512 + 70,
                "qcow2": 8 * 65536 + 5,
                "vmdk": 70000,
                "vhdx": 64 * 1024 + 100,
            }[kind],
        )
        if kind == "vhdx":
            _flip(bad, 128 * 1024 + 100)  # both headers
        if kind == "qcow2":  # an L2 entry pointing past the end
            with open(bad, "r+b") as f:
                f.seek(40)  # the L1 table's offset
                l1 = struct.unpack(">Q", f.read(8))[0]
                f.seek(l1)
                l2 = struct.unpack(">Q", f.read(8))[0] & ((1 << 56) - 512)
                f.seek(l2)
                f.write(struct.pack(">Q", (1 << 63) | (1 << 40)))
        damaged.add(bad)
    vmdk = open(os.path.join(root, "images", "disk0.vmdk"), "rb").read()
    for i in range(3):  # OVA
        path = os.path.join(root, "ova", f"vm{i}.ova")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        ovagen.build_ova(path, f"vm{i}", [(f"vm{i}-disk1.vmdk", vmdk, len(data))])
    bad = os.path.join(root, "ova", "vm1.ova")
    blob = bytearray(open(bad, "rb").read())
    at = blob.index(b"SHA256(vm1-disk1.vmdk)= ") + 30
    blob[at] = ord("0") if blob[at] != ord("0") else ord("1")
    open(bad, "wb").write(blob)
    damaged.add(bad)
    backups = xoremote.build(os.path.join(root, "xo"), 4, True, "gzip")  # 4 json + 8 dirs
    vm_dir = os.path.dirname(backups[0][0])
    vdi_dir = os.path.join(
        vm_dir,
        "vdis",
        xoremote.JOB,
        sorted(os.listdir(os.path.join(vm_dir, "vdis", xoremote.JOB)))[0],
    )
    data_dirs = sorted(os.listdir(os.path.join(vdi_dir, "data")))
    victim = os.path.join(vdi_dir, "data", data_dirs[0])
    block = next(
        os.path.join(top, f)
        for top, _, files in os.walk(os.path.join(victim, "blocks"))
        for f in files
    )
    os.unlink(block)
    damaged.add(victim)
    return damaged


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tree") / "backups")
    return root, build_tree(root)


def test_a_tree_of_every_kind_names_exactly_the_damaged(tree):
    root, damaged = tree
    res = run("verify", "-r", root, "--output", "json")
    assert res.code == 2, res
    doc = valid(res, "verify-tree")
    records = doc["backups"]
    assert len(records) >= 30
    kinds = {r["format"] for r in records}
    assert {"xva", "vma", "vhd", "qcow2", "vmdk", "vhdx", "ova", "xo"} <= kinds
    bad = {r["path"] for r in records if r["status"] != "ok"}
    assert bad == damaged, bad ^ damaged
    assert doc["summary"]["damaged"] + doc["summary"]["unreadable"] == len(damaged)
    assert set(doc["summary"]["first_problems"]) == damaged
    human = run("verify", "-r", root, "--jobs", "2")
    assert human.code == 2
    lines = [ln for ln in human.text.splitlines() if ln.strip()]
    assert sum(1 for ln in lines if ln.startswith(("DAMAGED", "UNREADABLE"))) == len(damaged)
    s = doc["summary"]
    assert f"{len(records)} backups" in human.text
    assert f"{s['damaged']} damaged, {s['unreadable']} unreadable" in human.text


def test_jobs_give_the_same_records(tree):
    root, _ = tree
    one = valid(run("verify", "-r", root, "--output", "json"), "verify-tree")
    two = valid(run("verify", "-r", root, "--jobs", "2", "--output", "json"), "verify-tree")
    strip = lambda rs: [(r["path"], r["status"], r["format"]) for r in rs]  # noqa: E731
    assert strip(one["backups"]) == strip(two["backups"])


def test_since_limits_to_recent_backups(tree, tmp_path):
    root, _ = tree
    old = os.path.join(root, "xva", "vm2.xva")
    st = os.stat(old)
    os.utime(old, (st.st_atime, 946684800))  # 2000-01-01
    try:
        doc = valid(
            run("verify", "-r", root, "--since", "2020-01-01", "--output", "json"), "verify-tree"
        )
        assert old not in {r["path"] for r in doc["backups"]}
    finally:
        os.utime(old, (st.st_atime, st.st_mtime))


def test_deep_finds_the_root_and_what_fstab_mounts(tmp_path):
    for tool in ("mke2fs", "sfdisk", "qemu-img"):
        need(tool)
    root = tmp_path / "deep"
    root.mkdir()
    for name, fstab in (
        ("good", "LABEL=guestroot / ext4 defaults 0 1\n"),
        (
            "missing",
            "LABEL=guestroot / ext4 defaults 0 1\nUUID=0badc0de-0000-4000-8000-000000000000 /data ext4 defaults 0 2\n",
        ),
    ):
        tree = gg.make_tree(str(tmp_path / f"t-{name}"), fstab=fstab, many=3)
        fs = gg.make_fs("ext4", str(tmp_path / f"{name}.fs"), 24 * MiB, tree, "guestroot")
        disk = str(tmp_path / f"{name}.raw")
        gg.partition(disk, 32 * MiB, "dos", [(1, 26, "L")])
        gg.place(disk, fs, MiB)
        _qemu("convert", "-f", "raw", "-O", "qcow2", disk, root / f"{name}.qcow2")
    # and a Xen Orchestra delta backup of the good guest, checked through its metadata
    good = open(tmp_path / "good.raw", "rb").read()
    ((meta, _),) = xoremote.build(root / "xo", 1, True, None, given=[[good, bytes(2 * MiB)]])
    res = run("verify", "-r", root, "--deep", "--output", "json")
    doc = valid(res, "verify-tree")
    boot = {os.path.basename(r["path"]): r["boot"] for r in doc["backups"] if "boot" in r}
    assert boot[os.path.basename(meta)]["ok"], boot
    assert len(boot) == 3  # the two images and the XO backup, not its VHD parts
    assert boot["good.qcow2"] == {
        "ok": True,
        "found": "Linux root on disk1; /etc/fstab mounts nothing else",
    }
    assert not boot["missing.qcow2"]["ok"] and "0badc0de" in boot["missing.qcow2"]["found"]
    assert res.code == 2 and doc["summary"]["not_bootable"] == 1
    human = run("verify", "-r", root, "--deep").text
    assert "NO-BOOT" in human and "Linux root on" in human
