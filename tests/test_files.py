"""Files inside the guest (issue 17): file systems built by their own tools, read back by
vmarc through every kind of source, checked against the tools' own readers."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess

import pytest

from tests.support import guestgen as gg
from tests.support.helpers import vmarc

MiB = gg.MiB
KINDS = ["ext4", "xfs", "btrfs", "ntfs", "vfat"]
TOOLS = {
    "ext4": ["mke2fs", "debugfs"],
    "xfs": ["mkfs.xfs"],
    "btrfs": ["mkfs.btrfs", "btrfs"],
    "ntfs": ["mkntfs", "ntfs-3g", "ntfsls", "ntfscat"],
    "vfat": ["mkfs.vfat", "mcopy", "mdir", "mtype"],
}
SIZES = {"xfs": 300 * MiB, "btrfs": 300 * MiB}
UNIX_MODES = {"ext4", "xfs", "btrfs"}  # NTFS (through ntfs-3g) and FAT keep no modes


def need(*tools):
    if not gg.have(*tools):
        pytest.fail(f"missing {tools}: run ./setup.sh")


def ls_json(*args) -> dict:
    r = vmarc("ls", "-R", "--output", "json", *args)
    assert r.code == 0, r
    return {e["path"]: e for e in valid(r, "ls")["entries"]}


def valid(r, command) -> dict:
    """The document, checked against docs/json-schema.json."""
    from tests.test_json import VALIDATOR

    doc = json.loads(r.out)
    errors = [e.message for e in VALIDATOR.iter_errors(doc)]
    assert not errors and doc["command"] == command, errors[:5]
    return doc


def as_listing(entries: dict, modes: bool) -> dict:
    out = {}
    for path, e in entries.items():
        if path == "/lost+found":
            continue
        kind = e["type"]
        out[path] = (
            kind,
            e["size"] if kind == "file" else None,
            e["mode"] if modes and kind != "symlink" else None,
            e["target"],
        )
    return out


def expected(tree: str, modes: bool) -> dict:
    return {p: (k, s, m if modes else None, t) for p, (k, s, m, t) in gg.listing(tree).items()}


@pytest.fixture(scope="module")
def fs_images(tmp_path_factory):
    """One whole-disk image per file-system type, with its source tree."""
    d = tmp_path_factory.mktemp("fs")
    made = {}
    for kind in KINDS:
        need(*TOOLS[kind])
        tree = gg.make_tree(str(d / f"{kind}-tree"), links=kind != "vfat")
        img = gg.make_fs(kind, str(d / f"{kind}.img"), SIZES.get(kind, 64 * MiB), tree, f"L{kind}")
        made[kind] = (img, tree)
    return made


@pytest.mark.parametrize("kind", KINDS)
def test_each_file_system_lists_and_reads_exactly(fs_images, kind):
    img, tree = fs_images[kind]
    got = as_listing(ls_json("-f", "raw", img), kind in UNIX_MODES)
    assert got == expected(tree, kind in UNIX_MODES)
    for rel in ("data/big.bin", "data/caf\u00e9-menu.txt", "home/u/notes.txt", "data/sparse"):
        r = vmarc("cat", "-f", "raw", img, "/" + rel)
        assert r.code == 0, r
        with open(os.path.join(tree, rel), "rb") as f:
            assert r.out == f.read(), rel
    r = vmarc("filesystems", "--output", "json", "-f", "raw", img)
    (vol,) = json.loads(r.out)["volumes"]
    assert (vol["name"], vol["type"], vol["label"]) == ("disk", kind, f"L{kind}")


def test_independent_readers_agree(fs_images, tmp_path):
    """debugfs (ext), ntfsls/ntfscat (NTFS), mdir/mtype (FAT), btrfs restore: the same
    names and bytes as vmarc's."""
    img, tree = fs_images["ext4"]
    out = subprocess.run(
        ["debugfs", "-R", "ls -l /data/many", img], capture_output=True, check=True
    ).stdout.decode()
    names = {line.split()[-1] for line in out.splitlines() if line.strip()} - {".", ".."}
    r = vmarc("ls", "-f", "raw", img, "/data/many")
    assert set(r.text.split()) == names
    dumped = tmp_path / "big.debugfs"
    subprocess.run(
        ["debugfs", "-R", f"dump /data/big.bin {dumped}", img], check=True, capture_output=True
    )
    assert vmarc("cat", "-f", "raw", img, "/data/big.bin").out == dumped.read_bytes()

    img, _ = fs_images["ntfs"]
    out = subprocess.run(["ntfsls", "-p", "/data/many", img], capture_output=True, check=True)
    assert set(vmarc("ls", "-f", "raw", img, "/data/many").text.split()) == set(
        out.stdout.decode().split()
    ) - {".", ".."}
    theirs = subprocess.run(["ntfscat", img, "/data/big.bin"], capture_output=True, check=True)
    assert vmarc("cat", "-f", "raw", img, "/data/big.bin").out == theirs.stdout

    img, _ = fs_images["vfat"]
    theirs = subprocess.run(
        ["mtype", "-i", img, "::/data/big.bin"], capture_output=True, check=True
    )
    assert vmarc("cat", "-f", "raw", img, "/data/big.bin").out == theirs.stdout
    out = subprocess.run(["mdir", "-b", "-i", img, "::/data/many"], capture_output=True, check=True)
    assert {os.path.basename(p) for p in out.stdout.decode().split()} == set(
        vmarc("ls", "-f", "raw", img, "/data/many").text.split()
    )

    img, _ = fs_images["btrfs"]
    restored = tmp_path / "restored"
    restored.mkdir()
    subprocess.run(["btrfs", "restore", "-S", img, str(restored)], capture_output=True, check=True)
    copied = tmp_path / "copied"
    copied.mkdir()
    assert vmarc("copy-out", "-f", "raw", img, "/data", copied).code == 0
    assert gg.listing(str(restored / "data")) == gg.listing(str(copied / "data"))


