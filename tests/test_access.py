"""Random access in place: index, map, NBD (checked with nbdinfo, nbdcopy, qemu-img) and
FUSE (a real mount, read with ordinary file reads)."""

import json
import mmap
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

from tests.support import ovagen, vmagen
from tests.support import xvagen as g
from tests.support.helpers import assert_clean_failure, need
from tests.support.helpers import vmarc as run
from tests.test_vhd_qcow2 import make_chain

MiB = g.MiB


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Every test gets its own index cache (the server subprocesses inherit it)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def xva_case(tmp_path, compress=None):
    d1 = g.pattern_disk(5 * MiB + 1536, zero_chunks={2})
    d2 = g.pattern_disk(3 * MiB, zero_chunks={1}, seed=2)
    spec = g.XvaSpec(
        disks=[g.XDisk("Ref:10", d1, "root disk", "0"), g.XDisk("Ref:9", d2, "data disk", "1")],
        keepalives={"Ref:10": {1, 4}},
        compress=compress,
    )
    suffix = {None: "", "gzip": ".gz", "zstd": ".zst"}[compress]
    path = tmp_path / f"vm.xva{suffix}"
    g.write(path, spec)
    return path, {"Ref:10": d1, "Ref:9": d2}


def vma_case(tmp_path, compress=None):
    d1 = vmagen.disk_bytes(3 * MiB + 8192, seed=1)
    d2 = vmagen.disk_bytes(1 * MiB, seed=2)
    blob = vmagen.build([("drive-scsi0", d1), ("drive-virtio1", d2)])
    path = tmp_path / "vzdump.vma"
    path.write_bytes(blob)
    if compress:
        tool = {"gzip": ["gzip", "-k", "-1"], "zstd": ["zstd", "-q", "-1"], "lzo": ["lzop", "-1"]}[
            compress
        ]
        subprocess.run([*tool, str(path)], check=True)
        path = tmp_path / f"vzdump.vma.{ {'gzip': 'gz', 'zstd': 'zst', 'lzo': 'lzo'}[compress] }"
    return path, {"drive-scsi0": d1, "drive-virtio1": d2}


def image_case(tmp_path, kind):
    need("qemu-img")
    data = vmagen.disk_bytes(5 * MiB, seed=7)
    raw = tmp_path / "src.img"
    raw.write_bytes(data)
    if kind == "raw":
        return raw, {"disk": data}
    if kind == "vhd-chain":
        top, merged = make_chain(tmp_path, 2)
        return top, {None: merged}
    out = tmp_path / f"img.{kind}"
    opts = {
        "qcow2": ["-O", "qcow2", "-c"],
        "vhd": ["-O", "vpc", "-o", "force_size=on"],
        "vmdk": ["-O", "vmdk"],
        "vmdk-stream": ["-O", "vmdk", "-o", "subformat=streamOptimized"],
        "vhdx": ["-O", "vhdx", "-o", "block_size=1M"],
        "ova": ["-O", "vmdk", "-o", "subformat=streamOptimized"],
    }[kind]
    subprocess.run(["qemu-img", "convert", "-f", "raw", *opts, str(raw), str(out)], check=True)
    if kind == "ova":  # its one disk, as VMware exports it
        ova = tmp_path / "vm.ova"
        ovagen.build_ova(ova, "t", [("t-disk1.vmdk", out.read_bytes(), len(data))])
        return ova, {"vmdisk1": data}
    return out, {None: data}


CASES = {
    "xva": lambda p: xva_case(p),
    "xva.gz": lambda p: xva_case(p, "gzip"),
    "xva.zst": lambda p: xva_case(p, "zstd"),
    "vma": lambda p: vma_case(p),
    "vma.gz": lambda p: vma_case(p, "gzip"),
    "vma.zst": lambda p: vma_case(p, "zstd"),
    "vma.lzo": lambda p: vma_case(p, "lzo"),
    "raw": lambda p: image_case(p, "raw"),
    "qcow2": lambda p: image_case(p, "qcow2"),
    "vhd": lambda p: image_case(p, "vhd"),
    "vhd-chain": lambda p: image_case(p, "vhd-chain"),
    "vmdk": lambda p: image_case(p, "vmdk"),
    "vmdk-stream": lambda p: image_case(p, "vmdk-stream"),
    "vhdx": lambda p: image_case(p, "vhdx"),
    "ova": lambda p: image_case(p, "ova"),
}


