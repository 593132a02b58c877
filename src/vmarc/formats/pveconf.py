"""qemu-server.conf: Proxmox VE's VM configuration ("key: value" lines)."""

from __future__ import annotations

import re

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
    return {k: v for k, v in main_section(conf).items()
            if DRIVE_KEY.fullmatch(k) and "media=cdrom" not in v}


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
    return {"name": keys.get("name", ""), "memory": num("memory", 512) * (1 << 20),
            "vcpus": num("vcpus", cores * sockets), "cores": cores, "sockets": sockets,
            "ostype": keys.get("ostype", "")}
