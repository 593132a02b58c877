"""Restoring into what a user names: block devices (real loop devices), /dev/null,
symlinks and existing files with -n; write errors on a full or read-only file system."""

import json
import os
import stat
import subprocess

import pytest

from tests.support import xvagen as g
from tests.support.helpers import assert_clean_failure, need, vmarc_peak
from tests.support.helpers import vmarc as run
from tests.test_access import CASES, mounted, own_cache  # noqa: F401 (fixtures)

MiB = 1 << 20
FILL = b"\xaa"


def _root():
    if os.geteuid() != 0:
        pytest.fail("these tests need root (loop devices, tmpfs mounts): CI runs as root")


@pytest.fixture
def loopdev(tmp_path):
    """make(size) -> a loop device of size bytes, every byte 0xAA; detached afterwards."""
    _root()
    made = []

    def make(size):
        backing = tmp_path / f"loop{len(made)}.img"
        backing.write_bytes(FILL * size)
        dev = subprocess.run(
            ["losetup", "-f", "--show", str(backing)], check=True, capture_output=True, text=True
        ).stdout.strip()
        made.append(dev)
        return dev

    yield make
    for dev in made:
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.fixture
def small_fs(tmp_path):
    """mount(size_mib, ro=False) -> a fresh tmpfs of that size; unmounted afterwards."""
    _root()
    made = []

    def mount(size_mib, ro=False):
        where = tmp_path / f"fs{len(made)}"
        where.mkdir()
        opts = f"size={size_mib}m" + (",ro" if ro else "")
        subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "vmarc-test", str(where)], check=True)
        made.append(where)
        return where

    yield mount
    for where in made:
        subprocess.run(["umount", str(where)], check=False)


def _read(path, n=None):
    with open(path, "rb") as f:
        return f.read() if n is None else f.read(n)


