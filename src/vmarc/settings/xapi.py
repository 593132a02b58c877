"""XAPI's side of a VM's settings, both ways: ova.xml read into VmSettings
(read_settings) and written from them (ova_xml), with XAPI's lookup tables (templates by
OS, boot letters).

ova.xml is XAPI's XML-RPC `<value><struct>` description of an exported VM: `version` says
who exported it; `objects` is a list of {class, id, snapshot} records for VM, VBD, VIF,
VDI, SR, network... Integers are written as strings; values with no type element are
strings too (Xen Orchestra writes those). docs/formats/xva.md.
"""

from __future__ import annotations

import re
import uuid as uuidlib
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

from ..errors import FormatError

if TYPE_CHECKING:
    from .neutral import VmSettings

MAX_OVA_XML = 64 << 20  # XAPI's ova.xml is a few hundred KiB at most


MAX_DEPTH = 64  # XAPI's ova.xml nests five deep; more is an attack on the parser


def _value(elem: ET.Element, where: str, depth: int = 0):
    if depth > MAX_DEPTH:
        raise FormatError(f"{where}: ova.xml nests values more than {MAX_DEPTH} deep")
    kids = list(elem)
    if not kids:
        return elem.text or ""
    typed = kids[0]
    tag = typed.tag
    if tag == "struct":
        out = {}
        for member in typed.findall("member"):
            name = member.findtext("name")
            val = member.find("value")
            if name is None or val is None:
                raise FormatError(f"{where}: struct member without name or value")
            out[name] = _value(val, where, depth + 1)
        return out
    if tag == "array":
        data = typed.find("data")
        return [] if data is None else [_value(v, where, depth + 1) for v in data.findall("value")]
    if tag == "boolean":
        return (typed.text or "").strip() == "1"
    return typed.text or ""


MAX_ELEMENTS = 200_000  # an ova.xml of twenty disks holds ~20,000; a bomb holds millions


def _count_elements(data: bytes, where: str) -> None:
    """Refuse an element bomb before a tree is built for it (a few bytes an element
    compressed, a few hundred in the tree)."""
    from xml.parsers import expat

    parser = expat.ParserCreate()
    count = 0

    def start(_name, _attrs):
        nonlocal count
        count += 1
        if count > MAX_ELEMENTS:
            raise FormatError(f"{where}: ova.xml holds more than {MAX_ELEMENTS:,} elements")

    parser.StartElementHandler = start
    try:
        parser.Parse(data, True)
    except expat.ExpatError as e:
        raise FormatError(f"{where}: ova.xml is not well-formed XML: {e}") from None


def parse(data: bytes, where: str) -> dict:
    """The top-level struct ({'version': ..., 'objects': [...]})."""
    _count_elements(data, where)
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise FormatError(f"{where}: ova.xml is not well-formed XML: {e}") from None
    if root.tag != "value":
        raise FormatError(f"{where}: ova.xml root is <{root.tag}>, expected <value>")
    top = _value(root, where)
    if not isinstance(top, dict) or not isinstance(top.get("objects"), list):
        raise FormatError(f"{where}: ova.xml has no 'objects' array")
    ids = set()
    for obj in top["objects"]:
        if not (
            isinstance(obj, dict)
            and isinstance(obj.get("class"), str)
            and isinstance(obj.get("id"), str)
            and isinstance(obj.get("snapshot"), dict)
        ):
            raise FormatError(f"{where}: ova.xml object without class, id or snapshot")
        if obj["id"] in ids:  # one of the two would be dropped: which disk is which?
            raise FormatError(f"{where}: ova.xml lists object {obj['id']} twice")
        ids.add(obj["id"])
    return top


def to_int(value, what: str, where: str) -> int:
    try:
        n = int(str(value).strip())
    except ValueError:
        raise FormatError(f"{where}: {what} is not an integer: {value!r}") from None
    if n < 0:
        raise FormatError(f"{where}: {what} is negative: {n}")
    return n


class DateTime(str):
    """A date XAPI reads as <dateTime.iso8601> ("19700101T00:00:00Z")."""


