"""Output files that appear only when complete.

Data goes to a hidden temporary name beside the target; commit() fsyncs and renames it
into place, and any error or Ctrl-C before that removes it. Nothing half-written stays.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile

from .errors import SourceError, UnsupportedError, UsageError
from .model import ZERO_CHUNK


def write_all(fd: int, data) -> None:
    """os.write until every byte is out (pipes and stdout take partial writes)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def write_zeros(fd: int, count: int) -> None:
    """count zero bytes to a stream (holes cannot be made on a pipe)."""
    zeros = memoryview(ZERO_CHUNK)
    while count > 0:
        step = min(count, len(zeros))
        write_all(fd, zeros[:step])
        count -= step


def _tmp_name(target: str) -> str:
    d, base = os.path.split(os.path.abspath(target))
    return os.path.join(d, f".{base}.vmarc-{os.getpid()}-{os.urandom(3).hex()}")


class OutputFile:
    """A file being written; stdout when path is "-" (then nothing can be taken back)."""

    def __init__(self, path: str, *, overwrite: bool = True):
        self.path = path
        self.is_stdout = path == "-"
        if self.is_stdout:
            self.fd = sys.stdout.fileno()
            self.tmp = None
            return
        if os.path.isdir(path):
            raise UsageError(f"{path}: is a directory")
        if not overwrite and os.path.lexists(path):
            raise UsageError(f"{path}: already exists")
        self.tmp = _tmp_name(path)
        try:
            # read-write: the qcow2 writer reads back tables it wrote
            self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as e:
            raise SourceError(f"{path}: cannot create: {e.strerror}") from None

    def commit(self, sync: bool = True) -> None:
        if self.is_stdout:
            return
        try:
            if sync:
                os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            os.rename(self.tmp, self.path)
            self.tmp = None
        except OSError as e:
            self.abort()
            raise SourceError(f"{self.path}: cannot finish writing: {e.strerror}") from None

    def abort(self) -> None:
        if self.is_stdout:
            return
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.tmp:
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass
            self.tmp = None


class OutputDir:
    """A new directory filled under a temporary name, renamed into place at the end."""

    def __init__(self, path: str):
        self.path = path
        if os.path.lexists(path):
            raise UsageError(f"{path}: already exists (extract writes a new directory)")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise UsageError(f"{path}: parent directory does not exist")
        self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.vmarc-", dir=parent)

    def join(self, name: str) -> str:
        return os.path.join(self.tmp, name)

    def commit(self) -> None:
        os.rename(self.tmp, self.path)
        self.tmp = None

    def abort(self) -> None:
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


COMPRESSION_SUFFIXES = {".zst": "zstd", ".gz": "gzip", ".lzo": "lzop"}


def compression_for(path: str) -> str | None:
    """The compression an output name asks for (vzdump's names: .vma.zst, .vma.gz...)."""
    for suffix, kind in COMPRESSION_SUFFIXES.items():
        if path.lower().endswith(suffix):
            return kind
    return None


class StreamOutput:
    """A byte stream written front to back into an OutputFile, optionally through a
    compressor: the zstd and lzop tools in their own processes (zstd on every core,
    the way vzdump runs it), gzip with ISA-L on threads."""

    def __init__(self, path: str, compression: str | None = None):
        self.file = OutputFile(path)
        self.compression = compression
        self.path = path
        self._proc = None
        self._writer = None    # a file object for in-process compressors
        self._fd = self.file.fd
        try:
            if compression in ("zstd", "lzop"):
                self._start_tool(compression)
            elif compression == "gzip":
                raw = io.FileIO(self.file.fd, "wb", closefd=False)
                try:
                    from isal import igzip_threaded
                    self._writer = igzip_threaded.open(raw, "wb", threads=-1)
                except ImportError:
                    import gzip
                    self._writer = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6)
            elif compression is not None:
                raise UsageError(f"unknown output compression {compression!r}")
        except BaseException:
            self.file.abort()
            raise

    def _start_tool(self, kind: str) -> None:
        argv = {"zstd": ["zstd", "-q", "-c", "-T0"], "lzop": ["lzop", "-q", "-c"]}[kind]
        tool = shutil.which(argv[0])
        if tool is None:
            raise UnsupportedError(f"{self.path}: {kind} output needs the {argv[0]} tool "
                                   f"(apt-get install {argv[0]})")
        self._proc = subprocess.Popen([tool, *argv[1:]], stdin=subprocess.PIPE,
                                      stdout=self.file.fd, stderr=subprocess.PIPE, bufsize=0)
        self._fd = self._proc.stdin.fileno()

    def write(self, data) -> None:
        if self._writer is not None:
            self._writer.write(data)
            return
        try:
            write_all(self._fd, data)
        except BrokenPipeError:
            if self._proc is None:
                raise
            self._tool_failed()
        except OSError as e:
            raise SourceError(f"{self.path}: write failed: {e.strerror}") from None

    def _tool_failed(self):
        rc = self._proc.wait()
        text = self._proc.stderr.read().decode(errors="replace").strip()
        raise SourceError(f"{self.path}: {self.compression} failed: "
                          f"{text.splitlines()[-1] if text else f'exit status {rc}'}")

    def commit(self, sync: bool = True) -> None:
        try:
            if self._writer is not None:
                self._writer.close()
            if self._proc is not None:
                self._proc.stdin.close()
                if self._proc.wait() != 0:
                    self._tool_failed()
                self._proc.stderr.close()
        except BaseException:
            self.abort()
            raise
        self.file.commit(sync=sync)

    def abort(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self.file.abort()
