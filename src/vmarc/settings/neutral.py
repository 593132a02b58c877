"""A VM's settings in neutral terms: what moves between XenServer/XCP-ng and Proxmox.

Readers fill a VmSettings from ova.xml (settings/xapi.py) or qemu-server.conf
(settings/proxmox.py); writers render one back into the other format. Whatever a source
says that the neutral model cannot hold goes into `lost`, and a writer adds what its own
format cannot hold: the command prints every line as a warning, nothing is dropped silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the model imports this module, not the other way
    from ..model import Disk

MiB = 1 << 20
BOOT_CLASSES = ("disk", "cdrom", "net")


@dataclass
class DiskSlot:
    """A disk of the VM in slot order: data from the archive, or a CD drive."""

    disk: Disk | None  # the archive's disk (None for a CD drive)
    kind: str = "disk"  # disk | cdrom
    size: int = 0
    label: str = ""
    media: str = ""  # a CD's image name (an ISO is never in the archive)
    source_slot: str = ""  # where it was: xvda / userdevice 3 / scsi0 / ide2


@dataclass
class Nic:
    mac: str
    network: str = ""  # neutral name: the Proxmox bridge (vmbr0...)
    model: str = ""  # virtio, e1000... ("" when the source cannot say)
    mtu: int | None = None


@dataclass
class VmSettings:
    name: str = ""
    description: str = ""
    uuid: str = ""  # SMBIOS uuid (XAPI: VM uuid; Proxmox: smbios1 uuid=)
    memory: int = 0  # bytes
    memory_min: int | None = None  # balloon floor (XAPI dynamic_min; Proxmox balloon)
    sockets: int = 1
    cores: int = 1  # per socket
    vcpus: int | None = None  # vCPUs online at boot when fewer than sockets x cores
    firmware: str = "bios"  # bios | uefi
    boot: list[str] = field(default_factory=lambda: ["disk", "cdrom", "net"])
    disks: list[DiskSlot] = field(default_factory=list)  # data disks, slot order
    cdroms: list[DiskSlot] = field(default_factory=list)
    nics: list[Nic] = field(default_factory=list)
    ostype: str = "other"  # Proxmox's names: l26, win10, win11, other...
    lost: list[str] = field(default_factory=list)

    @property
    def max_vcpus(self) -> int:
        return self.sockets * self.cores

    def summary(self) -> dict:
        """What round trips must keep (tests and `info` compare this)."""
        present = {"disk": self.disks, "cdrom": self.cdroms, "net": self.nics}
        return {
            "name": self.name,
            "memory": self.memory,
            "memory_min": self.memory_min,
            "sockets": self.sockets,
            "cores": self.cores,
            "vcpus": self.vcpus,
            "firmware": self.firmware,
            "ostype": self.ostype,
            "boot": [c for c in self.boot if present[c]],
            "uuid": self.uuid,
            "disks": [(s.size, s.label) for s in self.disks],
            "cdroms": len(self.cdroms),
            "nics": [(n.mac.upper(), n.network) for n in self.nics],
        }


# -- OS types --------------------------------------------------------------------------
# Proxmox ostype -> the XAPI template name written as base_template_name (what XenCenter
# and Xen Orchestra show as the OS; XAPI itself only stores it).
def is_windows(ostype: str) -> bool:
    return ostype.startswith("w")


# -- boot order --------------------------------------------------------------------------
def mac_ok(mac: str) -> bool:
    return re.fullmatch(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}", mac) is not None


def is_uuid(text: str) -> bool:
    return re.fullmatch(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}", text) is not None
