"""Proxmox's side of a VM's settings, both ways: qemu-server.conf ("key: value" lines)
read into VmSettings (read_settings) and written from them (render), with Proxmox's
tables (buses and their slots, NIC models)."""

from __future__ import annotations

import re

from ..errors import FormatError

DRIVE_KEY = re.compile(r"(ide|sata|scsi|virtio|efidisk|tpmstate|unused)\d+")


def main_section(conf: str) -> dict[str, str]:
    """Keys of the current configuration (snapshot sections [name] come after it)."""
    out = {}
    for line in conf.splitlines():
        if line.startswith("["):
            break
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def drives(conf: str) -> dict[str, str]:
    """{"scsi0": "local-lvm:vm-100-disk-0,size=10G", ...} (CD drives excluded)."""
    return {
        k: v
        for k, v in main_section(conf).items()
        if DRIVE_KEY.fullmatch(k) and "media=cdrom" not in v
    }


def vm_summary(conf: str) -> dict:
    keys = main_section(conf)
    if not keys:
        return {}

    def num(key, default):
        try:
            return int(keys.get(key, default))
        except ValueError:
            return default

    cores, sockets = num("cores", 1), num("sockets", 1)
    return {
        "name": keys.get("name", ""),
        "memory": num("memory", 512) * (1 << 20),
        "vcpus": num("vcpus", cores * sockets),
        "cores": cores,
        "sockets": sockets,
        "ostype": keys.get("ostype", ""),
    }


# -- VM settings, both ways ----------------------------------------------------------------
BUS_ORDER = ("ide", "sata", "scsi", "virtio")
BUS_SLOTS = {"ide": 4, "sata": 6, "scsi": 31, "virtio": 16}
NIC_MODELS = ("virtio", "e1000", "e1000e", "rtl8139", "vmxnet3")
# keys that say nothing a target can miss (controller model, ids Proxmox regenerates)
QUIET_KEYS = {"scsihw", "vmgenid", "digest", "meta", "boot", "bootdisk", "smbios1"}
MAPPED_KEYS = {
    "name",
    "memory",
    "balloon",
    "cores",
    "sockets",
    "vcpus",
    "bios",
    "ostype",
    "description",
}
DISK_KEY = re.compile(r"(ide|sata|scsi|virtio)(\d+)")
NET_KEY = re.compile(r"net(\d+)")


def _options(value: str) -> tuple[str, dict[str, str]]:
    """ "local-lvm:vm-1-disk-0,size=10G" -> ("local-lvm:vm-1-disk-0", {"size": "10G"})."""
    head, *rest = value.split(",")
    opts = {}
    for item in rest:
        k, sep, v = item.partition("=")
        opts[k.strip()] = v.strip() if sep else ""
    return head.strip(), opts


def parse_size(text: str) -> int | None:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)", text.strip())
    if not m:
        return None
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m[2]]
    return int(float(m[1]) * scale)


def format_size(n: int) -> str:
    """The largest unit that states n exactly, as Proxmox writes size=."""
    for unit, scale in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def _description(conf: str) -> str:
    """The comment lines before the first key (how Proxmox stores `description`)."""
    from urllib.parse import unquote

    lines = []
    for line in conf.splitlines():
        if not line.startswith("#") or line.startswith("#qmdump#"):
            break
        lines.append(unquote(line[1:]))
    return "\n".join(lines)


def _slot_key(key: str):
    m = DISK_KEY.fullmatch(key)
    return (BUS_ORDER.index(m[1]), int(m[2])) if m else (99, 0)


