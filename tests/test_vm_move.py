"""Whole VMs between XenServer/XCP-ng and Proxmox: create -O xva, convert -O vma|xva.

Every XVA written goes through the model of XAPI's importer (xapimodel.py) and xva-img
style rebuilding; every VMA's qemu-server.conf through qmrestore's rules; disks are
compared byte for byte with what went in, settings with the source's.
"""

import os
import re
import subprocess

import pytest

from tests.support import vmagen, xapimodel, xvagen
from tests.support.helpers import SHARED_FIXTURES, assert_clean_failure, need
from tests.support.helpers import vmarc as run
from tests.test_vma_create import make_raw

MiB = 1 << 20
MAP_LINE = re.compile(r"^#qmdump#map:(\S+):(\S+):(\S*):(\S*):$")  # qmrestore's pattern


def disks_of(path, tmp_path, tag):
    """{device: bytes} of every disk of an archive, read back by vmarc."""
    info = run("info", path, "--output", "json")
    assert info.code == 0, info
    import json

    out = {}
    for d in json.loads(info.out)["disks"]:
        dest = tmp_path / f"{tag}-{d['index']}.raw"
        res = run("convert", path, dest, "--disk", d["id"])
        assert res.code == 0, res
        out[d["device"] or d["id"]] = dest.read_bytes()
    return out


def settings_of(path) -> dict:
    """The neutral settings summary vmarc reads from an archive."""
    import vmarc

    with vmarc.open(str(path)) as a:
        return a.settings().summary()


def qmrestore_check(vma_path, conf: str, devices: list[str]) -> dict[str, str]:
    """What qmrestore needs: a map line per archive disk naming a device of the archive,
    and a drive line with a size for it. Returns {slot: drive line}."""
    lines = dict(
        ln.split(": ", 1)
        for ln in conf.splitlines()
        if ln and not ln.startswith("#") and ": " in ln
    )
    maps = [MAP_LINE.match(ln) for ln in conf.splitlines() if ln.startswith("#qmdump#map:")]
    assert all(maps), conf
    assert sorted(m[2] for m in maps) == sorted(devices), (maps, devices)
    out = {}
    for m in maps:
        slot = m[1]
        assert m[2] == f"drive-{slot}"
        assert re.search(r"(^|,)size=\d+[KMGT]?(,|$)", lines[slot]), lines[slot]
        out[slot] = lines[slot]
    return out


def vma_conf(path) -> str:
    import vmarc

    with vmarc.open(str(path)) as a:
        return a.configs["qemu-server.conf"].decode()


def sample_xva(tmp_path, **kw):
    """Two disks whose refs sort against slot order (Ref:10 is xvdb), a CD with an ISO,
    a keepalive, skipped zero chunks, a partial last chunk."""
    d0 = xvagen.pattern_disk(5 * MiB + 4321, zero_chunks={1, 2}, seed=1)
    d1 = xvagen.pattern_disk(2 * MiB + 512, seed=2)
    spec = xvagen.XvaSpec(
        disks=[
            xvagen.XDisk("Ref:9", d0, label="root", userdevice="0"),
            xvagen.XDisk("Ref:10", d1, label="data", userdevice="1"),
        ],
        keepalives={"Ref:9": {3}},
        **kw,
    )
    path = tmp_path / "vm.xva"
    xvagen.write(path, spec)
    return path, {"xvda": d0, "xvdb": d1}


PVE_CONF = (
    b"#a test VM\n#second line\n"
    b"boot: order=scsi0;ide2;net0\ncores: 2\nsockets: 2\n"
    b"ide2: local:iso/debian-12.iso,media=cdrom\nmemory: 3072\nballoon: 1024\n"
    b"name: web01\nnet0: virtio=BC:24:11:AA:BB:01,bridge=vmbr0,firewall=1\n"
    b"net1: virtio=BC:24:11:AA:BB:02,bridge=vmbr1\nnuma: 0\nostype: l26\n"
    b"scsi0: local-lvm:vm-120-disk-0,size=3M\nscsi1: local-lvm:vm-120-disk-1,size=1M\n"
    b"scsihw: virtio-scsi-single\nsmbios1: uuid=6e51303b-e166-46c9-a269-63ed8b57f811\n"
    b"bios: ovmf\nagent: 1\n"
)


