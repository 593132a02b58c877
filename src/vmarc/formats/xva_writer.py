"""Writing XVA archives the way XAPI's exporter writes them (xen-api stream_vdi.ml).

A tar stream: ova.xml first, then each disk's 1 MiB chunks `Ref:N/%08d`, each followed by
its checksum member (`.xxhash`: XXH64 as 16 uppercase hex digits; `.checksum`: SHA-1 for
hosts older than Citrix Hypervisor 8.1). Disks follow each other in string order of their
refs. All-zero chunks are left out (a gap in the numbering) except the first and the last,
which XAPI's importer needs to see; the last chunk is exactly `size mod 1 MiB` long. No
keepalive members are written, so chunk N always sits at N MiB.

The ova.xml objects carry every field XAPI's importer requires (FORMATS.md); the VM's
field set follows Xen Orchestra's template (@xen-orchestra/xva/templates/vm.mjs).
"""

from __future__ import annotations

import uuid as uuidlib

from ..errors import UsageError
from ..io.hashing import sha1_text, xxh64_text
from ..model import ZERO_CHUNK, is_zero
from ..settings import xapi
from ..settings.neutral import XAPI_BOOT_LETTER, XAPI_TEMPLATE_FOR, VmSettings, is_uuid, is_windows
from .tar import make_header

CHUNK = 1 << 20
BLOCK = 512
NULL = "OpaqueRef:NULL"
EPOCH = xapi.DateTime("19700101T00:00:00Z")
CHECKSUMS = {"xxhash": (".xxhash", xxh64_text), "sha1": (".checksum", sha1_text)}
HEADERS = ("v7", "ustar")


class XvaWriter:
    """Writes to out (anything with write(bytes-like)). Disks are given as (ref, size) in
    the order they will be written, which must be the string order of their refs.

    chunk(i, n, data) takes disk i's chunk n (1 MiB, shorter only at the end) with n
    increasing; finish_disk(i) completes disk i; close() ends the tar stream.
    """

    def __init__(
        self,
        out,
        ova_xml: bytes,
        disks: list[tuple[str, int]],
        checksum: str = "xxhash",
        header: str = "v7",
    ):
        if checksum not in CHECKSUMS:
            raise UsageError(f"-o checksum={checksum}: XVA checksums are xxhash or sha1")
        if header not in HEADERS:
            raise UsageError(f"-o header={header}: XVA tar headers are v7 or ustar")
        refs = [r for r, _ in disks]
        if refs != sorted(refs) or len(set(refs)) != len(refs):
            raise ValueError(f"disk refs must be unique and in string order: {refs}")
        self.out = out
        self.disks = disks
        self.style = header
        self.suffix, self.digest = CHECKSUMS[checksum]
        self._last = [-1] * len(disks)  # last chunk number written per disk
        self._current = 0
        self.chunks_written = 0
        self._member("ova.xml", ova_xml)

    def _member(self, name: str, data) -> None:
        self.out.write(make_header(name, len(data), self.style))
        if len(data):
            self.out.write(data)
        pad = -len(data) % BLOCK
        if pad:
            self.out.write(ZERO_CHUNK[:pad])

    def _write_chunk(self, i: int, n: int, data) -> None:
        name = f"{self.disks[i][0]}/{n:08d}"
        self._member(name, data)
        self._member(name + self.suffix, self.digest(data).encode())
        self._last[i] = n
        self.chunks_written += 1

    def chunk(self, i: int, n: int, data) -> None:
        if i != self._current:
            raise RuntimeError(f"disk {i} written while disk {self._current} is open")
        if n <= self._last[i]:
            raise RuntimeError(f"chunk {n} of disk {i} after chunk {self._last[i]}")
        size = self.disks[i][1]
        last = -(-size // CHUNK) - 1
        if n != 0 and n != last and is_zero(data):
            return  # a skipped zero chunk: the gap in the numbering says it
        if self._last[i] < 0 and n > 0:
            self._write_chunk(i, 0, ZERO_CHUNK[: min(CHUNK, size)])
        self._write_chunk(i, n, data)

    def finish_disk(self, i: int) -> None:
        size = self.disks[i][1]
        last = -(-size // CHUNK) - 1
        if self._last[i] < 0 and last > 0:
            self._write_chunk(i, 0, ZERO_CHUNK[:CHUNK])
        if self._last[i] < last:
            self._write_chunk(i, last, ZERO_CHUNK[: size - last * CHUNK])
        self._current = i + 1

    def close(self) -> None:
        if self._current != len(self.disks):
            raise RuntimeError("XVA closed before every disk was finished")
        self.out.write(ZERO_CHUNK[: 2 * BLOCK])


# -- ova.xml -------------------------------------------------------------------------------
def disk_refs(count: int) -> list[str]:
    """Refs for the disks' VDIs that sort in the order written (Ref:0010 < Ref:0011)."""
    return [f"Ref:{1000 + i:04d}" for i in range(count)]


def _vm_snapshot(s: VmSettings, vm_uuid: str) -> dict:
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
    for field in ("name", "description"):
        text = getattr(s, field)
        if xapi.xml_text(text) != text:  # dropped by render(); said here
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
                    "other_config": {},
                    "currently_attached": False,
                    "status_code": "0",
                    "status_detail": "",
                    "runtime_properties": {},
                    "qos_algorithm_type": "",
                    "qos_algorithm_params": {},
                    "qos_supported_algorithms": [],
                    "metrics": NULL,
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
    return xapi.render(top).encode()


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
            "other_config": {},
            "currently_attached": False,
            "status_code": "0",
            "status_detail": "",
            "runtime_properties": {},
            "qos_algorithm_type": "",
            "qos_algorithm_params": {},
            "qos_supported_algorithms": [],
            "metrics": NULL,
        },
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
