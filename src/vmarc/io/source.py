"""Opening inputs: paths or stdin, compression detected by magic, one sequential pass.

A Source hands out the *decompressed* bytes of an input in order and keeps the offset
reached, so every refusal can say where it happened. Compressed inputs are decompressed
on a background thread (isal's threaded gzip, or our read-ahead for zstd) so that
decompression overlaps the checksum and write work of the main thread.
"""

from __future__ import annotations

import errno
import io
import os
import queue
import stat
import sys
import tempfile
import threading

from ..errors import CorruptError, SourceError, TruncatedError, UnsupportedError, VmarcError
from ..notices import notice
from .codecs import DECOMPRESSORS, MAGIC_LZOP, sniff_compression
from .remote import NoRanges, RemoteFile, is_url, open_stream

BLOCK = 1 << 20  # read size for decompressors and read-ahead


def describe(path) -> str:
    return "stdin" if path in ("-", None) else os.fspath(path)


class Source:
    """Sequential reader over an input's decompressed bytes."""

    def __init__(
        self,
        stream,
        *,
        name: str,
        compression: str | None,
        path=None,
        file_size: int | None = None,
        raw_file=None,
    ):
        self._stream = stream  # has readinto(memoryview) -> int
        self._pending = b""  # bytes peeked but not consumed yet
        self._raw_file = raw_file  # the underlying file object (for close / seek)
        # an object at a URL (io/remote.py): read at random by its own pread
        self.remote = raw_file if isinstance(raw_file, RemoteFile) else None
        self.name = name
        self.compression = compression  # None, "gzip", "zstd", "lzop"
        self.path = path  # a filesystem path, or None for stdin / streams
        self.file_size = file_size  # size of the file on disk, when it is a regular file
        self.offset = 0  # decompressed bytes consumed so far
        self.pread_bytes = 0  # bytes read at random (pread), for summaries
        self._scratch = None
        # Plain regular files can skip data by seeking instead of reading it.
        self.seekable = compression is None and file_size is not None
        self._ahead = None  # the _Prefetch reading a plain file ahead, if any

    def read_ahead(self) -> None:
        """Announce a sequential pass: a plain file is then read ahead on a thread (pipes
        and decompressors always are). Random-access readers never call this."""
        if self.seekable and self._ahead is None and self._raw_file is not None:
            self._stream = self._ahead = _Prefetch(self._raw_file)

    def take_view(self, n: int) -> memoryview | None:
        """The next n bytes without a copy, as a view of the read-ahead buffer holding
        them (a plain file read ahead, or a decompressor's output), when they lie inside
        one buffer; else None.
        The view stays valid until release_views()."""
        if not isinstance(self._stream, _Prefetch) or self._pending:
            return None
        view = self._stream.view(n)
        if view is not None:
            self.offset += n
        return view

    def release_views(self) -> None:
        if isinstance(self._stream, _Prefetch):
            self._stream.release()

    # -- reading ---------------------------------------------------------------------
    def _readinto(self, view: memoryview) -> int:
        if self._pending:
            n = min(len(view), len(self._pending))
            view[:n] = self._pending[:n]
            self._pending = self._pending[n:]
            return n
        return self._stream_read(view)

    def _stream_read(self, view: memoryview) -> int:
        """One read from the (decompressing) stream, its errors turned into ours."""
        try:
            return self._stream.readinto(view) or 0
        except VmarcError:  # already ours: damage, or an input that failed (a URL)
            raise
        except EOFError as e:  # isal/gzip: stream ended before its end marker
            raise TruncatedError(
                f"{self.name}: {self.compression} stream truncated near "
                f"decompressed offset {self.offset}: {e}"
            ) from None
        except OSError as e:
            # a decompressor reports bad data as OSError without errno; an errno is the
            # system's (EIO, ...): the input could not be read, which is not damage
            if self.compression and not e.errno:
                raise CorruptError(
                    f"{self.name}: {self.compression} data corrupt near "
                    f"decompressed offset {self.offset}: {e}"
                ) from None
            raise SourceError(
                f"{self.name}: read error at offset {self.offset}: {e.strerror or e}"
            ) from None
        except Exception as e:  # decompressor errors (zstd.ZstdError, zlib.error...)
            if "window" in str(e).lower() or "too much memory" in str(e).lower():
                raise UnsupportedError(
                    f"{self.name}: a zstd frame needs a window over 128 MiB (made with "
                    "zstd --long?); the zstd tool refuses it too; VMARC_ZSTD_LONG=1 reads "
                    "it"
                ) from None
            raise CorruptError(
                f"{self.name}: {self.compression or 'data'} corrupt near "
                f"decompressed offset {self.offset}: {e}"
            ) from None

    def readinto_upto(self, view: memoryview) -> int:
        """Fill as much of view as the input still has; returns the count (short at EOF)."""
        got = 0
        total = len(view)
        while got < total:
            n = self._readinto(view[got:])
            if n == 0:
                break
            got += n
        self.offset += got
        return got

    def readinto_exact(self, view: memoryview, what: str) -> None:
        start = self.offset
        got = self.readinto_upto(view)
        if got < len(view):
            raise TruncatedError(
                f"{self.name}: truncated in {what} at offset {start}: "
                f"input ends after {got} of {len(view)} bytes"
            )

    def read_exact(self, n: int, what: str) -> bytes:
        buf = bytearray(n)
        self.readinto_exact(memoryview(buf), what)
        return bytes(buf)

    def read_upto(self, n: int) -> bytes:
        buf = bytearray(n)
        got = self.readinto_upto(memoryview(buf))
        return bytes(buf[:got])

    def peek(self, n: int) -> bytes:
        """Up to n bytes from the current position, without consuming them."""
        while len(self._pending) < n:
            buf = bytearray(n - len(self._pending))
            got = self._stream_read(memoryview(buf))
            if got == 0:
                break
            self._pending += bytes(buf[:got])
        return self._pending[:n]

    def skip(self, n: int, what: str) -> None:
        """Consume n bytes; seeks over them on a plain file, reads them otherwise."""
        if n <= 0:
            return
        # Seek over long stretches of a plain file; when reading ahead, only stretches
        # long enough to be worth restarting the read-ahead thread.
        if self.seekable and not self._pending and n > (4 * BLOCK if self._ahead else 65536):
            if self.offset + n > self.file_size:
                raise TruncatedError(
                    f"{self.name}: truncated in {what} at offset {self.offset}: "
                    f"{n} bytes needed, file has {self.file_size - self.offset}"
                )
            ahead = self._ahead is not None
            if ahead:
                self._ahead.stop()
                self._stream = self._raw_file
                self._ahead = None
            self._raw_file.seek(self.offset + n)
            self.offset += n
            if ahead:
                self.read_ahead()
            return
        if self._scratch is None:
            self._scratch = memoryview(bytearray(BLOCK))
        left = n
        while left:
            step = min(left, BLOCK)
            self.readinto_exact(self._scratch[:step], what)
            left -= step

    def pread(self, n: int, offset: int, what: str) -> bytes:
        """n bytes at a file offset (plain files only; the stream position is unchanged)."""
        if not self.seekable:
            raise UnsupportedError(
                f"{self.name}: {what} needs random access; give a file, "
                "not a pipe or a compressed file"
            )
        try:
            if self.remote is not None:
                data = self.remote.pread(n, offset)
            else:
                data = os.pread(self._raw_file.fileno(), n, offset)
        except OSError as e:
            raise SourceError(f"{self.name}: read error at offset {offset}: {e.strerror}") from None
        self.pread_bytes += len(data)
        if len(data) < n:
            raise TruncatedError(
                f"{self.name}: truncated in {what} at offset {offset}: file "
                f"ends after {len(data)} of {n} bytes"
            )
        return data

    def preadinto(self, view: memoryview, offset: int, what: str) -> None:
        if self.remote is not None:
            view[:] = self.pread(len(view), offset, what)
            return
        got = 0
        fd = self._raw_file.fileno()
        while got < len(view):
            try:
                n = os.preadv(fd, [view[got:]], offset + got)
            except OSError as e:
                raise SourceError(
                    f"{self.name}: read error at offset {offset + got}: {e.strerror}"
                ) from None
            if n == 0:
                raise TruncatedError(
                    f"{self.name}: truncated in {what} at offset {offset}: "
                    f"file ends after {got} of {len(view)} bytes"
                )
            got += n
            self.pread_bytes += n

    def data_extent(self, pos: int) -> tuple[int | None, float]:
        """(start, end) of the next stretch at or after pos that may hold data; start is
        None when only a hole follows. Plain files answer with SEEK_DATA / SEEK_HOLE (the
        file position is put back); anything else is all data."""
        if self._ahead is not None:
            return pos, float("inf")  # reading ahead: the file position is not ours
        if self.seekable and self._pending and pos == self.offset:
            # drop the peeked bytes and seek back: reads then stay aligned to pos
            self._raw_file.seek(pos)
            self._pending = b""
        if not self.seekable or self._pending or pos != self.offset or self.remote is not None:
            return pos, float("inf") if not self._pending else pos + len(self._pending)
        fd = self._raw_file.fileno()
        try:
            return next_data(fd, pos)
        finally:
            os.lseek(fd, pos, os.SEEK_SET)

    def next_data(self, pos: int) -> tuple[int | None, float]:
        """next_data() of the plain file at any position (the stream position is kept):
        where the file's next data starts and ends; all data for an object at a URL."""
        if self.remote is not None:
            return pos, float("inf")
        return next_data(self._raw_file.fileno(), pos)

    def drain(self) -> int:
        """Read to the end (lets a decompressor check its trailer); returns bytes read."""
        total = 0
        if self._scratch is None:
            self._scratch = memoryview(bytearray(BLOCK))
        while True:
            n = self.readinto_upto(self._scratch)
            if not n:
                return total
            total += n

    def close(self) -> None:
        for obj in (self._stream, self._raw_file):
            if obj is not None:
                try:
                    obj.close()
                except Exception:
                    pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def next_data(fd: int, pos: int) -> tuple[int | None, float]:
    """(start, end) of the next stretch of a file at or after pos that may hold data,
    by SEEK_DATA / SEEK_HOLE (moves the file position); start is None when only a hole
    follows, end is infinite where the file system cannot tell."""
    try:
        start = os.lseek(fd, pos, os.SEEK_DATA)
        return start, os.lseek(fd, start, os.SEEK_HOLE)
    except OSError as e:
        if e.errno == errno.ENXIO:  # nothing but a hole up to the end
            return None, pos
        return pos, float("inf")  # no SEEK_DATA here: read everything


