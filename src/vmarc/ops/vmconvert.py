"""convert -O vma|xva: a whole VM (every disk and its settings) into a new archive, in one
streaming pass (ops/pack.py writes it, as for `create`).

XVA -> VMA streams straight through (a VMA takes clusters in any order). Into an XVA each
disk must come whole and in order, one after the other: disks are written in the order
the source finishes them, so an XVA or a one-disk source streams straight through; what a
source gives out of turn (a multi-disk VMA interleaves its disks) is held in a temporary
file until its turn, and the command says so (formats/disk_order.py). A multi-disk VMA
in a plain file is read disk by disk through its header scan instead.
"""

from __future__ import annotations

import os

from ..errors import UsageError
from ..model import SCAN, Archive, Checks
from ..settings import proxmox
from ..settings.xapi import disk_refs, ova_xml
from .pack import Target, file_stem, plan, write_archive
from .progress import Progress

READ_STEP = 4 << 20


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
    settings = archive.settings()
    target = plan(
        output, out_format, options, vmid=vmid, vm_name=settings.name, name_in_directory=True
    )
    if not settings.disks and not settings.cdroms:
        raise UsageError(f"{archive.source.name}: the archive has no disks to carry")
    if bus is None:
        bus = "sata" if settings.ostype.startswith("w") else "scsi"
    bar = Progress(archive.source, progress, label=os.path.basename(target.path))
    if out_format == "xva":
        make_writer, disks, pieces = _xva(archive, settings, target, verify)
    elif out_format == "ova":
        make_writer, disks, pieces = _ova(archive, settings, target, verify)
    else:
        make_writer, disks, pieces = _vma(archive, settings, target, storage, bus, bridge, verify)
    write_archive(target, make_writer, [(pieces, disks, bar)], sync=sync)
    # a re-pack into the same format carries everything as it is
    warnings = [] if archive.format == out_format else list(settings.lost)
    return target.path, warnings


def _xva(archive: Archive, settings, target: Target, verify: bool):
    """(make_writer, disks in write order, pieces) of the XVA of the archive's VM."""
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
    if _interleaved_file(archive, order):
        pieces, covered = _indexed_pieces(archive, order), None
    else:
        pieces = archive.stream(order, Checks(), verify=verify)
        covered = None if archive.ordered else archive.covered

    def make_writer(out):
        return target.writer(out, list(zip(refs, order)), ova_xml=xml, covered=covered)

    return make_writer, order, pieces


def _ova(archive: Archive, settings, target: Target, verify: bool):
    """(make_writer, disks in write order, pieces) of the OVA of the archive's VM: the
    disks as streamOptimized VMDKs named after the VM, in the order the source finishes
    them; the OVF lists them in slot order."""
    from ..settings.ovf import render

    stem = file_stem(settings.name)
    data_disks = [slot.disk for slot in settings.disks]
    names = {d.id: f"{stem}-disk{i}.vmdk" for i, d in enumerate(data_disks, 1)}
    ovf, lost = render(settings, [(names[d.id], d.size) for d in data_disks])
    settings.lost.extend(lost)
    rank = {d.id: i for i, d in enumerate(archive.stream_order())}
    order = sorted(data_disks, key=lambda d: rank.get(d.id, 1 << 30))
    pieces = archive.stream(order, Checks(), verify=verify)
    covered = None if archive.ordered else archive.covered

    def make_writer(out):
        return target.writer(
            out, [(names[d.id], d) for d in order], ovf=(f"{stem}.ovf", ovf), covered=covered
        )

    return make_writer, order, pieces


def _vma(
    archive: Archive,
    settings,
    target: Target,
    storage: str,
    bus: str,
    bridge: str | None,
    verify: bool,
):
    """(make_writer, disks, pieces) of the VMA of the archive's VM."""
    data_disks = [slot.disk for slot in settings.disks]
    if archive.format == "vma":
        # a re-pack keeps the configs and every device as they are (EFI and TPM state,
        # the memory state of a snapshot backup)
        data_disks = list(archive.disks) + [d for d, _ in archive.extra_streams()]
        configs = dict(archive.configs)
        names = [d.id for d in data_disks]
    else:
        conf, keys = proxmox.render(settings, bus, storage, target.vmid, bridge)
        configs = {"qemu-server.conf": conf.encode()}
        names = [f"drive-{k}" for k in keys]

    def make_writer(out):
        return target.writer(
            out, list(zip(names, data_disks)), configs=configs, ordered=archive.ordered
        )

    return make_writer, data_disks, archive.stream(data_disks, Checks(), verify=verify)


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
            # scan checked the structure (and raised on damage); VMA has no chunk sums
            view = MappedDisk(disk, store, maps[disk.id].finish(), archive.source.name)
            yield from view.stream(READ_STEP)
    finally:
        store.close()