def _disk_with(tmp_path, kind="ext4", table="dos"):
    tree = gg.make_tree(str(tmp_path / "tree"))
    fs = gg.make_fs(kind, str(tmp_path / "fs.img"), 40 * MiB, tree, "guestroot")
    disk = str(tmp_path / "disk.raw")
    gg.partition(disk, 48 * MiB, table, [(1, 2, "L"), (4, 40, "L")])
    gg.place(disk, fs, 4 * MiB)
    return disk, tree


def _packed(tmp_path, disk: str, how: str) -> str:
    if how in ("xva", "xva.gz", "vma.zst"):
        out = str(tmp_path / f"vm.{how}")
        slot = "scsi0" if how.startswith("vma") else "root"
        r = vmarc("create", "-O", how.split(".")[0], "--disk", f"{slot}={disk}", "-f", "raw", out)
        assert r.code == 0, r
        return out
    out = str(tmp_path / f"disk.{how}")
    fmt = {
        "vhd": ["-O", "vpc", "-o", "subformat=dynamic"],
        "qcow2": ["-O", "qcow2"],
        "vmdk": ["-O", "vmdk", "-o", "subformat=streamOptimized"],
        "vhdx": ["-O", "vhdx"],
    }[how]
    subprocess.run(["qemu-img", "convert", "-f", "raw", *fmt, disk, out], check=True)
    return out


@pytest.mark.parametrize("how", ["xva", "xva.gz", "vma.zst", "vhd", "qcow2", "vmdk", "vhdx"])
def test_every_source_gives_the_same_files(tmp_path, how):
    need("sfdisk", "mke2fs", "qemu-img")
    disk, tree = _disk_with(tmp_path, table="gpt" if how == "vhd" else "dos")
    src = _packed(tmp_path, disk, how)
    r = vmarc("filesystems", "--output", "json", src)
    vols = {v["name"]: v for v in valid(r, "filesystems")["volumes"]}
    part = "scsi0-part2" if how.startswith("vma") else next(n for n in vols if n.endswith("2"))
    assert vols[part]["type"] == "ext4" and vols[part]["label"] == "guestroot"
    assert as_listing(ls_json(src), True) == expected(tree, True)
    r = vmarc("cat", src, f"{part}:/data/big.bin")
    assert r.code == 0, r
    assert r.out == (tmp_path / "tree/data/big.bin").read_bytes()