class Server:
    def __init__(self, tmp_path, source, *extra):
        self.sock = str(tmp_path / "nbd.sock")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vmarc", "serve", str(source), "--socket", self.sock, *extra],
            stderr=subprocess.PIPE,
        )
        deadline = time.time() + 60
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"server did not start: {self.proc.stderr.read()!r}")
            time.sleep(0.05)

    def url(self, name=""):
        return f"nbd+unix:///{name}?socket={self.sock}"

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=20)
        self.proc.stderr.close()
        return code


@pytest.fixture
def serve(tmp_path):
    servers = []

    def start(source, *extra):
        need("nbdinfo")
        s = Server(tmp_path, source, *extra)
        servers.append(s)
        return s

    yield start
    for s in servers:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


@pytest.mark.parametrize("case", list(CASES))
def test_every_disk_reads_identically_through_nbd(case, tmp_path, serve):
    need("nbdcopy")
    source, disks = CASES[case](tmp_path)
    s = serve(source)
    for name, data in disks.items():
        out = tmp_path / "copy.raw"
        subprocess.run(["nbdcopy", s.url(name or ""), str(out)], check=True)
        assert out.read_bytes() == data, (case, name)
        # every byte asked for, holes included (hole chunks, sendfile data chunks), with
        # 128 KiB requests (not the 1 MiB chunk or 2 MiB block boundaries)
        out.unlink()
        subprocess.run(
            ["nbdcopy", "--no-extents", "--request-size=131072", s.url(name or ""), str(out)],
            check=True,
        )
        assert out.read_bytes() == data, (case, name, "no extents")
        size = json.loads(
            subprocess.run(
                ["nbdinfo", "--json", s.url(name or "")], capture_output=True, check=True
            ).stdout
        )
        assert size["exports"][0]["export-size"] == len(data)
    assert s.stop() == 0
    assert not os.path.exists(s.sock)


@pytest.mark.parametrize("case", ["xva", "xva.gz", "vma"])
def test_holes_show_in_nbdinfo_map_and_qemu_reads_nbd(case, tmp_path, serve):
    source, disks = CASES[case](tmp_path)
    s = serve(source)
    name, data = next(iter(disks.items()))
    res = subprocess.run(
        ["nbdinfo", "--map", "--json", s.url(name)], capture_output=True, check=True
    )
    extents = json.loads(res.stdout)
    assert sum(e["length"] for e in extents) == len(data)
    holes = [e for e in extents if e["type"] & 1]
    assert holes, extents
    for e in extents:  # every hole really reads as zeros; data is where the bytes are
        piece = data[e["offset"] : e["offset"] + e["length"]]
        if e["type"] & 1:
            assert piece == bytes(len(piece))
    if case == "xva":  # the skipped zero chunk 2 (after two keepalives) is a hole
        assert any(
            e["offset"] <= 2 * MiB and e["offset"] + e["length"] >= 3 * MiB for e in holes
        ), extents
    need("qemu-img")
    ref = tmp_path / "ref.raw"
    ref.write_bytes(data)
    cmp = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(ref), s.url(name)],
        capture_output=True,
    )
    assert cmp.returncode == 0, cmp
    out = tmp_path / "q.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", s.url(name), str(out)], check=True)
    assert subprocess.run(["qemu-img", "compare", str(ref), str(out)]).returncode == 0


def test_export_names_list_and_unknown(tmp_path, serve):
    source, disks = xva_case(tmp_path)
    s = serve(source)
    listed = subprocess.run(
        ["nbdinfo", "--list", "--json", s.url()], capture_output=True, check=True
    )
    names = {e["export-name"] for e in json.loads(listed.stdout)["exports"]}
    assert names == set(disks)
    # the device works as an export name too
    out = tmp_path / "b.raw"
    subprocess.run(["nbdcopy", s.url("xvdb"), str(out)], check=True)
    assert out.read_bytes() == disks["Ref:9"]
    bad = subprocess.run(["nbdinfo", s.url("nope")], capture_output=True)
    assert bad.returncode != 0