def sample_vma(tmp_path, order="seq"):
    d0 = vmagen.disk_bytes(3 * MiB, seed=5)
    d1 = vmagen.disk_bytes(1 * MiB, seed=6)
    path = tmp_path / "vzdump-qemu-120-2026_01_01-00_00_00.vma"
    path.write_bytes(
        vmagen.build(
            [("drive-scsi0", d0), ("drive-scsi1", d1)],
            configs=[("qemu-server.conf", PVE_CONF)],
            order=order,
        )
    )
    return path, {"scsi0": d0, "scsi1": d1}


# -- create -O xva ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "opts", ["", "checksum=sha1", "header=ustar", "compress=gzip", "compress=zstd"]
)
def test_create_xva_passes_the_importer(opts, tmp_path):
    a = xvagen.pattern_disk(3 * MiB + 777, zero_chunks={1}, seed=3)  # partial last chunk
    b = bytes(4 * MiB)  # all zero
    c = xvagen.pattern_disk(MiB, seed=4)
    for name, data in (("a", a), ("b", b), ("c", c)):
        make_raw(tmp_path / f"{name}.raw", data)
    out = tmp_path / "new.xva"
    args = [
        "create",
        "-O",
        "xva",
        out,
        "--disk",
        f"root={tmp_path / 'a.raw'}",
        "--disk",
        f"empty={tmp_path / 'b.raw'}",
        "--disk",
        f"swap={tmp_path / 'c.raw'}",
        "--name",
        "made here",
        "--memory",
        "1536",
        "--cpus",
        "3",
    ]
    if opts:
        args += ["-o", opts]
    res = run(*args)
    assert res.code == 0, res
    data = out.read_bytes()
    top, disks = xapimodel.import_xva(data)
    assert list(disks.values()) == [a, b, c]  # refs sort in slot order
    assert list(xapimodel.xva_img_rebuild(data, tmp_path).values()) == [a, b, c]
    vm = next(o["snapshot"] for o in top["objects"] if o["class"] == "VM")
    assert vm["name_label"] == "made here"
    assert vm["memory_static_max"] == str(1536 * MiB) and vm["VCPUs_max"] == "3"
    raw = data if not opts.startswith("compress") else xapimodel._decompress(data)
    names = [m for m, _ in xapimodel._members(raw)]
    # zero chunks skipped except first and last; the all-zero disk keeps both ends
    assert "Ref:1000/00000001" not in names and "Ref:1001/00000000" in names
    assert "Ref:1001/00000003" in names and "Ref:1001/00000001" not in names
    ext = ".checksum" if "sha1" in opts else ".xxhash"
    assert all(n == "ova.xml" or n.endswith(ext) or n[-8:].isdigit() for n in names)
    if "ustar" in opts:
        assert raw[257:262] == b"ustar"
    else:
        assert raw[257:262] == bytes(5) and raw[156:157] == b"\0"  # XAPI's V7 headers
    assert run("verify", out).code == 0


def test_create_xva_to_stdout_and_from_other_formats(tmp_path):
    need("qemu-img")
    data = xvagen.pattern_disk(2 * MiB + 512, zero_chunks={1}, seed=9)  # qcow2: 512-byte units
    make_raw(tmp_path / "d.raw", data)
    subprocess.run(
        [
            "qemu-img",
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            tmp_path / "d.raw",
            tmp_path / "d.qcow2",
        ],
        check=True,
    )
    res = run("create", "-O", "xva", "-", "--disk", f"d={tmp_path / 'd.qcow2'}")
    assert res.code == 0, res
    _, disks = xapimodel.import_xva(res.out)
    assert list(disks.values()) == [data]


