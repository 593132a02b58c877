"""verify on a qcow2 agrees with `qemu-img check` on intact / damaged / leaks, for
corruptions made by direct edits of images qemu-img wrote."""

import os
import struct
import subprocess

import pytest

from tests.support.helpers import need, vmarc_peak
from tests.support.helpers import vmarc as run

CS = 65536
OFFSET_MASK = 0x00FFFFFFFFFFFE00
COPIED = 1 << 63
VERDICT = {0: "intact", 2: "damaged", 3: "leaks"}


class Image:
    """A qcow2 written by qemu-img, with its tables located for editing."""

    def __init__(self, path):
        self.path = path
        self.raw = bytearray(path.read_bytes())
        h = self.raw
        self.l1_size, self.l1_off, self.rt_off = struct.unpack_from(">IQQ", h, 36)
        self.l2_off = self.u64(self.l1_off) & OFFSET_MASK
        self.block_off = self.u64(self.rt_off) & OFFSET_MASK

    def u64(self, at):
        return struct.unpack_from(">Q", self.raw, at)[0]

    def set64(self, at, value):
        struct.pack_into(">Q", self.raw, at, value)

    def refcount(self, cluster, value):
        struct.pack_into(">H", self.raw, self.block_off + 2 * cluster, value)

    def data_entries(self):
        """(L2 entry position, entry) of the allocated data clusters of L2 table 0."""
        out = []
        for j in range(CS // 8):
            e = self.u64(self.l2_off + 8 * j)
            if e & OFFSET_MASK:
                out.append((self.l2_off + 8 * j, e))
        return out

    def save(self, name):
        out = self.path.parent / name
        out.write_bytes(self.raw)
        return out


def _leak(img):
    end = len(img.raw) // CS
    img.raw += bytes(CS)
    img.refcount(end, 1)  # a cluster nothing refers to


def _refcount_zero(img):
    _, e = img.data_entries()[0]
    img.refcount((e & OFFSET_MASK) // CS, 0)


def _refcount_two(img):
    _, e = img.data_entries()[0]
    img.refcount((e & OFFSET_MASK) // CS, 2)  # COPIED then lies


def _shared_cluster(img):
    (a, e1), (b, e2) = img.data_entries()[:2]
    img.set64(b, e1)  # two guest clusters on one host cluster


def _past_the_end(img):
    at, e = img.data_entries()[0]
    img.set64(at, COPIED | (len(img.raw) // CS + 10) * CS)


def _unaligned_data(img):
    at, e = img.data_entries()[0]
    img.set64(at, e + 512)


def _unaligned_l2(img):
    img.set64(img.l1_off, img.u64(img.l1_off) + 512)


def _copied_cleared_data(img):
    at, e = img.data_entries()[0]
    img.set64(at, e & ~COPIED)


def _copied_cleared_l1(img):
    img.set64(img.l1_off, img.u64(img.l1_off) & ~COPIED)


def _header_refcount(img):
    img.refcount(0, 0)


def _unaligned_refcount_block(img):
    img.set64(img.rt_off, img.block_off + 512)


def _l2_refcount_high(img):
    img.refcount(img.l2_off // CS, 3)


CORRUPTIONS = {
    "intact": lambda img: None,
    "leak": _leak,
    "refcount zero on data": _refcount_zero,
    "refcount two on data": _refcount_two,
    "two clusters share one": _shared_cluster,
    "data past the end": _past_the_end,
    "unaligned data offset": _unaligned_data,
    "unaligned L2 offset": _unaligned_l2,
    "COPIED cleared on data": _copied_cleared_data,
    "COPIED cleared on L1": _copied_cleared_l1,
    "header refcount zero": _header_refcount,
    "unaligned refcount block": _unaligned_refcount_block,
    "L2 table refcount high": _l2_refcount_high,
}


@pytest.fixture
def qcow2(tmp_path):
    need("qemu-img")
    data = bytearray(os.urandom(3 * 1024 * 1024))
    data[CS : 3 * CS] = bytes(2 * CS)
    raw = tmp_path / "d.raw"
    raw.write_bytes(data)
    path = tmp_path / "good.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path], check=True)
    return Image(path)


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_verify_agrees_with_qemu_img_check(kind, qcow2):
    CORRUPTIONS[kind](qcow2)
    path = qcow2.save("bad.qcow2")
    theirs = subprocess.run(["qemu-img", "check", "-f", "qcow2", path], capture_output=True)
    mine = run("verify", path)
    assert "Traceback" not in mine.errtext, mine
    # qemu-img check exits 1 when the image cannot be checked at all: damaged too
    want = VERDICT.get(theirs.returncode, "damaged")
    assert VERDICT.get(mine.code) == want, (kind, theirs.stdout, theirs.stderr, mine)


def test_compressed_cluster_with_copied_is_damage(tmp_path):
    need("qemu-img")
    raw = tmp_path / "d.raw"
    raw.write_bytes(b"vmarc" * 200000)
    path = tmp_path / "c.qcow2"
    subprocess.run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", raw, path], check=True)
    img = Image(path)
    at, e = img.data_entries()[0]
    assert e & (1 << 62)
    img.set64(at, e | COPIED)
    bad = img.save("bad.qcow2")
    theirs = subprocess.run(["qemu-img", "check", "-f", "qcow2", bad], capture_output=True)
    assert theirs.returncode == 2
    assert run("verify", bad).code == 2
    assert run("verify", path).code == 0


def test_a_zstd_cluster_inflating_to_gibs_is_damage_not_memory(tmp_path):
    need("qemu-img")
    import zstandard

    raw = tmp_path / "d.raw"
    raw.write_bytes(b"vmarc " * 200000)
    path = tmp_path / "z.qcow2"
    subprocess.run(
        [
            "qemu-img",
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "compression_type=zstd",
            raw,
            path,
        ],
        check=True,
    )
    img = Image(path)
    at, e = img.data_entries()[0]
    assert e & (1 << 62)
    z = zstandard.ZstdCompressor(level=1).compressobj()
    frame = b"".join(z.compress(bytes(1 << 24)) for _ in range(128)) + z.flush()  # 2 GiB
    where = -(-len(img.raw) // 512) * 512
    img.raw += bytes(where - len(img.raw)) + frame + bytes(-len(frame) % 512)
    sectors = -(-len(frame) // 512)
    img.set64(at, (1 << 62) | ((sectors - 1) << 54) | where)
    bomb = img.save("bomb.qcow2")
    res, peak = vmarc_peak("convert", bomb, tmp_path / "o.raw")
    assert res.code == 2 and "inflates past a cluster" in res.errtext, res
    assert peak < 256 * 1024, peak
