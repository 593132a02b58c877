"""The compressions vzdump and XenServer use (gzip, zstd, lzop): how each is found by its
magic and by an output name, read (decompressing readers that io/source.py wraps in its
read-ahead) and written (compressors behind io/output.StreamOutput)."""

from __future__ import annotations

import fcntl
import io
import os
import shutil
import subprocess
import threading

from ..errors import CorruptError, SourceError, TruncatedError, UnsupportedError, UsageError

MAGIC_GZIP = b"\x1f\x8b"
MAGIC_ZSTD = b"\x28\xb5\x2f\xfd"
MAGIC_LZOP = b"\x89LZO\x00\r\n\x1a\n"
PIPE_BLOCK = 1 << 20  # what the feeder thread hands a tool at a time

COMPRESSION_SUFFIXES = {".zst": "zstd", ".gz": "gzip", ".lzo": "lzop"}


def sniff_compression(head: bytes) -> str | None:
    if head.startswith(MAGIC_GZIP):
        return "gzip"
    if head.startswith(MAGIC_ZSTD):
        return "zstd"
    if head.startswith(MAGIC_LZOP):
        return "lzop"
    return None


def compression_for(path: str) -> str | None:
    """The compression an output name asks for (vzdump's names: .vma.zst, .vma.gz...)."""
    for suffix, kind in COMPRESSION_SUFFIXES.items():
        if path.lower().endswith(suffix):
            return kind
    return None


# -- reading --------------------------------------------------------------------------------
class _ZstdFrameCheck(io.RawIOBase):
    """Passes compressed bytes through while walking zstd frame and block headers.

    python-zstandard's stream reader returns a short stream, without error, when the
    input stops in the middle of a frame. Walking the headers as the bytes go by tells
    a complete stream from a cut one at the cost of one small parse per 128 KiB block.
    """

    def __init__(self, raw, name):
        self._raw = raw
        self._name = name
        self._need = 4  # bytes still needed by the current parse state
        self._state = "magic"
        self._hdr = b""  # partial header bytes being collected
        self._skip = 0  # payload bytes to pass through without parsing
        self._checksum = False
        self.consumed = 0

    def readable(self):
        return True

    def read(self, size=-1):
        # python-zstandard calls read(); answering it directly saves RawIOBase.read's
        # extra buffer and copy.
        data = self._raw.read(size)
        if not data:
            if self._state != "magic" or self._hdr or self._skip:
                raise TruncatedError(
                    f"{self._name}: zstd stream truncated at compressed "
                    f"offset {self.consumed} (inside a frame)"
                )
            return b""
        self._walk(memoryview(data))
        self.consumed += len(data)
        return data

    def readinto(self, view):
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def _walk(self, data: bytes):
        pos, end = 0, len(data)
        while pos < end:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
                continue
            take = min(self._need - len(self._hdr), end - pos)
            self._hdr += data[pos : pos + take]  # bytes + memoryview slice: a small copy
            pos += take
            if len(self._hdr) < self._need:
                return
            hdr, self._hdr = self._hdr, b""
            self._advance(hdr)

    def _advance(self, hdr: bytes):
        st = self._state
        if st == "magic":
            magic = int.from_bytes(hdr, "little")
            if magic == 0xFD2FB528:
                self._state, self._need = "fhd", 1
            elif magic & 0xFFFFFFF0 == 0x184D2A50:
                self._state, self._need = "skipsize", 4
            else:
                raise CorruptError(
                    f"{self._name}: zstd stream corrupt: no frame magic at "
                    f"compressed offset {self.consumed}"
                )
        elif st == "skipsize":
            self._skip = int.from_bytes(hdr, "little")
            self._state, self._need = "magic", 4
        elif st == "fhd":
            fhd = hdr[0]
            fcs_flag, single, did_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
            self._checksum = bool(fhd & 4)
            fcs = (1 if single else 0, 2, 4, 8)[fcs_flag]
            rest = (0 if single else 1) + (0, 1, 2, 4)[did_flag] + fcs
            self._state = "block"
            self._need = 3
            self._skip = rest
        elif st == "block":
            bh = int.from_bytes(hdr, "little")
            last, btype, bsize = bh & 1, (bh >> 1) & 3, bh >> 3
            self._skip = 1 if btype == 1 else bsize
            if last:
                if self._checksum:
                    self._skip += 4
                self._state, self._need = "magic", 4
            else:
                self._need = 3


