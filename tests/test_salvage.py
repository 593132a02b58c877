"""Damaged backups: intact disks come out of them, and --salvage gets everything that
can still be read, with a report that names exactly what could not."""

import gzip
import io
import json
import os
import subprocess

import pytest

from tests.support import vmagen
from tests.support import xvagen as g
from tests.support.helpers import SHARED_FIXTURES, SHARED_REALDATA, assert_clean_failure
from tests.support.helpers import vmarc as run
from tests.test_access import mounted, own_cache, serve  # noqa: F401 (fixtures)

MiB = g.MiB


def two_disk_xva():
    d1 = g.pattern_disk(5 * MiB + 1536, zero_chunks={2})
    d2 = g.pattern_disk(3 * MiB, zero_chunks={1}, seed=2)
    spec = g.XvaSpec(
        disks=[g.XDisk("Ref:10", d1, "root disk", "0"), g.XDisk("Ref:9", d2, "data disk", "1")]
    )
    return g.build(spec), d1, d2


def cut_inside_second_disk(tmp_path):
    blob, d1, d2 = two_disk_xva()
    # Ref:10 streams first (string order); cut 1000 bytes into Ref:9's chunk 2
    cut = blob.index(b"Ref:9/00000002\0") + 512 + 1000
    path = tmp_path / "cut.xva"
    path.write_bytes(blob[:cut])
    return path, d1, d2


def report_of(path):
    with open(path) as f:
        return json.load(f)


def assert_exact(out: bytes, want: bytes, report: dict, kept=("checksum", "unverified")):
    """Bytes outside the damaged stretches are the disk's; inside, missing stretches are
    zeros and the others hold what was read."""
    damaged = bytearray(len(want))
    for d in report["damage"]:
        a, n = d["offset"], d["length"]
        damaged[a : a + n] = b"\1" * n
        if d["cause"] == "missing":
            assert out[a : a + n] == bytes(n), d
    assert len(out) == len(want)
    for i in range(0, len(want), 4096):
        if b"\1" not in damaged[i : i + 4096]:
            assert out[i : i + 4096] == want[i : i + 4096], i
        else:
            for j in range(i, min(i + 4096, len(want))):
                if not damaged[j]:
                    assert out[j] == want[j], j


def test_intact_first_disk_of_a_cut_archive(tmp_path):
    path, d1, d2 = cut_inside_second_disk(tmp_path)
    res = run("convert", path, tmp_path / "a.raw", "--disk", "xvda")
    assert res.code == 0, res
    lines = res.errtext.splitlines()
    assert len(lines) == 1 and "warning" in lines[0] and "Ref:9/00000002" in lines[0], res
    assert (tmp_path / "a.raw").read_bytes() == d1
    res = run("extract", path, tmp_path / "x", "--disk", "xvda")
    assert res.code == 0, res
    assert (tmp_path / "x" / "xvda.raw").read_bytes() == d1
    # the damaged disk itself still fails, leaving nothing
    res = run("convert", path, tmp_path / "b.raw", "--disk", "xvdb")
    assert_clean_failure(res, 2, "Ref:9/00000002")
    assert not (tmp_path / "b.raw").exists()


def test_salvage_a_flipped_byte_keeps_the_bytes_as_read(tmp_path):
    blob, d1, d2 = two_disk_xva()
    bad = bytearray(blob)
    at = blob.index(b"Ref:10/00000003\0") + 512 + 777
    bad[at] ^= 0x40
    path = tmp_path / "flip.xva"
    path.write_bytes(bad)
    assert_clean_failure(
        run("convert", path, tmp_path / "o.raw", "--disk", "xvda"),
        2,
        "Ref:10/00000003",
        "checksum mismatch",
    )
    res = run("convert", path, tmp_path / "o.raw", "--disk", "xvda", "--salvage")
    assert res.code == 2, res
    assert "report" in res.errtext and "Traceback" not in res.errtext
    want = bytearray(d1)
    want[3 * MiB + 777] ^= 0x40
    assert (tmp_path / "o.raw").read_bytes() == want
    rep = report_of(tmp_path / "o.raw.damage.json")
    assert [
        (d["disk"], d["offset"], d["length"], d["cause"], d["source"]["member"])
        for d in rep["damage"]
    ] == [("Ref:10", 3 * MiB, MiB, "checksum", "Ref:10/00000003")]


