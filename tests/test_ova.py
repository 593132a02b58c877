"""OVA/OVF: an OVA in VMware's shape (ovagen: ESXi's OVF text, qemu-img's streamOptimized
VMDKs, Python's tarfile) moved to Proxmox and XCP-ng in one command, from a file and from
a pipe; manifests checked; OVAs and VMDKs written and checked by qemu-img and an
independent reading of the OVF."""

import hashlib
import io
import json
import os
import subprocess
import tarfile
import xml.etree.ElementTree as ET

import pytest
from dissect.archive.vma import VMA

from tests.support import ovagen, xapimodel
from tests.support.helpers import assert_clean_failure, need
from tests.support.helpers import vmarc as run
from tests.test_vm_move import qmrestore_check, vma_conf
from tests.test_vmdk import qemu_img, write_source

MiB = 1 << 20
NS = {
    "ovf": "http://schemas.dmtf.org/ovf/envelope/1",
    "rasd": "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData",
    "vmw": "http://www.vmware.com/schema/ovf",
}


@pytest.fixture
def ova(tmp_path):
    """web01.ova: two disks (9 MiB + 12 KiB and 3 MiB), SHA256 manifest second."""
    need("qemu-img")
    raws = []
    disks = []
    for i, size in enumerate((9 * MiB + 3 * 4096, 3 * MiB), 1):
        raw = tmp_path / f"d{i}.raw"
        write_source(raw, size=size, seed=i)
        with open(raw, "r+b") as f:
            f.truncate(size)
        raws.append(raw.read_bytes())
        disks.append(
            (f"web01-disk{i}.vmdk", ovagen.stream_optimized(raw, tmp_path / f"d{i}.vmdk"), size)
        )
    path = tmp_path / "web01.ova"
    ovagen.build_ova(path, "web01", disks)
    return path, raws, disks


def test_info_shows_the_ovf_settings(ova):
    path, raws, _ = ova
    res = run("info", path, "--output", "json")
    assert res.code == 0, res
    info = json.loads(res.out)
    s = info["settings"]
    assert (s["name"], s["memory"], s["sockets"], s["cores"]) == ("web01", 2048 * MiB, 2, 2)
    assert s["firmware"] == "uefi" and s["ostype"] == "l26" and s["cdroms"] == 1
    assert s["nics"] == [["00:50:56:8A:12:34", "VM Network"], ["00:50:56:8A:56:78", "vmbr1"]]
    assert [d["size"] for d in info["disks"]] == [len(r) for r in raws]
    assert any("floppy" in x for x in s["not_carried"])
    assert info["details"]["manifest"]["algorithms"] == ["sha256"]


def test_ova_to_vma_in_one_command(ova, tmp_path):
    path, raws, _ = ova
    out = tmp_path / "vzdump-qemu-120-2026_11_30-10_00_00.vma.zst"
    res = run("convert", path, out, "-O", "vma")
    assert res.code == 0, res
    assert "floppy" in res.errtext  # what cannot move is said
    assert run("verify", out).code == 0
    conf = vma_conf(out)
    drives = qmrestore_check(out, conf, ["drive-scsi0", "drive-scsi1"])
    assert drives["scsi0"].endswith(f"size={len(raws[0]) // 1024}K")
    for line in (
        "name: web01",
        "memory: 2048",
        "cores: 2",
        "sockets: 2",
        "bios: ovmf",
        "net0: vmxnet3=00:50:56:8A:12:34,bridge=vmbr0",
        "net1: e1000=00:50:56:8A:56:78,bridge=vmbr1",
    ):
        assert line in conf, (line, conf)
    plain = tmp_path / "plain.vma"
    subprocess.run(["zstd", "-dq", out, "-o", plain], check=True)
    with open(plain, "rb") as f:  # dissect's VMA reader: the disks' bytes
        devs = {d.name: d for d in VMA(f).devices()}
        assert devs["drive-scsi0"].open().read() == raws[0]
        assert devs["drive-scsi1"].open().read() == raws[1]


