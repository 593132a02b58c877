"""Where output goes (OutputFile says how each kind of path is written).

A new file is written under a hidden temporary name beside the target; commit() fsyncs
and renames it into place, and any error or Ctrl-C before that removes it: nothing
half-written stays. What already exists and is not a plain file (a block device, a
character device, a FIFO, a symlink) or anything given with -n is written in place:
never renamed over or unlinked. Write failures become one OutputError line.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
import struct
import sys
import tempfile

from ..errors import OutputError, UsageError
from ..model import ZERO_CHUNK
from .codecs import open_compressor


def write_all(fd: int, data) -> None:
    """os.write until every byte is out (pipes and stdout take partial writes)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


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


BLKGETSIZE64 = 0x80081272  # ioctl: a block device's size in bytes
BLKZEROOUT = 0x127F  # ioctl: zero a byte range (offloaded where the device can)
FALLOC_PUNCH = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


def _fallocate():
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    f = libc.fallocate
    f.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return f


@contextlib.contextmanager
def temp_writes():
    """Writes to vmarc's own temporary files: a failure names TMPDIR, not the output."""
    try:
        yield
    except OSError as e:
        raise OutputError(
            f"temporary file in {tempfile.gettempdir()}: cannot write: "
            f"{e.strerror or e} (TMPDIR picks another place)"
        ) from None


@contextlib.contextmanager
def writing(out):
    """Fill out (an OutputFile, StreamOutput or OutputDir) inside this block: on any
    error it is aborted, and a failed write becomes its one-line OutputError."""
    try:
        yield out
    except OSError as e:
        out.abort()
        raise out.failed(e) from None
    except BaseException:
        out.abort()
        raise


def write_failed(path: str, e: OSError, in_place: bool = False) -> OutputError:
    """The one line for an output that could not be written (disk full, read-only...)."""
    left = f"; {path} is left partly written" if in_place else ""
    return OutputError(f"{path}: cannot write: {e.strerror or e}{left}")