class _ProcessReader(io.RawIOBase):
    """Decompression by the format's own command-line tool in a separate process (lzop,
    which has no maintained Python binding, and zstd when python-zstandard is missing).
    The tool's exit status is checked at the end of its output, so a truncated or
    corrupt stream is an error, never a short disk.
    """

    def __init__(self, argv, raw, name, compression, regular_file: bool):
        self._name = name
        self._compression = compression
        self._pump = None
        try:
            self._proc = subprocess.Popen(
                argv,
                stdin=raw.fileno() if regular_file else subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                bufsize=0,
            )
        except OSError as e:
            raise SourceError(f"{name}: cannot start {argv[0]}: {e.strerror}") from None
        try:
            fcntl.fcntl(self._proc.stdout.fileno(), 1031, 1 << 20)  # F_SETPIPE_SZ: fewer reads
        except OSError:
            pass
        if not regular_file:  # a pipe we already read the magic from: replay it
            self._pump = threading.Thread(target=self._feed, args=(raw,), daemon=True)
            self._pump.start()

    def _feed(self, raw):
        dst = self._proc.stdin
        try:
            while True:
                block = raw.read(PIPE_BLOCK)
                if not block:
                    break
                dst.write(block)
        except (BrokenPipeError, ValueError, OSError):
            pass
        finally:
            try:
                dst.close()
            except OSError:
                pass

    def readable(self):
        return True

    def readinto(self, view):
        n = self._proc.stdout.readinto(view)
        if n:
            return n
        rc = self._proc.wait()
        if rc != 0:
            text = self._proc.stderr.read().decode(errors="replace").strip()
            last = text.splitlines()[-1] if text else f"exit status {rc}"
            last = last.replace("/*stdin*\\", "").strip(": ")
            kind = (
                TruncatedError
                if (
                    "end of file" in last
                    or "truncated" in last.lower()
                    or "premature" in last.lower()
                )
                else CorruptError
            )
            raise kind(
                f"{self._name}: {self._compression} stream "
                f"{'truncated' if kind is TruncatedError else 'corrupt'}: {last}"
            )
        return 0

    def close(self):
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        for f in (self._proc.stdout, self._proc.stderr):
            f.close()
        super().close()


def _open_gzip(raw, name, regular_file):
    try:
        from isal import igzip  # ISA-L: at par with `igzip -dc` (bench/)

        return igzip.IGzipFile(fileobj=raw, mode="rb")
    except ImportError:  # stdlib fallback: same format, slower
        import gzip

        return gzip.GzipFile(fileobj=raw, mode="rb")


def zstd_window_log() -> int:
    """The largest zstd window read: 128 MiB, as the zstd tool (vzdump writes no larger);
    VMARC_ZSTD_LONG=1 allows 2 GiB (archives made with zstd --long=31)."""
    return 31 if os.environ.get("VMARC_ZSTD_LONG") == "1" else 27


def _open_zstd(raw, name, regular_file):
    # In-process decompression into the prefetch ring beats the zstd tool behind a pipe
    # (bench/: the pipe costs two copies of every byte on a two-core machine).
    try:
        import zstandard
    except ImportError:
        zstandard = None
    if zstandard is not None:
        checked = _ZstdFrameCheck(raw, name)
        # Compressed reads stay under glibc's mmap threshold (128 KiB): larger fresh
        # buffers are mapped and unmapped on every read, which doubled the time (bench/).
        reader = zstandard.ZstdDecompressor(max_window_size=1 << zstd_window_log()).stream_reader(
            checked, read_size=64 << 10, read_across_frames=True
        )
        return reader
    tool = shutil.which("zstd")
    if tool:
        # --long=31 windows need the memory limit raised to be read at all.
        return _ProcessReader(
            [tool, "-dcq", "--no-progress", f"--memory={1 << (zstd_window_log() - 20)}MB"],
            raw,
            name,
            "zstd",
            regular_file,
        )
    raise UnsupportedError(
        f"{name}: zstd-compressed input needs the zstandard package "
        "(pip install 'vmarc[zstd]') or the zstd tool"
    )


def _open_lzop(raw, name, regular_file):
    tool = shutil.which("lzop")
    if not tool:
        raise UnsupportedError(
            f"{name}: lzop-compressed input needs the lzop tool (apt-get install lzop)"
        )
    return _ProcessReader([tool, "-dc", "-q"], raw, name, "lzop", regular_file)


DECOMPRESSORS = {"gzip": _open_gzip, "zstd": _open_zstd, "lzop": _open_lzop}


# -- writing --------------------------------------------------------------------------------
def open_compressor(kind: str, fd: int, path: str):
    """(file object, None) for an in-process compressor (gzip with ISA-L on threads), or
    (None, process) for a tool in its own process writing to fd (zstd on every core, the
    way vzdump runs it; lzop)."""
    if kind == "gzip":
        raw = io.FileIO(fd, "wb", closefd=False)
        try:
            from isal import igzip_threaded

            return igzip_threaded.open(raw, "wb", threads=-1), None
        except ImportError:
            import gzip

            return gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6), None
    argv = {"zstd": ["zstd", "-q", "-c", "-T0"], "lzop": ["lzop", "-q", "-c"]}.get(kind)
    if argv is None:
        raise UsageError(f"unknown output compression {kind!r}")
    tool = shutil.which(argv[0])
    if tool is None:
        raise UnsupportedError(
            f"{path}: {kind} output needs the {argv[0]} tool (apt-get install {argv[0]})"
        )
    proc = subprocess.Popen(
        [tool, *argv[1:]], stdin=subprocess.PIPE, stdout=fd, stderr=subprocess.PIPE, bufsize=0
    )
    return None, proc
