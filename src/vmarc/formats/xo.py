"""Xen Orchestra backup metadata (`xo-vm-backups/<vm>/<timestamp>.json`): one backup of a
VM, as XO's backup writers describe it (docs/formats/xo.md).

- mode "full": the VM is the XVA named by `xva` beside the metadata; read as any XVA.
- mode "delta": each disk is the VHD chain ending in `vhds[<vdi ref>]` (a VHD file or an
  .alias.vhd naming a VHD directory), resolved through XO's parent names; the disk is
  the chain's merged state at that backup's time, nothing merged on disk.

The VM's settings come from the XAPI records XO saved (vm, vbds, vdis, vifs), read by
settings/xapi.py as an ova.xml would be.
"""

from __future__ import annotations

import json
import os
import time

from ..errors import FormatError, UnsupportedError
from ..model import STREAM, Archive, Checks
from . import open_archive
from .vhd import ALIAS_SUFFIX
from .vhddir import VhdDirectoryArchive, read_remote_file, remote_cipher

MAX_METADATA = 64 << 20


class XoBackupArchive(Archive):
    format = "xo"
    access = STREAM

    @classmethod
    def probe(cls, head: bytes) -> bool:
        text = head.lstrip()
        return (
            text.startswith(b"{")
            and b'"jobId"' in head
            and (b'"mode":"delta"' in head or b'"mode":"full"' in head)
        )

    @classmethod
    def needs_file(cls, head: bytes, unsized: bool = False, parent: str | None = None):
        return "backup metadata names the files beside it"

    def __init__(self, source):
        super().__init__(source)
        path = source.path
        name = source.name
        self.cipher = remote_cipher(path)
        raw = read_remote_file(path, self.cipher, MAX_METADATA)
        try:
            meta = json.loads(raw)
        except ValueError as e:
            raise FormatError(f"{name}: not Xen Orchestra's backup metadata: {e}") from None
        if not isinstance(meta, dict) or meta.get("mode") not in ("delta", "full"):
            raise FormatError(f"{name}: backup metadata without a mode of delta or full")
        self.meta = meta
        self.mode = meta["mode"]
        self.base = os.path.dirname(os.path.abspath(path))
        self.configs[os.path.basename(path)] = raw
        vm = _vm_record(meta.get("vm"))
        self.vm = {"name": vm.get("name_label", ""), "backup_mode": self.mode}
        for key, field in (("memory", "memory_static_max"), ("vcpus", "VCPUs_max")):
            if str(vm.get(field, "")).isdigit():
                self.vm[key] = int(vm[field])
        ts = meta.get("timestamp")
        if isinstance(ts, (int, float)):
            self.vm["backup_time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts / 1000))
        self.inner = None
        self.layers: dict[str, Archive] = {}  # disk id -> its VHD chain
        if self.mode == "full":
            self._open_full()
        else:
            self._open_delta()

    def _file(self, rel: str, what: str) -> str:
        if not isinstance(rel, str) or not rel or os.path.isabs(rel):
            raise FormatError(f"{self.source.name}: {what} {rel!r} is not a relative path")
        path = os.path.normpath(os.path.join(self.base, rel))
        if not (path + os.sep).startswith(self.base + os.sep):
            raise FormatError(f"{self.source.name}: {what} {rel!r} leaves the VM's directory")
        return path

    def _open_full(self):
        if self.cipher is not None:
            raise UnsupportedError(
                f"{self.source.name}: a full backup on an encrypted remote is not read yet"
            )
        self.inner = open_archive(self._file(self.meta.get("xva"), "xva"))
        self.disks = self.inner.disks
        self.configs.update(self.inner.configs)

    def _open_delta(self):
        meta = self.meta
        vhds = meta.get("vhds")
        if not isinstance(vhds, dict) or not vhds:
            raise FormatError(f"{self.source.name}: a delta backup without vhds")
        vdis = _records(meta, "vdis")
        slots = {}
        for vbd in _records(meta, "vbds").values():
            if isinstance(vbd.get("VDI"), str) and vbd["VDI"] in vhds:
                slots[vbd["VDI"]] = str(vbd.get("userdevice", ""))
        order = sorted(vhds, key=lambda ref: (_int(slots.get(ref)), ref))
        try:
            for i, ref in enumerate(order):
                path = self._file(vhds[ref], f"the VHD of {ref}")
                if path.endswith(ALIAS_SUFFIX) or os.path.isdir(path):
                    layer = VhdDirectoryArchive.open_path(path)
                elif self.cipher is not None:
                    raise UnsupportedError(f"{path}: an encrypted VHD file is not read yet")
                else:
                    layer = open_archive(path, "vhd")
                self.layers[ref] = layer
                vdi = vdis.get(ref, {})
                # the chain's own Disk, named as the backup names it: the damage its
                # reading reports then falls on this backup's disk
                disk = layer.disks[0]
                disk.id = vdi.get("uuid") or ref
                disk.name = vdi.get("name_label") or os.path.basename(path)
                disk.device = _device(slots.get(ref))
                disk.index = i
                disk.meta.update({"vhd": vhds[ref], "chain": _chain(layer)})
                self.disks.append(disk)
        except BaseException:
            self.close()
            raise

    def disk_images(self):
        if self.inner is not None:
            return None  # a full backup: its XVA is indexed as any XVA
        return {layer.disks[0].id: layer for layer in self.layers.values()}

    def details(self) -> dict:
        d = {
            "mode": self.mode,
            "timestamp": self.meta.get("timestamp"),
            "job": self.meta.get("jobId"),
            "schedule": self.meta.get("scheduleId"),
        }
        if self.inner is not None:
            d["xva"] = self.meta.get("xva")
        if self.cipher is not None:
            d["encryption"] = self.cipher[0]
        return d

    def settings(self):
        if self.inner is not None:
            return self.inner.settings()
        from ..settings.xapi import read_settings

        meta = self.meta
        vm = _vm_record(meta.get("vm"))
        vm_ref = vm.get("$ref") or "vm"
        objects = [{"class": "VM", "id": vm_ref, "snapshot": vm}]
        for cls, key in (("VBD", "vbds"), ("VDI", "vdis"), ("VIF", "vifs")):
            for ref, rec in _records(meta, key).items():
                rec = dict(rec)
                if cls in ("VBD", "VIF"):
                    rec.setdefault("VM", vm_ref)
                objects.append({"class": cls, "id": ref, "snapshot": rec})
        try:
            return read_settings({"objects": objects}, vm_ref, self.disks, self.source.name)
        except (TypeError, AttributeError, ValueError) as e:  # a field of the wrong type
            raise FormatError(
                f"{self.source.name}: the saved VM records are malformed: {e}"
            ) from None

    def stream(self, disks=None, checks: Checks | None = None, verify: bool = True):
        checks = checks or Checks()
        if self.inner is not None:
            yield from self.inner.stream(disks, checks, verify)
            return
        for layer in self.layers.values():
            disk = layer.disks[0]
            if disks is None or disk in disks:
                yield from layer.stream(checks=checks, verify=verify)

    def checked(self):
        if self.inner is not None:
            return self.inner.checked()
        # each chain has one disk: its checks, under this backup's disk id
        out = {}
        for layer in self.layers.values():
            out.update(layer.checked())
        return out

    def stream_checks(self) -> list[str]:
        return self.inner.stream_checks() if self.inner is not None else []

    def close(self):
        if self.inner is not None:
            self.inner.close()
        for layer in self.layers.values():
            layer.close()
        super().close()


TEXT_FIELDS = (
    "$ref",
    "name_label",
    "name_description",
    "uuid",
    "domain_type",
    "PV_bootloader",
    "HVM_boot_policy",
    "reference_label",
    "suspend_VDI",
)
MAP_FIELDS = ("HVM_boot_params", "platform", "other_config")


def _vm_record(vm) -> dict:
    """The saved VM record with every field the settings read in the shape XAPI gives
    it (text, maps, lists of refs); a field of another shape is left out."""
    if not isinstance(vm, dict):
        return {}
    out = {}
    for key, value in vm.items():
        if key in TEXT_FIELDS:
            if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                out[key] = str(value)
        elif key in MAP_FIELDS:
            if isinstance(value, dict):
                out[key] = {k: str(v) for k, v in value.items() if isinstance(v, (str, int, float))}
        elif key in ("VBDs", "VIFs"):
            if isinstance(value, list):
                out[key] = [r for r in value if isinstance(r, str)]
        elif isinstance(value, (str, int, float, bool)):
            out[key] = value
        elif value:  # NVRAM, VTPMs...: their presence is what the settings note
            out[key] = value
    return out


def _records(meta: dict, key: str) -> dict[str, dict]:
    """XAPI records saved under key (ref -> record), those of the right shape only."""
    found = meta.get(key)
    if not isinstance(found, dict):
        return {}
    return {
        ref: rec for ref, rec in found.items() if isinstance(ref, str) and isinstance(rec, dict)
    }


def _chain(layer) -> list[str]:
    """The files of a VHD chain, newest first."""
    out = []
    while layer is not None:
        out.append(layer.source.path)
        layer = layer.lower()
    return out


def _int(text) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        return 1 << 30


def _device(userdevice) -> str | None:
    n = _int(userdevice)
    return f"xvd{chr(ord('a') + n)}" if n < 26 else None


READERS = {"xo": XoBackupArchive}