# -- XVA -> VMA ------------------------------------------------------------------------------
def test_xva_to_vma_restores_disks_and_settings(tmp_path):
    src, want = sample_xva(tmp_path)
    out = tmp_path / "vzdump-qemu-130-2026_01_01-00_00_00.vma.zst"
    res = run("convert", src, out, "-O", "vma", "--storage", "fast")
    assert res.code == 0, res
    assert out.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"
    assert "install.iso" in res.errtext  # the ISO is named as not carried
    conf = vma_conf(out)
    drives = qmrestore_check(out, conf, ["drive-scsi0", "drive-scsi1"])
    assert drives["scsi0"] == f"fast:vm-130-disk-0,size={5 * MiB + 4321}"
    assert drives["scsi1"] == f"fast:vm-130-disk-1,size={2 * MiB + 512}"
    assert "name: test-vm" in conf and "memory: 2048" in conf
    assert "ide2: none,media=cdrom" in conf and "boot: order=scsi0;ide2" in conf
    assert "#qmdump#map:scsi0:drive-scsi0:fast:raw:" in conf
    got = disks_of(out, tmp_path, "vma")
    assert got == {"scsi0": want["xvda"], "scsi1": want["xvdb"]}
    assert run("verify", out).code == 0


def test_real_proxmox_settings_to_xva(tmp_path):
    """The real sample's qemu-server.conf, with a generated disk: the sample's own disk
    data is cut short (see test_vma), which convert must refuse without output."""
    import vmarc

    sample = os.path.join(SHARED_FIXTURES, "proxmox-test.vma.gz")
    res = run("convert", sample, tmp_path / "cut.xva", "-O", "xva")
    assert_clean_failure(res, 2, "incomplete")
    assert os.listdir(tmp_path) == []
    with vmarc.open(sample) as a:
        conf = a.configs["qemu-server.conf"]
    disk = vmagen.disk_bytes(2 * MiB, seed=3)
    src = tmp_path / "real-conf.vma"
    src.write_bytes(vmagen.build([("drive-scsi0", disk)], configs=[("qemu-server.conf", conf)]))
    out = tmp_path / "test.xva"
    res = run("convert", src, out, "-O", "xva")
    assert res.code == 0, res
    for said in ("Fedora-Server", "firewall=1"):  # the ISO and the Proxmox firewall
        assert said in res.errtext, res.errtext
    assert "vmgenid" not in res.errtext and "numa" not in res.errtext
    top, disks = xapimodel.import_xva(out.read_bytes())
    vm = next(o["snapshot"] for o in top["objects"] if o["class"] == "VM")
    assert vm["name_label"] == "Test" and vm["memory_static_max"] == str(2048 * MiB)
    assert vm["VCPUs_max"] == "1" and vm["HVM_boot_params"]["order"] == "cdn"
    assert vm["uuid"] == "6e51303b-e166-46c9-a269-63ed8b57f811"  # smbios1 uuid
    assert vm["other_config"]["base_template_name"] == "Generic Linux BIOS"
    vifs = [o["snapshot"] for o in top["objects"] if o["class"] == "VIF"]
    assert [v["MAC"] for v in vifs] == ["9e:19:c3:d0:e2:f7"]
    nets = [o["snapshot"] for o in top["objects"] if o["class"] == "network"]
    assert [n["bridge"] for n in nets] == ["xenbr0"]
    cds = [
        o["snapshot"]
        for o in top["objects"]
        if o["class"] == "VBD" and o["snapshot"]["type"] == "CD"
    ]
    assert [c["userdevice"] for c in cds] == ["3"] and cds[0]["empty"] is True
    assert list(disks.values()) == [disk]
    assert list(xapimodel.xva_img_rebuild(out.read_bytes(), tmp_path).values()) == [disk]


