"""VMDK read against qemu-img: every subformat qemu-img writes, chains, disks past 2 TiB,
pipes, and damage refused with one line."""

import json
import os
import random
import struct
import subprocess

import pytest

from tests.support.helpers import assert_clean_failure, need
from tests.support.helpers import vmarc as run

MiB = 1 << 20
SUBFORMATS = [
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
]


def qemu_img(*args, cwd=None):
    need("qemu-img")
    return subprocess.run(
        ["qemu-img", *map(str, args)], capture_output=True, check=True, cwd=cwd
    ).stdout


def qemu_io(path, fmt, *cmds):
    need("qemu-io")
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    subprocess.run([*args, str(path)], capture_output=True, check=True)


def write_source(path, size=9 * MiB + 3 * 4096, seed=3):
    """Random MiBs, whole zero MiBs, zero sectors inside data, a size that is not a
    whole grain."""
    rnd = random.Random(seed)
    data = bytearray(size)
    for mib in range(0, size, MiB):
        if (mib // MiB) % 3 == 1:
            continue
        n = min(MiB, size - mib)
        data[mib : mib + n] = rnd.randbytes(n)
        data[mib + 4096 : mib + 8192] = bytes(4096)
    data[5 * MiB + 100 : 5 * MiB + 200] = b"x" * 100  # a lone write in a zero MiB
    path.write_bytes(data)


def allocation(rows):
    """(start, end, reads as zero) stretches, neighbours of one kind merged. (qemu-img
    calls a hole in a flat extent's file "data" that is "zero"; vmarc calls it zero, as
    it does a raw file's hole: both say the stretch reads as zeros.)"""
    out = []
    for r in rows:
        s, e, d = r["start"], r["start"] + r["length"], bool(r["zero"])
        if out and out[-1][2] == d and out[-1][1] == s:
            out[-1] = (out[-1][0], e, d)
        else:
            out.append((s, e, d))
    return out


def assert_same_map(path):
    theirs = json.loads(qemu_img("map", "--output=json", path.name, cwd=path.parent))
    res = run("map", path, "--output", "json")
    assert res.code == 0, res
    assert allocation(json.loads(res.out)) == allocation(theirs)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("vmdk")
    src = d / "src.raw"
    write_source(src)
    for sub in SUBFORMATS:
        qemu_img(
            "convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={sub}", src, d / f"{sub}.vmdk"
        )
        qemu_img("convert", "-O", "raw", d / f"{sub}.vmdk", d / f"{sub}.want")
    return d


@pytest.mark.parametrize("sub", SUBFORMATS)
def test_every_subformat_reads_as_qemu_img_reads_it(sub, images, tmp_path):
    path = images / f"{sub}.vmdk"
    out = tmp_path / "out.raw"
    res = run("convert", path, out)
    assert res.code == 0, res
    assert out.read_bytes() == (images / f"{sub}.want").read_bytes()
    assert_same_map(path)
    res = run("verify", path)
    assert res.code == 0, res
    info = json.loads(run("info", path, "--output", "json").out)
    assert info["format"] == "vmdk" and info["disks"][0]["details"]["subformat"] == sub


def test_stream_optimized_streams_from_a_pipe(images, tmp_path):
    out = tmp_path / "out.raw"
    with open(images / "streamOptimized.vmdk", "rb") as f:
        res = run("convert", "-", out, "-f", "vmdk", stdin=f)
    assert res.code == 0, res
    assert out.read_bytes() == (images / "streamOptimized.want").read_bytes()
    with open(images / "streamOptimized.vmdk", "rb") as f:  # and found by content
        res = run("verify", "-", stdin=f)
    assert res.code == 0, res


def test_a_disk_past_2_tib_mostly_empty(tmp_path):
    """Sector numbers past 2^32: data at 0, at 2 TiB and at the last 4 KiB of 2049 GiB."""
    size = 2049 << 30
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.truncate(size)
        for at, byte, n in (
            (0, 0x11, 65536),
            (2 << 40, 0x5A, 3 * 65536 + 512),
            (size - 4096, 7, 4096),
        ):
            f.seek(at)
            f.write(bytes([byte]) * n)
    for sub in ("monolithicSparse", "streamOptimized"):
        path = tmp_path / f"{sub}.vmdk"
        qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={sub}", src, path)
        out = tmp_path / "out.raw"
        res = run("convert", path, out)
        assert res.code == 0, res
        assert os.path.getsize(out) == size
        qemu_img("compare", "-f", "raw", "-F", "raw", src, out)  # both sparse: quick
        out.unlink()
    assert_same_map(path)  # (qemu-img takes seconds to walk 2 TiB of tables)


def test_a_parent_chain_through_parent_file_name_hint(tmp_path):
    base, child = tmp_path / "base.vmdk", tmp_path / "child.vmdk"
    write_source(tmp_path / "src.raw")
    qemu_img("convert", "-O", "vmdk", tmp_path / "src.raw", base)
    qemu_img("create", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", child)
    qemu_io(child, "vmdk", "write -P 0x33 1M 200k", "write -P 0x44 8M 64k")
    want = tmp_path / "want.raw"
    qemu_img("convert", "-O", "raw", child, want)
    out = tmp_path / "out.raw"
    res = run("convert", child, out)
    assert res.code == 0, res
    assert out.read_bytes() == want.read_bytes()
    assert_same_map(child)
    info = json.loads(run("info", child, "--output", "json").out)
    assert info["details"]["backing_chain"] == [str(base)]
    # the parent changed after the child was made: its CID no longer matches
    raw = bytearray(base.read_bytes())
    at = raw.index(b"CID=") + 4
    raw[at : at + 8] = b"0badc0de"
    base.write_bytes(raw)
    assert_clean_failure(run("convert", child, tmp_path / "x.raw"), 2, "base.vmdk", "CID")
    assert not (tmp_path / "x.raw").exists()


def _first_grain(path):
    """File offset of the first grain marker of a streamOptimized VMDK (qemu's layout)."""
    raw = path.read_bytes()
    overhead = struct.unpack_from("<Q", raw, 4 + 4 + 4 + 8 + 8 + 8 + 8 + 4 + 8 + 8)[0]
    return raw, overhead * 512


def test_a_corrupted_compressed_grain_is_refused(images, tmp_path):
    raw, at = _first_grain(images / "streamOptimized.vmdk")
    raw = bytearray(raw)
    raw[at + 12 + 40 : at + 12 + 60] = bytes(range(20))  # inside the deflate data
    bad = tmp_path / "bad.vmdk"
    bad.write_bytes(raw)
    out = tmp_path / "out.raw"
    assert_clean_failure(run("convert", bad, out), 2, "bad.vmdk", f"offset {at}", "sector 0")
    assert not out.exists()
    res = run("verify", bad)
    assert res.code == 2 and "sector 0" in res.errtext + res.text, res
    with open(bad, "rb") as f:
        assert_clean_failure(run("convert", "-", out, stdin=f), 2, "sector 0")


def test_a_grain_table_pointing_past_the_end_is_refused(images, tmp_path):
    raw = bytearray((images / "monolithicSparse.vmdk").read_bytes())
    gd_sector = struct.unpack_from("<Q", raw, 56)[0]
    gt_sector = struct.unpack_from("<I", raw, gd_sector * 512)[0]
    struct.pack_into("<I", raw, gt_sector * 512, 0x7FFFFFF0)
    bad = tmp_path / "bad.vmdk"
    bad.write_bytes(raw)
    assert_clean_failure(
        run("convert", bad, tmp_path / "o.raw"), 2, "bad.vmdk", "disk offset 0", "past the end"
    )
    res = run("verify", bad)
    assert res.code == 2 and "grain at disk offset 0" in res.text + res.errtext, res


def test_the_redundant_directory_is_checked_against_the_primary(images, tmp_path):
    raw = bytearray((images / "monolithicSparse.vmdk").read_bytes())
    rgd_sector = struct.unpack_from("<Q", raw, 48)[0]
    rgt_sector = struct.unpack_from("<I", raw, rgd_sector * 512)[0]
    struct.pack_into("<I", raw, rgt_sector * 512 + 4 * 3, 0)  # one entry differs
    bad = tmp_path / "rgd.vmdk"
    bad.write_bytes(raw)
    assert run("convert", bad, tmp_path / "o.raw").code == 0  # the primary reads fine
    res = run("verify", bad)
    assert res.code == 2 and "redundant" in res.text + res.errtext, res


def test_a_missing_extent_file_is_named(images, tmp_path):
    desc = (images / "twoGbMaxExtentFlat.vmdk").read_bytes()
    (tmp_path / "d.vmdk").write_bytes(desc)  # its extent stays behind
    assert_clean_failure(run("info", tmp_path / "d.vmdk"), 1, "twoGbMaxExtentFlat-f001.vmdk")


def test_a_stream_cut_at_a_grain_boundary_is_told_from_a_whole_one(images, tmp_path):
    """qemu-img may end a streamOptimized file right after its last grain (no end-of-
    stream marker): the tables before the grains say how far the stream must reach."""
    raw = (images / "streamOptimized.vmdk").read_bytes()
    gd = struct.unpack_from("<Q", raw, 56)[0]
    gt = struct.unpack_from("<I", raw, gd * 512)[0]
    grains = [g for g in struct.unpack_from("<512I", raw, gt * 512) if g]
    cut = tmp_path / "cut.vmdk"
    cut.write_bytes(raw[: grains[-1] * 512])  # the last grain is gone, on a boundary
    res = run("convert", "-", tmp_path / "o.raw", "-f", "vmdk", input=cut.read_bytes())
    assert_clean_failure(res, 2, "ends at offset", "before its end-of-stream marker")
    size = struct.unpack_from("<I", raw, grains[-1] * 512 + 8)[0]
    end = grains[-1] * 512 + -(-(12 + size) // 512) * 512
    whole = run("convert", "-", tmp_path / "w.raw", "-f", "vmdk", input=raw[:end])
    assert whole.code == 0, whole  # cut after the last grain: whole


@pytest.mark.parametrize("sub", ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"])
def test_split_extents_across_their_boundaries(sub, tmp_path):
    """5 GiB in 2 GiB extent files: writes straddling both boundaries."""
    path = tmp_path / "split.vmdk"
    qemu_img("create", "-f", "vmdk", "-o", f"subformat={sub}", path, "5G")
    assert len(list(tmp_path.glob("split-*.vmdk"))) == 3
    qemu_io(path, "vmdk", "write -P 0x61 2047M 2M", "write -P 0x62 4095M 1536k", "write -P 3 0 4k")
    want = tmp_path / "want.raw"
    qemu_img("convert", "-O", "raw", path, want)
    out = tmp_path / "out.raw"
    res = run("convert", path, out)
    assert res.code == 0, res
    qemu_img("compare", "-f", "raw", "-F", "raw", want, out)
    assert_same_map(path)
    info = json.loads(run("info", path, "--output", "json").out)
    assert [e["file"] for e in info["details"]["extents"]] == [
        f"split-{'s' if sub.endswith('Sparse') else 'f'}00{i}.vmdk" for i in (1, 2, 3)
    ]
    assert run("verify", path).code == 0