def render(value) -> str:
    """XML-RPC text for a value the way XAPI exports it: integers as strings, booleans as
    <boolean>, dicts as <struct>, lists as <array>."""
    from xml.sax.saxutils import escape

    if isinstance(value, bool):
        return f"<value><boolean>{int(value)}</boolean></value>"
    if isinstance(value, DateTime):
        return f"<value><dateTime.iso8601>{escape(value)}</dateTime.iso8601></value>"
    if isinstance(value, dict):
        return (
            "<value><struct>"
            + "".join(
                f"<member><name>{escape(xml_text(str(k)))}</name>{render(v)}</member>"
                for k, v in value.items()
            )
            + "</struct></value>"
        )
    if isinstance(value, (list, tuple)):
        return "<value><array><data>" + "".join(map(render, value)) + "</data></array></value>"
    return f"<value>{escape(xml_text(str(value)))}</value>"


# characters XML 1.0 cannot hold, escaped or not
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def xml_text(text: str) -> str:
    """text without the characters XML 1.0 cannot hold (an importer refuses them)."""
    return _NOT_XML.sub("", text)


def read_settings(top: dict, vm_id: str | None, disks, where: str):
    """VmSettings of the VM object vm_id; disks are the archive's data disks in slot order."""
    from .neutral import DiskSlot, Nic, VmSettings, mac_ok  # only when settings are asked for

    objs = {o["id"]: o for o in top["objects"]}
    s = VmSettings()
    vm = objs.get(vm_id, {}).get("snapshot", {}) if vm_id else {}
    s.name = vm.get("name_label", "")
    s.description = vm.get("name_description", "")
    s.uuid = vm.get("uuid", "")
    s.memory = to_int(vm.get("memory_static_max") or 0, "VM memory_static_max", where)
    dyn_min = to_int(vm.get("memory_dynamic_min") or 0, "VM memory_dynamic_min", where)
    if 0 < dyn_min < s.memory:
        s.memory_min = dyn_min
    vcpus = to_int(vm.get("VCPUs_max") or 1, "VCPUs_max", where) or 1
    platform = vm.get("platform") if isinstance(vm.get("platform"), dict) else {}
    per_socket = to_int(platform.get("cores-per-socket") or vcpus, "cores-per-socket", where)
    if per_socket and vcpus % per_socket == 0:
        s.cores, s.sockets = per_socket, vcpus // per_socket
    else:
        s.cores, s.sockets = vcpus, 1
    startup = to_int(vm.get("VCPUs_at_startup") or vcpus, "VCPUs_at_startup", where)
    if 0 < startup < vcpus:
        s.vcpus = startup
    params = vm.get("HVM_boot_params") if isinstance(vm.get("HVM_boot_params"), dict) else {}
    s.firmware = "uefi" if params.get("firmware") == "uefi" else "bios"
    s.boot = boot_from_letters(params.get("order", "")) or ["disk", "cdrom", "net"]
    other = vm.get("other_config") if isinstance(vm.get("other_config"), dict) else {}
    s.ostype = ostype_from_template(
        other.get("base_template_name", "") or vm.get("reference_label", "")
    )
    if vm.get("domain_type") == "pv" or (
        vm and not vm.get("HVM_boot_policy") and vm.get("PV_bootloader")
    ):
        s.lost.append(
            "PV guest: it booted through the Xen PV bootloader "
            f"({vm.get('PV_bootloader') or 'kernel'}); under Proxmox it boots its "
            "disk with the firmware, which needs a bootloader inside the disk"
        )
    if platform.get("secureboot") == "true":
        s.lost.append("Secure Boot: the target starts with it off")
    for key, what in (
        ("NVRAM", "UEFI variables (NVRAM)"),
        ("VTPMs", "virtual TPM"),
        ("VGPUs", "virtual GPUs"),
        ("VUSBs", "USB passthrough"),
        ("attached_PCIs", "PCI passthrough"),
        ("tags", "tags"),
    ):
        if vm.get(key):
            s.lost.append(f"{what} not carried")
    if vm.get("suspend_VDI") in objs:
        s.lost.append(
            "suspended state: the suspend image is not carried (the VM starts from a cold boot)"
        )
    s.disks = [
        DiskSlot(d, size=d.size, label=d.name, source_slot=d.device or d.id)
        for d in disks
        if d.device != "suspend"
    ]
    vbd_ids = set(vm.get("VBDs") or [])
    cds = [
        o["snapshot"]
        for o in top["objects"]
        if o["class"] == "VBD"
        and (o["id"] in vbd_ids or o["snapshot"].get("VM") == vm_id)
        and str(o["snapshot"].get("type", "")).lower() == "cd"
    ]
    for cd in sorted(cds, key=lambda b: _int_or(b.get("userdevice"))):
        vdi = objs.get(cd.get("VDI"), {}).get("snapshot", {})
        s.cdroms.append(
            DiskSlot(
                None,
                "cdrom",
                media=vdi.get("name_label", ""),
                source_slot=f"userdevice {cd.get('userdevice')}",
            )
        )
    vif_ids = set(vm.get("VIFs") or [])
    vifs = [
        o["snapshot"]
        for o in top["objects"]
        if o["class"] == "VIF" and (o["id"] in vif_ids or o["snapshot"].get("VM") == vm_id)
    ]
    for vif in sorted(vifs, key=lambda v: _int_or(v.get("device"))):
        net = objs.get(vif.get("network"), {}).get("snapshot", {})
        mac = str(vif.get("MAC", ""))
        if not mac_ok(mac):
            s.lost.append(f"VIF {vif.get('device')}: no MAC address; not carried")
            continue
        mtu = _int_or(vif.get("MTU") or net.get("MTU"), None)
        s.nics.append(Nic(mac.upper(), net.get("bridge") or net.get("name_label", ""), mtu=mtu))
    return s


