"""create: a new archive from disk images (any format vmarc reads) and config files."""

from __future__ import annotations

import contextlib
import os

from .. import open as open_archive
from ..errors import SourceError, UsageError
from ..formats.vma_writer import VmaWriter, device_name
from ..model import Checks
from ..output import StreamOutput, compression_for
from ..progress import Progress

CREATE_FORMATS = ("vma",)


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


def create(output: str, disks: list[tuple[str | None, str]], configs: list[tuple[str, str]],
           out_format: str = "vma", fmt: str | None = None, compression: str | None = "auto",
           verify: bool = True, progress: bool = False, sync: bool = True) -> tuple[list[str], list[str]]:
    """Write an archive of the given (name, path) disks; returns the device names and
    warnings for the user.

    Each path is opened with vmarc.open (raw by -f raw or a .raw/.img name) and must hold
    one disk. Names default to scsi0, scsi1... Compression "auto" follows the output name.
    """
    if out_format not in CREATE_FORMATS:
        raise UsageError(f"unknown archive format {out_format!r} (known: "
                         f"{', '.join(CREATE_FORMATS)})")
    if not disks:
        raise UsageError("no disks given (--disk NAME=PATH)")
    if compression == "auto":
        compression = compression_for(output) if output != "-" else None
    blobs = read_configs(configs)
    with contextlib.ExitStack() as stack:
        inputs = []
        names = []
        for i, (name, path) in enumerate(disks):
            archive = stack.enter_context(open_archive(path, fmt))
            disk = archive.select(None) if len(archive.disks) == 1 else None
            if disk is None:
                raise UsageError(f"{path}: holds {len(archive.disks)} disks; give a "
                                 "single disk image")
            dev = device_name(name or f"scsi{i}")
            if dev in names or dev == "vmstate":
                raise UsageError(f"disk name {dev!r} used twice or reserved")
            names.append(dev)
            inputs.append((archive, disk))
        out = StreamOutput(output, compression)
        try:
            writer = VmaWriter(out, [(n, d.size) for n, (_, d) in zip(names, inputs)], blobs)
            for dev_id, (archive, disk) in enumerate(inputs, start=1):
                bar = Progress(archive.source, progress, label=names[dev_id - 1])
                try:
                    for _, offset, data in archive.stream([disk], Checks(), verify=verify):
                        writer.add(dev_id, offset, data)
                        bar.update()
                finally:
                    bar.close()
                writer.finish_device(dev_id)
            writer.close()
            out.commit(sync=sync)
        except BaseException:
            out.abort()
            raise
    warnings = []
    if "qemu-server.conf" not in blobs:  # vma create allows it, qmrestore needs it
        warnings.append("no qemu-server.conf given; a Proxmox restore needs one "
                        "(--config qemu-server.conf=FILE)")
    return names, warnings