def read_settings(conf: str, disks):
    """VmSettings from a qemu-server.conf and the archive's disks (VMA devices named
    drive-<key>). A drive in the config but not in the archive, or the other way round,
    is said in `lost`."""
    from .neutral import DiskSlot, Nic, VmSettings, mac_ok

    keys = main_section(conf)
    s = VmSettings()
    s.name = keys.get("name", "")
    s.description = keys.get("description", "") or _description(conf)
    summary = vm_summary(conf)
    s.memory = summary.get("memory", 512 << 20)
    for what, value, low, high in (
        ("memory", s.memory >> 20, 16, 64 << 20),  # MiB: 64 TiB
        ("cores", summary.get("cores", 1), 1, 1024),
        ("sockets", summary.get("sockets", 1), 1, 64),
        ("vcpus", summary.get("vcpus", 1), 1, 65536),
    ):
        if not low <= value <= high:  # Proxmox itself refuses these
            raise FormatError(
                f"qemu-server.conf: {what} {value} is outside {low}..{high}: damaged settings"
            )
    if keys.get("balloon", "").isdigit() and 0 < int(keys["balloon"]) * (1 << 20) < s.memory:
        s.memory_min = int(keys["balloon"]) << 20
    s.sockets, s.cores = summary.get("sockets", 1), summary.get("cores", 1)
    if keys.get("vcpus", "").isdigit() and int(keys["vcpus"]) < s.max_vcpus:
        s.vcpus = int(keys["vcpus"])
    s.ostype = keys.get("ostype", "other") or "other"
    s.firmware = "uefi" if keys.get("bios") == "ovmf" else "bios"
    m = re.search(r"(?:^|,)uuid=([0-9a-fA-F-]{36})", keys.get("smbios1", ""))
    s.uuid = m[1].lower() if m else ""

    by_name = {d.id: d for d in disks}
    used = set()
    boot_keys = _boot_keys(keys)
    drive_keys = sorted((k for k in keys if DISK_KEY.fullmatch(k)), key=_slot_key)
    # the first disk in the boot order goes first: XAPI boots its first disk
    first = next((k for k in boot_keys if k in drive_keys and "media=cdrom" not in keys[k]), None)
    if first:
        drive_keys.remove(first)
        drive_keys.insert(0, first)
    for key in drive_keys:
        volume, opts = _options(keys[key])
        if opts.get("media") == "cdrom":
            media = "" if volume in ("none", "cdrom") else volume.rpartition("/")[2]
            s.cdroms.append(DiskSlot(None, "cdrom", media=media, source_slot=key))
            continue
        disk = by_name.get(f"drive-{key}")
        if disk is None:
            s.lost.append(f"{key} ({volume}) is not in the archive (excluded from the backup)")
            continue
        used.add(disk.id)
        s.disks.append(DiskSlot(disk, size=disk.size, label=key, source_slot=key))
    for d in disks:
        if d.id in used:
            continue
        short = d.id[6:] if d.id.startswith("drive-") else d.id
        if short.startswith("efidisk"):
            s.firmware = "uefi"
            s.lost.append(
                f"{short}: the UEFI variables store is not carried (the target "
                "starts with default UEFI variables)"
            )
        elif short.startswith("tpmstate"):
            s.lost.append(f"{short}: the TPM state is not carried")
        else:
            s.disks.append(DiskSlot(d, size=d.size, label=short, source_slot=short))
    for key in sorted((k for k in keys if NET_KEY.fullmatch(k)), key=lambda k: int(k[3:])):
        head, opts = _options(keys[key])
        model, _, mac = head.partition("=")
        if not mac_ok(mac):
            s.lost.append(f"{key}: no MAC address in {keys[key]!r}; not carried")
            continue
        mtu = int(opts["mtu"]) if opts.get("mtu", "").isdigit() else None
        s.nics.append(Nic(mac.upper(), opts.get("bridge", ""), model, mtu))
        extra = [k for k in opts if k not in ("bridge", "mtu")]
        if extra:
            s.lost.append(f"{key}: {', '.join(f'{k}={opts[k]}' for k in extra)} not carried")
    s.boot = []
    for k in boot_keys:
        cls = (
            "net"
            if NET_KEY.fullmatch(k)
            else "cdrom"
            if "media=cdrom" in keys.get(k, "")
            else "disk"
        )
        if cls not in s.boot:
            s.boot.append(cls)
    for k, v in keys.items():
        if (
            k in MAPPED_KEYS
            or k in QUIET_KEYS
            or DISK_KEY.fullmatch(k)
            or NET_KEY.fullmatch(k)
            or DRIVE_KEY.fullmatch(k)
            or (k == "numa" and v == "0")
        ):
            continue
        s.lost.append(f"{k}: {v} (no equivalent carried)")
    if re.search(r"^\[", conf, re.M):
        s.lost.append("snapshots in the configuration are not carried")
    return s


def _boot_keys(keys: dict[str, str]) -> list[str]:
    """Devices in boot order: "order=scsi0;ide2;net0", or the legacy "cdn" + bootdisk."""
    boot = keys.get("boot", "")
    if boot.startswith("order=") or ";" in boot:
        return [k for k in boot.removeprefix("order=").split(";") if k]
    letters = boot or "cdn"
    out = []
    for ch in letters:
        if ch == "c":
            out.append(
                keys.get("bootdisk")
                or next(
                    (
                        k
                        for k in sorted(keys, key=_slot_key)
                        if DISK_KEY.fullmatch(k) and "media=cdrom" not in keys[k]
                    ),
                    "scsi0",
                )
            )
        elif ch == "d":
            out.extend(
                k
                for k in sorted(keys, key=_slot_key)
                if DISK_KEY.fullmatch(k) and "media=cdrom" in keys[k]
            )
        elif ch == "n":
            out.extend(k for k in sorted(keys) if NET_KEY.fullmatch(k))
    return out