def _int_or(value, default=1 << 30):
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


# -- XAPI's lookup tables -----------------------------------------------------------------
XAPI_TEMPLATE_FOR = {
    "win11": "Windows 11",
    "win10": "Windows 10 (64-bit)",
    "win8": "Windows 8.1 (64-bit)",
    "win7": "Windows 7 (64-bit)",
    "wvista": "Windows Vista (32-bit)",
    "w2k8": "Windows Server 2008 (64-bit)",
    "w2k3": "Windows Server 2003 (32-bit)",
    "w2k": "Windows 2000",
    "wxp": "Windows XP SP3 (32-bit)",
    "l26": "Generic Linux",
    "l24": "Generic Linux",
    "solaris": "Other install media",
    "other": "Other install media",
}
# Template names -> Proxmox ostype, first match wins (Proxmox: win11 also means Server
# 2022/2025, win10 Server 2016/2019, win8 Server 2012, win7 Server 2008 R2).
_OSTYPE_PATTERNS = [
    (r"windows 11|server 202[2-9]", "win11"),
    (r"windows 10|server 201[69]", "win10"),
    (r"windows 8|server 2012", "win8"),
    (r"windows 7|server 2008 r2", "win7"),
    (r"vista|server 2008", "w2k8"),
    (r"server 2003", "w2k3"),
    (r"windows xp", "wxp"),
    (r"windows 2000", "w2k"),
    (r"windows", "win10"),
    (
        r"linux|debian|ubuntu|centos|red ?hat|rhel|suse|sles|oracle|rocky|alma|fedora|"
        r"coreos|gentoo|mint|arch|alpine|scientific|neokylin|kylin|nixos",
        "l26",
    ),
]


def ostype_from_template(name: str) -> str:
    low = name.lower()
    for pattern, ostype in _OSTYPE_PATTERNS:
        if re.search(pattern, low):
            return ostype
    return "other"


XAPI_BOOT_LETTER = {"disk": "c", "cdrom": "d", "net": "n"}


def boot_from_letters(order: str) -> list[str]:
    """XAPI's HVM_boot_params order ("cdn") as neutral classes."""
    by_letter = {v: k for k, v in XAPI_BOOT_LETTER.items()}
    out = []
    for ch in order.lower():
        cls = by_letter.get(ch)
        if cls and cls not in out:
            out.append(cls)
    return out


# -- writing ova.xml ------------------------------------------------------------------------
NULL = "OpaqueRef:NULL"
EPOCH = DateTime("19700101T00:00:00Z")


def disk_refs(count: int) -> list[str]:
    """Refs for the disks' VDIs that sort in the order written (Ref:0010 < Ref:0011)."""
    return [f"Ref:{1000 + i:04d}" for i in range(count)]


