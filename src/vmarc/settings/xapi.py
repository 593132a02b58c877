"""ova.xml: XAPI's XML-RPC `<value><struct>` description of an exported VM.

`version` says who exported it; `objects` is a list of {class, id, snapshot} records for
VM, VBD, VIF, VDI, SR, network... Integers are written as strings; values with no type
element are strings too (Xen Orchestra writes those).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from ..errors import FormatError

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
    from .neutral import DiskSlot, Nic, VmSettings, boot_from_letters, mac_ok, ostype_from_template

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
