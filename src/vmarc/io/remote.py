"""Archives and images at a URL (http://, https://, s3://), read in place by range
requests through fsspec (aiohttp for HTTP, s3fs for S3; the `remote` extra). Credentials
come from the usual places (AWS_* variables, ~/.aws, AWS_ENDPOINT_URL for an
S3-compatible server).

The object is read in blocks of 4 KiB kept in a bounded cache (64 MiB): a read fetches
the blocks it misses in one request, a read that continues the previous one fetches
ahead (doubling up to 8 MiB), and nothing is fetched twice while it stays cached. A
header scan that seeks over data (an XVA's tar headers) so costs 4 KiB a header. A failed request is
retried with backoff; one that keeps failing is one clear error, never wrong bytes.
"""

from __future__ import annotations

import io
import time
from collections import OrderedDict

from ..errors import SourceError, UnsupportedError

SCHEMES = ("http://", "https://", "s3://")
BLOCK = 4 << 10
CACHE_BLOCKS = 16384  # 64 MiB at most
AHEAD_MAX = 2048  # blocks fetched ahead of a sequential reader (8 MiB)
RETRIES = (0.5, 1.0, 2.0, 4.0)


def is_url(src) -> bool:
    return isinstance(src, str) and src.startswith(SCHEMES)


def _fs(url: str):
    try:
        import fsspec
    except ImportError:
        raise UnsupportedError(
            f"{url}: reading from a URL needs fsspec (pip install 'vmarc[remote]')"
        ) from None
    # a server that stops answering is an error after a while, not a hang
    if url.startswith("s3://"):
        options = {"config_kwargs": {"connect_timeout": 20, "read_timeout": 60}}
    else:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, connect=20, sock_connect=20, sock_read=60)
        options = {"client_kwargs": {"timeout": timeout}}
    try:
        return fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as e:
        raise UnsupportedError(f"{url}: {e} (pip install 'vmarc[remote]')") from None


class NoRanges(UnsupportedError):
    """The server sends whole objects only: read it as a stream instead."""


def open_stream(url: str):
    """A URL whose server serves no ranges, as a stream read once front to back."""
    fs, key = _fs(url)
    try:
        return fs.open(key, "rb", block_size=0)  # fsspec's streaming file
    except FileNotFoundError:
        raise SourceError(f"{url}: not found") from None
    except Exception as e:
        raise SourceError(f"{url}: cannot open: {type(e).__name__}: {e}") from None


class RemoteFile(io.RawIOBase):
    """One object at a URL as a read-only, seekable file with pread."""

    def __init__(self, url: str):
        super().__init__()
        self.url = url
        self.fs, self.key = _fs(url)
        info = self._retry(lambda: self.fs.info(self.key), 0, "the object's size")
        size = info.get("size")
        if size is None:
            raise UnsupportedError(f"{url}: the server gives no size; ranges cannot be read")
        self.size = int(size)
        self.fetched = 0  # bytes received, for --progress and the tests
        self.requests = 0
        if self.size:  # one byte asked for must come back as one byte
            probe = self._retry(lambda: self.fs.cat_file(self.key, 0, 1), 0, "the first byte")
            if len(probe) != 1:
                raise NoRanges(f"{url}: the server does not serve byte ranges")
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._pos = 0
        self._last_end = -1
        self._ahead = 1

    # -- fetching ------------------------------------------------------------------------
    def _retry(self, call, offset: int, what: str):
        for pause in (*RETRIES, None):
            try:
                return call()
            except FileNotFoundError:
                raise SourceError(f"{self.url}: not found") from None
            except PermissionError as e:
                raise SourceError(f"{self.url}: access denied: {e}") from None
            except Exception as e:  # connection reset, timeout, 5xx: worth another try
                if pause is None:
                    raise SourceError(
                        f"{self.url}: reading {what} at offset {offset} failed after "
                        f"{len(RETRIES) + 1} tries: {type(e).__name__}: {e}"
                    ) from None
                time.sleep(pause)

    def _fetch(self, first: int, last: int) -> None:
        """Blocks first..last (inclusive) into the cache, in one request."""
        start, end = first * BLOCK, min((last + 1) * BLOCK, self.size)
        data = self._retry(lambda: self.fs.cat_file(self.key, start, end), start, "data")
        if len(data) != end - start:
            raise SourceError(
                f"{self.url}: asked for bytes {start}-{end}, got {len(data)}: the server does "
                "not serve ranges, or the object changed"
            )
        self.fetched += len(data)
        self.requests += 1
        for i in range(first, last + 1):
            self._cache[i] = data[(i - first) * BLOCK : (i - first + 1) * BLOCK]
            self._cache.move_to_end(i)
        while len(self._cache) > CACHE_BLOCKS:
            self._cache.popitem(last=False)

    def pread(self, n: int, offset: int) -> bytes:
        """Up to n bytes at offset (fewer at the end of the object)."""
        n = max(0, min(n, self.size - offset))
        if not n:
            return b""
        first, last = offset // BLOCK, (offset + n - 1) // BLOCK
        sequential = offset == self._last_end
        self._ahead = min(AHEAD_MAX, self._ahead * 2) if sequential else 1
        i = first
        while i <= last:
            if i in self._cache:
                self._cache.move_to_end(i)
                i += 1
                continue
            j = i
            while j + 1 <= last and j + 1 not in self._cache:
                j += 1
            if j == last and sequential:  # read ahead of a reader going forwards
                j = min(last + self._ahead, (self.size - 1) // BLOCK)
            self._fetch(i, j)
            i = j + 1
        out = b"".join(self._cache[k] for k in range(first, last + 1))
        at = offset - first * BLOCK
        self._last_end = offset + n
        return out[at : at + n]

    # -- io.RawIOBase: the sequential pass -------------------------------------------------
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, view) -> int:
        data = self.pread(len(view), self._pos)
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def fileno(self) -> int:
        raise io.UnsupportedOperation(f"{self.url} is not a local file")
