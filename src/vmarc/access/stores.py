"""Stores: where an index's runs are read from (a plain file, or the decompressed bytes of
a gzip file through rapidgzip's seek checkpoints)."""

from __future__ import annotations

import os
import threading

from ..errors import SourceError
from ..io.source import Source


class FileStore:
    """A plain file read with pread (thread-safe by nature)."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise SourceError(f"{path}: cannot open: {e.strerror}") from None

    def pread(self, n: int, offset: int) -> bytes:
        data = os.pread(self.fd, n, offset)
        while len(data) < n:  # short reads happen on some file systems
            more = os.pread(self.fd, n - len(data), offset + len(data))
            if not more:
                raise SourceError(
                    f"{self.path}: file ends at offset {offset + len(data)}, "
                    "inside data the index points at (changed since indexed?)"
                )
            data += more
        return data

    def close(self) -> None:
        os.close(self.fd)


class RemoteStore:
    """An object at a URL read by range requests (io/remote.py), its own connection and
    cache; reads are serialised (one fetch at a time per store)."""

    def __init__(self, url: str):
        import threading

        from ..io.remote import RemoteFile

        self.path = url
        self.file = RemoteFile(url)
        self._lock = threading.Lock()

    def pread(self, n: int, offset: int) -> bytes:
        with self._lock:
            data = self.file.pread(n, offset)
        if len(data) < n:
            raise SourceError(
                f"{self.path}: ends at offset {offset + len(data)}, inside data the index "
                "points at (changed since indexed?)"
            )
        return data

    def close(self) -> None:
        self.file.close()


def open_store(path: str):
    """The plain bytes of an archive, by path or URL."""
    from ..io.remote import is_url

    return RemoteStore(path) if is_url(path) else FileStore(path)


class GzipStore:
    """The decompressed bytes of a gzip file, read through rapidgzip's seek checkpoints:
    a read decompresses from the nearest checkpoint only."""

    def __init__(self, path: str, gz_index: str | None):
        import rapidgzip

        from ..io.remote import RemoteFile, is_url

        self.path = path
        self._lock = threading.Lock()

        def opened():
            if is_url(path):  # through our range reads; one thread reads it once (several
                return rapidgzip.RapidgzipFile(RemoteFile(path), parallelization=1)  # twice)
            return rapidgzip.RapidgzipFile(path, parallelization=os.cpu_count() or 1)

        self.file = opened()
        if gz_index and os.path.exists(gz_index):
            try:
                self.file.import_index(gz_index)
            except Exception:  # stale or damaged: build it again
                self.file.close()
                self.file = opened()

    def export_checkpoints(self, path: str) -> None:
        """gztool's format keeps each checkpoint's 32 KiB window sparse and compressed:
        ~1 KiB a checkpoint instead of ~20, on disk and again in memory once imported
        (17 MiB against 40 MiB for a 4 GiB disk), so a mount of a large .gz stays small."""
        import rapidgzip

        self.file.export_index(path, rapidgzip.IndexFormat.GZTOOL)  # rapidgzip >= 0.16

    def pread(self, n: int, offset: int) -> bytes:
        with self._lock:
            self.file.seek(offset)
            data = self.file.read(n)
        if len(data) < n:
            raise SourceError(
                f"{self.path}: decompressed data ends at offset "
                f"{offset + len(data)}, inside data the index points at"
            )
        return data

    def source(self, name: str) -> Source:
        """A Source over the decompressed bytes, for the header scan: seekable for a local
        file; front to back for one at a URL (its size is known only by decompressing
        everything, which the scan does once anyway: seeking to the end first would
        fetch the whole object twice)."""
        from ..io.remote import is_url

        size = None
        if not is_url(self.path):
            size = self.file.seek(0, os.SEEK_END)
            self.file.seek(0)
        lent = _Unclosed(self.file)
        return Source(
            lent, name=name, compression=None, path=self.path, file_size=size, raw_file=lent
        )

    def close(self) -> None:
        self.file.close()


class _Unclosed:
    """Lends a file to a Source (what a header scan calls) without letting it close it."""

    def __init__(self, f):
        self._f = f

    def read(self, n: int = -1) -> bytes:
        return self._f.read(n)

    def readinto(self, view) -> int:
        return self._f.readinto(view)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        pass  # the store closes it