def _vm_snapshot(s: VmSettings, vm_uuid: str) -> dict:
    from .neutral import is_windows

    """Every field of a VM record the importer reads (Xen Orchestra's template's set)."""
    vcpus = s.max_vcpus
    template = XAPI_TEMPLATE_FOR.get(s.ostype, "Other install media")
    if template == "Generic Linux":
        template = "Generic Linux UEFI" if s.firmware == "uefi" else "Generic Linux BIOS"
    memory = str(s.memory)
    dyn_min = str(s.memory_min if s.memory_min else s.memory)
    order = "".join(XAPI_BOOT_LETTER[c] for c in s.boot) or "cdn"
    return {
        "uuid": vm_uuid,
        "name_label": s.name,
        "name_description": s.description,
        "power_state": "Halted",
        "user_version": "1",
        "is_a_template": False,
        "is_default_template": False,
        "is_control_domain": False,
        "is_a_snapshot": False,
        "is_snapshot_from_vmpp": False,
        "is_vmss_snapshot": False,
        "allowed_operations": [],
        "current_operations": {},
        "blocked_operations": {},
        "suspend_VDI": NULL,
        "suspend_SR": NULL,
        "resident_on": NULL,
        "affinity": NULL,
        "scheduled_to_be_resident_on": NULL,
        "appliance": NULL,
        "protection_policy": NULL,
        "snapshot_schedule": NULL,
        "metrics": NULL,
        "guest_metrics": NULL,
        "parent": NULL,
        "snapshot_of": NULL,
        "snapshot_time": EPOCH,
        "snapshot_info": {},
        "snapshot_metadata": "",
        "transportable_snapshot_id": "",
        "snapshots": [],
        "children": [],
        "memory_overhead": "0",
        "memory_target": memory,
        "memory_static_max": memory,
        "memory_dynamic_max": memory,
        "memory_dynamic_min": dyn_min,
        "memory_static_min": dyn_min,
        "VCPUs_params": {},
        "VCPUs_max": str(vcpus),
        "VCPUs_at_startup": str(s.vcpus or vcpus),
        "actions_after_shutdown": "destroy",
        "actions_after_reboot": "restart",
        "actions_after_crash": "restart",
        "consoles": [],
        "VIFs": [],
        "VBDs": [],
        "VUSBs": [],
        "crash_dumps": [],
        "VTPMs": [],
        "VGPUs": [],
        "attached_PCIs": [],
        "PV_bootloader": "",
        "PV_kernel": "",
        "PV_ramdisk": "",
        "PV_args": "",
        "PV_bootloader_args": "",
        "PV_legacy_args": "",
        "HVM_boot_policy": "BIOS order",
        "HVM_boot_params": {"order": order, "firmware": s.firmware},
        "HVM_shadow_multiplier": "1",
        "platform": {
            "timeoffset": "0",
            "device-model": "qemu-upstream-compat",
            "secureboot": "false",
            "hpet": "true",
            "nx": "true",
            "pae": "true",
            "apic": "true",
            "acpi": "1",
            "viridian": "true" if is_windows(s.ostype) else "false",
            "cores-per-socket": str(s.cores),
        },
        "PCI_bus": "",
        "other_config": {"base_template_name": template, "install-methods": "cdrom"},
        "domid": "-1",
        "domarch": "",
        "last_boot_CPU_flags": {},
        "last_booted_record": "",
        "recommendations": "",
        "xenstore_data": {},
        "ha_always_run": False,
        "ha_restart_priority": "",
        "tags": [],
        "order": "0",
        "start_delay": "0",
        "shutdown_delay": "0",
        "version": "0",
        "generation_id": "",
        "hardware_platform_version": "0",
        "has_vendor_device": False,
        "requires_reboot": False,
        "reference_label": "",
        "domain_type": "hvm",
        "NVRAM": {},
        "bios_strings": {},
        "blobs": {},
    }


