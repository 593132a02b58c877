"""OVF (DMTF DSP0243, as VMware and VirtualBox write it), both ways: an OVF descriptor
read into VmSettings (read_ovf) and written from them (render), after what VMware's
exports hold. docs/formats/ova.md.

Elements are matched by local name, so OVF 1.x (rasd Items) and 2.x (StorageItem,
EthernetPortItem) read alike.
"""

from __future__ import annotations

import re
import uuid as uuidlib
import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape, quoteattr

from ..errors import FormatError
from .neutral import DiskSlot, Nic, VmSettings, mac_ok
from .xapi import _count_elements

MAX_OVF = 16 << 20
OVF_NS = "http://schemas.dmtf.org/ovf/envelope/1"
CPU, MEMORY, IDE, SCSI, FLOPPY, CD, DVD, DISK, SATA, ETHERNET = 3, 4, 5, 6, 14, 15, 16, 17, 20, 10
CONTROLLERS = {IDE: "ide", SCSI: "scsi", SATA: "sata"}
# hardware that has no neutral setting: what `not carried` names
NAMED_LOSSES = {
    FLOPPY: "floppy drive",
    21: "serial port",
    22: "parallel port",
    23: "USB controller",
}
NIC_MODEL = {"e1000": "e1000", "e1000e": "e1000e", "vmxnet3": "vmxnet3", "virtio": "virtio"}


class Ovf:
    """What a descriptor says: files (id -> href), disks in controller order (disk id,
    file href or None, capacity in bytes, label, slot) and the settings."""

    def __init__(self, files, disks, settings: VmSettings):
        self.files = files
        self.disks = disks
        self.settings = settings


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _attr(elem, name: str, default: str = "") -> str:
    for k, v in elem.attrib.items():
        if _local(k) == name:
            return v
    return default


def _kids(elem, name: str):
    return [c for c in elem if _local(c.tag) == name]


def _find(elem, *path):
    for name in path:
        found = _kids(elem, name)
        if not found:
            return None
        elem = found[0]
    return elem


def _text(elem, name: str) -> str:
    found = _kids(elem, name) if elem is not None else []
    return (found[0].text or "").strip() if found else ""


def units(text: str, where: str) -> int:
    """A multiplier from OVF allocation units: 'byte * 2^20', 'MegaBytes', 'byte'."""
    t = (text or "byte").replace(" ", "").lower()
    m = re.fullmatch(r"byte(?:\*(\d+)\^(\d+))?", t)
    if m:
        return int(m[1]) ** int(m[2]) if m[1] else 1
    named = {"kilobytes": 1 << 10, "megabytes": 1 << 20, "gigabytes": 1 << 30, "terabytes": 1 << 40}
    if t in named:
        return named[t]
    raise FormatError(f"{where}: allocation units {text!r} not understood")


