"""create: a new archive from disk images (any format vmarc reads) and config files."""

from __future__ import annotations

import contextlib
import os

from ..errors import SourceError, UsageError
from ..formats import open_archive
from ..formats.disk_order import ORDERED
from ..formats.vma_writer import device_name
from ..model import Checks
from ..settings import proxmox
from ..settings.neutral import DiskSlot, VmSettings
from ..settings.xapi import disk_refs, ova_xml
from .pack import plan, write_archive
from .progress import Progress


def read_configs(configs: list[tuple[str, str]]) -> dict[str, bytes]:
    """NAME=FILE pairs (NAME defaults to the file's base name) read into blobs."""
    blobs: dict[str, bytes] = {}
    for name, path in configs:
        name = os.path.basename(name or path)
        if name in blobs:
            raise UsageError(f"config {name!r} given twice")
        try:
            with open(path, "rb") as f:
                blobs[name] = f.read()
        except OSError as e:
            raise SourceError(f"{path}: cannot read: {e.strerror}") from None
    return blobs


def create(
    output: str,
    disks: list[tuple[str | None, str]],
    configs: list[tuple[str, str]],
    out_format: str = "vma",
    fmt: str | None = None,
    compression: str | None = "auto",
    verify: bool = True,
    progress: bool = False,
    sync: bool = True,
    name: str | None = None,
    memory_mib: int | None = None,
    cpus: int | None = None,
    options: dict | None = None,
    stats: dict | None = None,
) -> tuple[list[str], list[str]]:
    """Write an archive of the given (name, path) disks; returns the disk names and
    warnings for the user. stats, if given, gets the input archives and the data bytes
    copied (for --output json).

    Each path is opened with vmarc.open (raw by -f raw or a .raw/.img name) and must hold
    one disk. VMA names default to scsi0, scsi1...; XVA names are the disks' labels.
    Compression "auto" follows the output name. name, memory_mib and cpus describe the VM
    (XVA's ova.xml; VMA's qemu-server.conf when none is given).
    """
    target = plan(output, out_format, options, compression=compression)
    if not disks:
        raise UsageError("no disks given (--disk NAME=PATH)")
    if out_format == "xva" and configs:
        raise UsageError(
            "--config belongs to VMA; an XVA's settings come from --name, --memory and --cpus"
        )
    blobs = read_configs(configs)
    warnings: list[str] = []
    with contextlib.ExitStack() as stack:
        inputs = []
        names = []
        for i, (dname, path) in enumerate(disks):
            archive = stack.enter_context(open_archive(path, fmt))
            disk = archive.select(None) if len(archive.disks) == 1 else None
            if disk is None:
                raise UsageError(
                    f"{path}: holds {len(archive.disks)} disks; give a single disk image"
                )
            if out_format == "vma":
                dev = device_name(dname or f"scsi{i}")
                if dev in names or dev == "vmstate":
                    raise UsageError(f"disk name {dev!r} used twice or reserved")
            else:
                dev = dname or os.path.basename(path)
            names.append(dev)
            inputs.append((archive, disk))
        settings = VmSettings(
            name=name or "vm",
            memory=(memory_mib or 1024) << 20,
            cores=cpus or 1,
            disks=[DiskSlot(d, size=d.size, label=n) for n, (_, d) in zip(names, inputs)],
        )
        if out_format == "xva":
            refs = disk_refs(len(inputs))
            archive_of = {id(d): a for a, d in inputs}

            def covered(disk):  # each input says how far it has given its disk
                a = archive_of[id(disk)]
                return ORDERED if a.ordered else a.covered(disk)

            def make_writer(out):
                return target.writer(
                    out,
                    [(r, d) for r, (_, d) in zip(refs, inputs)],
                    ova_xml=ova_xml(settings, refs),
                    covered=covered,
                )
        else:
            if "qemu-server.conf" not in blobs:
                conf = _generated_conf(settings, names, warnings, target.vmid)
                if conf:
                    blobs["qemu-server.conf"] = conf

            def make_writer(out):
                return target.writer(
                    out,
                    [(n, d) for n, (_, d) in zip(names, inputs)],
                    configs=blobs,
                    ordered=all(a.ordered for a, _ in inputs),
                )

        # one disk after the other, each finished as its source ends
        feeds = (  # made one at a time: each bar shows as its disk starts
            (
                archive.stream([disk], Checks(), verify=verify),
                [disk],
                Progress(archive.source, progress, label=names[k]),
            )
            for k, (archive, disk) in enumerate(inputs)
        )
        copied = write_archive(target, make_writer, feeds, sync=sync)
        if stats is not None:
            stats.update(archives=[a for a, _ in inputs], data_bytes=copied)
    return names, warnings


def _generated_conf(
    settings: VmSettings, names: list[str], warnings: list[str], vmid: int
) -> bytes | None:
    """A qemu-server.conf for disks named by Proxmox slot (drive-scsi0...), so that the
    archive restores with qmrestore."""
    keys = [n[6:] for n in names]
    if not all(proxmox.DISK_KEY.fullmatch(k) for k in keys):
        warnings.append(
            "no qemu-server.conf given and the disk names are not Proxmox "
            "slots (scsi0, virtio0...); a Proxmox restore needs one "
            "(--config qemu-server.conf=FILE)"
        )
        return None
    settings.boot = ["disk"]
    conf, _ = proxmox.render(
        settings, proxmox.DISK_KEY.fullmatch(keys[0])[1], "local-lvm", vmid, disk_keys=keys
    )
    return conf.encode()
