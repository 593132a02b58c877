"""extract: every disk (or the chosen ones) plus the VM's config files into a new
directory, in one pass. The directory appears only when everything is written."""

from __future__ import annotations

import os

from ..formats.raw import RawWriter
from ..io.output import OutputDir, writing
from ..model import Archive
from .damage import checks_for, report_path, summary, warn_elsewhere, write_report
from .progress import Progress


def extract(
    archive: Archive,
    directory: str,
    disks: list[str] | None = None,
    verify: bool = True,
    progress: bool = False,
    sync: bool = True,
    salvage: bool = False,
    report: str | None = None,
    stats: dict | None = None,
) -> dict[str, str]:
    """Returns {what: file name} for everything written. Damage is handled as by
    convert (ops/damage.py)."""
    chosen = [archive.select(s) for s in disks] if disks else list(archive.disks)
    chosen = list({d.id: d for d in chosen}.values())
    names = {d.id: archive.disk_filename(d) for d in chosen}
    if not disks:  # everything: the memory state too, as `vma extract` does
        for stream, fname in archive.extra_streams():
            chosen.append(stream)
            names[stream.id] = fname
    written: dict[str, str] = {}
    with writing(OutputDir(directory)) as target, Progress(archive.source, progress) as bar:
        writers = {}
        used = set()
        for d in chosen:
            fname = names[d.id]
            while fname in used:
                fname = f"{fname[:-4]}-{d.index}.raw"
            used.add(fname)
            writers[d.id] = RawWriter(target.file(fname), d.size)
            written[d.id] = fname
        checks = checks_for(chosen, salvage)
        copied = 0
        for disk, offset, data in archive.stream(chosen, checks, verify=verify):
            writers[disk.id].write(offset, data)
            copied += len(data)
            bar.update()
        if stats is not None:
            stats.update(data_bytes=copied, checks=checks)
        for name, blob in archive.configs.items():
            safe = os.path.basename(name)
            with open(target.join(safe), "wb") as f:
                f.write(blob)
            written[name] = safe
        for d in chosen:
            writers[d.id].finish()
            writers[d.id].out.commit(sync=sync)
        if salvage and checks.seen:
            report = report_path(directory, report)
            write_report(
                report,
                archive.source.name,
                {d.id: os.path.join(directory, written[d.id]) for d in chosen},
                checks,
            )
        target.commit()
    warn_elsewhere(checks, chosen)
    if checks.damage:
        raise summary(checks, report)
    return written