def test_ova_to_xva_passes_the_importer(ova, tmp_path):
    path, raws, _ = ova
    out = tmp_path / "web01.xva"
    res = run("convert", path, out, "-O", "xva")
    assert res.code == 0, res
    data = out.read_bytes()
    top, disks = xapimodel.import_xva(data)
    assert list(disks.values()) == raws
    vm = next(o["snapshot"] for o in top["objects"] if o["class"] == "VM")
    assert vm["name_label"] == "web01" and vm["memory_static_max"] == str(2048 * MiB)
    assert vm["VCPUs_max"] == "4"
    assert vm["HVM_boot_params"].get("firmware") == "uefi"
    macs = sorted(o["snapshot"]["MAC"].lower() for o in top["objects"] if o["class"] == "VIF")
    assert macs == ["00:50:56:8a:12:34", "00:50:56:8a:56:78"]


def test_ova_streams_from_a_pipe(ova, tmp_path):
    path, raws, _ = ova
    out = tmp_path / "piped.vma"
    with open(path, "rb") as f:
        res = run("convert", "-", out, "-O", "vma", stdin=f)
    assert res.code == 0, res
    with open(out, "rb") as f:
        devs = {d.name: d for d in VMA(f).devices()}
        assert [devs[f"drive-scsi{i}"].open().read() for i in (0, 1)] == raws
    with open(path, "rb") as f:
        assert run("verify", "-", stdin=f).code == 0


def test_a_manifest_digest_that_disagrees_is_refused(ova, tmp_path):
    path, raws, disks = ova
    bad = tmp_path / "bad.ova"
    ovf = ovagen.build_ova(bad, "web01", disks)
    raw = bytearray(bad.read_bytes())
    digest = hashlib.sha256(disks[1][1]).hexdigest().encode()
    at = raw.index(digest)
    raw[at : at + 4] = b"0000"
    bad.write_bytes(raw)
    out = tmp_path / "out.vma"
    assert_clean_failure(run("convert", bad, out, "-O", "vma"), 2, "web01-disk2.vmdk", "manifest")
    assert not out.exists()
    res = run("verify", bad)
    assert res.code == 2 and "web01-disk2.vmdk" in res.text + res.errtext, res
    with open(bad, "rb") as f:
        assert_clean_failure(run("convert", "-", out, "-O", "vma", stdin=f), 2, "manifest")
    assert ovf  # (the OVF itself is intact)


def test_a_manifest_at_the_end_and_sha1(ova, tmp_path):
    _, raws, disks = ova
    path = tmp_path / "vbox.ova"
    ovagen.build_ova(path, "web01", disks, manifest="SHA1", manifest_last=True)
    with open(path, "rb") as f:
        assert run("verify", "-", stdin=f).code == 0
    raw = bytearray(path.read_bytes())
    at = raw.index(b"SHA1(web01-disk2.vmdk)= ") + 30  # inside the manifest's last digest
    raw[at] = ord("0") if raw[at] != ord("0") else ord("1")
    path.write_bytes(raw)
    res = run("verify", path)
    assert res.code == 2 and "SHA1" in res.text + res.errtext, res


def test_ovf_capacity_smaller_than_the_disk_uses_the_larger(ova, tmp_path):
    _, raws, disks = ova
    path = tmp_path / "small.ova"
    ovagen.build_ova(path, "web01", disks, capacities={"web01-disk2.vmdk": 2 * MiB})
    out = tmp_path / "d2.raw"
    res = run("convert", path, out, "--disk", "vmdisk2")
    assert res.code == 0, res
    assert "using 3145728" in res.errtext
    assert out.read_bytes() == raws[1]


def test_an_ovf_beside_its_files(ova, tmp_path):
    path, raws, _ = ova
    d = tmp_path / "unpacked"
    with tarfile.open(path) as tar:
        tar.extractall(d, filter="data")
    res = run("convert", d / "web01.ovf", tmp_path / "x.vma", "-O", "vma")
    assert res.code == 0, res
    assert run("verify", d / "web01.ovf").code == 0
    disk = bytearray((d / "web01-disk1.vmdk").read_bytes())
    disk[-20000] ^= 0x40  # not what the manifest says
    (d / "web01-disk1.vmdk").write_bytes(disk)
    res = run("verify", d / "web01.ovf")
    assert res.code == 2 and "manifest" in res.text + res.errtext, res