def test_two_disk_guest_with_root_on_lvm(tmp_path):
    """Root on LVM over xvda2 (its volume group spanning xvdb2 too), /home on xvdb1,
    placed by /etc/fstab: cat /home/u/notes.txt needs no --fs."""
    need("sfdisk", "mke2fs", "pvcreate", "vgcfgrestore", "losetup")
    home_tree = tmp_path / "home"
    (home_tree / "u").mkdir(parents=True)
    (home_tree / "u/notes.txt").write_bytes(b"the notes on the second disk\n")
    home = gg.make_fs("ext4", str(tmp_path / "home.img"), 16 * MiB, str(home_tree), "home")
    uuid = json.loads(vmarc("filesystems", "--output", "json", "-f", "raw", home).out)["volumes"][
        0
    ]["uuid"]
    fstab = (
        "/dev/mapper/vg0-root / ext4 defaults 0 1\n"
        f"UUID={uuid} /home ext4 defaults 0 2\n"
        "LABEL=bigdata /srv ext4 defaults 0 2\n"
        "/dev/vg0/swap none swap sw 0 0\n"
    )
    root_tree = gg.make_tree(str(tmp_path / "root"), fstab=fstab)
    os.makedirs(tmp_path / "root/home", exist_ok=True)
    os.makedirs(tmp_path / "root/srv", exist_ok=True)
    root = gg.make_fs("ext4", str(tmp_path / "root.img"), 24 * MiB, root_tree, "root")
    big_tree = tmp_path / "big"
    big_tree.mkdir()
    (big_tree / "spans.bin").write_bytes(os.urandom(20 * MiB))
    big = gg.make_fs("ext4", str(tmp_path / "big.img"), 28 * MiB, str(big_tree), "bigdata")

    xvda, xvdb = str(tmp_path / "xvda.raw"), str(tmp_path / "xvdb.raw")
    gg.partition(xvda, 80 * MiB, "dos", [(1, 8, "L"), (10, 60, "V")])
    gg.partition(xvdb, 64 * MiB, "gpt", [(1, 20, "L"), (22, 30, "V")])
    gg.place(xvdb, home, 1 * MiB)
    pvs = [(xvda, 10 * MiB, 60 * MiB), (xvdb, 22 * MiB, 30 * MiB)]
    # root: 6 extents on pv0; bigdata: 3 extents on pv0 then 4 on pv1 (spans the disks)
    striped = [("striped", [(0, 9), (1, 4)], 2)]  # one extent on each disk, 64 KiB stripes
    _, pe_start, extent = gg.lvm(
        pvs, [("root", [(0, 0, 6)]), ("data", [(0, 6, 3), (1, 0, 4)]), ("fast", striped)]
    )
    fast_tree = tmp_path / "fast"
    fast_tree.mkdir()
    (fast_tree / "striped.bin").write_bytes(os.urandom(5 * MiB))
    fast = gg.make_fs("ext4", str(tmp_path / "fast.img"), 8 * MiB, str(fast_tree), "fast")
    gg.write_striped(
        fast, [(xvda, 10 * MiB + pe_start + 9 * extent), (xvdb, 22 * MiB + pe_start + 4 * extent)]
    )
    gg.place(xvda, root, 10 * MiB + pe_start)
    with open(big, "rb") as f:
        first, second = f.read(3 * extent), f.read()
    with open(xvda, "r+b") as d:
        d.seek(10 * MiB + pe_start + 6 * extent)
        d.write(first)
    with open(xvdb, "r+b") as d:
        d.seek(22 * MiB + pe_start)
        d.write(second[: 4 * extent])

    vm = str(tmp_path / "vm.xva")
    r = vmarc("create", "-O", "xva", "--disk", f"a={xvda}", "--disk", f"b={xvdb}", "-f", "raw", vm)
    assert r.code == 0, r
    r = vmarc("filesystems", "--output", "json", vm)
    vols = {v["name"]: v for v in json.loads(r.out)["volumes"]}
    assert vols["xvda2"]["type"] == "lvm2" and vols["xvdb2"]["type"] == "lvm2"
    assert vols["vg0/root"]["type"] == "ext4" and vols["vg0/data"]["label"] == "bigdata"
    assert vols["vg0/data"]["disk"] == "xvda,xvdb"
    r = vmarc("cat", vm, "/home/u/notes.txt")
    assert (r.code, r.out) == (0, b"the notes on the second disk\n"), r
    r = vmarc("cat", vm, "/srv/spans.bin")  # on a logical volume across both disks
    assert r.code == 0 and r.out == (big_tree / "spans.bin").read_bytes()
    r = vmarc("cat", vm, "/etc/hostname")
    assert r.out == b"guest\n"
    r = vmarc("ls", vm, "/")
    assert {"home", "srv", "etc", "data"} <= set(r.text.split())
    assert vmarc("cat", vm, "vg0/root:/etc/hostname").out == b"guest\n"
    r = vmarc("cat", vm, "vg0/fast:/striped.bin")
    assert r.code == 0 and r.out == (fast_tree / "striped.bin").read_bytes(), r