def test_disconnecting_clients_do_not_stop_the_server(tmp_path, serve):
    source, disks = xva_case(tmp_path)
    s = serve(source)
    for cut in (0, 8, 18, 30):  # gone at once, mid-greeting, mid-option, after options
        c = socket.socket(socket.AF_UNIX)
        c.connect(s.sock)
        c.recv(18)
        if cut >= 18:
            c.sendall(struct.pack(">I", 3))  # client flags
        if cut >= 30:
            c.sendall(struct.pack(">QII", 0x49484156454F5054, 7, 100) + b"x" * 10)
        c.close()
    # a hostile option length is dropped without harm
    c = socket.socket(socket.AF_UNIX)
    c.connect(s.sock)
    c.recv(18)
    c.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 7, 1 << 31))
    c.close()
    out = tmp_path / "after.raw"
    subprocess.run(["nbdcopy", s.url("Ref:10"), str(out)], check=True)
    assert out.read_bytes() == disks["Ref:10"]
    assert s.stop() == 0


def test_several_clients_at_once(tmp_path, serve):
    source, disks = vma_case(tmp_path)
    s = serve(source)
    procs = [
        subprocess.Popen(["nbdcopy", s.url(name), str(tmp_path / f"{i}-{name}.raw")])
        for i in range(3)
        for name in disks
    ]
    assert all(p.wait(timeout=60) == 0 for p in procs)
    for i in range(3):
        for name, data in disks.items():
            assert (tmp_path / f"{i}-{name}.raw").read_bytes() == data


def test_index_is_saved_and_reused(tmp_path):
    from vmarc.access import open_disks

    for case in ("xva", "vma.gz", "vma.zst"):
        source, disks = CASES[case](tmp_path)
        with open_disks(str(source), quiet=True) as first:
            assert not first.how.endswith("(reused)")
            got = {d.disk.id: d.read_at(0, d.size) for d in first.disks}
        with open_disks(str(source), quiet=True) as second:
            assert second.how.endswith("(reused)"), (case, second.how)
            for d in second.disks:
                assert d.read_at(0, d.size) == got[d.disk.id] == disks[d.disk.id]
    # gzip checkpoints are saved in gztool's format: sparse, compressed windows
    saved = list((tmp_path / "cache" / "vmarc").glob("*.gzidx"))
    assert len(saved) == 1 and saved[0].read_bytes()[:16] == bytes(8) + b"gzipindx"
    # a changed archive is indexed again, not misread through the old index
    source, _ = xva_case(tmp_path)
    os.utime(source, ns=(1, 1))
    with open_disks(str(source), quiet=True) as third:
        assert not third.how.endswith("(reused)")


def test_index_beside_the_archive_and_random_reads(tmp_path):
    from vmarc.access import open_disks

    source, disks = xva_case(tmp_path)
    idx = tmp_path / "vm.idx"
    res = run("map", source, "--disk", "Ref:10", "--index", idx, "--output", "json")
    assert res.code == 0, res
    assert idx.exists()
    rnd = random.Random(5)
    with open_disks(str(source), index=str(idx)) as opened:
        assert opened.how == "index (reused)"
        for d in opened.disks:
            data = disks[d.disk.id]
            for _ in range(300):
                off = rnd.randrange(0, d.size)
                n = rnd.choice([1, 512, 4096, 65536, 3 * MiB])
                assert d.read_at(off, n) == data[off : off + n]


