"""convert -O vma|xva: a whole VM (every disk and its settings) into a new archive, in one
streaming pass.

XVA -> VMA streams straight through (a VMA takes clusters in any order). Into an XVA each
disk must come whole and in order, one after the other: disks are written in the order
the source finishes them, so an XVA or a one-disk source streams straight through; what a
source gives out of turn (a multi-disk VMA interleaves its disks) is held in a temporary
file until its turn, and the command says so (ops/sequencer.py).
"""

from __future__ import annotations

import os
import re
import time

from ..errors import UsageError
from ..formats.vma_writer import VmaWriter
from ..formats.xva_writer import XvaWriter, disk_refs, ova_xml
from ..io.codecs import compression_for
from ..io.output import StreamOutput, writing
from ..model import DATA, SCAN, Archive, Checks
from ..settings import proxmox
from .convert import ARCHIVE_FORMATS
from .progress import Progress
from .sequencer import DiskSequencer

XVA_OPTIONS = {"checksum", "header", "compress"}
VMA_OPTIONS = {"compress"}
VZDUMP_NAME = re.compile(r"vzdump-qemu-(\d+)-")
READ_STEP = 4 << 20


def output_name(
    output: str, out_format: str, vm_name: str, vmid: int, compression: str | None
) -> str:
    """A directory gets the file name Proxmox (vzdump-qemu-<vmid>-<time>.vma.zst) or
    XenServer (<name>.xva) would give it."""
    if output == "-" or not os.path.isdir(output):
        return output
    if out_format == "vma":
        ext = {"zstd": ".zst", "gzip": ".gz", "lzop": ".lzo", None: ""}[compression]
        stamp = time.strftime("%Y_%m_%d-%H_%M_%S")
        return os.path.join(output, f"vzdump-qemu-{vmid}-{stamp}.vma{ext}")
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", vm_name).strip(".-") or "vm"
    return os.path.join(output, f"{stem}.xva")


def vma_name_rules(output: str, compression: str | None, vmid: int | None) -> int:
    """The vmid to write, after checking the output name against what Proxmox reads from
    it: the decompressor (by suffix) and the VM id (vzdump-qemu-<vmid>-...)."""
    if output == "-" or os.path.isdir(output):
        return 100 if vmid is None else vmid
    named = compression_for(output)
    if compression != named:
        raise UsageError(
            f"{output}: the name says {named or 'no'} compression but "
            f"{compression or 'none'} was asked for; Proxmox picks the "
            "decompressor by the name (.vma, .vma.zst, .vma.gz, .vma.lzo)"
        )
    m = VZDUMP_NAME.search(os.path.basename(output))
    if m and vmid is not None and int(m[1]) != vmid:
        raise UsageError(
            f"{output}: the name says VM {int(m[1])} but --vmid is {vmid}; "
            "the restored config would name another VM's volumes"
        )
    return int(m[1]) if m else (100 if vmid is None else vmid)


def write_xva(
    out, archive: Archive, settings, *, checksum: str, header: str, verify: bool, bar
) -> None:
    """The XVA of the archive's VM into out."""
    data_disks = [slot.disk for slot in settings.disks]
    if archive.format == "xva":
        # a re-pack keeps ova.xml and the refs as they are, so every disk it streams
        # (a suspend image too) goes along
        order = archive.stream_order()
        refs = [d.id for d in order]
        xml = archive.configs["ova.xml"]
    else:
        rank = {d.id: i for i, d in enumerate(archive.stream_order())}
        order = sorted(data_disks, key=lambda d: rank.get(d.id, 1 << 30))
        by_written = dict(zip((d.id for d in order), disk_refs(len(order))))
        refs = [by_written[d.id] for d in order]
        xml = ova_xml(settings, [by_written[d.id] for d in data_disks])
    writer = XvaWriter(
        out, xml, [(r, d.size) for r, d in zip(refs, order)], checksum=checksum, header=header
    )
    if _interleaved_file(archive, order):
        pieces, covered = _indexed_pieces(archive, order), None
    else:
        pieces = archive.stream(order, Checks(), verify=verify)
        covered = None if archive.ordered else archive.covered
    seq = DiskSequencer(order, writer.chunk, writer.finish_disk, covered)
    for disk, offset, data in pieces:
        seq.add(disk, offset, data)
        bar.update()
    seq.close()
    writer.close()


def _interleaved_file(archive: Archive, order) -> bool:
    """Several disks whose data interleaves (VMA) in a plain file: read each disk in turn
    through an index of the archive's headers instead of holding the others back."""
    src = archive.source
    return (
        len(order) > 1
        and not archive.ordered
        and archive.access == SCAN
        and src.path is not None
        and src.compression is None
        and src.seekable
    )


