"""VHDX read against qemu-img and libvhdi: what qemu-img writes (dynamic, fixed, block
sizes, past 2 TiB), differencing disks and logs built from the spec (vhdxgen), damage."""

import hashlib
import json
import os
import random
import struct
import subprocess
import uuid

import pytest

from tests.support import vhdxgen
from tests.support.helpers import assert_clean_failure, need
from tests.support.helpers import vmarc as run
from tests.test_vmdk import qemu_img, write_source

MiB = 1 << 20
VARIANTS = {
    "dynamic": [],
    "fixed": ["-o", "subformat=fixed"],
    "dynamic-1m-blocks": ["-o", "block_size=1M"],
    "dynamic-4k-sectors": ["-o", "block_size=8M"],
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_qemu_img_vhdx_reads_as_qemu_img_reads_it(variant, tmp_path):
    src = tmp_path / "src.raw"
    write_source(src)
    path = tmp_path / "d.vhdx"
    qemu_img("convert", "-f", "raw", "-O", "vhdx", *VARIANTS[variant], src, path)
    want = tmp_path / "want.raw"
    qemu_img("convert", "-O", "raw", path, want)
    out = tmp_path / "out.raw"
    res = run("convert", path, out)
    assert res.code == 0, res
    assert out.read_bytes() == want.read_bytes()
    assert_map_holes_read_as_zeros(path, want)
    assert run("verify", path).code == 0
    info = json.loads(run("info", path, "--output", "json").out)
    assert info["format"] == "vhdx"
    assert info["details"]["subformat"] == ("fixed" if variant == "fixed" else "dynamic")


def test_a_vhdx_past_2_tib(tmp_path):
    size = 2049 << 30
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.truncate(size)
        for at in (0, 2 << 40, size - 4096):
            f.seek(at)
            f.write(random.Random(at).randbytes(4096))
    path = tmp_path / "big.vhdx"
    qemu_img("convert", "-f", "raw", "-O", "vhdx", src, path)
    out = tmp_path / "out.raw"
    res = run("convert", path, out)
    assert res.code == 0, res
    qemu_img("compare", "-f", "raw", "-F", "raw", src, out)
    res = run("map", path, "--output", "json")
    stored = [(r["start"], r["length"]) for r in json.loads(res.out) if r["data"]]
    assert stored == [(0, 32 * MiB), (2 << 40, 32 * MiB), (size - 32 * MiB, 32 * MiB)]


@pytest.mark.parametrize("sector", [512, 4096])
def test_a_differencing_vhdx_reads_through_its_parent(sector, tmp_path):
    need("vhdimount")
    src = tmp_path / "src.raw"
    write_source(src)
    parent = tmp_path / "parent.vhdx"
    qemu_img("convert", "-f", "raw", "-O", "vhdx", "-o", "block_size=1M", src, parent)
    rnd = random.Random(5)
    writes = [
        (sector, rnd.randbytes(sector * 3)),  # a few sectors of a block
        (3 * MiB - 4096, rnd.randbytes(8192)),  # across two blocks
        (6 * MiB, rnd.randbytes(MiB)),  # a whole block
        (8 * MiB + sector * 7, bytes(sector)),  # zeros written over parent data: here
    ]
    size = os.path.getsize(src)
    child = tmp_path / "child.vhdx"
    vhdxgen.make_differencing(child, parent, size, writes, "parent.vhdx", sector=sector)
    want = bytearray(src.read_bytes())
    for off, data in writes:
        want[off : off + len(data)] = data
    out = tmp_path / "out.raw"
    res = run("convert", child, out)
    assert res.code == 0, res
    assert out.read_bytes() == bytes(want)
    # libvhdi reads it the same way (it finds the parent beside the child)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["vhdimount", child, mnt], check=True, capture_output=True, cwd=tmp_path)
    try:
        layers = sorted(os.listdir(mnt), key=lambda n: int(n[4:]))  # vhdi1 = the parent
        assert (mnt / layers[-1]).read_bytes()[:size] == bytes(want)
    finally:
        subprocess.run(["fusermount", "-u", mnt], check=False)
    info = json.loads(run("info", child, "--output", "json").out)
    assert info["details"]["subformat"] == "differencing"
    assert info["details"]["backing_chain"] == [str(parent)]
    assert run("verify", child).code == 0
    # a parent whose data write GUID is not the child's linkage is not taken
    other = tmp_path / "other" / "parent.vhdx"
    other.parent.mkdir()
    qemu_img("convert", "-f", "raw", "-O", "vhdx", src, other)
    moved = other.parent / "child.vhdx"
    os.replace(child, moved)
    assert_clean_failure(run("info", moved), 1, "parent VHDX not found", "linkage")


def assert_map_holes_read_as_zeros(path, want):
    """qemu's VHDX driver gives no block status (qemu-img map calls it all data), so
    vmarc's map is checked against the bytes: every stretch it calls zero is zero in
    qemu-img's output, and the stored blocks are the BAT's (whole blocks)."""
    res = run("map", path, "--output", "json")
    assert res.code == 0, res
    data = want.read_bytes()
    rows = json.loads(res.out)
    assert sum(r["length"] for r in rows) == len(data)
    for r in rows:
        if not r["data"]:
            assert data[r["start"] : r["start"] + r["length"]].count(0) == r["length"]


def _sector(byte):
    return bytes([byte]) * 4096


def test_a_log_is_replayed_in_memory_and_a_torn_entry_is_not(tmp_path):
    src = tmp_path / "src.raw"
    write_source(src)
    path = tmp_path / "logged.vhdx"
    qemu_img("convert", "-f", "raw", "-O", "vhdx", "-o", "block_size=1M", src, path)
    bat_at, bs = vhdxgen.bat_of(path)
    with open(path, "rb") as f:
        f.seek(bat_at)
        bat = list(struct.unpack("<64Q", f.read(512)))
    x = next(i for i, e in enumerate(bat) if e & 7 == 6)  # an allocated block
    y = next(i for i, e in enumerate(bat) if e & 7 != 6)  # an unallocated one
    xoff = (bat[x] >> 20) << 20
    bat_sector = bytearray(open(path, "rb").read()[bat_at : bat_at + 4096])
    struct.pack_into("<Q", bat_sector, 8 * y, (xoff >> 20) << 20 | 6)  # y now maps onto x
    lguid = uuid.uuid4().bytes_le
    first = [("data", xoff, _sector(0xA1)), ("zero", xoff + 65536, 8192)]
    second = [("data", xoff + 131072, _sector(0xB2)), ("data", bat_at, bytes(bat_sector))]
    torn = [("data", xoff + 196608, _sector(0xC3))]
    stale = [("data", xoff + 262144, _sector(0xD4))]
    e1 = vhdxgen.log_entry(10, lguid, first)
    e2 = vhdxgen.log_entry(11, lguid, second)
    e3 = vhdxgen.log_entry(12, lguid, torn, torn=True)
    e4 = vhdxgen.log_entry(5, lguid, stale)  # valid, but of an older sequence
    pos = 0
    placed = []
    for e in (e1, e2, e3, e4):
        placed.append((pos, e))
        pos += len(e)
    expected = tmp_path / "expected.vhdx"
    expected.write_bytes(path.read_bytes())
    vhdxgen.write_log(path, placed, lguid)
    vhdxgen.apply_and_clear(expected, first + second)
    want = tmp_path / "want.raw"
    qemu_img("convert", "-O", "raw", expected, want)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    # qemu-img will not read it without writing the replay (it opens read-only)
    assert subprocess.run(["qemu-img", "info", path], capture_output=True).returncode != 0
    out = tmp_path / "out.raw"
    res = run("convert", path, out)
    assert res.code == 0, res
    assert "log" in res.errtext and "replayed in memory" in res.errtext
    data = out.read_bytes()
    assert data == want.read_bytes()
    assert data[y * bs : y * bs + 4096] == _sector(0xA1)  # the BAT change took
    assert _sector(0xC3) not in data and _sector(0xD4)[:4096] != data[x * bs + 262144 :][:4096]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before  # the source untouched
    info = json.loads(run("info", path, "--output", "json").out)
    assert info["details"]["log_replayed"] == {"entries": 2, "last_sequence": 11}


def test_header_crc_mismatch(tmp_path):
    src = tmp_path / "src.raw"
    write_source(src, size=4 * MiB)
    path = tmp_path / "d.vhdx"
    qemu_img("convert", "-f", "raw", "-O", "vhdx", src, path)
    raw = bytearray(path.read_bytes())
    raw[64 * 1024 + 200] ^= 1  # one header: the other is used, verify names the bad one
    one = tmp_path / "one.vhdx"
    one.write_bytes(raw)
    assert run("convert", one, tmp_path / "o.raw").code == 0
    res = run("verify", one)
    assert res.code == 2 and "header at offset 65536" in res.text + res.errtext, res
    raw[128 * 1024 + 200] ^= 1  # both: nothing to trust
    both = tmp_path / "both.vhdx"
    both.write_bytes(raw)
    out = tmp_path / "b.raw"
    assert_clean_failure(run("convert", both, out), 2, "both.vhdx", "CRC-32C")
    assert not out.exists()