class OutputFile:
    """Where one output goes, chosen by what the path names (the README lists the same):

    - "-": stdout, written front to back (a stream);
    - nothing yet, or a regular file: a new file under a hidden temporary name beside
      it, fsynced and renamed into place by commit(); an error or Ctrl-C leaves nothing
      and the old file stays until then. A dangling symlink's target is made this way;
    - a block device (an LVM volume, a zvol, /dev/rbd0, a loop device): written in place,
      opened O_EXCL so a mounted one is refused; it must hold the whole disk;
    - a character device or a FIFO (/dev/null, a named pipe): written in place, as a stream;
    - an existing file reached through a symlink, or any existing file or device with
      no_create (`-n`): written in place; the file is cut to empty first unless no_create.

    fresh says that every byte not written reads as zero (a new or emptied file, or the
    user's target_is_zero); otherwise a writer zeroes what it leaves out with zero().
    """

    def __init__(
        self,
        path: str,
        *,
        overwrite: bool = True,
        no_create: bool = False,
        target_is_zero: bool = False,
    ):
        self.path = path
        self.tmp = None
        self.fd = -1
        self.device_size = None  # block devices: their size in bytes
        self.in_place = True
        self.is_stream = True
        self.fresh = True
        self.no_create = no_create
        if path == "-":
            self.fd = sys.stdout.fileno()
            if os.isatty(self.fd):
                raise UsageError(
                    "refusing to write binary data to a terminal; give an "
                    "output file, or redirect stdout (> file, | command)"
                )
            return
        try:
            st = os.stat(path)  # through symlinks
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise OutputError(f"{path}: cannot use as output: {e.strerror}") from None
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{path}: is a directory")
        if st is None or (stat.S_ISREG(st.st_mode) and not os.path.islink(path) and not no_create):
            self._new_file(path, st, overwrite, no_create)
            return
        if not overwrite:
            raise UsageError(f"{path}: already exists")
        if stat.S_ISBLK(st.st_mode):
            self._open(path, os.O_RDWR | os.O_EXCL, "in use (mounted or held by another program)")
            self.device_size = _ioctl_u64(self.fd, BLKGETSIZE64)
            self.is_stream = False
            self.fresh = target_is_zero
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode):
            self._open(path, os.O_WRONLY, "")
        elif stat.S_ISREG(st.st_mode):  # a symlink to a file, or -n
            self._open(path, os.O_RDWR | (0 if no_create else os.O_TRUNC), "")
            self.is_stream = False
            self.fresh = target_is_zero or not no_create
        else:
            raise UsageError(f"{path}: not a file or a device vmarc can write to")

    @property
    def is_stdout(self) -> bool:
        return self.path == "-"

    def _new_file(self, path, st, overwrite, no_create):
        if no_create:
            raise UsageError(f"{path}: does not exist (-n writes into an existing file or device)")
        if st is not None and not overwrite:
            raise UsageError(f"{path}: already exists")
        real = os.path.realpath(path)  # a dangling symlink: make its target
        if st is None and _on_dev(real):
            raise UsageError(
                f"{path}: no such device (vmarc does not create files in /dev; "
                "is the volume active?)"
            )
        self.in_place = False
        self.is_stream = False
        self.target = real
        self.tmp = _tmp_name(real)
        try:
            # read-write: the qcow2 writer reads back tables it wrote
            self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as e:
            self.tmp = None
            raise OutputError(f"{path}: cannot create: {e.strerror}") from None

    def _open(self, path, flags, busy):
        try:
            self.fd = os.open(path, flags | os.O_CLOEXEC)
        except OSError as e:
            why = busy if e.errno == errno.EBUSY and busy else e.strerror
            raise OutputError(f"{path}: cannot open for writing: {why}") from None

    def reserve(self, size: int) -> None:
        """Refuse, before anything is written, a device too small for size bytes."""
        if self.device_size is not None and size is not None and self.device_size < size:
            raise UsageError(
                f"{self.path}: the device holds {self.device_size} bytes, the "
                f"disk needs {size}; nothing was written"
            )

    def set_size(self, size: int) -> None:
        """The output's final size: a file is cut or extended to it (never cut short when
        written in place with -n); a device keeps its size and must hold it."""
        if self.device_size is not None and self.device_size < size:
            raise OutputError(
                f"{self.path}: the device holds {self.device_size} bytes, the "
                f"image needs {size}; it is left partly written"
            )
        if self.device_size is not None or self.is_stream:
            return
        if self.no_create and os.fstat(self.fd).st_size >= size:
            return
        os.ftruncate(self.fd, size)

    def zero(self, offset: int, length: int) -> None:
        """Make [offset, offset + length) read as zeros on a target that held data: a
        device by BLKZEROOUT, a file by punching a hole, else by writing zeros."""
        if length <= 0:
            return
        if self.device_size is not None:
            # BLKZEROOUT takes whole 512-byte sectors; the ragged edges are written
            a, b = -(-offset // 512) * 512, (offset + length) // 512 * 512
            if b - a >= 65536:
                try:
                    fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("=QQ", a, b - a))
                except OSError:
                    pass
                else:
                    self._write_zeros(offset, a - offset)
                    self._write_zeros(b, offset + length - b)
                    return
        elif not self.is_stream:
            global _FALLOCATE
            if _FALLOCATE is None:
                _FALLOCATE = _fallocate()
            if _FALLOCATE(self.fd, FALLOC_PUNCH, offset, length) == 0:
                return
        self._write_zeros(offset, length)

    def _write_zeros(self, offset: int, length: int) -> None:
        zeros = memoryview(ZERO_CHUNK)
        while length > 0:
            step = min(length, len(zeros))
            pwrite_all(self.fd, zeros[:step], offset)
            offset += step
            length -= step

    def failed(self, e: OSError) -> OutputError:
        """The one-line error for a write that failed with e."""
        return write_failed(self.path, e, self.in_place and not self.is_stdout)

    def commit(self, sync: bool = True) -> None:
        if self.is_stdout:
            return
        try:
            if (
                sync
                and not stat.S_ISCHR(os.fstat(self.fd).st_mode)
                and not stat.S_ISFIFO(os.fstat(self.fd).st_mode)
            ):
                os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            if self.tmp:
                os.rename(self.tmp, self.target)
                self.tmp = None
        except OSError as e:
            self.abort()
            raise OutputError(f"{self.path}: cannot finish writing: {e.strerror}") from None

    def abort(self) -> None:
        if self.is_stdout:
            return
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.tmp:
            try:
                os.unlink(self.tmp)
            except OSError:
                pass
            self.tmp = None