def _ovf_items(ovf: bytes) -> dict[int, list]:
    root = ET.fromstring(ovf)
    assert root.tag == f"{{{NS['ovf']}}}Envelope"
    vs = root.find("ovf:VirtualSystem", NS)
    items = {}
    for item in vs.find("ovf:VirtualHardwareSection", NS).findall("ovf:Item", NS):
        kind = int(item.find("rasd:ResourceType", NS).text)
        items.setdefault(kind, []).append(item)
    return root, items


def test_xva_to_ova_is_read_by_qemu_img_and_parses_as_ovf(ova, tmp_path):
    path, raws, _ = ova
    xva = tmp_path / "web01.xva"
    assert run("convert", path, xva, "-O", "xva").code == 0
    out = tmp_path / "back.ova"
    res = run("convert", xva, out, "-O", "ova")
    assert res.code == 0, res
    with tarfile.open(out) as tar:
        names = tar.getnames()
        files = {n: tar.extractfile(n).read() for n in names}
    assert names[0] == "web01.ovf" and names[1] == "web01.mf"
    for line in files["web01.mf"].decode().splitlines():  # every digest, by hashlib
        name, digest = line[len("SHA256(") :].split(")= ")
        assert hashlib.sha256(files[name]).hexdigest() == digest
    root, items = _ovf_items(files["web01.ovf"])
    assert items[3][0].find("rasd:VirtualQuantity", NS).text == "4"
    assert items[3][0].find("vmw:CoresPerSocket", NS).text == "2"
    assert items[4][0].find("rasd:VirtualQuantity", NS).text == "2048"
    assert len(items[6]) == 1 and len(items[5]) == 1 and len(items[15]) == 1
    macs = [i.find("rasd:Address", NS).text for i in items[10]]
    assert macs == ["00:50:56:8a:12:34", "00:50:56:8a:56:78"]
    hosts = [i.find("rasd:HostResource", NS).text for i in items[17]]
    disks = root.find("ovf:DiskSection", NS).findall("ovf:Disk", NS)
    refs = {
        f.get(f"{{{NS['ovf']}}}id"): f.get(f"{{{NS['ovf']}}}href")
        for f in root.find("ovf:References", NS)
    }
    assert hosts == ["ovf:/disk/vmdisk1", "ovf:/disk/vmdisk2"]
    for disk, raw in zip(disks, raws):
        href = refs[disk.get(f"{{{NS['ovf']}}}fileRef")]
        assert int(disk.get(f"{{{NS['ovf']}}}capacity")) == len(raw)
        vmdk = tmp_path / href
        vmdk.write_bytes(files[href])
        check = subprocess.run(["qemu-img", "check", vmdk], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        (tmp_path / "want.raw").write_bytes(raw)
        qemu_img("compare", "-f", "vmdk", "-F", "raw", vmdk, tmp_path / "want.raw")
        info = json.loads(qemu_img("info", "--output=json", vmdk))
        assert info["format-specific"]["data"]["create-type"] == "streamOptimized"
    firmware = root.find(".//vmw:Config[@vmw:key='firmware']", NS)
    assert firmware is not None and firmware.get(f"{{{NS['vmw']}}}value") == "efi"
    assert run("verify", out).code == 0
    back = json.loads(run("info", out, "--output", "json").out)["settings"]
    assert (back["memory"], back["sockets"], back["cores"]) == (2048 * MiB, 2, 2)


def test_ova_to_stdout_is_refused_cleanly(ova, tmp_path):
    path, _, _ = ova
    res = run("convert", path, "-", "-O", "ova")
    assert_clean_failure(res, 1, "written to a file")


@pytest.mark.parametrize("source_fmt", ["qcow2", "vhdx", "raw"])
def test_convert_to_vmdk_passes_qemu_img(source_fmt, tmp_path):
    raw = tmp_path / "src.raw"
    write_source(raw)
    src = tmp_path / f"src.{source_fmt}"
    if source_fmt != "raw":
        qemu_img("convert", "-f", "raw", "-O", source_fmt, raw, src)
    out = tmp_path / "out.vmdk"
    res = run("convert", src, out, "-O", "vmdk", *(["-f", "raw"] if source_fmt == "raw" else []))
    assert res.code == 0, res
    check = subprocess.run(["qemu-img", "check", out], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    qemu_img("compare", "-f", "vmdk", "-F", "raw", out, raw)
    back = tmp_path / "back.raw"
    assert run("convert", out, back).code == 0  # and vmarc reads its own
    assert back.read_bytes() == raw.read_bytes()


def test_vmdk_written_to_a_pipe(tmp_path):
    raw = tmp_path / "src.raw"
    write_source(raw)
    res = run("convert", raw, "-", "-f", "raw", "-O", "vmdk")
    assert res.code == 0, res
    out = tmp_path / "piped.vmdk"
    out.write_bytes(res.out)
    check = subprocess.run(["qemu-img", "check", out], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    qemu_img("compare", "-f", "vmdk", "-F", "raw", out, raw)
    assert io.BytesIO(res.out).read(4) == b"KDMV"
    assert os.path.getsize(out) < os.path.getsize(raw)


@pytest.mark.parametrize("order", ["seq", "shuffle", "backup"])
def test_a_proxmox_backup_moves_to_an_ova(order, tmp_path):
    """VMA -> OVA: a live backup interleaves its disks; the OVA writes them one after
    the other, each a VMDK qemu-img reads back as the disk."""
    from tests.test_vm_move import sample_vma

    vma, disks = sample_vma(tmp_path, order=order)
    out = tmp_path / "web01.ova"
    res = run("convert", vma, out, "-O", "ova")
    assert res.code == 0, res
    with tarfile.open(out) as tar:
        names = tar.getnames()
        assert names == ["web01.ovf", "web01.mf", "web01-disk1.vmdk", "web01-disk2.vmdk"]
        for i, slot in enumerate(("scsi0", "scsi1"), 1):
            vmdk = tmp_path / f"d{i}.vmdk"
            vmdk.write_bytes(tar.extractfile(f"web01-disk{i}.vmdk").read())
            back = tmp_path / f"d{i}.raw"
            qemu_img("convert", "-f", "vmdk", "-O", "raw", vmdk, back)
            assert back.read_bytes() == disks[slot]
        _, items = _ovf_items(tar.extractfile("web01.ovf").read())
    assert items[4][0].find("rasd:VirtualQuantity", NS).text == "3072"
    assert [i.find("rasd:Address", NS).text for i in items[10]] == [
        "bc:24:11:aa:bb:01",
        "bc:24:11:aa:bb:02",
    ]
    assert "balloon" in res.errtext  # what OVF cannot hold is said


def test_vmdk_into_a_block_device(tmp_path):
    """On a device larger than the image, the footer is also written in the device's last
    1.5 KiB, where qemu looks for it; vmarc reads the device back as well."""
    raw = tmp_path / "src.raw"
    write_source(raw)
    backing = tmp_path / "dev.img"
    with open(backing, "wb") as f:
        f.truncate(32 * MiB)
    loop = subprocess.run(
        ["losetup", "-f", "--show", backing], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        res = run("convert", "-f", "raw", raw, loop, "-O", "vmdk")
        assert res.code == 0, res
        check = subprocess.run(["qemu-img", "check", "-f", "vmdk", loop], capture_output=True)
        assert check.returncode == 0, check
        qemu_img("compare", "-f", "vmdk", "-F", "raw", loop, raw)
        back = tmp_path / "back.raw"
        assert run("convert", "-f", "vmdk", loop, back).code == 0
        assert back.read_bytes() == raw.read_bytes()
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