def ova_xml(s: VmSettings, refs: list[str], network_names=None) -> bytes:
    """ova.xml for VmSettings whose data disks get the VDI refs given (in s.disks order)."""
    from .neutral import is_uuid, is_windows

    for field, text in (("name", s.name), ("description", s.description)):
        if xml_text(text) != text:  # dropped by render(); said here
            s.lost.append(f"control characters in the VM {field} (XML cannot hold them)")
    vm_ref, sr_ref = "Ref:0001", "Ref:0002"
    new_uuid = lambda: str(uuidlib.uuid4())  # noqa: E731
    vm = _vm_snapshot(s, s.uuid.lower() if is_uuid(s.uuid) else new_uuid())
    objects = [{"class": "VM", "id": vm_ref, "snapshot": vm}]
    sr = {
        "uuid": new_uuid(),
        "name_label": "vmarc",
        "name_description": "",
        "allowed_operations": [],
        "current_operations": {},
        "VDIs": [],
        "PBDs": [],
        "virtual_allocation": str(sum(d.size for d in s.disks)),
        "physical_utilisation": "0",
        "physical_size": "0",
        "type": "lvm",
        "content_type": "user",
        "shared": False,
        "other_config": {},
        "tags": [],
        "sm_config": {},
        "blobs": {},
        "local_cache_enabled": False,
        "introduced_by": NULL,
        "clustered": False,
        "is_tools_sr": False,
    }
    objects.append({"class": "SR", "id": sr_ref, "snapshot": sr})
    n = 0

    def ref(prefix: int) -> str:
        nonlocal n
        n += 1
        return f"Ref:{prefix + n:04d}"

    userdevices = _userdevices(len(s.disks), len(s.cdroms))
    for pos, (slot, vdi_ref) in enumerate(zip(s.disks, refs)):
        vbd_ref = ref(2000)
        objects.append(
            {
                "class": "VDI",
                "id": vdi_ref,
                "snapshot": {
                    "uuid": new_uuid(),
                    "name_label": slot.label or f"{s.name} disk {pos}",
                    "name_description": "",
                    "allowed_operations": [],
                    "current_operations": {},
                    "SR": sr_ref,
                    "VBDs": [vbd_ref],
                    "crash_dumps": [],
                    "virtual_size": str(slot.size),
                    "physical_utilisation": str(slot.size),
                    "type": "user",
                    "sharable": False,
                    "read_only": False,
                    "other_config": {},
                    "storage_lock": False,
                    "location": "",
                    "managed": True,
                    "missing": False,
                    "parent": NULL,
                    "xenstore_data": {},
                    "sm_config": {},
                    "is_a_snapshot": False,
                    "snapshot_of": NULL,
                    "snapshots": [],
                    "snapshot_time": EPOCH,
                    "tags": [],
                    "allow_caching": False,
                    "on_boot": "persist",
                    "metadata_of_pool": NULL,
                    "metadata_latest": False,
                    "is_tools_iso": False,
                    "cbt_enabled": False,
                },
            }
        )
        sr["VDIs"].append(vdi_ref)
        objects.append(_vbd(vbd_ref, vm_ref, vdi_ref, userdevices[pos], "Disk", bootable=pos == 0))
        vm["VBDs"].append(vbd_ref)
    for k, slot in enumerate(s.cdroms):
        if slot.media:
            s.lost.append(
                f"CD {slot.media} ({slot.source_slot}) is not in the archive; the "
                "drive is left empty"
            )
        vbd_ref = ref(2000)
        objects.append(
            _vbd(vbd_ref, vm_ref, NULL, userdevices[len(s.disks) + k], "CD", bootable=False)
        )
        vm["VBDs"].append(vbd_ref)
    networks: dict[str, str] = {}
    if s.ostype in ("l24", "solaris"):
        s.lost.append(f"ostype {s.ostype}: XAPI has no template of that kind")
    default_model = "e1000" if is_windows(s.ostype) else "virtio"
    for dev, nic in enumerate(s.nics):
        if nic.model and nic.model != default_model:
            s.lost.append(
                f"net{dev}: NIC model {nic.model} not carried (XAPI has no "
                "per-interface model; the way back picks " + default_model + ")"
            )
        name, bridge = xapi_network(nic.network)
        if bridge not in networks:
            networks[bridge] = ref(3000)
            objects.append(
                {
                    "class": "network",
                    "id": networks[bridge],
                    "snapshot": {
                        "uuid": new_uuid(),
                        "name_label": name,
                        "name_description": "",
                        "allowed_operations": [],
                        "current_operations": {},
                        "VIFs": [],
                        "PIFs": [],
                        "MTU": "1500",
                        "other_config": {},
                        "bridge": bridge,
                        "managed": True,
                        "blobs": {},
                        "tags": [],
                        "default_locking_mode": "unlocked",
                        "assigned_ips": {},
                        "purpose": [],
                    },
                }
            )
        vif_ref = ref(4000)
        objects.append(
            {
                "class": "VIF",
                "id": vif_ref,
                "snapshot": {
                    "uuid": new_uuid(),
                    "allowed_operations": [],
                    "current_operations": {},
                    "device": str(dev),
                    "network": networks[bridge],
                    "VM": vm_ref,
                    "MAC": nic.mac.lower(),
                    "MTU": str(nic.mtu or 1500),
                    **_device_state(),
                    "MAC_autogenerated": False,
                    "locking_mode": "network_default",
                    "ipv4_allowed": [],
                    "ipv6_allowed": [],
                    "ipv4_configuration_mode": "None",
                    "ipv4_addresses": [],
                    "ipv4_gateway": "",
                    "ipv6_configuration_mode": "None",
                    "ipv6_addresses": [],
                    "ipv6_gateway": "",
                    "reserved": False,
                    "reserved_pci": NULL,
                },
            }
        )
        vm["VIFs"].append(vif_ref)
    for obj in objects:
        if obj["class"] == "network":
            obj["snapshot"]["VIFs"] = [
                o["id"]
                for o in objects
                if o["class"] == "VIF" and o["snapshot"]["network"] == obj["id"]
            ]
    top = {
        "version": {
            "hostname": "vmarc",
            "date": "1970-01-01",
            "product_version": "8.2.1",
            "product_brand": "XCP-ng",
            "build_number": "vmarc",
            "xapi_major": "1",
            "xapi_minor": "20",
            "export_vsn": "2",
        },
        "objects": objects,
    }
    return render(top).encode()