class _Prefixed(io.RawIOBase):
    """A raw stream that first replays bytes already read from it (sniffing a pipe)."""

    def __init__(self, prefix: bytes, raw):
        self._prefix = prefix
        self._raw = raw

    def readable(self):
        return True

    def readinto(self, view):
        if self._prefix:
            n = min(len(view), len(self._prefix))
            view[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        return self._raw.readinto(view)


class _Prefetch(io.RawIOBase):
    """Reads ahead of the consumer on a thread, into a ring of reusable buffers.

    The thread runs the blocking reads (file reads, decompression: all of them release
    the GIL) while the main thread hashes and writes the previous blocks; buffers are
    allocated once and recycled, since fresh 1 MiB objects per read cost page faults
    that showed in bench/ (zstd XVA -> raw took twice as long).
    """

    # 4 MiB buffers: most 1 MiB XVA chunks then lie inside one (view())
    def __init__(self, reader, count: int = 8, size: int = 4 * BLOCK):
        self._reader = reader  # has readinto(view) and close()
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        self._full: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(count):
            self._free.put(bytearray(size))
        self._buf = None  # the buffer being consumed, its fill and read position
        self._fill = self._pos = 0
        self._holding = False  # a view() is out: finished buffers wait in _held
        self._held: list = []
        self._done = False
        self._stop = False
        self._thread = threading.Thread(target=self._pump, name="vmarc-prefetch", daemon=True)
        self._thread.start()

    def _pump(self):
        try:
            while True:
                buf = self._free.get()
                if buf is None or self._stop:
                    return
                view = memoryview(buf)
                got = 0
                while got < len(buf):
                    n = self._reader.readinto(view[got:])
                    if not n:
                        break
                    got += n
                self._full.put((buf, got))
                if got < len(buf):  # end of input
                    self._full.put(None)
                    return
        except BaseException as e:  # handed to the consumer, raised there
            self._full.put(e)

    def readable(self):
        return True

    def _next_buffer(self) -> bool:
        """Move to the next filled buffer; False at the end of the input."""
        if self._done:
            return False
        if self._buf is not None:
            if self._holding:
                self._held.append(self._buf)
            else:
                self._free.put(self._buf)
            self._buf = None
        item = self._full.get()
        if item is None or isinstance(item, BaseException):
            self._done = True
            if item is None:
                return False
            raise item
        self._buf, self._fill = item
        self._pos = 0
        return True

    def view(self, n: int) -> memoryview | None:
        """The next n bytes as a view of the buffer they were read into, consumed, when
        they lie inside one buffer; else None (read them with readinto). The buffer is
        not refilled before release()."""
        if self._pos == self._fill and not self._next_buffer():
            return None
        if self._fill - self._pos < n:
            return None
        view = memoryview(self._buf)[self._pos : self._pos + n]
        self._pos += n
        self._holding = True
        return view

    def release(self) -> None:
        """The views handed out are no longer used: their buffers may be refilled."""
        self._holding = False
        for buf in self._held:
            self._free.put(buf)
        self._held.clear()

    def readinto(self, view):
        if self._pos == self._fill and not self._next_buffer():
            return 0
        n = min(len(view), self._fill - self._pos)
        view[:n] = memoryview(self._buf)[self._pos : self._pos + n]
        self._pos += n
        return n

    def stop(self, timeout: float = 5) -> None:
        """End the thread; the underlying reader may then be used (or closed) again."""
        self._stop = True
        self._free.put(None)
        self._thread.join(timeout)  # a pipe read may block; the thread is a daemon

    def close(self):
        self.stop(timeout=1)
        if not self._thread.is_alive():  # never close a reader another thread is inside
            try:
                self._reader.close()
            except Exception:
                pass
        super().close()


def open_source(src, *, name: str | None = None) -> Source:
    """Open a path, "-" (stdin) or a binary file object, decompressing by magic."""
    file_size = None
    path = None
    if src == "-" or src is None:
        raw = io.FileIO(sys.stdin.fileno(), "rb", closefd=False)
        name = name or "stdin"
    elif is_url(src):  # read in place by range requests
        name = name or src
        try:
            raw = RemoteFile(src)
            file_size = raw.size
        except NoRanges:
            notice(f"{src}: the server does not serve byte ranges; reading it as a stream")
            raw = open_stream(src)
    elif isinstance(src, (str, bytes, os.PathLike)):
        path = os.fspath(src)
        name = name or describe(path)
        try:
            raw = io.FileIO(path, "rb")
        except OSError as e:
            raise SourceError(f"{name}: cannot open: {e.strerror}") from None
        st = os.fstat(raw.fileno())
        if stat.S_ISDIR(st.st_mode):
            raw.close()
            raise SourceError(f"{name}: is a directory")
        if stat.S_ISREG(st.st_mode):
            file_size = st.st_size
        elif stat.S_ISBLK(st.st_mode):  # a disk device: seekable, its size from the end
            file_size = os.lseek(raw.fileno(), 0, os.SEEK_END)
            os.lseek(raw.fileno(), 0, os.SEEK_SET)
    else:
        raw = src
        if not name:
            try:  # a file object's name, when it has one
                name = str(src.name)
            except AttributeError:
                name = "stream"

    # Sniff the first bytes; a pipe cannot be rewound, so replay them.
    head = bytearray()
    while len(head) < len(MAGIC_LZOP):
        chunk = raw.read(len(MAGIC_LZOP) - len(head))
        if not chunk:
            break
        head += chunk
    head = bytes(head)
    compression = sniff_compression(head)
    if file_size is not None:
        raw.seek(0)
        stream = raw
    else:
        stream = _Prefixed(head, raw)
    if compression:
        stream = DECOMPRESSORS[compression](stream, name, file_size is not None)
        if not isinstance(raw, RemoteFile):  # (a URL's bytes are fetched ahead already;
            stream = _Prefetch(stream)  # decompressing ahead would fetch what no one reads)
    elif file_size is None:  # a plain pipe: always read ahead (see Source.read_ahead)
        stream = _Prefetch(stream)
    return Source(
        stream, name=name, compression=compression, path=path, file_size=file_size, raw_file=raw
    )


def as_file(source: Source, why: str) -> Source:
    """What is left of a source that cannot seek (a pipe, a compressed file), copied to a
    sparse temporary file and opened as a plain file, for readers that need random
    access (qcow2, a fixed or differencing VHD, raw of unknown size). Said on stderr."""
    from ..model import data_runs
    from .output import pwrite_all, temp_writes

    notice(f"{source.name}: {why}; copying it to a temporary file in {tempfile.gettempdir()} first")
    with temp_writes():
        fd, path = tempfile.mkstemp(prefix="vmarc-input-")
    try:
        buf = memoryview(bytearray(4 * BLOCK))
        pos = 0
        while n := source.readinto_upto(buf):
            for a, b in data_runs(buf[:n], pos, BLOCK):
                with temp_writes():
                    pwrite_all(fd, buf[a:b], pos + a)
            pos += n
        with temp_writes():
            os.ftruncate(fd, pos)
        copy = open_source(path, name=source.name)
    finally:
        os.close(fd)
        os.unlink(path)  # gone when the copy is closed
    source.close()
    copy.path = None  # names no file: relative backing files are not looked up beside it
    return copy