# -- round trips --------------------------------------------------------------------------
def test_vma_to_xva_to_vma_round_trip(tmp_path):
    src, want = sample_vma(tmp_path)
    xva = tmp_path / "mid.xva"
    res = run("convert", src, xva, "-O", "xva")
    assert res.code == 0, res
    for said in ("agent: 1", "debian-12.iso", "firewall=1"):
        assert said in res.errtext, res.errtext
    top, disks = xapimodel.import_xva(xva.read_bytes())
    assert list(disks.values()) == [want["scsi0"], want["scsi1"]]
    back = tmp_path / "vzdump-qemu-120-2026_01_02-00_00_00.vma"
    res = run("convert", xva, back, "-O", "vma")
    assert res.code == 0, res
    assert settings_of(back) == settings_of(src)
    assert disks_of(back, tmp_path, "back") == want
    conf = vma_conf(back)
    qmrestore_check(back, conf, ["drive-scsi0", "drive-scsi1"])
    for line in (
        "#a test VM",
        "net0: virtio=BC:24:11:AA:BB:01,bridge=vmbr0",
        "net1: virtio=BC:24:11:AA:BB:02,bridge=vmbr1",
        "balloon: 1024",
        "bios: ovmf",
        "sockets: 2",
        "cores: 2",
        "ostype: l26",
        "smbios1: uuid=6e51303b-e166-46c9-a269-63ed8b57f811",
        "boot: order=scsi0;ide2;net0",
    ):
        assert line in conf, (line, conf)


def test_xva_to_vma_to_xva_round_trip(tmp_path):
    src, want = sample_xva(tmp_path)
    vma = tmp_path / "mid.vma"
    assert run("convert", src, vma, "-O", "vma").code == 0
    back = tmp_path / "back.xva"
    res = run("convert", vma, back, "-O", "xva")
    assert res.code == 0, res
    _, disks = xapimodel.import_xva(back.read_bytes())
    assert list(disks.values()) == [want["xvda"], want["xvdb"]]
    a, b = settings_of(src), settings_of(back)
    # disk labels live in XAPI only; the CD's ISO is not in any archive
    for s in (a, b):
        s["disks"] = [size for size, _ in s["disks"]]
    assert a == b


def test_xva_repack_keeps_ova_and_recompresses(tmp_path):
    src, want = sample_xva(tmp_path)
    out = tmp_path / "again.xva"
    res = run("convert", src, out, "-O", "xva", "-o", "compress=zstd,checksum=sha1")
    assert res.code == 0, res
    assert res.errtext == ""
    # the test generator's ova.xml is XAPI's minimum, not every field: stream rules only
    top, disks = xapimodel.import_xva(out.read_bytes(), check_fields=False)
    assert disks == {"Ref:9": want["xvda"], "Ref:10": want["xvdb"]}


# -- order of the source -------------------------------------------------------------------
@pytest.mark.parametrize("memory", ["0", "65536", None])
def test_interleaved_vma_from_a_pipe_is_held_and_said(memory, tmp_path, monkeypatch):
    """Out-of-turn data is held in memory up to a bound, then in a temporary file (said);
    0 and 64 KiB force the file, with whole chunks or a mix of both."""
    if memory is not None:
        monkeypatch.setenv("VMARC_HOLD_MEMORY", memory)
    src, want = sample_vma(tmp_path, order="shuffle")
    res = run("convert", "-", tmp_path / "x.xva", "-O", "xva", input=src.read_bytes())
    assert res.code == 0, res
    assert ("temporary file" in res.errtext) == (memory is not None), res
    _, disks = xapimodel.import_xva((tmp_path / "x.xva").read_bytes())
    assert list(disks.values()) == [want["scsi0"], want["scsi1"]]