def test_map_json_and_dmsetup_agree_with_the_disk(tmp_path):
    source, disks = xva_case(tmp_path)
    archive = source.read_bytes()
    data = disks["Ref:10"]
    rows = json.loads(run("map", source, "--disk", "Ref:10", "--output", "json").out)
    assert rows[0]["start"] == 0 and sum(r["length"] for r in rows) == len(data)
    for r in rows:
        piece = data[r["start"] : r["start"] + r["length"]]
        if r["data"]:
            assert archive[r["offset"] : r["offset"] + r["length"]] == piece
        else:
            assert piece == bytes(len(piece))
    table = run(
        "map", source, "--disk", "xvda", "--output", "dmsetup", "--device", "/dev/loop7"
    ).text.splitlines()
    pos = 0
    for line in table:
        f = line.split()
        start, count = int(f[0]) * 512, int(f[1]) * 512
        assert start == pos
        piece = data[start : start + count]
        if f[2] == "linear":
            assert f[3] == "/dev/loop7"
            at = int(f[4]) * 512
            assert archive[at : at + len(piece)] == piece
        else:
            assert f[2] == "zero" and piece == bytes(len(piece))
        pos += count
    assert pos >= len(data)
    gz, _ = xva_case(tmp_path, "gzip")
    assert_clean_failure(run("map", gz, "--disk", "xvda", "--output", "dmsetup"), 1, "uncompressed")