def _int(text: str, what: str, where: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise FormatError(f"{where}: {what} {text!r} is not a whole number") from None
    if value < 0:
        raise FormatError(f"{where}: negative {what}")
    return value


def ostype(vmw: str, description: str) -> str:
    """A Proxmox ostype for VMware's guest id (vmw:osType) or the OS description."""
    t = (vmw or description).lower()
    if t.startswith("win") or "windows" in t:
        for key, name in (
            ("windows11", "win11"),
            ("windows2022", "win11"),
            ("windows2019srvnext", "win11"),
            ("windows9", "win10"),
            ("windows2019", "win10"),
            ("windows8", "win8"),
            ("windows7", "win7"),
            ("winvista", "wvista"),
            ("winlonghorn", "w2k8"),
            ("winnet", "w2k3"),
            ("winxp", "wxp"),
            ("win2000", "w2k"),
        ):
            if key in t:
                return name
        return "win10"
    if re.search(
        r"linux|ubuntu|debian|centos|rhel|sles|suse|fedora|oracle|rocky|alma|photon|coreos|asianux",
        t,
    ):
        return "l26"
    return "other"


def read_ovf(data: bytes, where: str) -> Ovf:
    if len(data) > MAX_OVF:
        raise FormatError(f"{where}: an OVF descriptor of {len(data)} bytes is implausible")
    _count_elements(data, where)
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise FormatError(f"{where}: the OVF descriptor is not well-formed XML: {e}") from None
    if _local(root.tag) != "Envelope":
        raise FormatError(f"{where}: not an OVF descriptor (root element {_local(root.tag)})")
    files = {}
    for f in _kids(_find(root, "References") or ET.Element("x"), "File"):
        files[_attr(f, "id")] = _attr(f, "href")
    disk_section = _find(root, "DiskSection")
    ovf_disks = {}
    for d in _kids(disk_section, "Disk") if disk_section is not None else []:
        cap = _int(_attr(d, "capacity", "0"), "disk capacity", where)
        mult = units(_attr(d, "capacityAllocationUnits", "byte"), where)
        ovf_disks[_attr(d, "diskId")] = (files.get(_attr(d, "fileRef")), cap * mult)
    systems = _kids(root, "VirtualSystem")
    if not systems:
        if _kids(root, "VirtualSystemCollection"):
            raise FormatError(f"{where}: a VirtualSystemCollection (a vApp) is not read")
        raise FormatError(f"{where}: the OVF descriptor holds no VirtualSystem")
    vs = systems[0]
    s = VmSettings(name=_text(vs, "Name") or _attr(vs, "id"))
    s.description = _text(_find(vs, "AnnotationSection"), "Annotation")
    os_section = _find(vs, "OperatingSystemSection")
    if os_section is not None:
        s.ostype = ostype(_attr(os_section, "osType"), _text(os_section, "Description"))
    hw = _find(vs, "VirtualHardwareSection")
    if hw is None:
        raise FormatError(f"{where}: the VirtualSystem has no VirtualHardwareSection")
    items = [c for c in hw if _local(c.tag) in ("Item", "StorageItem", "EthernetPortItem")]
    by_id = {_text(i, "InstanceID"): (n, i) for n, i in enumerate(items)}
    disks, cds = [], []
    for n, item in enumerate(items):
        kind = _int(_text(item, "ResourceType") or "0", "ResourceType", where)
        label = _text(item, "ElementName") or _text(item, "Caption")
        if kind == CPU:
            vcpus = _int(_text(item, "VirtualQuantity") or "1", "CPU count", where) or 1
            cps = _text(item, "CoresPerSocket")
            cores = _int(cps, "cores per socket", where) if cps else 1
            if not cores or vcpus % cores:
                s.lost.append(f"{vcpus} vCPUs in sockets of {cores} cores: one core per socket")
                cores = 1
            s.cores, s.sockets = cores, vcpus // cores
        elif kind == MEMORY:
            qty = _int(_text(item, "VirtualQuantity") or "0", "memory", where)
            s.memory = qty * units(_text(item, "AllocationUnits") or "byte * 2^20", where)
        elif kind == DISK:
            ref = _text(item, "HostResource")
            disk_id = ref.rsplit("/", 1)[-1]
            if disk_id not in ovf_disks:
                raise FormatError(f"{where}: disk item {label!r} names unknown disk {ref!r}")
            disks.append((_slot_key(item, by_id, n), disk_id, label, _slot(item, by_id)))
        elif kind in (CD, DVD):
            cds.append(DiskSlot(None, kind="cdrom", label=label, source_slot=_slot(item, by_id)))
        elif kind == ETHERNET:
            mac = _text(item, "Address")
            sub = _text(item, "ResourceSubType").lower()
            if mac and not mac_ok(mac):
                raise FormatError(f"{where}: NIC {label!r} has MAC {mac!r}")
            if not mac:
                s.lost.append(f"NIC {label!r} has no fixed MAC: a new one is made")
                mac = _new_mac()
            s.nics.append(Nic(mac.upper(), _text(item, "Connection"), NIC_MODEL.get(sub, "")))
        elif kind in NAMED_LOSSES:
            s.lost.append(f"{NAMED_LOSSES[kind]} ({label})")
    for conf in _kids(hw, "Config"):
        if _attr(conf, "key") == "firmware":
            s.firmware = "uefi" if _attr(conf, "value").lower() == "efi" else "bios"
    disks.sort(key=lambda d: d[0])
    ordered = []
    for _key, disk_id, label, slot in disks:
        href, capacity = ovf_disks[disk_id]
        ordered.append((disk_id, href, capacity, label, slot))
    s.cdroms = cds
    return Ovf(files, ordered, s)


def _slot_key(item, by_id, n: int):
    """Controller order, then the place on the controller, then document order."""
    parent = by_id.get(_text(item, "Parent"))
    ctrl = parent[0] if parent else 1 << 20
    try:
        place = int(_text(item, "AddressOnParent") or 0)
    except ValueError:
        place = 0
    return (ctrl, place, n)


def _slot(item, by_id) -> str:
    parent = by_id.get(_text(item, "Parent"))
    if parent is None:
        return ""
    kind = _text(parent[1], "ResourceType")
    bus = CONTROLLERS.get(int(kind) if kind.isdigit() else 0, "bus")
    return f"{bus}{_text(parent[1], 'Address') or 0}:{_text(item, 'AddressOnParent') or 0}"


def _new_mac() -> str:
    b = uuidlib.uuid4().bytes[:5]
    return "00:50:56:" + ":".join(f"{x:02X}" for x in b[:3])  # VMware's prefix


# -- writing --------------------------------------------------------------------------
VMW_OS = {
    "l26": ("101", "otherLinux64Guest"),
    "win11": ("1", "windows11_64Guest"),
    "win10": ("1", "windows9_64Guest"),
    "win8": ("1", "windows8_64Guest"),
    "win7": ("105", "windows7_64Guest"),
    "w2k8": ("1", "winLonghorn64Guest"),
    "other": ("1", "otherGuest64"),
}
STREAM_OPTIMIZED = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
HEAD = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    '<Envelope vmw:buildId="vmarc" xmlns="http://schemas.dmtf.org/ovf/envelope/1" '
    'xmlns:cim="http://schemas.dmtf.org/wbem/wscim/1/common" '
    'xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" '
    'xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" '
    'xmlns:vmw="http://www.vmware.com/schema/ovf" '
    'xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" '
    'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">\n'
)


