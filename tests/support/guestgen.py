"""Guest disks made with the file systems' own tools, for the guest-file tests.

A source tree is laid out on the host (files of several sizes, modes, a sparse file,
symlinks absolute, relative and dangling, non-ASCII names), then written into a file
system image by its own tool (mke2fs -d, mkfs.xfs -p, mkfs.btrfs --rootdir, mkntfs +
ntfs-3g, mkfs.vfat + mcopy); disks get MBR or GPT tables from sfdisk and LVM2 metadata
from pvcreate and vgcfgrestore on a loop device (no device-mapper needed: the file
system is then written at the logical volume's extents by offset).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile

MiB = 1 << 20
STRIPE = 64 << 10  # the stripe size of striped logical volumes made here
LVM_CONFIG = (
    'devices { obtain_device_list_from_udev=0 filter=["a|^/dev/loop|","r|.*|"] } '
    "activation { udev_sync=0 udev_rules=0 }"
)


def run(*argv, **kw):
    proc = subprocess.run(list(map(str, argv)), capture_output=True, **kw)
    if proc.returncode:
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {proc.stderr.decode()[-800:]}")
    return proc


def have(*tools) -> bool:
    return all(shutil.which(t) for t in tools)


def make_tree(root: str, *, links: bool = True, fstab: str | None = None, many: int = 30):
    """The source tree; returns root."""

    def put(rel, data=b"", mode=0o644):
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, mode)

    put("etc/hostname", b"guest\n")
    if fstab is not None:
        put("etc/fstab", fstab.encode())
    put("home/u/notes.txt", b"my notes\n" * 10, 0o600)
    put("bin/run.sh", b"#!/bin/sh\necho hi\n", 0o755)
    put("data/big.bin", bytes(range(256)) * (3 * MiB // 256 + 77))
    put("data/empty", b"")
    put("data/caf\u00e9-menu.txt", "cr\u00e8me br\u00fbl\u00e9e\n".encode())
    for i in range(many):
        put(f"data/many/f{i:04d}", f"file {i}\n".encode() * (i + 1))
    os.makedirs(os.path.join(root, "data/emptydir"), exist_ok=True)
    with open(os.path.join(root, "data/sparse"), "wb") as f:
        f.seek(4 * MiB)
        f.write(b"after the hole\n")
    if links:
        os.symlink("/etc/hostname", os.path.join(root, "data/abs-link"))
        os.symlink("../etc/hostname", os.path.join(root, "data/rel-link"))
        os.symlink("nowhere/at/all", os.path.join(root, "data/dangling"))
    stamp = 1_700_000_000
    for dirpath, dirs, files in os.walk(root, topdown=False):
        for name in files + dirs:
            os.utime(os.path.join(dirpath, name), (stamp, stamp), follow_symlinks=False)
    os.utime(root, (stamp, stamp))
    return root


def listing(root: str) -> dict:
    """path -> (kind, size, permissions, target) of a host tree, as `vmarc ls -R` sees it."""
    found = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = "/" + os.path.relpath(path, root)
            if stat.S_ISLNK(st.st_mode):
                found[rel] = ("symlink", None, None, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                found[rel] = ("directory", None, stat.S_IMODE(st.st_mode), None)
            else:
                found[rel] = ("file", st.st_size, stat.S_IMODE(st.st_mode), None)
    return found


def make_fs(kind: str, image: str, size: int, tree: str, label: str = "") -> str:
    """A file system image of kind holding tree; returns image."""
    with open(image, "wb") as f:
        f.truncate(size)
    if kind in ("ext2", "ext3", "ext4"):
        run("mke2fs", "-q", "-F", "-t", kind, *(["-L", label] if label else []), "-d", tree, image)
    elif kind == "xfs":
        proto = os.path.join(os.path.dirname(image), os.path.basename(image) + ".proto")
        with open(proto, "w") as f:
            f.write(_xfs_proto(tree))
        run("mkfs.xfs", "-q", "-f", *(["-L", label] if label else []), "-p", proto, image)
    elif kind == "btrfs":
        run("mkfs.btrfs", "-q", "-f", *(["-L", label] if label else []), "--rootdir", tree, image)
    elif kind == "vfat":
        run("mkfs.vfat", *(["-n", label] if label else []), image)
        entries = [os.path.join(tree, n) for n in sorted(os.listdir(tree))]
        run("mcopy", "-s", "-m", "-i", image, *entries, "::/")
    elif kind == "ntfs":
        run("mkntfs", "-q", "-F", "-f", *(["-L", label] if label else []), image)
        mnt = tempfile.mkdtemp(prefix="vmarc-ntfs-")
        try:
            run("ntfs-3g", image, mnt)
            try:
                run("cp", "-a", "--no-preserve=ownership", f"{tree}/.", mnt)
            finally:
                run("fusermount", "-u", mnt)
        finally:
            os.rmdir(mnt)
    else:
        raise ValueError(kind)
    return image


def _xfs_proto(tree: str) -> str:
    """mkfs.xfs's prototype file for a host tree (its own format: the man page's -p)."""
    lines = ["/dev/null", "0 0"]

    def mode(st, kind):
        return f"{kind}--{stat.S_IMODE(st.st_mode) & 0o777:03o} {st.st_uid} {st.st_gid}"

    def walk(path, depth):
        for name in sorted(os.listdir(path)):
            full = os.path.join(path, name)
            st = os.lstat(full)
            pad = " " * depth
            if stat.S_ISDIR(st.st_mode):
                lines.append(f"{pad}{name} {mode(st, 'd')}")
                walk(full, depth + 1)
                lines.append(f"{pad}$")
            elif stat.S_ISLNK(st.st_mode):
                lines.append(f"{pad}{name} {mode(st, 'l')} {os.readlink(full)}")
            else:
                lines.append(f"{pad}{name} {mode(st, '-')} {full}")

    lines.append(mode(os.lstat(tree), "d"))
    walk(tree, 1)
    lines.append("$")
    return "\n".join(lines) + "\n"


def partition(disk: str, size: int, table: str, parts: list[tuple[int, int, str]]) -> None:
    """An empty disk of size with a table ("dos" or "gpt"); parts: (start MiB, size MiB,
    type as sfdisk takes it). A dos disk with more than 3 parts gets them as logical."""
    with open(disk, "wb") as f:
        f.truncate(size)
    script = [f"label: {table}"]
    logical = table == "dos" and len(parts) > 3
    for i, (start, length, kind) in enumerate(parts):
        if logical and i == 2:
            script.append(f"{start * 2048 - 2048},,5")
        line = f"{start * 2048},{length * 2048},{kind}"
        script.append(line)
    run("sfdisk", "-q", disk, input="\n".join(script).encode() + b"\n")


def place(disk: str, image: str, offset: int) -> None:
    with open(image, "rb") as src, open(disk, "r+b") as dst:
        dst.seek(offset)
        shutil.copyfileobj(src, dst, MiB)


def lvm(pvs: list[tuple[str, int, int]], lvs: list[tuple[str, list[tuple[int, int, int]]]]):
    """LVM2 metadata on partitions of disk files: pvs (disk, offset, size in bytes);
    lvs (name, segments): a linear segment is (pv index, first extent, extent count), a
    striped one ("striped", [(pv index, first extent), ...], extent count) with STRIPE.
    Returns (vg name, pe_start bytes, extent bytes)."""
    extent = 4 * MiB
    pe_start = MiB
    devs = []
    try:
        for i, (disk, offset, size) in enumerate(pvs):
            dev = run("losetup", "-f", "--show", "-o", offset, "--sizelimit", size, disk)
            devs.append(dev.stdout.decode().strip())
        for i, dev in enumerate(devs):
            run(
                "pvcreate",
                "-ff",
                "-y",
                "--config",
                LVM_CONFIG,
                "--uuid",
                _id(f"pv{i}"),
                "--norestorefile",
                dev,
            )
        conf = _vg_conf(devs, [s for _, _, s in pvs], lvs, extent, pe_start)
        with tempfile.NamedTemporaryFile("w", suffix=".vg") as f:
            f.write(conf)
            f.flush()
            run("vgcfgrestore", "--config", LVM_CONFIG, "-f", f.name, "vg0")
    finally:
        for dev in devs:
            subprocess.run(["losetup", "-d", dev], check=False)
    return "vg0", pe_start, extent


def _id(seed: str) -> str:
    raw = (seed * 32)[:32].replace("-", "x")
    return "-".join([raw[:6], raw[6:10], raw[10:14], raw[14:18], raw[18:22], raw[22:26], raw[26:]])


def _vg_conf(devs, sizes, lvs, extent, pe_start) -> str:
    pvs = "\n".join(
        f"""    pv{i} {{
      id = "{_id(f"pv{i}")}"
      device = "{dev}"
      status = ["ALLOCATABLE"]
      flags = []
      dev_size = {sizes[i] // 512}
      pe_start = {pe_start // 512}
      pe_count = {(sizes[i] - pe_start) // extent}
    }}"""
        for i, dev in enumerate(devs)
    )
    out = []
    for n, (name, segments) in enumerate(lvs):
        segs, at = [], 0
        for s, seg in enumerate(segments, 1):
            if seg[0] == "striped":  # ("striped", [(pv, first extent), ...], extents)
                _, stripes, count = seg
                listed = ", ".join(f'"pv{pv}", {first}' for pv, first in stripes)
                segs.append(
                    f"""      segment{s} {{
        start_extent = {at}
        extent_count = {count}
        type = "striped"
        stripe_count = {len(stripes)}
        stripe_size = {STRIPE // 512}
        stripes = [{listed}]
      }}"""
                )
                at += count
                continue
            pv, first, count = seg
            segs.append(
                f"""      segment{s} {{
        start_extent = {at}
        extent_count = {count}
        type = "striped"
        stripe_count = 1
        stripes = ["pv{pv}", {first}]
      }}"""
            )
            at += count
        body = "\n".join(segs)
        out.append(
            f"""    {name} {{
      id = "{_id(f"lv{n}")}"
      status = ["READ", "WRITE", "VISIBLE"]
      flags = []
      segment_count = {len(segments)}
{body}
    }}"""
        )
    lvtext = "\n".join(out)
    return f"""contents = "Text Format Volume Group"
version = 1
vg0 {{
  id = "{_id("vg")}"
  seqno = 1
  format = "lvm2"
  status = ["RESIZEABLE", "READ", "WRITE"]
  flags = []
  extent_size = {extent // 512}
  max_lv = 0
  max_pv = 0
  metadata_copies = 0
  physical_volumes {{
{pvs}
  }}
  logical_volumes {{
{lvtext}
  }}
}}
"""


def write_striped(image: str, targets: list[tuple[str, int]]) -> None:
    """An image laid over a striped segment: STRIPE-sized pieces in turn on each
    (disk, offset) target, as LVM's striped mapping places them."""
    with open(image, "rb") as src:
        handles = [open(disk, "r+b") for disk, _ in targets]
        try:
            i = 0
            while True:
                piece = src.read(STRIPE)
                if not piece:
                    break
                which = i % len(targets)
                handles[which].seek(targets[which][1] + (i // len(targets)) * STRIPE)
                handles[which].write(piece)
                i += 1
        finally:
            for h in handles:
                h.close()
