"""VHDs written by Xen Orchestra's own vhd-lib (npm, run with node: an oracle no one here
wrote). XO stores Unix time in the footer's timestamp, which counts from 2000 in the
spec: such a file reads as qemu-img and libvhdi read it, and verify only warns."""

import os
import random
import subprocess

import pytest

from tests.support.helpers import ROOT, need
from tests.support.helpers import vmarc as run

ORACLES = os.path.join(ROOT, "tests", "oracles")
MiB = 1 << 20


@pytest.fixture
def xo_vhd(tmp_path):
    """(VHD written by vhd-lib, the raw disk it holds)."""
    need("node")
    if not os.path.isdir(os.path.join(ORACLES, "node_modules", "vhd-lib")):
        pytest.fail("vhd-lib is not installed in tests/oracles: run ./setup.sh")
    rnd = random.Random(5)
    data = bytearray(rnd.randbytes(7 * MiB))
    data[2 * MiB : 4 * MiB] = bytes(2 * MiB)  # a whole block of zeros: not allocated
    data[100_000:300_000] = bytes(200_000)  # zeros inside an allocated block
    raw = tmp_path / "disk.raw"
    raw.write_bytes(data)
    vhd = tmp_path / "xo.vhd"
    subprocess.run(["node", os.path.join(ORACLES, "xo-vhd.js"), raw, vhd], check=True)
    return vhd, bytes(data)


def _libvhdi(vhd, tmp_path) -> bytes:
    need("vhdimount")
    mnt = tmp_path / "vhdi"
    mnt.mkdir()
    subprocess.run(["vhdimount", vhd, mnt], check=True, capture_output=True)
    try:
        return (mnt / "vhdi1").read_bytes()
    finally:
        subprocess.run(["umount", mnt], check=False)


def test_xo_vhd_reads_as_libvhdi_reads_it(xo_vhd, tmp_path):
    vhd, data = xo_vhd
    want = _libvhdi(vhd, tmp_path)
    assert want[: len(data)] == data and not want[len(data) :].strip(b"\0")
    out = tmp_path / "out.raw"
    res = run("convert", vhd, out)
    assert res.code == 0 and not res.errtext, res
    assert out.read_bytes() == want
    with open(vhd, "rb") as f:
        res = run("convert", "-", tmp_path / "pipe.raw", stdin=f)
    assert res.code == 0, res
    assert (tmp_path / "pipe.raw").read_bytes() == want


def test_xo_timestamp_is_a_warning_not_damage(xo_vhd):
    vhd, _ = xo_vhd
    res = run("verify", vhd)
    assert res.code == 0, res
    assert "ok:" in res.text and "timestamp" in res.errtext and "warning" in res.errtext, res


def test_xo_differencing_chain_reads_as_libvhdi_reads_it(tmp_path):
    """A delta as Xen Orchestra links it: vhd-lib's chain() makes the child differencing
    (parent uuid, name, locator) over a parent vhd-lib wrote too."""
    need("node")
    rnd = random.Random(9)
    parent = rnd.randbytes(7 * MiB)
    child = bytearray(7 * MiB)
    child[64 << 10 : 192 << 10] = rnd.randbytes(128 << 10)
    child[5 * MiB : 5 * MiB + (64 << 10)] = rnd.randbytes(64 << 10)
    (tmp_path / "parent.raw").write_bytes(parent)
    (tmp_path / "child.raw").write_bytes(child)
    for name in ("parent", "child"):
        subprocess.run(
            [
                "node",
                os.path.join(ORACLES, "xo-vhd.js"),
                tmp_path / f"{name}.raw",
                tmp_path / f"{name}.vhd",
            ],
            check=True,
        )
    subprocess.run(
        [
            "node",
            os.path.join(ORACLES, "xo-chain.js"),
            tmp_path / "parent.vhd",
            tmp_path / "child.vhd",
        ],
        check=True,
    )
    need("vhdimount")
    mnt = tmp_path / "vhdi"
    mnt.mkdir()
    subprocess.run(["vhdimount", tmp_path / "child.vhd", mnt], check=True, capture_output=True)
    try:
        layers = sorted(os.listdir(mnt))  # vhdi1 the parent ... the child last
        want = (mnt / layers[-1]).read_bytes()
    finally:
        subprocess.run(["umount", mnt], check=False)
    assert len(layers) == 2
    merged = bytearray(parent)
    for at in range(0, len(child), 64 << 10):  # XO stores each non-zero 64 KiB
        if any(child[at : at + (64 << 10)]):
            merged[at : at + (64 << 10)] = child[at : at + (64 << 10)]
    assert want[: len(merged)] == merged
    res = run("convert", tmp_path / "child.vhd", tmp_path / "out.raw")
    assert res.code == 0, res
    assert (tmp_path / "out.raw").read_bytes() == want