def test_copy_out_keeps_modes_times_links_and_holes(tmp_path):
    need("mke2fs")
    tree = gg.make_tree(str(tmp_path / "tree"))
    img = gg.make_fs("ext4", str(tmp_path / "fs.img"), 64 * MiB, tree)
    dest = tmp_path / "out"
    dest.mkdir()
    r = vmarc("copy-out", "-f", "raw", img, "/data", "/etc/hostname", dest)
    assert r.code == 0, r
    assert gg.listing(str(dest / "data")) == gg.listing(os.path.join(tree, "data"))
    for rel in ("data/big.bin", "data/sparse", "data/many/f0007"):
        a, b = os.lstat(dest / rel.replace("data/", "data/", 1)), os.lstat(os.path.join(tree, rel))
        assert (a.st_mtime_ns, a.st_mode) == (b.st_mtime_ns, b.st_mode)
        assert (dest / rel).read_bytes() == open(os.path.join(tree, rel), "rb").read()
    assert os.lstat(dest / "data/sparse").st_blocks * 512 < MiB  # still sparse
    assert (dest / "hostname").read_bytes() == b"guest\n"
    assert not [n for n in os.listdir(dest) if "partial" in n]
    # nothing already there is replaced; the rest still comes out; exit 1
    (dest / "hostname").write_bytes(b"mine")
    r = vmarc("copy-out", "-f", "raw", img, "/etc/hostname", "/home", dest)
    assert r.code == 1 and "already exists" in r.errtext
    assert (dest / "hostname").read_bytes() == b"mine"
    assert (dest / "home/u/notes.txt").exists()


def test_missing_paths_and_files_as_directories(tmp_path):
    need("mke2fs")
    tree = gg.make_tree(str(tmp_path / "tree"))
    img = gg.make_fs("ext4", str(tmp_path / "fs.img"), 64 * MiB, tree)
    for args in (("cat", "/nope"), ("cat", "/etc/hostname/x"), ("ls", "/nope"), ("cat", "/etc")):
        r = vmarc(args[0], "-f", "raw", img, *args[1:])
        assert r.code == 1 and r.errtext.count("\n") == 1 and "Traceback" not in r.errtext, r
    r = vmarc("cat", "-f", "raw", "--fs", "nosuch", img, "/etc/hostname")
    assert r.code == 1 and "no volume nosuch" in r.errtext