def render(
    s,
    bus: str,
    storage: str,
    vmid: int,
    bridge: str | None = None,
    disk_keys: list[str] | None = None,
) -> tuple[str, list[str]]:
    """qemu-server.conf for a VmSettings: the text and the drive key of each data disk
    (the archive's devices are drive-<key>): bus0, bus1... unless disk_keys are given.
    What Proxmox cannot hold is added to s.lost."""
    from .neutral import is_uuid, is_windows

    if bus not in BUS_SLOTS:
        raise ValueError(bus)
    if len(s.disks) > BUS_SLOTS[bus]:
        from ..errors import UsageError

        raise UsageError(
            f"{len(s.disks)} disks do not fit on {bus} ({BUS_SLOTS[bus]} slots); "
            "choose another --bus"
        )
    lines: dict[str, str] = {}
    disk_keys = disk_keys or [f"{bus}{i}" for i in range(len(s.disks))]
    for n, (key, slot) in enumerate(zip(disk_keys, s.disks)):
        lines[key] = f"{storage}:vm-{vmid}-disk-{n},size={format_size(slot.size)}"
    cd_keys = []
    free_ide = [f"ide{i}" for i in (2, 0, 1, 3) if f"ide{i}" not in lines]
    for slot in s.cdroms:
        if not free_ide:
            s.lost.append("a CD drive: no free IDE slot left")
            continue
        key = free_ide.pop(0)
        lines[key] = "none,media=cdrom"
        cd_keys.append(key)
        if slot.media:
            s.lost.append(
                f"CD {slot.media} ({slot.source_slot}) is not in the archive; the "
                f"drive {key} is left empty"
            )
    for i, nic in enumerate(s.nics):
        model = (
            nic.model
            if nic.model in NIC_MODELS
            else ("e1000" if is_windows(s.ostype) else "virtio")
        )
        net = bridge or pve_bridge(nic.network, s.lost, f"net{i}")
        lines[f"net{i}"] = f"{model}={nic.mac.upper()},bridge={net}" + (
            f",mtu={nic.mtu}" if nic.mtu and nic.mtu != 1500 else ""
        )
    order = []
    for cls in s.boot:
        if cls == "disk" and disk_keys:
            order.append(disk_keys[0])
        elif cls == "cdrom":
            order.extend(cd_keys)
        elif cls == "net" and s.nics:
            order.append("net0")
    if order:
        lines["boot"] = "order=" + ";".join(order)
    lines["name"] = pve_name(s.name, s.lost)
    mib = -(-s.memory // (1 << 20))
    if mib << 20 != s.memory:
        s.lost.append(f"memory {s.memory} bytes rounded up to {mib} MiB")
    lines["memory"] = str(max(mib, 16))
    if s.memory_min is not None:
        lines["balloon"] = str(s.memory_min >> 20)
    lines["sockets"] = str(s.sockets)
    lines["cores"] = str(s.cores)
    if s.vcpus:
        lines["vcpus"] = str(s.vcpus)
    lines["ostype"] = s.ostype
    if s.firmware == "uefi":
        lines["bios"] = "ovmf"
        s.lost.append(
            "UEFI: no efidisk0 is created; Proxmox boots with default UEFI "
            f"variables until you add one (qm set {vmid} --efidisk0 {storage}:1)"
        )
    if bus == "scsi":
        lines["scsihw"] = "virtio-scsi-single"
    if is_uuid(s.uuid):
        lines["smbios1"] = f"uuid={s.uuid.lower()}"
    from urllib.parse import quote

    text = "".join(
        f"#{quote(line, safe=' !#$&()*+,-./:;<=>?@[]^_{|}~')}\n"
        for line in s.description.splitlines()
    )
    text += "".join(f"{k}: {lines[k]}\n" for k in sorted(lines))
    text += "".join(f"#qmdump#map:{k}:drive-{k}:{storage}:raw:\n" for k in disk_keys)
    return text, disk_keys


def pve_bridge(network: str, lost: list[str], where: str) -> str:
    """A Proxmox bridge for a neutral network name: vmbrN as is, XAPI's xenbrN as vmbrN,
    anything else vmbr0 (said)."""
    if re.fullmatch(r"vmbr\d+", network):
        return network
    m = re.fullmatch(r"xenbr(\d+)", network)
    if m:
        return f"vmbr{m[1]}"
    lost.append(
        f"{where}: network {network or '(none)'!r} has no Proxmox bridge of that "
        "name; attached to vmbr0 (--bridge to choose)"
    )
    return "vmbr0"


def pve_name(name: str, lost: list[str]) -> str:
    """Proxmox VM names are DNS names: letters, digits, dots and dashes."""
    clean = re.sub(r"[^A-Za-z0-9.-]+", "-", name).strip(".-")[:63] or "vm"
    if clean != name:
        lost.append(f"name {name!r} written as {clean!r} (Proxmox names are DNS names)")
    return clean
