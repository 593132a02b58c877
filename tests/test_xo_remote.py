"""Xen Orchestra remotes as XO writes them (tests/support/xoremote.py drives XO's own
@xen-orchestra/fs and vhd-lib): VHD files and VHD directories, uncompressed, gzip and
brotli, encrypted, delta chains of several backups; each backup reads as the disk state
XO was given; damage is named with the block, the file and the disk offset."""

import json
import os
import shutil
import subprocess

import pytest

from tests.support import xapimodel, xoremote
from tests.support.helpers import assert_clean_failure
from tests.support.helpers import vmarc as run
from tests.test_vm_move import qmrestore_check, vma_conf

MiB = 1 << 20


def disk_bytes(path, tmp_path, disk, *extra):
    out = tmp_path / f"out-{disk}.raw"
    if out.exists():
        out.unlink()
    res = run("convert", path, out, "--disk", disk, *extra)
    assert res.code == 0, res
    return out.read_bytes()


def assert_state(got: bytes, want: bytes):
    """vhd-lib rounds a disk up to its CHS geometry: the rest reads as zeros."""
    assert got[: len(want)] == want
    assert got[len(want) :].count(0) == len(got) - len(want)


@pytest.mark.parametrize(
    "directory,compression",
    [(False, None), (True, None), (True, "gzip"), (True, "brotli")],
    ids=["vhd-files", "directories", "directories-gzip", "directories-brotli"],
)
def test_every_backup_of_a_delta_chain_reads_as_its_state(directory, compression, tmp_path):
    backups = xoremote.build(tmp_path / "remote", 4, directory, compression)
    for meta, disks in backups:
        for i, want in enumerate(disks):
            assert_state(disk_bytes(meta, tmp_path, f"xvd{'ab'[i]}"), want)
        assert run("verify", meta).code == 0
    last = backups[-1][0]
    info = json.loads(run("info", last, "--output", "json").out)
    assert info["format"] == "xo" and info["details"]["mode"] == "delta"
    assert info["vm"]["name"] == "xo-web01" and info["vm"]["backup_time"] == "2026-01-04T00:00:00Z"
    assert len(info["disks"][0]["details"]["chain"]) == 4  # the synthetic full of 4 VHDs
    human = run("info", last).text
    assert "backup: delta, 2026-01-04T00:00:00Z" in human


def test_an_encrypted_remote_needs_its_key(tmp_path):
    key = bytes(range(32))
    backups = xoremote.build(tmp_path / "remote", 3, True, "gzip", key=key)
    meta, disks = backups[-1]
    assert_clean_failure(run("info", meta), 1, "--key-file")
    keyfile = tmp_path / "key"
    keyfile.write_bytes(key.hex().encode())
    for i, want in enumerate(disks):
        assert_state(disk_bytes(meta, tmp_path, f"xvd{'ab'[i]}", "--key-file", keyfile), want)
    wrong = tmp_path / "wrong"
    wrong.write_bytes(bytes(32))
    assert_clean_failure(run("info", meta, "--key-file", wrong), 2, "tag does not match")


def test_a_missing_or_damaged_block_file_is_named(tmp_path):
    backups = xoremote.build(tmp_path / "remote", 3, True, "brotli")
    meta, _ = backups[-1]
    info = json.loads(run("info", meta, "--output", "json").out)
    chain = info["disks"][0]["details"]["chain"]
    alias = chain[-1]  # the first backup: every block
    data_dir = os.path.join(os.path.dirname(alias), open(alias).read().strip())
    blocks = sorted(
        (int(a) * 1000 + int(b), os.path.join(data_dir, "blocks", a, b))
        for a in os.listdir(os.path.join(data_dir, "blocks"))
        for b in os.listdir(os.path.join(data_dir, "blocks", a))
    )
    index, path = blocks[1]
    saved = open(path, "rb").read()
    os.unlink(path)
    res = run("verify", meta)
    text = res.text + res.errtext
    assert res.code == 2 and path in text and f"block {index}" in text, res
    assert f"disk offset {index * 2 * MiB}" in text, res
    out = tmp_path / "o.raw"
    assert_clean_failure(run("convert", meta, out, "--disk", "xvda"), 2, path)
    assert not out.exists()
    with open(path, "wb") as f:
        f.write(saved[:10] + bytes([saved[10] ^ 0xFF]) + saved[11:])
    res = run("convert", meta, out, "--disk", "xvda")
    assert_clean_failure(res, 2, path, "does not decompress")