def test_bad_inputs_fail_cleanly(tmp_path):
    source, _ = xva_case(tmp_path)
    blob = bytearray(source.read_bytes())
    cut = tmp_path / "cut.xva"
    cut.write_bytes(blob[: len(blob) // 2])
    # a cut archive is mapped with its lost stretch marked (reads of it fail), and said
    res = run("map", cut, "--disk", "xvda")
    assert res.code == 0 and "(damaged)" in res.text, res
    assert len(res.errtext.splitlines()) == 1 and "cut.xva" in res.errtext, res
    junk = tmp_path / "junk.xva"
    junk.write_bytes(b"hello" * 1000)
    assert_clean_failure(run("serve", junk, "--socket", tmp_path / "s"), 1, "junk.xva")
    assert_clean_failure(
        run("serve", "-", "--socket", tmp_path / "s", input=bytes(blob)), 1, "pipe"
    )
    assert_clean_failure(run("mount", source, tmp_path / "nowhere"), 1, "not a directory")
    # libfuse refuses these options during INIT, when the background child no longer has
    # a stderr: the parent still says so in one line
    need("fusermount3")
    (tmp_path / "mnt").mkdir()
    assert_clean_failure(
        run("mount", source, tmp_path / "mnt", "-o", "max_read=524288"), 1, "FUSE mount failed"
    )
    assert not os.path.ismount(tmp_path / "mnt")


def _mbr_disk(size: int, parts) -> bytearray:
    data = bytearray(vmagen.disk_bytes(size, seed=11))
    data[0:512] = bytes(512)
    for i, (start, count) in enumerate(parts):
        data[446 + 16 * i : 462 + 16 * i] = struct.pack("<B3xB3xII", 0, 0x83, start, count)
    data[510:512] = b"\x55\xaa"
    return data


@pytest.fixture
def mounted(tmp_path):
    mounts = []

    def mount(source, *extra):
        if not os.path.exists("/dev/fuse"):
            pytest.fail("no /dev/fuse on this machine: mount cannot be tested")
        need("fusermount3")
        mnt = tmp_path / f"mnt{len(mounts)}"
        mnt.mkdir()
        res = run("mount", source, mnt, *extra)
        assert res.code == 0, res
        mounts.append(mnt)
        return mnt

    yield mount
    for mnt in mounts:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)


# every format; the read paths: archive fd and /dev/zero handed to libfuse (plain
# archives, spool files), bytes from Python (gzip checkpoints, qcow2, VHD chains), and
# the kernel-cached mount
@pytest.mark.parametrize("case,extra", [*((c, ()) for c in CASES), ("xva", ("--kernel-cache",))])
def test_fuse_mount_reads_byte_for_byte(case, extra, tmp_path, mounted):
    source, disks = CASES[case](tmp_path)
    mnt = mounted(source, *extra)
    names = sorted(os.listdir(mnt))
    files = [n for n in names if n not in ("ova.xml", "qemu-server.conf", "t.ovf")]
    assert len(files) == len(disks), names
    rnd = random.Random(1)
    if case.startswith("xva"):
        pairs = {"xvda": disks["Ref:10"], "xvdb": disks["Ref:9"]}
        assert "ova.xml" in names
    elif case.startswith("vma"):
        pairs = {"scsi0": disks["drive-scsi0"], "virtio1": disks["drive-virtio1"]}
        assert (mnt / "qemu-server.conf").read_bytes().startswith(b"name: t")
    else:
        pairs = {files[0]: next(iter(disks.values()))}
    for name, data in pairs.items():
        assert (mnt / name).read_bytes() == data
        with open(mnt / name, "rb") as f:
            for _ in range(50):
                off = rnd.randrange(len(data))
                n = rnd.choice([1, 4096, 70000, 1 << 20])  # inside a run, across runs
                assert os.pread(f.fileno(), n, off) == data[off : off + n]
            assert os.pread(f.fileno(), 4096, len(data)) == b""
            if "--kernel-cache" in extra:  # shared maps need the page cache
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                    assert m[:] == data
            with mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ) as m:
                assert (
                    m[len(data) // 3 : len(data) // 3 + 70000]
                    == data[len(data) // 3 : len(data) // 3 + 70000]
                )
    with pytest.raises(OSError):
        open(mnt / files[0], "r+b")


def test_fuse_partitions_from_mbr(tmp_path, mounted):
    size = 4 * MiB
    data = _mbr_disk(size, [(2048, 2048), (4096, 2048)])
    raw = tmp_path / "disk.img"
    raw.write_bytes(data)
    mnt = mounted(raw)
    assert sorted(os.listdir(mnt)) == ["disk", "disk-part1", "disk-part2"]
    assert (mnt / "disk-part1").read_bytes() == data[1 * MiB : 2 * MiB]
    assert (mnt / "disk-part2").read_bytes() == data[2 * MiB : 3 * MiB]


def test_fuse_partitions_from_gpt(tmp_path, mounted):
    size = 4 * MiB
    data = bytearray(vmagen.disk_bytes(size, seed=12))
    data[0:512] = _mbr_disk(512, [(1, size // 512 - 1)])[:512]
    data[446 + 4] = 0xEE
    entry = bytes(range(16)) + bytes(16) + struct.pack("<QQ", 2048, 4095) + bytes(72)
    header = b"EFI PART" + bytes(64) + struct.pack("<QII", 2, 1, 128)
    data[512 : 512 + 512] = header.ljust(512, b"\0")
    data[1024 : 1024 + 128] = entry
    data[1024 + 128 : 1024 + 512] = bytes(384)
    raw = tmp_path / "gpt.img"
    raw.write_bytes(data)
    mnt = mounted(raw)
    assert (mnt / "disk-part1").read_bytes() == data[1 * MiB : 2 * MiB]


def _damaged_xva(tmp_path, checksum="xxhash", compress=False):
    """A one-disk XVA whose chunk 1 has a byte flipped (its checksum member intact)."""
    from vmarc.access import open_disks

    data = g.pattern_disk(4 * MiB, zero_chunks={2})
    path = tmp_path / "vm.xva"
    g.write(path, g.XvaSpec(disks=[g.XDisk("Ref:10", data, "root", "0")], checksum=checksum))
    with open_disks(str(path), quiet=True, verify=False) as o:
        at = next(o.disks[0].extents(MiB + 100, 1)).at
    blob = bytearray(path.read_bytes())
    blob[at] ^= 0xFF
    path.write_bytes(blob)
    if compress:
        subprocess.run(["gzip", "-1", str(path)], check=True)
        path = tmp_path / "vm.xva.gz"
    return path, data


@pytest.mark.parametrize(
    "checksum,compress", [("xxhash", False), ("sha1", False), ("xxhash", True)]
)
def test_random_reads_check_xva_chunk_checksums(tmp_path, checksum, compress):
    from vmarc.access import open_disks
    from vmarc.errors import IntegrityError

    path, data = _damaged_xva(tmp_path, checksum, compress)
    for _ in range(2):  # the index is built, then reused: both keep the checksums
        with open_disks(str(path), quiet=True) as o:
            d = o.disks[0]
            assert d.read_at(0, 4096) == data[:4096]
            with pytest.raises(
                IntegrityError, match="disk offset 1048576 fails its .*the archive is damaged"
            ):
                d.read_at(MiB + 5000, 10)
            with pytest.raises(IntegrityError):  # a failed chunk stays failed
                d.in_place(MiB, 4096)
            assert d.read_at(3 * MiB, 4096) == data[3 * MiB : 3 * MiB + 4096]
    assert o.how.endswith("(reused)")
    with open_disks(str(path), quiet=True, verify=False) as o:  # --no-verify: as stored
        assert o.disks[0].read_at(MiB + 100, 1) != data[MiB + 100 : MiB + 101]


def test_serve_and_mount_refuse_a_damaged_chunk(tmp_path, serve, mounted):
    need("qemu-io")
    path, data = _damaged_xva(tmp_path)
    s = serve(path)

    def qemu_read(offset, n):
        return subprocess.run(
            ["qemu-io", "-r", "-f", "raw", "-c", f"read {offset} {n}", s.url()],
            capture_output=True,
            text=True,
        )

    assert "read 4096/4096 bytes" in qemu_read(0, 4096).stdout
    bad = qemu_read(MiB, 4096)
    assert "read 4096/4096 bytes" not in bad.stdout, bad
    assert "Input/output error" in bad.stdout + bad.stderr, bad
    assert "read 4096/4096 bytes" in qemu_read(3 * MiB, 4096).stdout  # still serving
    assert s.proc.poll() is None

    mnt = mounted(path)
    with open(mnt / "xvda", "rb") as f:
        assert os.pread(f.fileno(), 4096, 0) == data[:4096]
        with pytest.raises(OSError) as err:
            os.pread(f.fileno(), 4096, MiB)
        assert err.value.errno == 5
        assert os.pread(f.fileno(), 4096, 3 * MiB) == data[3 * MiB : 3 * MiB + 4096]
    s.proc.send_signal(signal.SIGTERM)
    said = s.proc.communicate(timeout=20)[1].decode()
    assert "disk offset 1048576 fails its xxh64 checksum" in said, said


def test_a_chunk_is_hashed_once_however_many_threads_read_it():
    import threading

    import xxhash

    from vmarc.access import ChunkChecks
    from vmarc.errors import IntegrityError

    data = random.Random(4).randbytes(MiB)
    good, bad = ChunkChecks(), ChunkChecks()
    good.add(0, "xxh64", xxhash.xxh64_hexdigest(data).upper(), MiB)
    bad.add(0, "xxh64", "0123456789ABCDEF", MiB)
    reads, errors = [], []

    def read_chunk(start, size):
        reads.append(start)
        time.sleep(0.2)  # the other threads arrive while this one hashes
        return data

    def reader(checks, k):
        try:
            checks.check(4096 * k, 4096, read_chunk, "vm.xva: xvda", "damaged")
        except IntegrityError as e:
            errors.append(str(e))

    def four_readers(checks):
        checks.finish()
        reads.clear()
        threads = [threading.Thread(target=reader, args=(checks, k)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return len(reads)

    assert four_readers(good) == 1 and good.checked[0] and not errors
    # a bad chunk fails every reader: a waiter hashes it again rather than pass it
    assert four_readers(bad) >= 1 and not bad.checked[0]
    assert len(errors) == 4 and all("fails its xxh64 checksum" in e for e in errors)


def test_a_damaged_index_is_built_again_not_trusted(tmp_path):
    from vmarc.access import open_disks

    source, disks = vma_case(tmp_path)  # VMA: no chunk checksums would catch a bad offset
    with open_disks(str(source), quiet=True) as o:
        assert o.how == "index"
    idx = next((tmp_path / "cache" / "vmarc").glob("*.idx"))
    blob = bytearray(idx.read_bytes())
    blob[-9] ^= 0x01  # a store offset in the body; the header (and identity) intact
    idx.write_bytes(blob)
    with open_disks(str(source), quiet=True) as o:
        assert o.how == "index", "a damaged index was reused"
        for d in o.disks:
            assert d.read_at(0, d.size) == disks[d.disk.id]
    with open_disks(str(source), quiet=True) as o:  # the rebuilt one is saved and reused
        assert o.how == "index (reused)"


def test_a_damaged_spool_file_is_caught_when_reused(tmp_path):
    from vmarc.access import open_disks
    from vmarc.errors import IntegrityError

    source, disks = vma_case(tmp_path, "zstd")
    with open_disks(str(source), quiet=True) as o:
        assert o.how == "spool"
        d = o.disks[0]
        assert d.read_at(0, d.size) == disks[d.disk.id]
        pos, _, _, at, *_ = next(e for e in d.extents(MiB, d.size - MiB) if e.kind == "data")
    spool = next((tmp_path / "cache" / "vmarc").glob("*.spool"))
    with open(spool, "r+b") as f:  # a bit rots in the cached spool
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x10]))
    with open_disks(str(source), quiet=True) as o:
        assert o.how == "spool (reused)"
        d = o.disks[0]
        assert d.read_at(0, 4096) == disks[d.disk.id][:4096]
        with pytest.raises(IntegrityError, match="fails its xxh64 checksum.*the spool file"):
            d.read_at(pos, 1)


def test_a_fifo_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    for cmd in (["map", fifo], ["serve", fifo, "--socket", tmp_path / "s"]):
        res = run(*cmd, timeout=30)
        assert_clean_failure(res, 1, "regular file or a block device")


def test_a_gpt_with_absurd_entries_is_no_partition_table():
    from vmarc.access.partitions import partitions

    class Disk:
        size = 1 << 30

        def __init__(self):
            self.mbr = bytearray(512)
            self.mbr[446 + 4] = 0xEE  # protective MBR
            self.mbr[510:512] = b"\x55\xaa"
            self.head = bytearray(512)
            self.head[:8] = b"EFI PART"
            struct.pack_into("<QII", self.head, 72, 2, 128, 1 << 31)  # 2 GiB entries

        def read_at(self, offset, n):
            if n > 1 << 24:
                raise AssertionError(f"asked for {n} bytes")
            return {0: bytes(self.mbr), 512: bytes(self.head)}.get(offset, bytes(n))[:n]

    assert partitions(Disk()) == []


def _nbd_connect(sock_path):
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(sock_path))
    s.settimeout(10)
    return s


def _nbd_export(s, name=b""):
    """Old-style export option: the size and flags follow."""
    s.recv(18, socket.MSG_WAITALL)
    s.sendall(struct.pack(">I", 3))  # fixed, no zeroes
    s.sendall(struct.pack(">QII", 0x49484156454F5054, 1, len(name)) + name)
    return s.recv(10, socket.MSG_WAITALL)


def test_nbd_write_is_refused_unread_and_connections_are_capped(tmp_path, serve):
    source, _ = xva_case(tmp_path)
    srv = serve(source)
    s = _nbd_connect(srv.sock)
    assert len(_nbd_export(s)) == 10
    # a write of 4 GiB - 1 with no payload sent: EPERM at once, then the server hangs up
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 7, 0, 0xFFFFFFFF))
    reply = s.recv(16, socket.MSG_WAITALL)
    assert struct.unpack(">IIQ", reply) == (0x67446698, 1, 7)
    assert s.recv(1) == b""
    s.close()
    held = [_nbd_connect(srv.sock) for _ in range(64)]
    for c in held:
        assert len(c.recv(18, socket.MSG_WAITALL)) == 18
    extra = _nbd_connect(srv.sock)
    assert extra.recv(18) == b""  # the 65th is closed before the handshake
    for c in held:
        c.close()
    extra.close()
    time.sleep(0.5)
    again = _nbd_connect(srv.sock)  # room again once they have gone
    assert len(_nbd_export(again)) == 10
    again.close()


def test_a_silent_nbd_client_is_dropped(tmp_path, serve, monkeypatch):
    monkeypatch.setenv("VMARC_NBD_IDLE_TIMEOUT", "1")
    source, _ = xva_case(tmp_path)
    srv = serve(source)
    s = _nbd_connect(srv.sock)
    assert len(_nbd_export(s)) == 10
    started = time.time()
    assert s.recv(1) == b""  # closed by the server, not by us
    assert time.time() - started < 8
    s.close()