@pytest.mark.parametrize("compress", [None, "gzip"])
def test_salvage_a_truncated_xva(compress, tmp_path):
    path, d1, d2 = cut_inside_second_disk(tmp_path)
    if compress:
        path.write_bytes(g.compress(path.read_bytes(), compress))
    out = tmp_path / "x"
    res = run("extract", path, out, "--salvage", "--report", tmp_path / "r.json")
    assert res.code == 2, res
    rep = report_of(tmp_path / "r.json")
    assert (out / "xvda.raw").read_bytes() == d1
    got = (out / "xvdb.raw").read_bytes()
    assert_exact(got, d2, rep)
    # chunk 2 of xvdb: 1000 bytes arrived (unverified), the rest of the disk is missing
    assert [(d["disk"], d["offset"], d["length"], d["cause"]) for d in rep["damage"]] == [
        ("Ref:9", 2 * MiB, 1000, "unverified"),
        ("Ref:9", 2 * MiB + 1000, MiB - 1000, "missing"),
    ]
    assert got[2 * MiB : 2 * MiB + 1000] == d2[2 * MiB : 2 * MiB + 1000]


@pytest.mark.parametrize("order", ["seq", "shuffle"])
def test_salvage_a_truncated_vma(order, tmp_path):
    d1 = vmagen.disk_bytes(3 * MiB + 8192, seed=1)
    d2 = vmagen.disk_bytes(2 * MiB, seed=2)
    blob = vmagen.build([("drive-scsi0", d1), ("drive-virtio1", d2)], order=order, per_extent=7)
    path = tmp_path / "cut.vma"
    path.write_bytes(blob[: len(blob) * 2 // 3 + 1234])
    res = run("extract", path, tmp_path / "x", "--salvage")
    assert res.code == 2, res
    rep = report_of(tmp_path / "x.damage.json")
    lost = {}
    for name, want in (("drive-scsi0", d1), ("drive-virtio1", d2)):
        got = (tmp_path / "x" / f"disk-{name}.raw").read_bytes()
        mine = {"damage": [d for d in rep["damage"] if d["disk"] == name]}
        assert_exact(got, want, mine)
        lost[name] = sum(d["length"] for d in mine["damage"])
        assert lost[name] < len(want)
        # blocks of the extent that broke off are named one by one, and each held data
        # (zero blocks are left out of a VMA by its mask); clusters never reached are
        # missing whole: no one can tell whether they were zero
        for d in mine["damage"]:
            if "extent_offset" in d["source"]:
                assert d["length"] < 65536 or d["length"] % 4096 == 0
                assert all(
                    want[a : a + 4096].strip(b"\0")
                    for a in range(d["offset"], d["offset"] + d["length"], 4096)
                ), d
            else:
                assert d["offset"] % 65536 == 0 and d["source"]["clusters"] >= 1
    # seq: the first disk lies wholly before the cut; shuffled, both lose clusters
    assert lost["drive-virtio1"] > 0
    assert (lost["drive-scsi0"] > 0) == (order == "shuffle")


def test_salvage_a_truncated_dynamic_vhd(tmp_path):
    data = os.urandom(7 * MiB)
    raw = tmp_path / "d.img"
    raw.write_bytes(data)
    vhd = tmp_path / "d.vhd"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", raw, "-O", "vpc", "-o", "force_size=on", vhd],
        check=True,
    )
    cut = tmp_path / "cut.vhd"
    cut.write_bytes(vhd.read_bytes()[:5_000_000])
    assert_clean_failure(run("convert", cut, tmp_path / "o.raw"), 2, "no VHD footer")
    res = run("convert", cut, tmp_path / "o.raw", "--salvage")
    assert res.code == 2, res
    rep = report_of(tmp_path / "o.raw.damage.json")
    got = (tmp_path / "o.raw").read_bytes()
    assert_exact(got, data, rep)
    missing = [(d["offset"], d["length"]) for d in rep["damage"] if d["cause"] == "missing"]
    # the file ends 5,000,000 bytes in: block 2's data (from 4 MiB + 512-byte bitmap
    # after the metadata) breaks off inside it; block 3 is gone entirely
    assert missing[-1] == (6 * MiB, MiB)
    assert sum(n for _, n in missing) + (missing[0][0] - 4 * MiB) == 3 * MiB


def test_salvage_the_real_proxmox_sample(tmp_path):
    sample = os.path.join(SHARED_FIXTURES, "proxmox-test.vma.gz")
    out = tmp_path / "scsi0.raw"
    res = run("convert", sample, out, "--salvage")
    assert res.code == 2, res
    assert os.path.getsize(out) == 10 << 30
    rep = report_of(tmp_path / "scsi0.raw.damage.json")
    missing = [(d["offset"], d["length"]) for d in rep["damage"]]
    assert sum(n for _, n in missing) == (163840 - 116) * 65536
    # the present clusters, as dissect.archive's VMA reader gives them
    from dissect.archive.vma import VMA

    vma = VMA(io.BytesIO(gzip.decompress(open(sample, "rb").read())))
    dev = vma.device(1).open()
    present, pos = [], 0
    for a, n in sorted(missing):
        if a > pos:
            present.append((pos, a - pos))
        pos = a + n
    if pos < 10 << 30:
        present.append((pos, (10 << 30) - pos))
    assert sum(n for _, n in present) == 116 * 65536
    with open(out, "rb") as f:
        for a, n in present:
            dev.seek(a)
            f.seek(a)
            assert f.read(n) == dev.read(n), a
        # the missing stretches are holes of the sparse output
        fd = f.fileno()
        for a, n in missing:
            try:
                nxt = os.lseek(fd, a, os.SEEK_DATA)
            except OSError:
                continue
            assert nxt >= a + n or nxt < a, (a, n, nxt)


def test_salvage_a_vhd_with_broken_footer_checksums_reads_as_vhdimount(tmp_path):
    src = os.path.join(SHARED_REALDATA, "dfvfs", "image.vhd.zst")
    vhd = tmp_path / "image.vhd"
    subprocess.run(["zstd", "-dq", src, "-o", vhd], check=True)
    assert_clean_failure(run("convert", vhd, tmp_path / "o.raw"), 2, "checksum mismatch")
    res = run("convert", vhd, tmp_path / "o.raw", "--salvage")
    assert res.code == 2, res
    rep = report_of(tmp_path / "o.raw.damage.json")
    assert {d["cause"] for d in rep["damage"]} == {"metadata"}
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["vhdimount", vhd, mnt], check=True, capture_output=True)
    try:
        want = (mnt / "vhdi1").read_bytes()
    finally:
        subprocess.run(["fusermount", "-u", mnt], check=False)
        subprocess.run(["umount", mnt], check=False, capture_output=True)
    assert (tmp_path / "o.raw").read_bytes() == want