def test_damaged_chunk_under_a_file(tmp_path):
    """A flipped byte in an XVA chunk under one file: cat of that file exits 2 naming the
    volume and path; copy-out copies the rest, lists it and exits 2."""
    need("mke2fs", "sfdisk")
    tree = gg.make_tree(str(tmp_path / "tree"))
    marker = b"MARKER-" * (4 * MiB // 7)  # spans whole chunks: damage inside is its alone
    with open(os.path.join(tree, "data/marked"), "wb") as f:
        f.write(marker)
    disk, _ = str(tmp_path / "disk.raw"), None
    fs = gg.make_fs("ext4", str(tmp_path / "fs.img"), 40 * MiB, tree)
    gg.partition(disk, 48 * MiB, "dos", [(4, 40, "L")])
    gg.place(disk, fs, 4 * MiB)
    vm = _packed(tmp_path, disk, "xva")
    with open(vm, "r+b") as f:
        data = f.read()
        at = data.index(marker[: 1 << 16]) + 2 * MiB
        f.seek(at)
        f.write(b"X")
    r = vmarc("cat", vm, "/data/marked")
    assert r.code == 2 and "xvda1:/data/marked" in r.errtext and "Traceback" not in r.errtext, r
    assert vmarc("cat", vm, "/etc/hostname").out == b"guest\n"
    dest = tmp_path / "out"
    dest.mkdir()
    r = vmarc("copy-out", vm, "/data", dest)
    assert r.code == 2 and "/data/marked" in r.errtext, r
    assert not (dest / "data/marked").exists()
    assert (dest / "data/big.bin").read_bytes() == open(
        os.path.join(tree, "data/big.bin"), "rb"
    ).read()


def test_dirty_journal_encrypted_and_unknown_volumes(tmp_path):
    need("mke2fs", "debugfs", "sfdisk")
    tree = gg.make_tree(str(tmp_path / "tree"), many=2)
    fs = gg.make_fs("ext4", str(tmp_path / "fs.img"), 16 * MiB, tree)
    subprocess.run(
        ["debugfs", "-w", "-R", "feature needs_recovery", fs], check=True, capture_output=True
    )
    disk = str(tmp_path / "disk.raw")
    gg.partition(disk, 64 * MiB, "dos", [(1, 16, "L"), (20, 8, "L"), (30, 8, "L")])
    gg.place(disk, fs, 1 * MiB)
    with open(disk, "r+b") as f:
        f.seek(20 * MiB)
        f.write(b"LUKS\xba\xbe\x00\x02" + bytes(160) + b"0b1e5d1e-aaaa-bbbb-cccc-123456789abc")
        f.seek(30 * MiB)
        f.write(os.urandom(4096))
    r = vmarc("filesystems", "--output", "json", "-f", "raw", disk)
    vols = {v["name"]: v for v in json.loads(r.out)["volumes"]}
    assert vols["disk2"]["type"] == "luks2" and "encrypted" in vols["disk2"]["note"]
    assert vols["disk2"]["uuid"] == "0b1e5d1e-aaaa-bbbb-cccc-123456789abc"
    assert vols["disk3"]["type"] is None and vols["disk3"]["note"] == "no known file system"
    r = vmarc("cat", "-f", "raw", disk, "/etc/hostname")  # the one readable file system
    assert r.code == 0 and r.out == b"guest\n", r
    assert r.errtext.count("recent changes may be missing") == 1
    r = vmarc("ls", "-f", "raw", "--fs", "disk2", disk)
    assert r.code == 1 and "LUKS2" in r.errtext


def test_mount_files_of_a_gzip_xva(tmp_path):
    need("mke2fs", "sfdisk", "fusermount3")
    disk, tree = _disk_with(tmp_path)
    vm = _packed(tmp_path, disk, "xva.gz")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = vmarc("mount", "--files", vm, mnt)
    assert r.code == 0, r
    try:
        assert sorted(os.listdir(mnt)) == ["xvda2"]
        out = tmp_path / "copied"
        subprocess.run(["cp", "-a", f"{mnt}/xvda2", str(out)], check=True)
        shutil.rmtree(out / "lost+found")
        # the same tree, read-only: write bits cleared, as the mount shows them
        readonly = {
            p: (k, s, m & ~0o222 if m is not None else None, t)
            for p, (k, s, m, t) in gg.listing(tree).items()
        }
        assert gg.listing(str(out)) == readonly
        assert (out / "data/big.bin").read_bytes() == (tmp_path / "tree/data/big.bin").read_bytes()
        assert stat.S_IMODE(os.lstat(out / "home/u/notes.txt").st_mode) == 0o400
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)


def test_copy_out_refuses_names_that_leave_dest(tmp_path):
    """A hostile file system's names (a slash, ..) never land outside DEST."""
    from vmarc.files.copy import CopyOut
    from vmarc.files.filesystems import OPENERS, Entry
    from vmarc.files.volumes import READABLE

    assert set(OPENERS) == READABLE

    class Fake(Entry):
        def __init__(self, name, mode, kids=()):
            self.name, self.mode, self.size, self.kids = name, mode, 0, kids

        def children(self):
            return iter(self.kids)

    class Tree:
        def children(self, fs, entry, where):
            return entry.children()

        def at(self, path):
            return None

    evil = [
        Fake("..", stat.S_IFDIR | 0o755),
        Fake("../../x", stat.S_IFREG | 0o644),
        Fake("a/b", stat.S_IFREG | 0o644),
    ]
    dest = tmp_path / "dest"
    dest.mkdir()
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        job = CopyOut(Tree(), fd)
        job.copy(None, Fake("top", stat.S_IFDIR | 0o755, evil), "/top")
    finally:
        os.close(fd)
    assert len(job.failed) == 3 and all("unsafe name" in why for _, why, _ in job.failed)
    assert os.listdir(tmp_path) == ["dest"] and os.listdir(dest / "top") == []


