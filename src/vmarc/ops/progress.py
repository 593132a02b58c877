"""Progress on stderr (-p): bytes, rate and ETA, from how far the source has been read."""

from __future__ import annotations

import os
import sys
import time


class Progress:
    def __init__(self, source, enabled: bool, label: str = ""):
        self.source = source
        self.enabled = enabled and sys.stderr.isatty()
        self._raw = source._raw_file
        self._remote = source.remote  # an object at a URL: say what was fetched
        self._total = source.file_size if source.path or self._remote else None
        if self._total is None and source.path:
            try:
                self._total = os.path.getsize(source.path)
            except OSError:
                pass
        self._bar = None
        self._last = 0.0
        if not self.enabled:
            return
        try:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self._total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=label or source.name,
                file=sys.stderr,
                dynamic_ncols=True,
            )
        except ImportError:
            self._start = time.monotonic()

    def _position(self) -> int:
        try:
            return self._raw.tell()
        except Exception:
            return self.source.offset

    def update(self) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.2:
            return
        self._last = now
        pos = self._position()
        if self._bar is not None:
            if self._remote is not None:
                self._bar.set_postfix_str(f"fetched {self._remote.fetched / 2**20:.1f} MiB")
            self._bar.update(pos - self._bar.n)
            return
        rate = pos / max(now - self._start, 1e-6)
        text = f"\r{pos / 2**20:10.1f} MiB  {rate / 2**20:8.1f} MiB/s"
        if self._total:
            text += f"  {100 * pos / self._total:5.1f}%  ETA {(self._total - pos) / max(rate, 1):6.0f} s"
        if self._remote is not None:
            text += f"  fetched {self._remote.fetched / 2**20:.1f} MiB"
        sys.stderr.write(text)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._position() - self._bar.n)
            self._bar.close()
        else:
            sys.stderr.write("\n")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