def test_interleaved_vma_file_is_read_disk_by_disk(tmp_path, monkeypatch):
    """From a plain file the disks are read in turn through an index of the headers:
    nothing held even with no memory allowed for it."""
    monkeypatch.setenv("VMARC_HOLD_MEMORY", "0")
    src, want = sample_vma(tmp_path, order="shuffle")
    res = run("convert", src, tmp_path / "x.xva", "-O", "xva")
    assert res.code == 0 and "temporary file" not in res.errtext, res
    _, disks = xapimodel.import_xva((tmp_path / "x.xva").read_bytes())
    assert list(disks.values()) == [want["scsi0"], want["scsi1"]]
    cut = tmp_path / "cut.vma"  # the index still finds what is missing
    cut.write_bytes(src.read_bytes()[:-600000])
    res = run("convert", cut, tmp_path / "y.xva", "-O", "xva")
    assert res.code == 2 and not (tmp_path / "y.xva").exists(), res


@pytest.mark.parametrize("memory", ["131072", None])
def test_live_backup_order_streams_from_a_pipe(memory, tmp_path, monkeypatch):
    """Copy-before-write pulls clusters forward: they are held until their turn and the
    rest streams through; from a pipe, without reading anything twice."""
    if memory is not None:
        monkeypatch.setenv("VMARC_HOLD_MEMORY", memory)
    data = vmagen.disk_bytes(6 * MiB + 4096, seed=11)
    vma = vmagen.build(
        [("drive-scsi0", data)], configs=[("qemu-server.conf", PVE_CONF)], order="backup"
    )
    res = run("convert", "-", "-", "-O", "xva", input=vma)
    assert res.code == 0, res
    _, disks = xapimodel.import_xva(res.out)
    assert list(disks.values()) == [data]


def test_sequential_vma_needs_no_temporary_file(tmp_path):
    src, want = sample_vma(tmp_path, order="seq")
    res = run("convert", src, tmp_path / "x.xva", "-O", "xva")
    assert res.code == 0 and "temporary file" not in res.errtext, res


# -- outputs, failures ------------------------------------------------------------------------
def test_directory_output_gets_a_vzdump_name(tmp_path):
    src, _ = sample_xva(tmp_path)
    outdir = tmp_path / "dump"
    outdir.mkdir()
    res = run("convert", src, outdir, "-O", "vma", "--vmid", "321")
    assert res.code == 0, res
    (name,) = os.listdir(outdir)
    assert re.fullmatch(r"vzdump-qemu-321-\d{4}_\d\d_\d\d-\d\d_\d\d_\d\d\.vma\.zst", name)
    assert "local-lvm:vm-321-disk-0" in vma_conf(outdir / name)
    res = run("convert", outdir / name, outdir, "-O", "xva")
    assert res.code == 0, res
    assert (outdir / "test-vm.xva").exists()


def test_windows_guest_gets_sata_and_e1000(tmp_path):
    conf = PVE_CONF.replace(b"ostype: l26", b"ostype: win10")
    d0 = vmagen.disk_bytes(MiB, seed=5)
    src = tmp_path / "win.vma"
    src.write_bytes(vmagen.build([("drive-scsi0", d0)], configs=[("qemu-server.conf", conf)]))
    xva = tmp_path / "win.xva"
    assert run("convert", src, xva, "-O", "xva").code == 0
    top, _ = xapimodel.import_xva(xva.read_bytes())
    vm = next(o["snapshot"] for o in top["objects"] if o["class"] == "VM")
    assert vm["platform"]["viridian"] == "true"
    assert vm["other_config"]["base_template_name"].startswith("Windows 10")
    back = tmp_path / "back.vma"
    assert run("convert", xva, back, "-O", "vma").code == 0
    text = vma_conf(back)
    assert "sata0: local-lvm:vm-100-disk-0" in text and "net0: e1000=" in text
    assert "ostype: win10" in text