def test_btrfs_subvolume_by_name(tmp_path):
    """A subvolume made by the kernel's btrfs (a loop mount, always undone): reached by
    --subvol, and by its path from the top-level subvolume."""
    need("mkfs.btrfs", "btrfs", "mount", "umount")
    img = str(tmp_path / "bt.img")
    gg.make_fs("btrfs", img, 300 * MiB, gg.make_tree(str(tmp_path / "tree"), many=1))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", img, str(mnt)], check=True)
    try:
        subprocess.run(
            ["btrfs", "subvolume", "create", str(mnt / "@home")], check=True, capture_output=True
        )
        (mnt / "@home/notes.txt").write_bytes(b"in a subvolume\n")
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    r = vmarc("cat", "-f", "raw", "--fs", "disk", "--subvol", "@home", img, "/notes.txt")
    assert (r.code, r.out) == (0, b"in a subvolume\n"), r
    assert vmarc("cat", "-f", "raw", img, "/@home/notes.txt").out == b"in a subvolume\n"
    r = vmarc("ls", "-f", "raw", "--fs", "disk", "--subvol", "nope", img)
    assert r.code == 1 and "no btrfs subvolume nope" in r.errtext


def test_an_xfs_log_left_dirty_is_said_and_a_clean_one_is_not(tmp_path):
    """A crash-consistent backup of XFS: changes in the log that were never written back.
    The kernel's XFS makes both (a forced shutdown after the log is flushed leaves the
    log DIRTY, as xfs_logprint calls it; an unmount leaves it CLEAN)."""
    need("mkfs.xfs", "xfs_io", "losetup")
    images = {}
    for name in ("clean", "dirty"):
        img = tmp_path / f"{name}.img"
        with open(img, "wb") as f:
            f.truncate(320 * MiB)
        subprocess.run(["mkfs.xfs", "-q", str(img)], check=True)
        mnt = tmp_path / f"mnt-{name}"
        mnt.mkdir()
        subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
        try:
            (mnt / "kept.txt").write_bytes(b"written\n")
            if name == "dirty":
                os.sync()
                (mnt / "only-in-the-log.txt").write_bytes(b"logged\n")
                subprocess.run(["xfs_io", "-x", "-c", "shutdown -f", str(mnt)], check=True)
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
        images[name] = img
    r = vmarc("ls", "-f", "raw", images["clean"])
    assert r.code == 0 and "kept.txt" in r.text and "warning" not in r.errtext, r
    r = vmarc("ls", "-f", "raw", images["dirty"])
    assert r.code == 0 and r.errtext.count("its log was not replayed") == 1, r
    assert "only-in-the-log.txt" not in r.text  # what the warning is about


def test_exfat_reads_as_exfat_fuse_wrote_it(tmp_path):
    """exFAT made by mkfs.exfat and filled through exfat-fuse (on a loop device, which it
    needs): names (non-ASCII too), sizes, bytes and a modification time."""
    need("mkfs.exfat", "mount.exfat-fuse", "losetup")
    img = tmp_path / "ex.img"
    with open(img, "wb") as f:
        f.truncate(48 * MiB)
    subprocess.run(["mkfs.exfat", "-L", "USBX", str(img)], check=True, capture_output=True)
    big = os.urandom(700_000)
    loop = subprocess.run(
        ["losetup", "-f", "--show", str(img)], capture_output=True, text=True, check=True
    ).stdout.strip()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        subprocess.run(["mount.exfat-fuse", loop, str(mnt)], check=True, capture_output=True)
        try:
            (mnt / "docs" / "sous-répertoire").mkdir(parents=True)
            (mnt / "docs" / "sous-répertoire" / "note.txt").write_bytes(b"exfat note\n")
            (mnt / "big.bin").write_bytes(big)
            (mnt / "empty").write_bytes(b"")
            os.utime(mnt / "big.bin", (1700000000, 1700000000))
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
    entries = ls_json("-f", "raw", img)
    assert entries["/docs/sous-répertoire/note.txt"]["size"] == 11
    assert entries["/big.bin"]["size"] == len(big) and entries["/empty"]["size"] == 0
    assert entries["/big.bin"]["mtime_ns"] // 10**9 == 1700000000
    r = vmarc("cat", "-f", "raw", img, "/big.bin")
    assert r.code == 0 and r.out == big
    r = vmarc("cat", "-f", "raw", img, "/DOCS/Sous-Répertoire/NOTE.TXT")  # case-blind, as exFAT
    assert r.code == 0 and r.out == b"exfat note\n"
