"""create: a new archive from disk images (any format vmarc reads) and config files."""

from __future__ import annotations

import contextlib
import os

from .. import open as open_archive
from ..errors import SourceError, UsageError
from ..formats.vma_writer import VmaWriter, device_name
from ..formats.xva_writer import XvaWriter, disk_refs, ova_xml
from ..io.codecs import compression_for
from ..io.output import StreamOutput, writing
from ..model import Checks
from ..settings import proxmox
from ..settings.neutral import DiskSlot, VmSettings
from .progress import Progress
from .sequencer import DiskSequencer
from .vmconvert import vma_name_rules

CREATE_FORMATS = ("vma", "xva")


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
    if out_format not in CREATE_FORMATS:
        raise UsageError(
            f"unknown archive format {out_format!r} (known: {', '.join(CREATE_FORMATS)})"
        )
    if not disks:
        raise UsageError("no disks given (--disk NAME=PATH)")
    opts = dict(options or {})
    allowed = {"xva": {"checksum", "header", "compress"}, "vma": {"compress"}}[out_format]
    for key in opts:
        if key not in allowed:
            raise UsageError(f"-o {key}: not an option of {out_format} output")
    if "compress" in opts:
        compression = None if opts["compress"] in ("none", "") else opts["compress"]
    if compression == "auto":
        compression = compression_for(output) if output != "-" else None
    vmid = vma_name_rules(output, compression, None) if out_format == "vma" else 100
    if out_format == "xva" and compression == "lzop":
        raise UsageError("XVA compression is gzip or zstd (XAPI reads no other)")
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
        out = StreamOutput(output, compression)
        with writing(out):
            if out_format == "xva":
                refs = disk_refs(len(inputs))
                writer = XvaWriter(
                    out,
                    ova_xml(settings, refs),
                    [(r, d.size) for r, (_, d) in zip(refs, inputs)],
                    checksum=opts.get("checksum", "xxhash"),
                    header=opts.get("header", "v7"),
                )
            else:
                conf = (
                    None
                    if "qemu-server.conf" in blobs
                    else _generated_conf(settings, names, warnings, vmid)
                )
                if conf:
                    blobs["qemu-server.conf"] = conf
                writer = VmaWriter(
                    out,
                    [(n, d.size) for n, (_, d) in zip(names, inputs)],
                    blobs,
                    ordered=all(a.ordered for a, _ in inputs),
                )
            copied = 0
            for k, (archive, disk) in enumerate(inputs):
                copied += _copy_disk(
                    writer,
                    k,
                    archive,
                    disk,
                    out_format,
                    verify,
                    Progress(archive.source, progress, label=names[k]),
                )
            if stats is not None:
                stats.update(archives=[a for a, _ in inputs], data_bytes=copied)
            writer.close()
            out.commit(sync=sync)
    return names, warnings


def _copy_disk(writer, k: int, archive, disk, out_format: str, verify: bool, bar) -> int:
    """One input disk into the archive as its k-th disk; returns the data bytes copied."""
    if out_format == "xva":
        feed = DiskSequencer(
            [disk],
            lambda _i, n, data: writer.chunk(k, n, data),
            lambda _i: writer.finish_disk(k),
            None if archive.ordered else archive.covered,
        )
        add = feed.add
    else:

        def add(_disk, offset, data):
            writer.add(k + 1, offset, data)

    copied = 0
    with bar:
        for d, offset, data in archive.stream([disk], Checks(), verify=verify):
            add(d, offset, data)
            copied += len(data)
            bar.update()
    if out_format == "xva":
        feed.close()
    else:
        writer.finish_device(k + 1)
    return copied


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