def test_damaged_source_leaves_nothing(tmp_path):
    src, _ = sample_xva(tmp_path)
    data = bytearray(src.read_bytes())
    data[600000] ^= 0xFF  # inside a chunk of the first disk
    bad = tmp_path / "bad.xva"
    bad.write_bytes(bytes(data))
    res = run("convert", bad, tmp_path / "out.vma", "-O", "vma")
    assert_clean_failure(res, 2, "checksum")
    assert sorted(os.listdir(tmp_path)) == ["bad.xva", "vm.xva"]
    res = run("convert", tmp_path / "vm.xva", tmp_path / "o.xva", "-O", "xva", "-o", "bogus=1")
    assert_clean_failure(res, 1, "bogus")


def test_vm_with_only_a_cd_drive(tmp_path):
    """No disk data at all: the VM and its CD drive still move both ways."""
    src = tmp_path / "cd.xva"
    xvagen.write(src, xvagen.XvaSpec(disks=[]))
    vma = tmp_path / "cd.vma"
    res = run("convert", src, vma, "-O", "vma")
    assert res.code == 0 and "install.iso" in res.errtext, res
    assert "ide2: none,media=cdrom" in vma_conf(vma) and run("verify", vma).code == 0
    back = tmp_path / "back.xva"
    assert run("convert", vma, back, "-O", "xva").code == 0
    top, disks = xapimodel.import_xva(back.read_bytes())
    assert disks == {}
    cds = [o for o in top["objects"] if o["class"] == "VBD" and o["snapshot"]["type"] == "CD"]
    assert len(cds) == 1
    assert settings_of(back)["cdroms"] == settings_of(src)["cdroms"] == 1


def test_vma_repack_keeps_every_device(tmp_path):
    """VMA -> VMA (recompression) keeps the EFI disk and the memory state as they are."""
    d0 = vmagen.disk_bytes(MiB, seed=1)
    efi = vmagen.disk_bytes(128 * 1024, seed=2)
    state = vmagen.disk_bytes(200000, seed=3)
    src = tmp_path / "a.vma"
    src.write_bytes(
        vmagen.build(
            [("drive-scsi0", d0), ("drive-efidisk0", efi)],
            configs=[("qemu-server.conf", PVE_CONF)],
            vmstate=state,
        )
    )
    out = tmp_path / "a.vma.zst"
    res = run("convert", src, out, "-O", "vma")
    assert res.code == 0 and res.errtext == "", res
    assert run("verify", out).code == 0
    assert vma_conf(out) == PVE_CONF.decode()
    assert run("extract", out, tmp_path / "x").code == 0
    assert (tmp_path / "x" / "disk-drive-efidisk0.raw").read_bytes() == efi
    assert (tmp_path / "x" / "vmstate.bin").read_bytes() == state
    assert (tmp_path / "x" / "disk-drive-scsi0.raw").read_bytes() == d0


def test_settings_that_cannot_be_carried_are_refused_or_said(tmp_path):
    disk = vmagen.disk_bytes(MiB, seed=4)
    bad = tmp_path / "bad.vma"
    bad.write_bytes(
        vmagen.build(
            [("drive-scsi0", disk)],
            configs=(
                (
                    "qemu-server.conf",
                    b"name: t\nmemory: -5\ncores: 2\nscsi0: local-lvm:vm-100-disk-0,size=1M\n",
                ),
            ),
        )
    )
    assert_clean_failure(
        run("convert", bad, tmp_path / "o.xva", "-O", "xva"), 2, "memory", "damaged settings"
    )
    ctl = tmp_path / "ctl.vma"
    ctl.write_bytes(
        vmagen.build(
            [("drive-scsi0", disk)],
            configs=(
                (
                    "qemu-server.conf",
                    b"#note \x01\x02 here\nname: t\x07x\nmemory: 512\n"
                    b"scsi0: local-lvm:vm-100-disk-0,size=1M\n",
                ),
            ),
        )
    )
    res = run("convert", ctl, tmp_path / "c.xva", "-O", "xva")
    assert res.code == 0 and "control characters" in res.errtext, res
    assert run("verify", tmp_path / "c.xva").code == 0  # its ova.xml parses
