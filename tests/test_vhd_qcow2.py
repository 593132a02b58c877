"""VHD and qcow2 against qemu-img as the oracle; differencing chains built in the tests."""

import json
import os
import random
import struct
import subprocess

import pytest

from tests.support import vhdgen
from tests.support.helpers import assert_clean_failure, need, vmarc_peak
from tests.support.helpers import vmarc as run

MiB = 1 << 20


def qemu_img(*args, check=True):
    need("qemu-img")
    return subprocess.run(["qemu-img", *map(str, args)], capture_output=True, check=check)


def source_raw(path, size=37 * MiB + 5 * 512, seed=1):
    """Data, whole zero MiBs (holes), zero sectors inside data, an odd sector count."""
    rnd = random.Random(seed)
    data = bytearray(size)
    for mib in range(0, size, MiB):
        if (mib // MiB) % 4 == 1:
            continue
        n = min(MiB, size - mib)
        data[mib : mib + n] = rnd.randbytes(n)
        for _ in range(5):
            s = rnd.randrange(0, n // 512)
            data[mib + s * 512 : mib + s * 512 + 512] = bytes(512)
    with open(path, "wb") as f:
        f.write(data)
    return bytes(data)


QEMU_INPUTS = {
    "vhd-dynamic": ("vpc", []),
    "vhd-fixed": ("vpc", ["-o", "subformat=fixed"]),
    "vhd-dynamic-force-size": ("vpc", ["-o", "force_size=on"]),
    "vhd-fixed-force-size": ("vpc", ["-o", "subformat=fixed,force_size=on"]),
    "qcow2": ("qcow2", []),
    "qcow2-v2": ("qcow2", ["-o", "compat=0.10"]),
    "qcow2-compressed": ("qcow2", ["-c"]),
    "qcow2-zstd": ("qcow2", ["-c", "-o", "compression_type=zstd"]),
    "qcow2-4k-clusters": ("qcow2", ["-o", "cluster_size=4096"]),
}


@pytest.mark.parametrize("kind", sorted(QEMU_INPUTS))
def test_qemu_made_inputs_convert_to_qemus_bytes(kind, tmp_path):
    fmt, opts = QEMU_INPUTS[kind]
    source_raw(tmp_path / "src.raw")
    img = tmp_path / f"img.{fmt}"
    qemu_img("convert", "-f", "raw", "-O", fmt, *opts, tmp_path / "src.raw", img)
    ref = tmp_path / "ref.raw"
    qemu_img("convert", "-f", fmt, "-O", "raw", img, ref)
    info = json.loads(qemu_img("info", "-f", fmt, "--output=json", img).stdout)
    mine = json.loads(run("info", img, "--output", "json").out)
    assert mine["format"] == {"vpc": "vhd"}.get(fmt, fmt)
    assert mine["disks"][0]["size"] == info["virtual-size"]
    out = tmp_path / "out.raw"
    res = run("convert", img, out)
    assert res.code == 0, res
    assert out.read_bytes() == ref.read_bytes()
    assert run("verify", img).code == 0


@pytest.mark.parametrize(
    "out_format,opts,qfmt",
    [("qcow2", [], "qcow2"), ("vhd", [], "vpc"), ("vhd", ["-o", "subformat=fixed"], "vpc")],
)
def test_vmarc_outputs_pass_qemu_img_and_vhdiinfo(out_format, opts, qfmt, tmp_path):
    data = source_raw(tmp_path / "src.raw")
    out = tmp_path / f"out.{out_format}"
    res = run("convert", "-O", out_format, *opts, tmp_path / "src.raw", out)
    assert res.code == 0, res
    if out_format == "qcow2":
        check = qemu_img("check", out, check=False)
        assert check.returncode == 0 and b"No errors were found" in check.stdout, check
        assert os.path.getsize(out) < len(data)  # holes not allocated
    info = json.loads(qemu_img("info", "-f", qfmt, "--output=json", out).stdout)
    assert info["virtual-size"] == len(data)
    cmp = qemu_img("compare", "-f", "raw", "-F", qfmt, tmp_path / "src.raw", out, check=False)
    assert cmp.returncode == 0, cmp
    if out_format == "vhd":
        need("vhdiinfo")
        vi = subprocess.run(["vhdiinfo", str(out)], capture_output=True)
        assert vi.returncode == 0 and f"({len(data)} bytes)".encode() in vi.stdout, vi
    back = tmp_path / "back.raw"
    assert run("convert", out, back).code == 0
    assert back.read_bytes() == data


def test_dynamic_vhd_on_stdout_and_from_a_pipe(tmp_path):
    source_raw(tmp_path / "src.raw")
    with open(tmp_path / "s.vhd", "wb") as f:
        res = subprocess.run(
            [
                os.sys.executable,
                "-m",
                "vmarc",
                "convert",
                "-O",
                "vhd",
                str(tmp_path / "src.raw"),
                "-",
            ],
            stdout=f,
            stderr=subprocess.PIPE,
        )
    assert res.returncode == 0, res.stderr
    assert (
        qemu_img(
            "compare", "-F", "vpc", tmp_path / "src.raw", tmp_path / "s.vhd", check=False
        ).returncode
        == 0
    )
    # qemu-img's own dynamic VHD, read front to back from a pipe
    qemu_img("convert", "-O", "vpc", tmp_path / "src.raw", tmp_path / "q.vhd")
    with open(tmp_path / "q.vhd", "rb") as f:
        res = run("convert", "-", tmp_path / "p.raw", stdin=f)
    assert res.code == 0, res
    ref = tmp_path / "ref.raw"
    qemu_img("convert", "-f", "vpc", "-O", "raw", tmp_path / "q.vhd", ref)
    assert (tmp_path / "p.raw").read_bytes() == ref.read_bytes()


def test_qcow2_with_a_backing_file(tmp_path):
    base = source_raw(tmp_path / "base.raw", size=8 * MiB)
    qemu_img("convert", "-O", "qcow2", tmp_path / "base.raw", tmp_path / "base.qcow2")
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", tmp_path / "top.qcow2")
    need("qemu-io")
    subprocess.run(
        [
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 1M 64k",
            "-c",
            "write -z 3M 1M",
            str(tmp_path / "top.qcow2"),
        ],
        check=True,
        capture_output=True,
    )
    ref = tmp_path / "ref.raw"
    qemu_img("convert", "-O", "raw", tmp_path / "top.qcow2", ref)
    assert ref.read_bytes() != base
    res = run("convert", tmp_path / "top.qcow2", tmp_path / "o.raw")
    assert res.code == 0, res
    assert (tmp_path / "o.raw").read_bytes() == ref.read_bytes()


@pytest.mark.parametrize("base_kind", ["dynamic", "fixed", "chain"])
def test_qcow2_over_a_vhd_backing_file(base_kind, tmp_path):
    """qcow2 overlays on XenServer disks: the VHD (or a differencing chain) is read at
    random through its BAT; the result matches qemu-img's."""
    need("qemu-io")
    if base_kind == "chain":
        base, merged = make_chain(tmp_path, 2)
    else:
        source_raw(tmp_path / "base.raw", size=8 * MiB + 3 * 512)
        base = tmp_path / "base.vhd"
        qemu_img(
            "convert", "-O", "vpc", "-o", f"subformat={base_kind}", tmp_path / "base.raw", base
        )
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", base.name, "-F", "vpc", top)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 64k", "-c", "write -z 2M 1M", str(top)],
        check=True,
        capture_output=True,
    )
    ref = tmp_path / "ref.raw"
    qemu_img("convert", "-O", "raw", top, ref)
    if base_kind == "chain":
        # qemu's vpc driver ignores VHD parents (it reads a differencing disk's unallocated
        # sectors as zeros), so the oracle is the merged chain with the overlay's writes
        want = bytearray(merged)
        want[MiB : MiB + 65536] = b"\x5a" * 65536
        want[2 * MiB : 3 * MiB] = bytes(MiB)
        ref.write_bytes(bytes(want))
    res = run("convert", top, tmp_path / "o.raw")
    assert res.code == 0, res
    assert (tmp_path / "o.raw").read_bytes() == ref.read_bytes()
    res = run("convert", top, tmp_path / "o.qcow2", "-O", "qcow2")
    assert res.code == 0, res
    assert (
        qemu_img("compare", "-f", "qcow2", "-F", "raw", tmp_path / "o.qcow2", ref).returncode == 0
    )


