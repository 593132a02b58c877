"""vmarc create -O vma: layout as Proxmox's writer, read back by an independent reader
(dissect.archive), by vmarc itself, through each compression and through a pipe."""

import hashlib
import os
import struct
import subprocess

import pytest
from dissect.archive.vma import VMA

from tests.support import vmagen, xvagen
from tests.support.helpers import assert_clean_failure
from tests.support.helpers import vmarc as run

MiB = 1 << 20
CONF = b"name: moved\nmemory: 1024\ncores: 2\nscsi0: local-lvm:vm-120-disk-0,size=4M\n"


def make_raw(path, data: bytes, sparse: bool = True) -> None:
    """Write data as a file with real holes where whole MiBs are zero."""
    with open(path, "wb") as f:
        for off in range(0, len(data), MiB):
            piece = data[off : off + MiB]
            if sparse and piece.count(0) == len(piece):
                continue
            f.seek(off)
            f.write(piece)
        f.truncate(len(data))


def disks_and_files(tmp_path):
    sizes = {"scsi0": 4 * MiB + 12345, "virtio1": 3 * MiB, "sata2": 5000}
    out = {}
    for i, (name, size) in enumerate(sizes.items()):
        data = vmagen.disk_bytes(size, seed=i + 7)
        if name == "virtio1":  # a sparse file: a hole of two whole MiBs in the middle
            data = data[:MiB] + bytes(2 * MiB)
        path = tmp_path / f"{name}.raw"
        make_raw(path, data)
        out[name] = (path, data)
    return out


def layout(path):
    """Walk the archive with plain struct reads: (header fields, [extent blockinfos])."""
    data = open(path, "rb").read()
    blob_off, blob_size, header_size = struct.unpack_from(">III", data, 48)
    extents = []
    pos = header_size
    while pos < len(data):
        assert data[pos : pos + 4] == b"VMAE"
        (count,) = struct.unpack_from(">H", data, pos + 6)
        infos = [bi for bi in struct.unpack_from(">59Q", data, pos + 40) if (bi >> 32) & 0xFF]
        extents.append(infos)
        pos += 512 + count * 4096
    assert pos == len(data)
    return (blob_off, blob_size, header_size), extents