def _indexed_pieces(archive: Archive, order):
    """(disk, offset, data) of each disk in turn, in disk order: scan() checks every
    header and structure rule and maps where each disk's data lies in the file, then the
    data is read from there (nothing read twice, nothing held)."""
    from ..access.open import scan_maps
    from ..access.stores import FileStore
    from ..access.views import MappedDisk

    maps = scan_maps(archive, Checks())
    store = FileStore(archive.source.path)
    try:
        for disk in order:
            view = MappedDisk(
                disk, store, maps[disk.id].finish(), archive.source.name, verify=False
            )  # scan checked the structure; XVA never comes here
            for e in view.extents():
                if e.kind != DATA:
                    continue
                for step in range(0, e.length, READ_STEP):
                    n = min(READ_STEP, e.length - step)
                    yield disk, e.start + step, memoryview(store.pread(n, e.at + step))
    finally:
        store.close()


def write_vma(
    out,
    archive: Archive,
    settings,
    *,
    storage: str,
    vmid: int,
    bus: str,
    bridge: str | None,
    verify: bool,
    bar,
) -> None:
    data_disks = [slot.disk for slot in settings.disks]
    if archive.format == "vma":
        # a re-pack keeps the configs and every device as they are (EFI and TPM state,
        # the memory state of a snapshot backup)
        data_disks = list(archive.disks) + [d for d, _ in archive.extra_streams()]
        configs = dict(archive.configs)
        names = [d.id for d in data_disks]
    else:
        conf, keys = proxmox.render(settings, bus, storage, vmid, bridge)
        configs = {"qemu-server.conf": conf.encode()}
        names = [f"drive-{k}" for k in keys]
    writer = VmaWriter(
        out, [(n, d.size) for n, d in zip(names, data_disks)], configs, ordered=archive.ordered
    )
    dev_of = {d.id: i for i, d in enumerate(data_disks, start=1)}
    for disk, offset, data in archive.stream(data_disks, Checks(), verify=verify):
        writer.add(dev_of[disk.id], offset, data)
        bar.update()
    for dev_id in dev_of.values():
        writer.finish_device(dev_id)
    writer.close()


def convert_vm(
    archive: Archive,
    output: str,
    out_format: str,
    *,
    options: dict | None = None,
    storage: str = "local-lvm",
    vmid: int | None = None,
    bus: str | None = None,
    bridge: str | None = None,
    verify: bool = True,
    progress: bool = False,
    sync: bool = True,
) -> tuple[str, list[str]]:
    """Write the archive's whole VM as out_format; returns (path written, warnings)."""
    if out_format not in ARCHIVE_FORMATS:
        raise UsageError(f"unknown archive format {out_format!r}")
    opts = dict(options or {})
    allowed = XVA_OPTIONS if out_format == "xva" else VMA_OPTIONS
    for key in opts:
        if key not in allowed:
            raise UsageError(
                f"-o {key}: not an option of {out_format} output "
                f"(known: {', '.join(sorted(allowed))})"
            )
    settings = archive.settings()
    if not settings.disks and not settings.cdroms:
        raise UsageError(f"{archive.source.name}: the archive has no disks to carry")
    compression = opts.get("compress")
    if compression in ("none", ""):
        compression = None
    elif compression is None and output != "-":
        compression = (
            compression_for(output)
            if not os.path.isdir(output)
            else ("zstd" if out_format == "vma" else None)
        )
    if compression not in (None, "gzip", "zstd") + (("lzop",) if out_format == "vma" else ()):
        raise UsageError(
            f"-o compress={compression}: {out_format} output takes "
            + ("gzip, zstd, lzop or none" if out_format == "vma" else "gzip, zstd or none")
        )
    if out_format == "vma":
        vmid = vma_name_rules(output, compression, vmid)
    if bus is None:
        bus = "sata" if settings.ostype.startswith("w") else "scsi"
    path = output_name(output, out_format, settings.name, vmid, compression)
    with (
        writing(StreamOutput(path, compression)) as out,
        Progress(archive.source, progress, label=os.path.basename(path)) as bar,
    ):
        if out_format == "xva":
            write_xva(
                out,
                archive,
                settings,
                checksum=opts.get("checksum", "xxhash"),
                header=opts.get("header", "v7"),
                verify=verify,
                bar=bar,
            )
        else:
            write_vma(
                out,
                archive,
                settings,
                storage=storage,
                vmid=vmid,
                bus=bus,
                bridge=bridge,
                verify=verify,
                bar=bar,
            )
        out.commit(sync=sync)
    # a re-pack into the same format carries everything as it is
    warnings = [] if archive.format == out_format else list(settings.lost)
    return path, warnings