def _pick(disks):
    """(--disk arguments, bytes) of a case's first disk."""
    key, data = next(iter(disks.items()))
    return (["--disk", key] if len(disks) > 1 else []), data


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_format_converts_into_a_block_device(case, tmp_path, loopdev):
    src, disks = CASES[case](tmp_path)
    sel, data = _pick(disks)
    devsize = -(-(len(data) + MiB) // 512) * 512
    dev = loopdev(devsize)
    res = run("convert", src, dev, *sel)
    assert res.code == 0, res
    assert stat.S_ISBLK(os.stat(dev).st_mode)
    got = _read(dev)
    assert got[: len(data)] == data  # holes read back as zeros, not 0xAA
    assert got[len(data) :] == FILL * (devsize - len(data))  # past the disk: untouched


@pytest.mark.parametrize("case", ["xva.gz", "vma", "vhd-chain", "qcow2"])
@pytest.mark.parametrize("fmt", ["qcow2", "vpc"])
def test_qcow2_and_vhd_into_a_block_device(case, fmt, tmp_path, loopdev):
    need("qemu-img")
    src, disks = CASES[case](tmp_path)
    sel, data = _pick(disks)
    dev = loopdev(-(-(len(data) + 4 * MiB) // 512) * 512)
    res = run("convert", src, dev, "-O", fmt, *sel)
    assert res.code == 0, res
    assert stat.S_ISBLK(os.stat(dev).st_mode)
    back = tmp_path / "back.raw"
    subprocess.run(["qemu-img", "convert", "-f", fmt, dev, "-O", "raw", str(back)], check=True)
    assert _read(back)[: len(data)] == data
    if fmt == "qcow2":
        subprocess.run(["qemu-img", "check", "-f", "qcow2", dev], check=True, capture_output=True)


def test_a_device_too_small_is_refused_before_any_write(tmp_path, loopdev):
    src, disks = CASES["xva"](tmp_path)
    sel, data = _pick(disks)
    devsize = len(data) // 512 * 512 - 4096
    dev = loopdev(devsize)
    res = run("convert", src, dev, *sel)
    assert_clean_failure(res, 1, dev, str(devsize), str(len(data)))
    assert _read(dev) == FILL * devsize
    assert stat.S_ISBLK(os.stat(dev).st_mode)


def test_target_is_zero_skips_zeroing(tmp_path, loopdev):
    src, disks = CASES["vma"](tmp_path)
    sel, data = _pick(disks)
    dev = loopdev(-(-len(data) // 512) * 512)
    res = run("convert", src, dev, *sel, "--target-is-zero")
    assert res.code == 0, res
    got = _read(dev)[: len(data)]
    assert got != data  # the holes kept the old bytes, as asked
    for off in range(0, len(data), 4096):
        want = data[off : off + 4096]
        assert got[off : off + 4096] == (want if any(want) else FILL * len(want))


def test_a_mounted_device_is_refused(tmp_path, loopdev):
    src, disks = CASES["raw"](tmp_path)
    dev = loopdev(8 * MiB)
    # no lazy init: the kernel would otherwise write inode tables in the background
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev], check=True
    )
    where = tmp_path / "mnt"
    where.mkdir()
    subprocess.run(["mount", dev, str(where)], check=True)
    try:
        before = _read(dev)
        res = run("convert", src, dev, "-f", "raw")
        assert_clean_failure(res, 1, dev, "in use")
        assert _read(dev) == before
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_symlinks_stay_symlinks(tmp_path, loopdev):
    src, disks = CASES["xva"](tmp_path)
    sel, data = _pick(disks)
    target = tmp_path / "target.raw"
    target.write_bytes(FILL * (len(data) + MiB))
    link = tmp_path / "link.raw"
    link.symlink_to(target)
    res = run("convert", src, link, *sel)
    assert res.code == 0, res
    assert os.path.islink(link) and os.readlink(link) == str(target)
    assert _read(target) == data  # written in place: cut to the disk's size
    dev = loopdev(-(-len(data) // 512) * 512)
    devlink = tmp_path / "dev-link"
    devlink.symlink_to(dev)
    assert run("convert", src, devlink, *sel).code == 0
    assert os.path.islink(devlink) and stat.S_ISBLK(os.stat(dev).st_mode)
    assert _read(dev)[: len(data)] == data
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "made-by-vmarc.raw")
    assert run("convert", src, dangling, *sel).code == 0
    assert os.path.islink(dangling) and _read(tmp_path / "made-by-vmarc.raw") == data


def test_no_create_writes_into_an_existing_file_without_cutting_it(tmp_path):
    src, disks = CASES["vma.zst"](tmp_path)
    sel, data = _pick(disks)
    out = tmp_path / "existing.raw"
    out.write_bytes(FILL * (len(data) + MiB))
    ino = os.stat(out).st_ino
    res = run("convert", src, out, *sel, "-n")
    assert res.code == 0, res
    assert os.stat(out).st_ino == ino
    got = _read(out)
    assert got[: len(data)] == data and got[len(data) :] == FILL * MiB
    res = run("convert", src, tmp_path / "missing.raw", *sel, "-n")
    assert_clean_failure(res, 1, "missing.raw", "does not exist")


def test_dev_null_and_missing_device_names(tmp_path):
    src, disks = CASES["vhd-chain"](tmp_path)
    for fmt in ("raw", "vpc"):
        res = run("convert", src, "/dev/null", "-O", fmt)
        assert res.code == 0, res
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    res = run("convert", src, "/dev/null", "-O", "qcow2")
    assert_clean_failure(res, 1, "/dev/null", "stream")
    missing = "/dev/vmarc-test-no-such-volume"
    res = run("convert", src, missing)
    assert_clean_failure(res, 1, missing, "no such device")
    assert not os.path.lexists(missing)


def test_binary_output_to_a_terminal_is_refused(tmp_path):
    src, disks = CASES["raw"](tmp_path)
    import pty

    leader, follower = pty.openpty()
    try:
        res = run("convert", src, "-", "-f", "raw", stdout=follower)
    finally:
        os.close(leader)
        os.close(follower)
    assert_clean_failure(res, 1, "terminal")


def _incompressible_raw(tmp_path, size=32 * MiB):
    src = tmp_path / "big.img"
    src.write_bytes(os.urandom(size))
    return src


def _xva_of(tmp_path, raw):
    data = raw.read_bytes()
    path = tmp_path / "big.xva"
    g.write(path, g.XvaSpec(disks=[g.XDisk("Ref:1", data, "d", "0")]))
    return path


WRITERS = {
    "raw": lambda src, xva, out: ["convert", src, out / "o.raw"],
    "qcow2": lambda src, xva, out: ["convert", src, out / "o.qcow2", "-O", "qcow2"],
    "vhd": lambda src, xva, out: ["convert", src, out / "o.vhd", "-O", "vpc"],
    "vhd-fixed": lambda src, xva, out: [
        "convert",
        src,
        out / "o.vhd",
        "-O",
        "vpc",
        "-o",
        "subformat=fixed",
    ],
    "vma": lambda src, xva, out: ["create", "-O", "vma", out / "o.vma", "--disk", f"scsi0={src}"],
    "vma.zst": lambda src, xva, out: ["convert", xva, out / "vzdump-qemu-1-x.vma.zst", "-O", "vma"],
    "xva": lambda src, xva, out: ["create", "-O", "xva", out / "o.xva", "--disk", f"d={src}"],
    "xva.gz": lambda src, xva, out: [
        "convert",
        xva,
        out / "o.xva",
        "-O",
        "xva",
        "-o",
        "compress=gzip",
    ],
    "extract": lambda src, xva, out: ["extract", xva, out / "dir"],
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_disk_full_and_read_only_are_one_line(writer, tmp_path, small_fs):
    raw = _incompressible_raw(tmp_path)
    xva = _xva_of(tmp_path, raw)
    full = small_fs(20)
    res = run(*WRITERS[writer](raw, xva, full))
    assert_clean_failure(res, 1, str(full), "No space left on device")
    assert os.listdir(full) == []
    ro = small_fs(20, ro=True)
    res = run(*WRITERS[writer](raw, xva, ro))
    assert_clean_failure(res, 1, str(ro), "Read-only file system")
    assert os.listdir(ro) == []


def _allocated(path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.fixture
def sparse_sources(tmp_path):
    """One disk with zero clusters and zero 4 KiB blocks inside data clusters, as XVA,
    VMA, a dynamic VHD and qcow2 (the last two written by qemu-img)."""
    need("qemu-img")
    from tests.support import vmagen

    data = vmagen.disk_bytes(16 * MiB + 4096, seed=5)
    raw = tmp_path / "disk.img"
    raw.write_bytes(data)
    xva = tmp_path / "disk.xva"
    g.write(xva, g.XvaSpec(disks=[g.XDisk("Ref:1", data, "d", "0")]))
    vma = tmp_path / "disk.vma"
    vma.write_bytes(vmagen.build([("drive-scsi0", data)]))
    srcs = {"xva": xva, "vma": vma}
    for fmt, opts in (("vhd", ["-O", "vpc", "-o", "force_size=on"]), ("qcow2", ["-O", "qcow2"])):
        srcs[fmt] = tmp_path / f"disk.{fmt}"
        subprocess.run(["qemu-img", "convert", "-f", "raw", raw, *opts, srcs[fmt]], check=True)
    return raw, data, srcs


@pytest.mark.parametrize("fmt", ["xva", "vma", "vhd", "qcow2"])
def test_raw_output_is_as_sparse_as_qemu_img(fmt, tmp_path, sparse_sources):
    raw, data, srcs = sparse_sources
    ref = tmp_path / "qemu.raw"
    subprocess.run(["qemu-img", "convert", "-f", "raw", raw, "-O", "raw", ref], check=True)
    out = tmp_path / f"from-{fmt}.raw"
    assert run("convert", srcs[fmt], out).code == 0
    assert _read(out) == data
    assert _allocated(out) <= 1.1 * _allocated(ref), (_allocated(out), _allocated(ref))
    assert _allocated(out) < len(data) * 0.75  # the zero 4 KiB blocks are holes


def test_vhd_output_is_as_sparse_as_qemu_img(tmp_path, sparse_sources):
    raw, data, srcs = sparse_sources
    ref = tmp_path / "qemu.vhd"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", raw, "-O", "vpc", "-o", "force_size=on", ref],
        check=True,
    )
    out = tmp_path / "vmarc.vhd"
    assert run("convert", srcs["xva"], out, "-O", "vpc").code == 0
    assert _allocated(out) <= 1.1 * _allocated(ref), (_allocated(out), _allocated(ref))
    back = tmp_path / "back.raw"
    subprocess.run(["qemu-img", "convert", "-f", "vpc", out, "-O", "raw", back], check=True)
    assert _read(back) == data


def test_vma_names_must_agree_with_compression_and_vmid(tmp_path):
    src, disks = CASES["xva"](tmp_path)
    raw = tmp_path / "d.img"
    raw.write_bytes(next(iter(disks.values())))
    for args in (
        [
            "create",
            "-O",
            "vma",
            tmp_path / "vzdump-qemu-5-x.vma.zst",
            "--disk",
            f"scsi0={raw}",
            "--compress",
            "gzip",
        ],
        [
            "create",
            "-O",
            "vma",
            tmp_path / "vzdump-qemu-5-x.vma",
            "--disk",
            f"scsi0={raw}",
            "--compress",
            "zstd",
        ],
        ["convert", src, tmp_path / "vzdump-qemu-5-x.vma.gz", "-O", "vma", "-o", "compress=zstd"],
    ):
        assert_clean_failure(run(*args), 1, "Proxmox picks the decompressor by the name")
    assert_clean_failure(
        run("convert", src, tmp_path / "vzdump-qemu-5-x.vma", "-O", "vma", "--vmid", "7"),
        1,
        "VM 5",
        "--vmid is 7",
    )
    assert os.listdir(tmp_path) == [p for p in os.listdir(tmp_path) if not p.startswith("vzdump")]
    # the vmid of the name goes into the volumes of the config vmarc writes
    out = tmp_path / "vzdump-qemu-123-2026_01_01-00_00_00.vma"
    assert run("create", "-O", "vma", out, "--disk", f"scsi0={raw}").code == 0
    configs = json.loads(run("info", out, "--output", "json", "--configs").out)["configs"]
    conf = next(c["content"] for c in configs if c["name"] == "qemu-server.conf")
    assert "vm-123-disk-0" in conf and "vm-100-" not in conf, conf


@pytest.mark.parametrize("sig,code", [("SIGTERM", 143), ("SIGHUP", 129), ("SIGINT", 130)])
def test_signals_leave_nothing_behind(sig, code, tmp_path):
    import signal
    import sys
    import time

    src, disks = CASES["xva"](tmp_path)
    blob = src.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmarc", "convert", "-", out / "o.raw", "--disk", "xvda"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdin.write(blob[:-65536])  # then the source stalls
    proc.stdin.flush()
    deadline = time.time() + 30
    while not os.listdir(out) and time.time() < deadline:
        time.sleep(0.05)
    assert os.listdir(out), "the conversion never started writing"
    proc.send_signal(getattr(signal, sig))
    err = proc.stderr.read().decode()
    proc.stdin.close()
    assert proc.wait(timeout=30) == code, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert os.listdir(out) == []


def test_a_file_too_large_for_its_limit_is_one_line(tmp_path):
    import resource
    import sys

    src, disks = CASES["raw"](tmp_path)

    def limit():  # the file-size limit of a quota or a file system, as the kernel sees it
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    res = subprocess.run(
        [sys.executable, "-m", "vmarc", "convert", src, tmp_path / "o.raw", "-f", "raw"],
        capture_output=True,
        preexec_fn=limit,
    )
    err = res.stderr.decode()
    assert res.returncode == 1 and "File too large" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
    assert not any(p.name.startswith(".o.raw") or p.name == "o.raw" for p in tmp_path.iterdir())


def test_a_read_error_under_gzip_is_exit_1_not_damage(tmp_path, own_cache, mounted):
    """The input file returns EIO (a file in a vmarc mount of an archive cut short, past
    the cut): a read error with exit 1, whatever the decompressor makes of it."""
    import gzip

    from tests.support import xvagen as gen

    inner = gzip.compress(os.urandom(3 << 20), compresslevel=1)  # a .gz, 3 MiB inside
    disk = inner + bytes(-len(inner) % (1 << 20))
    blob = gen.build(gen.XvaSpec(disks=[gen.XDisk("Ref:1", disk, "d", "0")]))
    cut = blob.index(b"Ref:1/00000002\0") + 512 + 1000  # chunk 2 lost
    (tmp_path / "cut.xva").write_bytes(blob[:cut])
    mnt = mounted(tmp_path / "cut.xva")
    res = run("convert", mnt / "xvda", tmp_path / "o.raw", "-f", "raw")
    assert_clean_failure(res, 1, "read error")


def test_disk_full_while_spooling_for_serve_is_one_line(tmp_path, small_fs):
    import sys

    src, _ = CASES["xva.zst"](tmp_path)
    cache = small_fs(1)  # the spool of a zstd archive does not fit
    env = dict(os.environ, XDG_CACHE_HOME=str(cache))
    res = subprocess.run(
        [sys.executable, "-m", "vmarc", "serve", src, "--socket", tmp_path / "s"],
        capture_output=True,
        env=env,
        timeout=120,
    )
    err = res.stderr.decode()
    lines = [ln for ln in err.splitlines() if not ln.startswith("vmarc: ") or "No space" in ln]
    assert res.returncode == 1 and "No space left on device" in err, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert not [p for p in cache.rglob("*") if p.is_file()]


def test_writing_a_huge_sparse_disk_costs_little_memory(tmp_path):
    """An 8 TiB disk with one stretch of data into qcow2: the writer's per-cluster flags
    are paged (a byte per cluster was 128 MiB)."""
    src = tmp_path / "huge.raw"
    with open(src, "wb") as f:
        f.truncate(8 << 40)
        f.seek(5 << 40)
        f.write(b"data" * 1024)
    res, peak = vmarc_peak("convert", src, tmp_path / "o.qcow2", "-O", "qcow2")
    assert res.code == 0 and peak < 100 * 1024, (res, peak)
    need("qemu-img")
    subprocess.run(
        ["qemu-img", "check", "-f", "qcow2", tmp_path / "o.qcow2"], check=True, capture_output=True
    )