_FALLOCATE = None


def _on_dev(path: str) -> bool:
    """A new file here would land in /dev's own file system (device nodes, in RAM), not
    on a file system mounted below it such as /dev/shm."""
    try:
        return os.stat(os.path.dirname(path)).st_dev == os.stat("/dev").st_dev
    except OSError:
        return False


def _ioctl_u64(fd: int, request: int) -> int:
    return struct.unpack("=Q", fcntl.ioctl(fd, request, bytes(8)))[0]


class OutputDir:
    """A new directory filled under a temporary name, renamed into place at the end."""

    def __init__(self, path: str):
        self.path = path
        self.tmp = None
        self._files: list[OutputFile] = []
        if os.path.lexists(path):
            raise UsageError(f"{path}: already exists (extract writes a new directory)")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise UsageError(f"{path}: parent directory does not exist")
        try:
            self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.vmarc-", dir=parent)
        except OSError as e:
            raise OutputError(f"{path}: cannot create: {e.strerror}") from None

    def join(self, name: str) -> str:
        return os.path.join(self.tmp, name)

    def file(self, name: str) -> OutputFile:
        """A new file in the directory, aborted with it."""
        out = OutputFile(self.join(name))
        self._files.append(out)
        return out

    def failed(self, e: OSError) -> OutputError:
        return write_failed(self.path, e)

    def commit(self) -> None:
        try:
            os.rename(self.tmp, self.path)
        except OSError as e:
            self.abort()
            raise OutputError(f"{self.path}: cannot finish writing: {e.strerror}") from None
        self.tmp = None

    def abort(self) -> None:
        for out in self._files:
            out.abort()
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


class StreamOutput:
    """A byte stream written front to back into an OutputFile, optionally through a
    compressor: the zstd and lzop tools in their own processes (zstd on every core,
    the way vzdump runs it), gzip with ISA-L on threads."""

    def __init__(self, path: str, compression: str | None = None):
        self.file = OutputFile(path)
        self.compression = compression
        self.path = path
        self._proc = None
        self._writer = None  # a file object for in-process compressors
        self._fd = self.file.fd
        try:
            if compression is not None:
                self._writer, self._proc = open_compressor(compression, self.file.fd, path)
                if self._proc is not None:
                    self._fd = self._proc.stdin.fileno()
        except BaseException:
            self.file.abort()
            raise

    def write(self, data) -> None:
        try:
            if self._writer is not None:
                self._writer.write(data)
            else:
                write_all(self._fd, data)
        except BrokenPipeError:
            if self._proc is None:
                raise
            self._tool_failed()
        except OSError as e:
            raise self.file.failed(e) from None

    def failed(self, e: OSError) -> OutputError:
        return self.file.failed(e)

    def _tool_failed(self):
        rc = self._proc.wait()
        text = self._proc.stderr.read().decode(errors="replace").strip()
        raise OutputError(
            f"{self.path}: {self.compression} failed: "
            f"{text.splitlines()[-1] if text else f'exit status {rc}'}"
        )

    def commit(self, sync: bool = True) -> None:
        try:
            if self._writer is not None:
                self._writer.close()
            if self._proc is not None:
                self._proc.stdin.close()
                if self._proc.wait() != 0:
                    self._tool_failed()
                self._proc.stderr.close()
        except OSError as e:
            self.abort()
            raise self.file.failed(e) from None
        except BaseException:
            self.abort()
            raise
        self.file.commit(sync=sync)

    def abort(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self.file.abort()