def test_mount_and_serve_a_cut_archive(tmp_path, own_cache, mounted, serve):
    path, d1, d2 = cut_inside_second_disk(tmp_path)
    mnt = mounted(path)
    assert sorted(os.listdir(mnt)) == ["ova.xml", "xvda", "xvdb"]
    assert (mnt / "xvda").read_bytes() == d1
    with open(mnt / "xvdb", "rb") as f:
        assert f.read(2 * MiB) == d2[: 2 * MiB]  # before the cut: readable
        with pytest.raises(OSError) as e:
            f.read(4096)  # past it: EIO
        assert e.value.errno == 5
    log = next(iter((tmp_path / "cache" / "vmarc" / "mounts").iterdir()))
    assert "disk offset 2097152" in log.read_text()  # the EIO's line, in the mount's log
    srv = serve(path)
    got = subprocess.run(
        [
            "qemu-io",
            "-r",
            "-f",
            "raw",
            "-c",
            f"read 0 {2 * MiB}",
            "-c",
            f"read {2 * MiB} 4096",
            srv.url("xvdb"),
        ],
        capture_output=True,
        text=True,
    )
    assert "read 2097152/2097152 bytes" in got.stdout, got
    assert "Input/output error" in got.stdout + got.stderr, got


def test_mount_refuses_a_busy_or_non_empty_mountpoint(tmp_path, own_cache, mounted):
    path, d1, d2 = cut_inside_second_disk(tmp_path)
    mnt = mounted(path)
    assert_clean_failure(run("mount", path, mnt), 1, "already a mount point")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert_clean_failure(run("mount", path, full), 1, "not empty")
    assert (full / "keep.txt").read_text() == "mine"


def test_serve_says_when_its_source_fails_mid_reply(tmp_path, own_cache, mounted, serve):
    """A raw disk read from a file that fails with EIO past a point (a vmarc mount of an
    archive cut short): the NBD client's read fails, and the server says where."""
    path, d1, d2 = cut_inside_second_disk(tmp_path)
    mnt = mounted(path)
    srv = serve(mnt / "xvdb", "-f", "raw")
    got = subprocess.run(
        [
            "qemu-io",
            "-r",
            "-f",
            "raw",
            "-c",
            f"read 0 {g.MiB}",
            "-c",
            f"read {2 * g.MiB} {g.MiB}",
            srv.url(),
        ],
        capture_output=True,
        text=True,
    )
    assert f"read {g.MiB}/{g.MiB} bytes" in got.stdout, got
    assert "error" in (got.stdout + got.stderr).lower(), got
    srv.proc.terminate()
    srv.proc.wait(timeout=20)
    err = srv.proc.stderr.read().decode()
    assert "read at" in err and "Input/output error" in err, err
