"""The exports of serve/exports.py as a read-only FUSE file system (mfusepy, imported
only when mounting): one flat directory of disk, partition and config files.

Reads that need no Python are handed to libfuse as (fd, offset): a stored run of a plain
archive, or /dev/zero for a hole (read_buf)."""

from __future__ import annotations

import ctypes
import errno
import os
import stat

from ..errors import SourceError, UnsupportedError
from ..model import ZERO
from ..notices import error

BLKSIZE = 1 << 20  # st_blksize: cat and cp then read a MiB at a time (one FUSE request)


def load():
    """mfusepy over libfuse 3, or UnsupportedError saying what to install (called before
    anything is opened, so a machine without FUSE fails at once)."""
    _prepare_libfuse()
    try:
        import mfusepy
    except ImportError as e:
        raise UnsupportedError(
            f"mount needs FUSE: pip install 'vmarc[mount]' and the fuse3 package (libfuse3) ({e})"
        ) from None
    except OSError as e:
        raise UnsupportedError(f"mount needs libfuse (apt-get install fuse3): {e}") from None
    if not os.path.exists("/dev/fuse"):
        raise UnsupportedError(
            "mount needs /dev/fuse (load the fuse module or give the container the device)"
        )
    return mfusepy


def mount(mfusepy, exports, mountpoint: str, st: os.stat_result, options: dict) -> None:
    """Serve exports on mountpoint until it is unmounted. options: FUSE mount options
    (direct_io or kernel_cache, and the user's -o)."""
    ops = _operations(mfusepy, exports.files(), st)
    opts = dict({"ro": True, "fsname": "vmarc", "subtype": "vmarc"}, **options)
    try:
        mfusepy.FUSE(ops, mountpoint, foreground=True, nothreads=False, **opts)
    except RuntimeError as e:
        raise SourceError(
            f"{mountpoint}: FUSE mount failed ({e}); is it already "
            "mounted, or is /dev/fuse not usable here?"
        ) from None


def _operations(mfusepy, files: dict, st):
    zero_fd = os.open("/dev/zero", os.O_RDONLY)  # holes, read by libfuse like a file

    def _or_eio(call, path, offset, n):
        """A failed read (a damaged chunk, an I/O error) is EIO for the reader and one
        line for the mount's stderr."""
        try:
            return call(offset, n)
        except Exception as e:
            error(f"{path[1:]}: read at {offset}: {e}", "vmarc mount")
            raise mfusepy.FuseOSError(errno.EIO) from None

    class Ops(mfusepy.Operations):
        use_ns = True

        def getattr(self, path, fh=None):
            base = {
                "st_uid": st.st_uid,
                "st_gid": st.st_gid,
                "st_atime": st.st_mtime_ns,
                "st_mtime": st.st_mtime_ns,
                "st_ctime": st.st_mtime_ns,
            }  # use_ns
            if path == "/":
                return dict(base, st_mode=stat.S_IFDIR | 0o555, st_nlink=2)
            f = files.get(path[1:])
            if f is None:
                raise mfusepy.FuseOSError(errno.ENOENT)
            return dict(
                base,
                st_mode=stat.S_IFREG | 0o444,
                st_nlink=1,
                st_size=f.size,
                st_blksize=BLKSIZE,
                st_blocks=-(-f.size // 512),
            )

        def readdir(self, path, fh):
            if path != "/":
                raise mfusepy.FuseOSError(errno.ENOTDIR)
            return [".", "..", *files]

        def open(self, path, flags):
            if path[1:] not in files:
                raise mfusepy.FuseOSError(errno.ENOENT)
            if flags & (os.O_WRONLY | os.O_RDWR):
                raise mfusepy.FuseOSError(errno.EROFS)
            return 0

        def read(self, path, size, offset, fh):
            f = files.get(path[1:])
            if f is None:
                raise mfusepy.FuseOSError(errno.ENOENT)
            return _or_eio(f.read_at, path, offset, size)

        def read_buf(self, path, bufpp, size, offset, fh):
            """libfuse reads what it can itself: a stored run of a plain archive is
            handed over as (archive fd, position) and a hole as /dev/zero, so libfuse
            preads them outside Python and the GIL; the rest is read() into one buffer."""
            f = files.get(path[1:])
            if f is None:
                raise mfusepy.FuseOSError(errno.ENOENT)
            n = max(0, min(size, f.size - offset))
            where = _or_eio(f.in_place, path, offset, n) if n else None  # checks chunks
            data = b""
            if n and where is None:
                data = self.read(path, n, offset, fh)
            vec = _BufVec.new()
            buf = vec.buf
            if where == ZERO:
                buf.size, buf.flags, buf.fd, buf.pos = n, _FD_FLAGS, zero_fd, 0
            elif where is not None:
                buf.size, buf.flags, buf.fd, buf.pos = n, _FD_FLAGS, where[0], where[1]
            elif data:
                buf.mem = _libc.malloc(len(data))  # libfuse free()s it after replying
                if not buf.mem:
                    _libc.free(ctypes.addressof(vec))
                    raise mfusepy.FuseOSError(errno.ENOMEM)
                ctypes.memmove(buf.mem, data, len(data))
                buf.size = len(data)
            ctypes.cast(bufpp, ctypes.POINTER(ctypes.c_void_p))[0] = ctypes.addressof(vec)
            return 0

        def statfs(self, path):
            return {"f_bsize": 4096, "f_frsize": 4096, "f_namemax": 255}

    return Ops()


# libfuse's struct fuse_buf / fuse_bufvec (fuse_common.h). We always hand over a
# single buffer, so only the leading fields' layout matters; the allocation is padded
# for fields later libfuse versions may append.
class _Buf(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_size_t),
        ("flags", ctypes.c_int),
        ("mem", ctypes.c_void_p),
        ("fd", ctypes.c_int),
        ("pos", ctypes.c_int64),
    ]


class _BufVec(ctypes.Structure):
    _fields_ = [
        ("count", ctypes.c_size_t),
        ("idx", ctypes.c_size_t),
        ("off", ctypes.c_size_t),
        ("buf", _Buf),
    ]

    @classmethod
    def new(cls) -> _BufVec:
        """A zeroed one-buffer vector from malloc's heap: libfuse free()s it."""
        at = _libc.calloc(1, 4 * ctypes.sizeof(cls))
        if not at:
            raise MemoryError("calloc")
        vec = cls.from_address(at)
        vec.count = 1
        vec.buf.fd = -1
        return vec


_libc = ctypes.CDLL(None)
_libc.malloc.restype = _libc.calloc.restype = ctypes.c_void_p
_libc.malloc.argtypes = [ctypes.c_size_t]
_libc.calloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
_libc.free.argtypes = [ctypes.c_void_p]
_FD_FLAGS = (1 << 1) | (1 << 2) | (1 << 3)  # FUSE_BUF_IS_FD | FD_SEEK | FD_RETRY


def _prepare_libfuse() -> None:
    """mfusepy takes libfuse 2 when both are installed (libvhdi-utils pulls it in); 3
    negotiates 1 MiB requests where 2 stays at 128 KiB."""
    if not os.environ.get("FUSE_LIBRARY_PATH"):
        from ctypes.util import find_library

        lib = find_library("fuse3")
        if lib:
            os.environ["FUSE_LIBRARY_PATH"] = lib
    # libfuse allocates a reply buffer per request: keep those in the heap, already
    # faulted in, instead of a fresh mmap (and 256 page faults) per MiB
    _libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD (glibc, as Debian has it)
    _libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