def test_a_delta_backup_moves_to_proxmox_and_xcp_ng(tmp_path):
    backups = xoremote.build(tmp_path / "remote", 3, True, None)
    meta, disks = backups[-1]
    vma = tmp_path / "vzdump-qemu-140-2026_01_03-00_00_00.vma.zst"
    res = run("convert", meta, vma, "-O", "vma")
    assert res.code == 0, res
    assert run("verify", vma).code == 0
    conf = vma_conf(vma)
    qmrestore_check(vma, conf, ["drive-scsi0", "drive-scsi1"])
    assert "name: xo-web01" in conf and "memory: 1024" in conf
    assert "net0: virtio=7A:2C:11:00:00:01" in conf and "ostype: l26" in conf
    xva = tmp_path / "back.xva"
    assert run("convert", meta, xva, "-O", "xva").code == 0
    top, got = xapimodel.import_xva(xva.read_bytes())
    for data, want in zip(got.values(), disks):
        assert_state(data, want)


def test_a_parent_missing_from_the_chain_is_named(tmp_path):
    backups = xoremote.build(tmp_path / "remote", 3, True, None)
    first_meta = backups[0][0]
    info = json.loads(run("info", first_meta, "--output", "json").out)
    alias = info["disks"][0]["details"]["chain"][0]
    data_dir = os.path.join(os.path.dirname(alias), open(alias).read().strip())
    shutil.rmtree(data_dir)
    res = run("info", backups[-1][0])
    assert res.code in (1, 2) and "Traceback" not in res.errtext, res
    assert os.path.basename(alias) in res.errtext or data_dir in res.errtext, res


def test_a_full_backup_reads_as_its_xva(tmp_path):
    """mode "full": the XVA beside the metadata (as XO's FullRemoteWriter leaves it)."""
    from tests.support import xvagen as g

    vm_dir = tmp_path / "xo-vm-backups" / xoremote.VM_UUID
    vm_dir.mkdir(parents=True)
    disk = g.pattern_disk(3 * MiB, seed=8)
    g.write(vm_dir / "20260105T000000Z.xva", g.XvaSpec(disks=[g.XDisk("Ref:1", disk, "d", "0")]))
    meta = {
        "jobId": xoremote.JOB,
        "mode": "full",
        "scheduleId": "s",
        "timestamp": 1767571200000,
        "version": "2.0.0",
        "vm": {"name_label": "full-vm", "uuid": xoremote.VM_UUID},
        "vmSnapshot": {},
        "xva": "./20260105T000000Z.xva",
    }
    path = vm_dir / "20260105T000000Z.json"
    path.write_text(json.dumps(meta))
    info = json.loads(run("info", path, "--output", "json").out)
    assert info["format"] == "xo" and info["details"]["mode"] == "full"
    assert disk_bytes(path, tmp_path, "xvda") == disk
    assert run("verify", path).code == 0
    meta["xva"] = "../../../../etc/passwd"
    path.write_text(json.dumps(meta))
    assert_clean_failure(run("info", path), 2, "leaves the VM's directory")


def test_map_and_serve_a_delta_backup(tmp_path):
    backups = xoremote.build(tmp_path / "remote", 3, True, "gzip")
    meta, disks = backups[-1]
    res = run("map", meta, "--disk", "xvdb", "--output", "json")
    assert res.code == 0, res
    rows = json.loads(res.out)
    data = disks[1].ljust(sum(r["length"] for r in rows), b"\0")  # (CHS-rounded size)
    assert any(r["data"] for r in rows)
    for r in rows:
        if not r["data"]:
            assert data[r["start"] : r["start"] + r["length"]].count(0) == r["length"]
    human = run("map", meta, "--disk", "xvdb").text
    assert "/blocks/" in human and "spool" not in human  # read in place, through the chain
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = run("mount", meta, mnt)
    assert res.code == 0, res
    try:
        got = (mnt / "xvdb").read_bytes()
        assert got[: len(disks[1])] == disks[1]
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)


def test_saved_records_of_the_wrong_shape_are_left_out(tmp_path):
    """Reproducer: records that were not objects (vbds: 5) and a name that was not text
    raised a traceback in info and convert."""
    meta, _ = xoremote.build(tmp_path / "remote", 2, True, None)[-1]
    doc = json.loads(open(meta).read())
    doc["vifs"] = 5
    doc["vbds"] = {"OpaqueRef:x": 7, **doc["vbds"]}
    doc["vm"]["name_label"] = 5
    doc["vm"]["VBDs"] = "not a list"
    with open(meta, "w") as f:
        json.dump(doc, f)
    res = run("info", meta, "--output", "json")
    assert res.code == 0, res
    assert json.loads(res.out)["vm"]["name"] == "5"
    res = run("convert", meta, tmp_path / "vzdump-qemu-150-2026_01_02-00_00_00.vma", "-O", "vma")
    assert res.code == 0 and "Traceback" not in res.errtext, res