def _item(fields: list[tuple[str, str]], required: bool = True) -> str:
    """One hardware Item; rasd elements in the schema's (alphabetical) order."""
    body = "".join(
        f"        <rasd:{k}>{escape(str(v))}</rasd:{k}>\n" for k, v in sorted(fields) if v != ""
    )
    attr = "" if required else ' ovf:required="false"'
    return f"      <Item{attr}>\n{body}      </Item>\n"


def render(s: VmSettings, disk_files: list[tuple[str, int]]) -> tuple[bytes, list[str]]:
    """The OVF descriptor of settings whose data disks are in disk_files ((file name,
    capacity in bytes) in slot order); returns it and what it cannot carry."""
    lost = []
    name = s.name or "vm"
    out = [HEAD, "  <References>\n"]
    for i, (fname, _size) in enumerate(disk_files, 1):
        out.append(f'    <File ovf:href={quoteattr(fname)} ovf:id="file{i}"/>\n')
    out.append("  </References>\n  <DiskSection>\n    <Info>Virtual disk information</Info>\n")
    for i, (_f, size) in enumerate(disk_files, 1):
        cap, unit = (size >> 30, "byte * 2^30") if size % (1 << 30) == 0 else (size, "byte")
        out.append(
            f'    <Disk ovf:capacity="{cap}" ovf:capacityAllocationUnits="{unit}" '
            f'ovf:diskId="vmdisk{i}" ovf:fileRef="file{i}" ovf:format="{STREAM_OPTIMIZED}"/>\n'
        )
    out.append("  </DiskSection>\n")
    networks = list(dict.fromkeys(n.network or "VM Network" for n in s.nics))
    out.append("  <NetworkSection>\n    <Info>The list of logical networks</Info>\n")
    for net in networks:
        out.append(
            f"    <Network ovf:name={quoteattr(net)}>\n"
            f"      <Description>The {escape(net)} network</Description>\n    </Network>\n"
        )
    out.append("  </NetworkSection>\n")
    os_id, vmw_os = VMW_OS.get(s.ostype, VMW_OS["win10" if s.ostype.startswith("w") else "other"])
    out.append(
        f"  <VirtualSystem ovf:id={quoteattr(name)}>\n    <Info>A virtual machine</Info>\n"
        f"    <Name>{escape(name)}</Name>\n"
    )
    if s.description:
        out.append(
            '    <AnnotationSection ovf:required="false">\n      <Info>A human-readable '
            f"annotation</Info>\n      <Annotation>{escape(s.description)}</Annotation>\n"
            "    </AnnotationSection>\n"
        )
    out.append(
        f'    <OperatingSystemSection ovf:id="{os_id}" vmw:osType="{vmw_os}">\n'
        "      <Info>The kind of installed guest operating system</Info>\n"
        "    </OperatingSystemSection>\n"
        "    <VirtualHardwareSection>\n      <Info>Virtual hardware requirements</Info>\n"
        "      <System>\n        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>\n"
        "        <vssd:InstanceID>0</vssd:InstanceID>\n"
        f"        <vssd:VirtualSystemIdentifier>{escape(name)}</vssd:VirtualSystemIdentifier>\n"
        "        <vssd:VirtualSystemType>vmx-14</vssd:VirtualSystemType>\n      </System>\n"
    )
    vcpus = s.sockets * s.cores
    if s.vcpus and s.vcpus < vcpus:
        lost.append(f"{s.vcpus} of {vcpus} vCPUs online at boot: OVF starts them all")
    cpu = _item(
        [
            ("AllocationUnits", "hertz * 10^6"),
            ("Description", "Number of Virtual CPUs"),
            ("ElementName", f"{vcpus} virtual CPU(s)"),
            ("InstanceID", "1"),
            ("ResourceType", str(CPU)),
            ("VirtualQuantity", str(vcpus)),
        ]
    )
    cpu = cpu.replace(
        "      </Item>\n",
        f'        <vmw:CoresPerSocket ovf:required="false">{s.cores}</vmw:CoresPerSocket>\n'
        "      </Item>\n",
    )
    out.append(cpu)
    out.append(
        _item(
            [
                ("AllocationUnits", "byte * 2^20"),
                ("Description", "Memory Size"),
                ("ElementName", f"{s.memory >> 20}MB of memory"),
                ("InstanceID", "2"),
                ("ResourceType", str(MEMORY)),
                ("VirtualQuantity", str(s.memory >> 20)),
            ]
        )
    )
    if s.memory % (1 << 20):
        lost.append(f"memory of {s.memory} bytes rounded down to whole MiB")
    if s.memory_min is not None and s.memory_min != s.memory:
        lost.append("a memory balloon floor: OVF gives one fixed size")
    out.append(
        _item(
            [
                ("Address", "0"),
                ("Description", "SCSI Controller"),
                ("ElementName", "SCSI controller 0"),
                ("InstanceID", "3"),
                ("ResourceSubType", "VirtualSCSI" if s.ostype == "l26" else "lsilogicsas"),
                ("ResourceType", str(SCSI)),
            ]
        )
    )
    out.append(
        _item(
            [
                ("Address", "0"),
                ("Description", "IDE Controller"),
                ("ElementName", "IDE 0"),
                ("InstanceID", "4"),
                ("ResourceType", str(IDE)),
            ]
        )
    )
    iid = 5
    if len(disk_files) > 15:
        lost.append(f"{len(disk_files) - 15} disks past the SCSI controller's 15 slots")
    for i in range(min(len(disk_files), 15)):
        place = i if i < 7 else i + 1  # unit 7 is the controller's own
        out.append(
            _item(
                [
                    ("AddressOnParent", str(place)),
                    ("ElementName", f"Hard disk {i + 1}"),
                    ("HostResource", f"ovf:/disk/vmdisk{i + 1}"),
                    ("InstanceID", str(iid)),
                    ("Parent", "3"),
                    ("ResourceType", str(DISK)),
                ]
            )
        )
        iid += 1
    for i, _cd in enumerate(s.cdroms[:2]):
        out.append(
            _item(
                [
                    ("AddressOnParent", str(i)),
                    ("AutomaticAllocation", "false"),
                    ("ElementName", f"CD/DVD drive {i + 1}"),
                    ("InstanceID", str(iid)),
                    ("Parent", "4"),
                    ("ResourceSubType", "vmware.cdrom.remotepassthrough"),
                    ("ResourceType", str(CD)),
                ],
                required=False,
            )
        )
        iid += 1
    for i, nic in enumerate(s.nics):
        model = {"e1000": "E1000", "e1000e": "E1000e"}.get(nic.model, "VmxNet3")
        if nic.model not in ("e1000", "e1000e", "vmxnet3"):
            lost.append(f"NIC {i + 1}: model {nic.model or '(any)'} becomes VmxNet3")
        out.append(
            _item(
                [
                    ("Address", nic.mac.lower()),
                    ("AddressOnParent", str(7 + i)),
                    ("AutomaticAllocation", "true"),
                    ("Connection", nic.network or "VM Network"),
                    ("Description", f'{model} ethernet adapter on "{nic.network}"'),
                    ("ElementName", f"Network adapter {i + 1}"),
                    ("InstanceID", str(iid)),
                    ("ResourceSubType", model),
                    ("ResourceType", str(ETHERNET)),
                ],
                required=False,
            )
        )
        iid += 1
    if s.firmware == "uefi":
        out.append('      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>\n')
    out.append("    </VirtualHardwareSection>\n  </VirtualSystem>\n</Envelope>\n")
    return "".join(out).encode(), lost