def sectors_of(data: bytes, every: int, offset: int = 0):
    """Every n-th sector of data (plus offset), as the sectors a layer holds."""
    return {s: data[s * 512 : (s + 1) * 512] for s in range(offset, len(data) // 512, every)}


def make_chain(tmp_path, levels, kinds=("W2ru", "W2ku", "MacX")):
    """levels differencing disks over a dynamic base; returns (top path, merged bytes)."""
    size = 6 * MiB
    rnd = random.Random(3)
    merged = bytearray(size)
    base_data = rnd.randbytes(size)
    base_sectors = sectors_of(base_data, 3)
    for s, b in base_sectors.items():
        merged[s * 512 : (s + 1) * 512] = b
    prev_path = tmp_path / "base.vhd"
    prev = vhdgen.build(size, base_sectors)
    prev_path.write_bytes(prev)
    for level in range(levels):
        layer = rnd.randbytes(size)
        secs = sectors_of(layer, 5 + level, offset=level)
        secs = {s: b for s, b in secs.items() if s // 4096 != 1}  # block 1 only in the base
        path = tmp_path / f"diff{level}.vhd"
        blob = vhdgen.build(
            size,
            secs,
            parent=(
                vhdgen.uuid_of(prev),
                prev_path.name,
                vhdgen.locators_for(str(path), str(prev_path), kinds),
            ),
        )
        path.write_bytes(blob)
        for s, b in secs.items():
            merged[s * 512 : (s + 1) * 512] = b
        prev, prev_path = blob, path
    return prev_path, bytes(merged)


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_differencing_chain_converts_to_the_merged_disk(levels, tmp_path):
    top, merged = make_chain(tmp_path, levels)
    res = run("convert", top, tmp_path / "o.raw")
    assert res.code == 0, res
    assert (tmp_path / "o.raw").read_bytes() == merged
    info = json.loads(run("info", top, "--output", "json").out)
    assert len(info["details"]["backing_chain"]) == levels
    assert run("verify", top).code == 0


@pytest.mark.parametrize("kind", ["W2ru", "W2ku", "MacX"])
def test_each_parent_locator_kind(kind, tmp_path):
    top, merged = make_chain(tmp_path, 1, kinds=(kind,))
    os.rename(tmp_path / "base.vhd", tmp_path / "moved-base.vhd")
    if kind != "W2ru":  # the name fallback would find nothing either
        res = run("convert", top, tmp_path / "o.raw")
        assert_clean_failure(res, 1, "not found", "--parent")
    os.rename(tmp_path / "moved-base.vhd", tmp_path / "base.vhd")
    res = run("convert", top, tmp_path / "o.raw")
    assert res.code == 0, res
    assert (tmp_path / "o.raw").read_bytes() == merged


def test_wrong_parent_is_refused_by_name(tmp_path):
    top, merged = make_chain(tmp_path, 1)
    (tmp_path / "other.vhd").write_bytes(vhdgen.build(6 * MiB, {}))
    res = run("convert", "--parent", tmp_path / "other.vhd", top, tmp_path / "o.raw")
    assert_clean_failure(res, 2, "other.vhd", "uuid")
    assert not (tmp_path / "o.raw").exists()
    res = run("convert", "--parent", tmp_path / "base.vhd", top, tmp_path / "o.raw")
    assert res.code == 0 and (tmp_path / "o.raw").read_bytes() == merged


def test_parent_loop_is_refused(tmp_path):
    a, b = tmp_path / "a.vhd", tmp_path / "b.vhd"
    ua, ub = os.urandom(16), os.urandom(16)
    a.write_bytes(
        vhdgen.build(2 * MiB, {}, uid=ua, parent=(ub, "b.vhd", vhdgen.locators_for(str(a), str(b))))
    )
    b.write_bytes(
        vhdgen.build(2 * MiB, {}, uid=ub, parent=(ua, "a.vhd", vhdgen.locators_for(str(b), str(a))))
    )
    assert_clean_failure(run("info", a), 2, "loops")


def test_corrupt_vhd_structures(tmp_path):
    source_raw(tmp_path / "src.raw", size=8 * MiB)
    qemu_img(
        "convert", "-O", "vpc", "-o", "force_size=on", tmp_path / "src.raw", tmp_path / "d.vhd"
    )
    good = (tmp_path / "d.vhd").read_bytes()
    size = len(good)

    def variant(change):
        b = bytearray(good)
        change(b)
        (tmp_path / "x.vhd").write_bytes(b)
        return tmp_path / "x.vhd"

    # footer checksum: verify 2, convert 2 with nothing left behind
    bad = variant(lambda b: b.__setitem__(size - 512 + 40, b[size - 512 + 40] ^ 1))
    res = run("verify", bad)
    assert res.code == 2 and "checksum" in res.text, res
    assert_clean_failure(run("convert", bad, tmp_path / "o.raw"), 2, "checksum")
    assert not (tmp_path / "o.raw").exists()
    # a BAT entry pointing past the end of the file
    bad = variant(lambda b: struct.pack_into(">I", b, 1536, 0x00FFFFF0))
    res = run("verify", bad)
    assert res.code == 2 and "BAT entry 0" in res.text, res

    # a dynamic header with an absurd table: refused at once, no huge allocation
    def absurd(b):
        struct.pack_into(">I", b, 512 + 28, 0xFFFFFFF0)
        b[512 + 36 : 512 + 40] = bytes(4)
        struct.pack_into(">I", b, 512 + 36, ~sum(b[512:1536]) & 0xFFFFFFFF)

    assert_clean_failure(run("info", variant(absurd)), 2, "BAT entries")
    # truncated: the footer is gone. The footer copy still describes the disk (qemu-img
    # info reads it too), so info warns; reading it is refused
    (tmp_path / "t.vhd").write_bytes(good[: size - 700])
    res = run("info", tmp_path / "t.vhd")
    assert res.code == 0 and "warning" in res.errtext and "no VHD footer" in res.errtext, res
    assert_clean_failure(run("convert", tmp_path / "t.vhd", tmp_path / "t.raw"), 2, "no VHD footer")

    # hostile block size
    def block_size(b):
        struct.pack_into(">I", b, 512 + 32, 3 << 20)
        b[512 + 36 : 512 + 40] = bytes(4)
        struct.pack_into(">I", b, 512 + 36, ~sum(b[512:1536]) & 0xFFFFFFFF)

    assert_clean_failure(run("info", variant(block_size)), 2, "power of two")


def test_corrupt_qcow2_structures(tmp_path):
    source_raw(tmp_path / "src.raw", size=8 * MiB)
    qemu_img("convert", "-O", "qcow2", tmp_path / "src.raw", tmp_path / "q.qcow2")
    good = (tmp_path / "q.qcow2").read_bytes()
    (l1_off,) = struct.unpack_from(">Q", good, 40)
    l2_off = struct.unpack_from(">Q", good, l1_off)[0] & 0x00FFFFFFFFFFFE00
    cases = {
        "L1 table": lambda b: struct.pack_into(">Q", b, 40, 1 << 40),
        "outside the": lambda b: struct.pack_into(">Q", b, l2_off, (1 << 63) | (1 << 45)),
        "cluster_bits": lambda b: struct.pack_into(">I", b, 20, 40),
    }
    for needle, change in cases.items():
        b = bytearray(good)
        change(b)
        (tmp_path / "x.qcow2").write_bytes(b)
        res = run("convert", tmp_path / "x.qcow2", tmp_path / "o.raw")
        assert_clean_failure(res, 2, needle)
        assert run("verify", tmp_path / "x.qcow2").code == 2
    assert not (tmp_path / "o.raw").exists()


def test_vma_to_vhd_spools_out_of_order_clusters(tmp_path):
    from tests.support import vmagen

    data = vmagen.disk_bytes(5 * MiB, seed=2)
    (tmp_path / "a.vma").write_bytes(vmagen.build([("drive-scsi0", data)], order="shuffle"))
    res = run("convert", "-O", "vhd", tmp_path / "a.vma", tmp_path / "o.vhd")
    assert res.code == 0 and "spooling" in res.errtext, res
    back = tmp_path / "back.raw"
    assert run("convert", tmp_path / "o.vhd", back).code == 0
    assert back.read_bytes() == data
    assert (
        qemu_img(
            "compare", "-f", "raw", "-F", "vpc", back, tmp_path / "o.vhd", check=False
        ).returncode
        == 0
    )


@pytest.mark.parametrize("how", ["tar", "tgz", "tgz-pipe"])
def test_vhd_inside_a_tar(how, tmp_path, monkeypatch):
    import tarfile

    source_raw(tmp_path / "src.raw", size=6 * MiB)
    qemu_img(
        "convert", "-O", "vpc", "-o", "force_size=on", tmp_path / "src.raw", tmp_path / "disk.vhd"
    )
    ref = tmp_path / "ref.raw"
    qemu_img("convert", "-f", "vpc", "-O", "raw", tmp_path / "disk.vhd", ref)
    arc = tmp_path / ("d.tar" if how == "tar" else "d.tgz")
    with tarfile.open(arc, "w:gz" if how != "tar" else "w") as t:
        t.add(tmp_path / "disk.vhd", arcname="disk.vhd")
    if how == "tgz-pipe":
        with open(arc, "rb") as f:
            res = run("convert", "-", tmp_path / "o.raw", stdin=f)
    else:
        res = run("convert", arc, tmp_path / "o.raw")
    assert res.code == 0, res
    assert (tmp_path / "o.raw").read_bytes() == ref.read_bytes()
    if how != "tgz-pipe":  # random access spools the tar's VHD (it reopened it as a VHD)
        from vmarc.access import open_disks

        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        with open_disks(str(arc), quiet=True) as opened:
            d = opened.disks[0]
            assert opened.how == "spool"
            assert d.read_at(0, d.size) == ref.read_bytes()


def test_chain_of_mixed_block_sizes_is_refused_not_misread(tmp_path):
    base = vhdgen.build(4 * MiB, {0: b"\1" * 512})
    (tmp_path / "base.vhd").write_bytes(base)
    top = tmp_path / "top.vhd"
    top.write_bytes(
        vhdgen.build(
            4 * MiB,
            {5000: b"\2" * 512},
            block_size=1 << 20,
            parent=(
                vhdgen.uuid_of(base),
                "base.vhd",
                vhdgen.locators_for(str(top), str(tmp_path / "base.vhd")),
            ),
        )
    )
    assert_clean_failure(run("convert", top, tmp_path / "o.raw"), 1, "block sizes")
    assert not (tmp_path / "o.raw").exists()


def test_qcow2_writer_memory_is_flat_and_tables_survive_eviction(tmp_path, monkeypatch):
    """L2 tables are written back and read again when more are in play than the cache
    holds: scattered writes over 6 tables with room for 2 still give qemu-img's bytes."""
    from vmarc.formats import qcow2
    from vmarc.io.output import OutputFile

    monkeypatch.setattr(qcow2, "L2_CACHE", 2)
    size = 3 * 1024 * MiB
    rnd = random.Random(8)
    writes = [(rnd.randrange(size // 65536) * 65536, rnd.randbytes(65536)) for _ in range(300)]
    writes = list({off: data for off, data in writes}.items())
    raw = tmp_path / "ref.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
        for off, data in writes:
            f.seek(off)
            f.write(data)
    out = OutputFile(str(tmp_path / "o.qcow2"))
    w = qcow2.Qcow2Writer(out, size)
    for off, data in writes:  # out of order, across every L2 table
        w.write(off, memoryview(data))
    w.finish()
    out.commit(sync=False)
    assert qemu_img("check", tmp_path / "o.qcow2").returncode == 0
    assert (
        qemu_img("compare", "-f", "qcow2", "-F", "raw", tmp_path / "o.qcow2", raw).returncode == 0
    )


def _set_backing(path, name: bytes, fmt: bytes | None):
    """Point a qcow2 at another backing file name, with or without a backing_fmt
    extension (qemu-img itself no longer writes one without)."""
    raw = bytearray(path.read_bytes())
    off, _ = struct.unpack_from(">QI", raw, 8)
    hdr_len = struct.unpack_from(">I", raw, 100)[0]
    pos = hdr_len
    exts = []
    while True:
        kind, length = struct.unpack_from(">II", raw, pos)
        if kind == 0:
            break
        if kind != 0xE2792ACA:
            exts.append(raw[pos : pos + 8 + (length + 7) // 8 * 8])
        pos += 8 + (length + 7) // 8 * 8
    if fmt is not None:
        exts.insert(
            0, struct.pack(">II", 0xE2792ACA, len(fmt)) + fmt.ljust(-(-len(fmt) // 8) * 8, b"\0")
        )
    table = b"".join(exts) + bytes(8)
    raw[hdr_len : hdr_len + len(table)] = table
    off = hdr_len + len(table)
    raw[off : off + len(name)] = name
    struct.pack_into(">QI", raw, 8, off, len(name))
    path.write_bytes(raw)


def test_a_backing_file_is_never_read_by_guess(tmp_path):
    """qcow2 backing names pointing anywhere: never read as raw unless the header says
    backing_fmt=raw or the user gives --parent; never a device; --no-backing reads the
    top layer alone; the chain is shown."""
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", base, "1M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 64k", top],
        check=True,
        capture_output=True,
    )
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"password\n" * 1000)
    for name in (b"secret.txt", b"../" * 12 + b"etc/passwd", b"/etc/shadow"):
        _set_backing(top, name, None)
        res = run("convert", top, tmp_path / "o.raw")
        assert_clean_failure(res, 2, "backing_fmt=raw")
        assert not (tmp_path / "o.raw").exists()
    _set_backing(top, b"/dev/zero", b"raw")
    assert_clean_failure(run("convert", top, tmp_path / "o.raw"), 1, "not a regular file")
    _set_backing(top, b"secret.txt", None)
    res = run("convert", top, tmp_path / "o.raw", "--parent", secret)  # the user's choice
    assert res.code == 0 and "reading through its backing chain" in res.errtext, res
    out = (tmp_path / "o.raw").read_bytes()
    assert (
        out[:65536] == b"a" * 65536
        and out[65536 : len(secret.read_bytes())] == secret.read_bytes()[65536:]
    )
    res = run("convert", top, tmp_path / "alone.raw", "--no-backing")
    assert res.code == 0, res
    alone = (tmp_path / "alone.raw").read_bytes()
    assert alone[:65536] == b"a" * 65536 and not alone[65536:].strip(b"\0")
    _set_backing(top, b"base.qcow2", b"qcow2")
    info = json.loads(run("info", top, "--output", "json").out)
    assert info["details"]["backing_chain"] == [str(base)]


def test_a_vhd_locator_naming_another_file_is_passed_over(tmp_path):
    size = 2 * MiB
    base = tmp_path / "base.vhd"
    ub = os.urandom(16)
    base.write_bytes(vhdgen.build(size, {0: b"\x11" * 512}, uid=ub))
    secret = tmp_path / "secret.bin"
    secret.write_bytes(os.urandom(12345))
    child = tmp_path / "child.vhd"
    # the W2ru locator names the secret file, the parent name the real parent
    child.write_bytes(
        vhdgen.build(
            size,
            {1: b"\x22" * 512},
            parent=(ub, "base.vhd", vhdgen.locators_for(str(child), str(secret), kinds=("W2ru",))),
        )
    )
    res = run("convert", child, tmp_path / "o.raw")
    assert res.code == 0, res
    out = (tmp_path / "o.raw").read_bytes()
    assert out[:512] == b"\x11" * 512 and out[512:1024] == b"\x22" * 512
    base.unlink()
    res = run("convert", child, tmp_path / "o2.raw")
    assert_clean_failure(res, 1, "not a VHD")
    assert "12345" not in res.errtext and "12344" not in res.errtext


def test_a_fixed_vhd_streams_from_a_pipe(tmp_path):
    """Its footer, and so its size, comes last: raw output streams and checks the footer
    at the end; other outputs need the size first and copy the input to a temporary file."""
    data = os.urandom(3 * MiB)
    raw = tmp_path / "d.raw"
    raw.write_bytes(data)
    vhd = tmp_path / "d.vhd"
    qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed,force_size=on", raw, vhd)
    blob = vhd.read_bytes()
    res = run("convert", "-", tmp_path / "o.raw", "-f", "vhd", input=blob)
    assert res.code == 0 and not res.errtext, res  # no temporary copy
    assert (tmp_path / "o.raw").read_bytes() == data
    res = run("convert", "-", "-", "-f", "vhd", input=blob)
    assert res.code == 0 and res.out == data, res
    res = run("convert", "-", tmp_path / "o.qcow2", "-O", "qcow2", "-f", "vhd", input=blob)
    assert res.code == 0 and "temporary file" in res.errtext, res
    for cut in (len(blob) - 100, len(blob) // 2):
        res = run("convert", "-", tmp_path / "cut.raw", "-f", "vhd", input=blob[:cut])
        assert_clean_failure(res, 2, "footer")
        assert not (tmp_path / "cut.raw").exists()
    bad = bytearray(blob)
    bad[-512 + 70] ^= 1  # inside the footer's uuid
    res = run("convert", "-", tmp_path / "bad.raw", "-f", "vhd", input=bytes(bad))
    assert_clean_failure(res, 2, "checksum")


@pytest.mark.parametrize("levels", [1, 2])
def test_a_differencing_vhd_streams_from_a_pipe_with_its_parent_named(levels, tmp_path):
    top, merged = make_chain(tmp_path, levels)
    parent = tmp_path / ("base.vhd" if levels == 1 else f"diff{levels - 2}.vhd")
    with open(top, "rb") as f:
        res = run("convert", "-", tmp_path / "o.raw", "--parent", parent, stdin=f)
    assert res.code == 0 and "temporary file" not in res.errtext, res
    assert (tmp_path / "o.raw").read_bytes() == merged


def _qemu_vhd(tmp_path, size: int):
    """A dynamic VHD qemu-img wrote of size random bytes: (path, the bytes)."""
    data = os.urandom(size)
    raw = tmp_path / "d.raw"
    raw.write_bytes(data)
    vhd = tmp_path / "d.vhd"
    qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", "force_size=on", raw, vhd)
    return vhd, data


def test_a_piped_vhds_trailing_footer_is_checked_in_full(tmp_path):
    vhd, _ = _qemu_vhd(tmp_path, 3 * MiB)
    blob = bytearray(vhd.read_bytes())
    bad = bytearray(blob)
    bad[-512 + 40] ^= 1  # the trailing footer's size
    res = run("convert", "-", tmp_path / "o.raw", input=bytes(bad))
    assert_clean_failure(res, 2, "checksum mismatch")
    bad = bytearray(blob)
    bad[-512 + 24 : -512 + 28] = b"\0\0\0\1"  # its timestamp, checksum fixed
    struct.pack_into(">I", bad, len(bad) - 512 + 64, 0)
    struct.pack_into(">I", bad, len(bad) - 512 + 64, ~sum(bad[-512:]) & 0xFFFFFFFF)
    res = run("convert", "-", tmp_path / "o.raw", input=bytes(bad))
    assert_clean_failure(res, 2, "differs from the footer copy")
    res = run("convert", "-", tmp_path / "o.raw", input=bytes(blob[: len(blob) // 2]))
    assert_clean_failure(res, 2)
    assert res.errtext.count("at offset") <= 1, res  # the offset said once


def test_a_bat_past_the_end_of_the_file_is_refused_at_once(tmp_path):
    vhd, _ = _qemu_vhd(tmp_path, 2 * MiB)
    b = bytearray(vhd.read_bytes())
    struct.pack_into(">I", b, 512 + 28, 0x100000)  # max_table_entries: a 4 MiB BAT
    struct.pack_into(">I", b, 512 + 32, 512)  # 512-byte blocks
    b[512 + 36 : 512 + 40] = bytes(4)
    struct.pack_into(">I", b, 512 + 36, ~sum(b[512:1536]) & 0xFFFFFFFF)
    vhd.write_bytes(b)
    assert_clean_failure(run("info", vhd), 2, "past the end of the file")


def test_a_vhd_with_tiny_blocks_costs_little_memory(tmp_path):
    """512-byte blocks give a BAT of 16 million entries for an 8 GiB disk; gzip makes the
    file 40 KB. The BAT is kept 4 bytes an entry (a Python int each took 600 MB)."""
    import gzip

    blob = vhdgen.build(8 << 30, {0: b"\1" * 512}, block_size=512)
    path = tmp_path / "tiny.vhd.gz"
    path.write_bytes(gzip.compress(blob, 6))
    assert path.stat().st_size < 1 << 20
    res, peak = vmarc_peak("info", path)
    assert res.code == 0 and peak < 256 * 1024, (res, peak)


def test_a_backing_name_with_nul_is_one_line(tmp_path):
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", base, "1M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    _set_backing(top, b"base\0.qcow2", b"qcow2")
    assert_clean_failure(run("info", top), 2, "NUL")