def test_create_matches_proxmox_layout_and_dissect_reads_it(tmp_path):
    disks = disks_and_files(tmp_path)
    (tmp_path / "qemu-server.conf").write_bytes(CONF)
    args = [
        "create",
        "-O",
        "vma",
        tmp_path / "a.vma",
        "--config",
        f"qemu-server.conf={tmp_path / 'qemu-server.conf'}",
    ]
    for name, (path, _) in disks.items():
        args += ["--disk", f"{name}={path}"]
    res = run(*args)
    assert res.code == 0, res

    (blob_off, blob_size, header_size), extents = layout(tmp_path / "a.vma")
    assert blob_off == 12288 and header_size % 512 == 0 and blob_off + blob_size <= header_size
    assert all(len(e) <= 58 for e in extents) and all(len(e) == 58 for e in extents[:-1])
    listed = {}
    for infos in extents:
        for bi in infos:
            key = ((bi >> 32) & 0xFF, bi & 0xFFFFFFFF)
            assert key not in listed, key
            listed[key] = bi >> 48
    for dev_id, (name, (_, data)) in enumerate(disks.items(), start=1):
        clusters = -(-len(data) // 65536)
        for c in range(clusters):
            mask, _stored = vmagen.cluster_blocks(data, c, len(data))
            assert listed.pop((dev_id, c)) == mask, (name, c)  # zero blocks left out
    assert not listed

    with open(tmp_path / "a.vma", "rb") as f:
        vma = VMA(f)
        assert vma.configs() == {"qemu-server.conf": CONF}
        devs = {d.name: d for d in vma.devices()}
        assert sorted(devs) == ["drive-sata2", "drive-scsi0", "drive-virtio1"]
        for name, (_, data) in disks.items():
            dev = devs[f"drive-{name}"]
            assert dev.size == len(data)
            assert dev.open().read() == data, name

    assert run("verify", tmp_path / "a.vma").code == 0
    for name, (_, data) in disks.items():
        out = tmp_path / f"back-{name}.raw"
        assert run("convert", tmp_path / "a.vma", out, "--disk", name).code == 0
        assert out.read_bytes() == data


@pytest.mark.parametrize(
    "suffix,magic,tool",
    [
        (".zst", b"\x28\xb5\x2f\xfd", "zstd"),
        (".gz", b"\x1f\x8b", "gzip"),
        (".lzo", b"\x89LZO", "lzop"),
    ],
)
def test_compressed_output_by_name(suffix, magic, tool, tmp_path):
    data = vmagen.disk_bytes(2 * MiB + 4096 * 3, seed=3)
    make_raw(tmp_path / "d.raw", data)
    out = tmp_path / f"vzdump-qemu-120-2026_01_01-00_00_00.vma{suffix}"
    res = run("create", "-O", "vma", out, "--disk", f"scsi0={tmp_path / 'd.raw'}")
    assert res.code == 0, res
    assert out.read_bytes().startswith(magic)
    plain = subprocess.run([tool, "-dc", str(out)], capture_output=True, check=True).stdout
    (tmp_path / "plain.vma").write_bytes(plain)
    with open(tmp_path / "plain.vma", "rb") as f:
        assert VMA(f).device(1).open().read() == data
    back = tmp_path / "back.raw"
    assert run("convert", out, back).code == 0
    assert back.read_bytes() == data


def test_stdout_streams_into_a_reader(tmp_path):
    data = vmagen.disk_bytes(3 * MiB + 777, seed=4)
    make_raw(tmp_path / "d.raw", data)
    create = subprocess.Popen(
        [
            os.sys.executable,
            "-m",
            "vmarc",
            "create",
            "-O",
            "vma",
            "-",
            "--disk",
            f"virtio0={tmp_path / 'd.raw'}",
        ],
        stdout=subprocess.PIPE,
    )
    res = run("convert", "-", tmp_path / "back.raw", stdin=create.stdout)
    create.stdout.close()
    assert create.wait() == 0 and res.code == 0, res
    assert (tmp_path / "back.raw").read_bytes() == data


def test_from_xva_and_from_vma_inputs(tmp_path):
    """Inputs in any format vmarc reads; a VMA input arrives out of order and with
    partial clusters, which the writer must assemble."""
    data = xvagen.pattern_disk(3 * MiB + 5000, zero_chunks=(1,))
    xvagen.write(tmp_path / "one.xva", xvagen.XvaSpec(disks=[xvagen.XDisk("Ref:1", data)]))
    other = vmagen.disk_bytes(2 * MiB + 100, seed=9)
    (tmp_path / "in.vma").write_bytes(vmagen.build([("drive-scsi0", other)], order="shuffle"))
    res = run(
        "create",
        "-O",
        "vma",
        tmp_path / "a.vma",
        "--disk",
        f"scsi0={tmp_path / 'one.xva'}",
        "--disk",
        f"scsi1={tmp_path / 'in.vma'}",
    )
    assert res.code == 0, res
    with open(tmp_path / "a.vma", "rb") as f:
        vma = VMA(f)
        assert vma.device(1).open().read() == data
        assert vma.device(2).open().read() == other
    assert run("verify", tmp_path / "a.vma").code == 0


def test_big_sparse_disk_is_small_and_complete(tmp_path):
    path = tmp_path / "big.raw"
    with open(path, "wb") as f:
        f.truncate(8 << 30)
        f.seek(5 << 30)
        f.write(b"x" * 4096)
    res = run("create", "-O", "vma", tmp_path / "a.vma", "--disk", f"scsi0={path}")
    assert res.code == 0, res
    # 131072 zero clusters listed in extents of 58: about 2260 extent headers, one block
    assert os.path.getsize(tmp_path / "a.vma") < 1400 * 1024
    info = run("verify", tmp_path / "a.vma")
    assert info.code == 0, info
    out = tmp_path / "back.raw"
    assert run("convert", tmp_path / "a.vma", out).code == 0
    with open(out, "rb") as f:
        f.seek(5 << 30)
        assert f.read(4097) == b"x" * 4096 + b"\0"
    assert os.stat(out).st_blocks * 512 < 1 * MiB


def test_damaged_input_leaves_no_output(tmp_path):
    data = xvagen.pattern_disk(3 * MiB)
    blob = bytearray(xvagen.build(xvagen.XvaSpec(disks=[xvagen.XDisk("Ref:1", data)])))
    at = blob.find(data[MiB + 100 : MiB + 164])
    blob[at] ^= 0xFF
    (tmp_path / "bad.xva").write_bytes(blob)
    res = run(
        "create", "-O", "vma", tmp_path / "a.vma.zst", "--disk", f"scsi0={tmp_path / 'bad.xva'}"
    )
    assert_clean_failure(res, 2, "checksum")
    assert sorted(os.listdir(tmp_path)) == ["bad.xva"]


def test_usage_errors(tmp_path):
    make_raw(tmp_path / "d.raw", bytes(MiB))
    xvagen.write(
        tmp_path / "two.xva",
        xvagen.XvaSpec(
            disks=[
                xvagen.XDisk("Ref:1", bytes(MiB)),
                xvagen.XDisk("Ref:2", bytes(MiB), userdevice="1"),
            ]
        ),
    )
    cases = [
        (["--disk", f"scsi0={tmp_path / 'nope.raw'}"], "cannot open"),
        (
            ["--disk", f"scsi0={tmp_path / 'd.raw'}", "--disk", f"scsi0={tmp_path / 'd.raw'}"],
            "twice",
        ),
        (["--disk", f"scsi0={tmp_path / 'two.xva'}"], "2 disks"),
        (
            ["--disk", f"scsi0={tmp_path / 'd.raw'}", "--config", f"x={tmp_path / 'none'}"],
            "cannot read",
        ),
    ]
    for extra, needle in cases:
        res = run("create", "-O", "vma", tmp_path / "a.vma", *extra)
        assert res.code == 1 and needle in res.errtext and "Traceback" not in res.errtext, res
    assert sorted(os.listdir(tmp_path)) == ["d.raw", "two.xva"]
    # a raw image from a pipe has no size before its end: it is copied to a temporary
    # file first, and vmarc says so
    with open(tmp_path / "d.raw", "rb") as f:
        res = run(
            "create", "-O", "vma", tmp_path / "a.vma", "-f", "raw", "--disk", "scsi0=-", stdin=f
        )
    assert res.code == 0 and "temporary file" in res.errtext, res
    assert run("convert", tmp_path / "a.vma", tmp_path / "back.raw").code == 0
    assert (tmp_path / "back.raw").read_bytes() == (tmp_path / "d.raw").read_bytes()


def test_header_is_what_the_reader_of_proxmox_expects(tmp_path):
    """vma-reader.c walks blobs from blob_buffer_offset + 1 and md5s header_size bytes."""
    make_raw(tmp_path / "d.raw", vmagen.disk_bytes(MiB, seed=1))
    (tmp_path / "qemu-server.conf").write_bytes(CONF)
    assert (
        run(
            "create",
            "-O",
            "vma",
            tmp_path / "a.vma",
            "--disk",
            f"scsi0={tmp_path / 'd.raw'}",
            "--config",
            f"{tmp_path / 'qemu-server.conf'}",
        ).code
        == 0
    )
    data = (tmp_path / "a.vma").read_bytes()
    blob_off, blob_size, header_size = struct.unpack_from(">III", data, 48)
    h = bytearray(data[:header_size])
    stored = bytes(h[32:48])
    h[32:48] = bytes(16)
    assert hashlib.md5(h).digest() == stored
    pos, blobs = blob_off + 1, {}
    while pos + 2 <= blob_off + blob_size:
        n = int.from_bytes(h[pos : pos + 2], "little")
        blobs[pos - blob_off] = bytes(h[pos + 2 : pos + 2 + n])
        pos += 2 + n
    assert pos == blob_off + blob_size
    name_ptr, data_ptr = struct.unpack_from(">I", h, 2044)[0], struct.unpack_from(">I", h, 3068)[0]
    assert blobs[name_ptr] == b"qemu-server.conf\0" and blobs[data_ptr] == CONF
    dev_ptr, _, size = struct.unpack_from(">IIQ", h, 4096 + 32)
    assert blobs[dev_ptr] == b"drive-scsi0\0" and size == MiB
