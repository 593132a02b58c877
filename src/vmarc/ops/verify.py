"""verify: read everything once and check every checksum and structural rule."""

from __future__ import annotations

from ..errors import CorruptError
from ..model import Archive, Checks
from ..progress import Progress


def verify(archive: Archive, progress: bool = False) -> Checks:
    """Returns the Checks with every problem found; a structural problem that stops the
    pass is the last one listed (checks.stopped is then True)."""
    checks = Checks(collect=True)
    checks.stopped = False
    bar = Progress(archive.source, progress)
    try:
        for _ in archive.stream(None, checks, verify=True):
            bar.update()
    except CorruptError as e:
        checks.problems.append(e)
        checks.stopped = True
    finally:
        bar.close()
    return checks
