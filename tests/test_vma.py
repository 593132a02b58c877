"""VMA reading and strict verification, on the real Proxmox sample and generated archives."""

import json
import os
import struct
import subprocess

import pytest

from tests.support import vmagen as v
from tests.support import xvagen
from tests.support.helpers import SHARED_FIXTURES, assert_clean_failure
from tests.support.helpers import vmarc as run

SAMPLE = os.path.join(SHARED_FIXTURES, "proxmox-test.vma.gz")
MiB = 1 << 20


def test_real_sample_info():
    info = json.loads(run("info", SAMPLE, "--output", "json", "--configs").out)
    assert info["format"] == "vma" and info["compression"] == "gzip"
    assert [(d["id"], d["size"]) for d in info["disks"]] == [("drive-scsi0", 10 << 30)]
    conf = next(c["content"] for c in info["configs"] if c["name"] == "qemu-server.conf")
    assert "scsi0: local-lvm:vm-100-disk-0,size=10G" in conf
    assert info["vm"]["name"] == "Test" and info["vm"]["memory"] == 2048 * MiB


def test_real_sample_is_reported_incomplete(tmp_path):
    res = run("verify", SAMPLE)
    assert res.code == 2
    assert "116 of 163840 clusters present" in res.text, res
    res = run("convert", SAMPLE, tmp_path / "d.raw", "--disk", "scsi0")
    assert_clean_failure(res, 2, "incomplete")
    assert os.listdir(tmp_path) == []


def two_disks():
    return [
        ("drive-scsi0", v.disk_bytes(3 * MiB + 12345, seed=1)),
        ("drive-virtio1", v.disk_bytes(2 * MiB, seed=2, zero_every=2)),
    ]


@pytest.mark.parametrize("order", ["shuffle", "seq"])
@pytest.mark.parametrize("per_extent", [58, 59, 7])
def test_generated_archives_convert_exactly(order, per_extent, tmp_path):
    disks = two_disks()
    (tmp_path / "a.vma").write_bytes(v.build(disks, order=order, per_extent=per_extent))
    assert run("verify", tmp_path / "a.vma").code == 0
    for name, data in disks:
        out = tmp_path / f"{name}.raw"
        res = run("convert", tmp_path / "a.vma", out, "--disk", name)
        assert res.code == 0, res
        assert out.read_bytes() == data


@pytest.mark.parametrize("how", ["gzip", "zstd", "lzop"])
@pytest.mark.parametrize("pipe", [False, True])
def test_compressed_and_piped(how, pipe, tmp_path):
    disks = two_disks()
    raw = tmp_path / "a.vma"
    raw.write_bytes(v.build(disks))
    comp = tmp_path / "a.vma.x"
    if how == "lzop":
        subprocess.run(["lzop", "-q", "-c", str(raw)], stdout=open(comp, "wb"), check=True)
    else:
        comp.write_bytes(xvagen.compress(raw.read_bytes(), how))
    out = tmp_path / "o.raw"
    if pipe:
        with open(comp, "rb") as f:
            res = run("convert", "-", out, "--disk", "virtio1", stdin=f)
    else:
        res = run("convert", comp, out, "--disk", "drive-virtio1")
    assert res.code == 0, res
    assert out.read_bytes() == disks[1][1]


def test_extract_writes_disks_configs_and_vmstate(tmp_path):
    disks = two_disks()
    state = os.urandom(200000)
    (tmp_path / "a.vma").write_bytes(v.build(disks, vmstate=state))
    res = run("extract", tmp_path / "a.vma", tmp_path / "out")
    assert res.code == 0, res
    files = sorted(os.listdir(tmp_path / "out"))
    assert files == [
        "disk-drive-scsi0.raw",
        "disk-drive-virtio1.raw",
        "qemu-server.conf",
        "vmstate.bin",
    ]
    assert (tmp_path / "out" / "disk-drive-scsi0.raw").read_bytes() == disks[0][1]
    assert (tmp_path / "out" / "vmstate.bin").read_bytes() == state


def test_missing_and_duplicate_clusters(tmp_path):
    disks = two_disks()
    (tmp_path / "m.vma").write_bytes(v.build(disks, drop=[(2, 5)]))
    res = run("verify", tmp_path / "m.vma")
    assert res.code == 2 and "drive-virtio1 is incomplete" in res.text and "cluster 5" in res.text
    assert_clean_failure(
        run("convert", tmp_path / "m.vma", tmp_path / "o.raw", "--disk", "virtio1"), 2, "incomplete"
    )
    (tmp_path / "d.vma").write_bytes(v.build(disks, duplicate=[(1, 3)]))
    res = run("verify", tmp_path / "d.vma")
    assert res.code == 2 and "cluster 3" in res.text and "second time" in res.text, res
    assert not (tmp_path / "o.raw").exists()


def test_cut_at_an_extent_boundary_is_incomplete(tmp_path):
    """Proxmox's `vma verify` passes this; vmarc must not."""
    data = v.build(two_disks(), per_extent=10)
    hdr_size = int.from_bytes(data[56:60], "big")
    first = 512 + int.from_bytes(data[hdr_size + 6 : hdr_size + 8], "big") * 4096
    (tmp_path / "c.vma").write_bytes(data[: hdr_size + first])
    res = run("verify", tmp_path / "c.vma")
    assert res.code == 2 and "incomplete" in res.text, res