def _userdevices(disks: int, cds: int) -> list[str]:
    """Disks from 0 up, CD drives at 3 (XAPI's habit: hdd) when a CD exists, else next."""
    cd_slot = 3 if cds else None
    out, u = [], 0
    for _ in range(disks):
        while u == cd_slot:
            u += 1
        out.append(str(u))
        u += 1
    taken = set(out)
    for _ in range(cds):
        slot = 3 if "3" not in taken else next(str(k) for k in range(64) if str(k) not in taken)
        out.append(slot)
        taken.add(slot)
    return out


def _vbd(ref: str, vm: str, vdi: str, userdevice: str, kind: str, bootable: bool) -> dict:
    return {
        "class": "VBD",
        "id": ref,
        "snapshot": {
            "uuid": str(uuidlib.uuid4()),
            "allowed_operations": [],
            "current_operations": {},
            "VM": vm,
            "VDI": vdi,
            "device": "",
            "userdevice": userdevice,
            "bootable": bootable,
            "mode": "RO" if kind == "CD" else "RW",
            "type": kind,
            "unpluggable": kind == "CD",
            "storage_lock": False,
            "empty": vdi == NULL,
            **_device_state(),
        },
    }


def _device_state() -> dict:
    """The fields a VBD and a VIF share after their own: an unplugged device's state."""
    return {
        "other_config": {},
        "currently_attached": False,
        "status_code": "0",
        "status_detail": "",
        "runtime_properties": {},
        "qos_algorithm_type": "",
        "qos_algorithm_params": {},
        "qos_supported_algorithms": [],
        "metrics": NULL,
    }


def xapi_network(network: str) -> tuple[str, str]:
    """(name_label, bridge) for a neutral network name. The importer attaches a VIF to the
    network of that name, else of that bridge, else makes a new internal network: a
    Proxmox vmbrN becomes XAPI's default network on ethN (xenbrN)."""
    import re

    m = re.fullmatch(r"(?:vmbr|xenbr)(\d+)", network)
    if m:
        return f"Pool-wide network associated with eth{m[1]}", f"xenbr{m[1]}"
    return (network or "vmarc network"), (network or "xenbr0")