def test_truncated_mid_extent(tmp_path):
    data = v.build(two_disks())
    for cut in (100, 12288 + 100, len(data) // 2, len(data) - 700):
        (tmp_path / "t.vma").write_bytes(data[:cut])
        res = run("convert", tmp_path / "t.vma", tmp_path / "o.raw", "--disk", "scsi0")
        assert_clean_failure(res, 2)
        assert run("verify", tmp_path / "t.vma").code == 2
    assert sorted(os.listdir(tmp_path)) == ["t.vma"]


def test_header_and_extent_md5(tmp_path):
    data = bytearray(v.build(two_disks()))
    bad = bytearray(data)
    bad[5000] ^= 1  # reserved area of the header: only the md5 notices
    (tmp_path / "h.vma").write_bytes(bad)
    assert_clean_failure(run("info", tmp_path / "h.vma"), 2, "header md5")
    hdr_size = int.from_bytes(data[56:60], "big")
    bad = bytearray(data)
    bad[hdr_size + 45] ^= 1  # a blockinfo of the first extent
    (tmp_path / "e.vma").write_bytes(bad)
    res = run("verify", tmp_path / "e.vma")
    assert res.code == 2 and "extent header md5 mismatch" in res.text, res


def rehash_header(h: bytearray) -> bytes:
    import hashlib

    h[32:48] = bytes(16)
    h[32:48] = hashlib.md5(h).digest()
    return bytes(h)


def test_hostile_headers(tmp_path):
    data = v.build(two_disks())
    hdr_size = int.from_bytes(data[56:60], "big")
    cases = {
        "blob pointer": lambda h: h.__setitem__(slice(2044, 2048), (60000).to_bytes(4, "big")),
        "header_size": lambda h: h.__setitem__(slice(56, 60), (1 << 31).to_bytes(4, "big")),
        "claims": lambda h: h.__setitem__(
            slice(4096 + 32 + 8, 4096 + 32 + 16), (1 << 62).to_bytes(8, "big")
        ),
        "version": lambda h: h.__setitem__(slice(4, 8), (2).to_bytes(4, "big")),
    }
    for needle, change in cases.items():
        h = bytearray(data[:hdr_size])
        change(h)
        (tmp_path / "x.vma").write_bytes(rehash_header(h) + data[hdr_size:])
        assert_clean_failure(run("info", tmp_path / "x.vma"), 2, needle)


def test_python_api_and_disk_selection(tmp_path):
    import vmarc

    disks = two_disks()
    (tmp_path / "a.vma").write_bytes(v.build(disks))
    with vmarc.open(tmp_path / "a.vma") as a:
        assert a.select("scsi0").id == "drive-scsi0"
        assert a.select("drive-virtio1").device == "virtio1"
        got = {d.id: bytearray(d.size) for d in a.disks}
        for disk, off, data in a.stream():
            got[disk.id][off : off + len(data)] = data
    assert {k: bytes(b) for k, b in got.items()} == dict(disks)


def test_names_read_from_the_header_are_never_dropped(tmp_path):
    """Two devices or configs of one name, or a config named like a disk's file: one of
    them would be dropped silently; the archive is refused as damaged instead."""
    d1, d2 = v.disk_bytes(MiB, seed=1), v.disk_bytes(MiB, seed=2)
    conf = ("qemu-server.conf", b"name: t\n")
    cases = {
        "twice": ([("drive-scsi0", d1), ("drive-scsi0", d2)], (conf,)),
        "appears twice in": ([("drive-scsi0", d1)], (conf, ("qemu-server.conf", b"x\n"))),
        "has the name of a disk's file": (
            [("drive-scsi0", d1)],
            (conf, ("disk-drive-scsi0.raw", b"x")),
        ),
    }
    for needle, (disks, configs) in cases.items():
        path = tmp_path / "dup.vma"
        path.write_bytes(v.build(disks, configs=configs))
        for args in (
            ["verify", path],
            ["extract", path, tmp_path / "x"],
            ["convert", path, tmp_path / "o.raw", "--disk", "0"],
        ):
            res = run(*args)
            assert res.code == 2 and needle in res.errtext + res.text, (needle, args, res)
        assert sorted(os.listdir(tmp_path)) == ["dup.vma"]


def test_names_with_nul_or_too_long_are_one_line(tmp_path):
    d = v.disk_bytes(MiB, seed=1)
    for name in ("drive-scsi0\0x", "drive-" + "s" * 300):
        path = tmp_path / "n.vma"
        path.write_bytes(v.build([(name, d)]))
        res = run("verify", path)
        assert res.code == 2 and "NUL byte or is longer than 255" in res.errtext + res.text, res
        assert "Traceback" not in res.errtext


def test_a_header_claiming_huge_devices_costs_no_memory(tmp_path):
    """254 devices of 1 TiB in a 16 KiB header: memory follows the clusters present, not
    the sizes claimed (run under a 2 GiB address-space limit; a flag per claimed cluster
    would take 4.2 GB)."""
    import resource
    import subprocess
    import sys

    header = v.header([(f"drive-scsi{i}", 1 << 40) for i in range(254)], [], b"u" * 16)
    path = tmp_path / "huge.vma"
    path.write_bytes(header)

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    res = subprocess.run(
        [sys.executable, "-m", "vmarc", "verify", str(path)],
        capture_output=True,
        preexec_fn=limit,
        timeout=120,
    )
    assert res.returncode == 2, res
    assert b"MemoryError" not in res.stderr and b"Traceback" not in res.stderr, res.stderr
    assert res.stdout.count(b"is incomplete: 0 of 16777216 clusters present") == 254


def test_a_header_size_too_large_says_so(tmp_path):
    blob = bytearray(v.build([("drive-scsi0", v.disk_bytes(MiB))]))
    struct.pack_into(">I", blob, 56, 1 << 30)
    (tmp_path / "big.vma").write_bytes(blob)
    assert_clean_failure(run("convert", tmp_path / "big.vma", tmp_path / "o.raw"), 2, "too large")
