"""vmarc mount: an archive's disks, their partitions and its configs as read-only files
through FUSE (mfusepy, imported only here)."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import subprocess
import sys
import time

from ..access import ZEROS, open_disks
from ..model import Archive
from ..errors import SourceError, UnsupportedError, UsageError
from ..partitions import partitions
from .common import layers, add_random_access_args, add_verify_arg

BLKSIZE = 1 << 20  # st_blksize: cat and cp then read a MiB at a time (one FUSE request)
# libfuse 3.14's fuse_main() prints this on every mount (a bug of that release)
LIBFUSE_NOISE = "Ignoring invalid max threads value"


def add_parser(sub):
    p = sub.add_parser("mount", help="mount the disks (and their partitions) read-only "
                       "with FUSE; unmount with fusermount3 -u")
    add_random_access_args(p)
    p.add_argument("mountpoint")
    p.add_argument("-F", "--foreground", action="store_true",
                   help="stay in the foreground until unmounted (default: background)")
    p.add_argument("--kernel-cache", action="store_true",
                   help="let the kernel cache what was read: repeated reads of the same "
                   "places get faster, a first read slower, and shared mmap() works "
                   "(default: direct I/O)")
    p.add_argument("-o", dest="options", default="", help="extra FUSE mount options, "
                   "e.g. allow_other")
    add_verify_arg(p, "each XVA chunk's checksum the first time a read touches it")
    p.set_defaults(run=run)


class _Slice:
    """A window of a disk (a partition) with the disk's read()."""

    def __init__(self, disk, offset: int, size: int):
        self.disk, self.offset, self.size = disk, offset, size

    def read(self, offset: int, n: int) -> bytes:
        n = max(0, min(n, self.size - offset))
        return self.disk.read(self.offset + offset, n)

    def in_place(self, offset: int, n: int):
        return self.disk.in_place(self.offset + offset, n)


class _Blob:
    def __init__(self, data: bytes):
        self.data, self.size = data, len(data)

    def read(self, offset: int, n: int) -> bytes:
        return self.data[offset:offset + n]

    def in_place(self, offset: int, n: int):
        return None


def tree(opened) -> dict:
    """File name -> object with size and read(offset, n)."""
    files = {}
    for d in opened.disks:
        # the device (xvda) or the id (drive-scsi0): not extract's per-format file names
        stem = Archive.disk_filename(opened.archive, d.disk)[:-len(".raw")]
        while stem in files:
            stem = f"{stem}-{d.disk.index}"
        files[stem] = d
        for i, (off, size) in enumerate(partitions(d), 1):
            files[f"{stem}-part{i}"] = _Slice(d, off, size)
    for name, blob in opened.archive.configs.items():
        files.setdefault(os.path.basename(name), _Blob(blob))
    return files


def run(args) -> int:
    if not os.path.isdir(args.mountpoint):
        raise UsageError(f"{args.mountpoint}: not a directory")
    if os.path.ismount(args.mountpoint):
        raise UsageError(f"{args.mountpoint}: already a mount point (a vmarc mount? "
                         f"fusermount3 -u {args.mountpoint})")
    try:
        if os.listdir(args.mountpoint):
            raise UsageError(f"{args.mountpoint}: not empty; mount on an empty directory "
                             "(a mount would hide what is there)")
    except OSError as e:
        raise UsageError(f"{args.mountpoint}: cannot read: {e.strerror}") from None
    if not args.foreground:
        return _background(args)
    _prepare_libfuse()
    try:
        import mfusepy
    except ImportError as e:
        raise UnsupportedError("mount needs FUSE: pip install 'vmarc[mount]' and the fuse3 "
                               f"package (libfuse3) ({e})") from None
    except OSError as e:
        raise UnsupportedError(f"mount needs libfuse (apt-get install fuse3): {e}") from None
    if not os.path.exists("/dev/fuse"):
        raise UnsupportedError("mount needs /dev/fuse (load the fuse module or give the "
                               "container the device)")
    with open_disks(args.source, args.fmt, index=args.index, **layers(args),
                    verify=args.verify) as opened:
        files = tree(opened)
        ops = _operations(mfusepy, files, os.stat(args.source))
        opts = {"ro": True, "fsname": "vmarc", "subtype": "vmarc"}
        if args.kernel_cache:
            # the archive does not change under a read-only mount, so the kernel may
            # keep what it read: a second read of the same place costs no Python call
            opts["kernel_cache"] = True
        else:
            # reads go straight into the reader's buffer: no copy into fresh page-cache
            # pages, which cost more than the read itself (a file read once, or a loop
            # device or file system above that keeps its own cache)
            opts["direct_io"] = True

        for o in filter(None, args.options.split(",")):
            key, _, value = o.partition("=")
            opts[key] = value or True
        try:
            mfusepy.FUSE(ops, args.mountpoint, foreground=True, nothreads=False, **opts)
        except RuntimeError as e:
            raise SourceError(f"{args.mountpoint}: FUSE mount failed ({e}); is it already "
                              "mounted, or is /dev/fuse not usable here?") from None
    return 0


def _operations(mfusepy, files: dict, st):
    zero_fd = os.open("/dev/zero", os.O_RDONLY)  # holes, read by libfuse like a file

    def _or_eio(call, path, offset, n):
        """A failed read (a damaged chunk, an I/O error) is EIO for the reader and one
        line for the mount's stderr."""
        try:
            return call(offset, n)
        except Exception as e:
            print(f"vmarc mount: {path[1:]}: read at {offset}: {e}", file=sys.stderr)
            raise mfusepy.FuseOSError(errno.EIO) from None

    class Ops(mfusepy.Operations):
        use_ns = True

        def getattr(self, path, fh=None):
            base = {"st_uid": st.st_uid, "st_gid": st.st_gid, "st_atime": st.st_mtime_ns,
                    "st_mtime": st.st_mtime_ns, "st_ctime": st.st_mtime_ns}  # use_ns
            if path == "/":
                return dict(base, st_mode=stat.S_IFDIR | 0o555, st_nlink=2)
            f = files.get(path[1:])
            if f is None:
                raise mfusepy.FuseOSError(errno.ENOENT)
            return dict(base, st_mode=stat.S_IFREG | 0o444, st_nlink=1, st_size=f.size,
                        st_blksize=BLKSIZE, st_blocks=-(-f.size // 512))

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
            return _or_eio(f.read, path, offset, size)

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
            if where is ZEROS:
                buf.size, buf.flags, buf.fd, buf.pos = n, _FD_FLAGS, zero_fd, 0
            elif where is not None:
                buf.size, buf.flags, buf.fd, buf.pos = n, _FD_FLAGS, where[0], where[1]
            elif data:
                buf.mem = _libc.malloc(len(data))   # libfuse free()s it after replying
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
    _fields_ = [("size", ctypes.c_size_t), ("flags", ctypes.c_int),
                ("mem", ctypes.c_void_p), ("fd", ctypes.c_int), ("pos", ctypes.c_int64)]


class _BufVec(ctypes.Structure):
    _fields_ = [("count", ctypes.c_size_t), ("idx", ctypes.c_size_t),
                ("off", ctypes.c_size_t), ("buf", _Buf)]

    @classmethod
    def new(cls) -> "_BufVec":
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
    if hasattr(_libc, "mallopt"):
        _libc.mallopt(-3, 64 << 20)    # M_MMAP_THRESHOLD
        _libc.mallopt(-1, 256 << 20)   # M_TRIM_THRESHOLD


def _background(args) -> int:
    """Run the mount in a detached child (`-F`) and return once it is mounted. A child
    process, not a fork: decompressor and index threads do not survive fork(). The
    child's messages (damaged chunks with their offsets, spool notices) go to a log file
    in the cache directory, named when the mount is up."""
    argv = [sys.executable, "-m", "vmarc", "mount", "-F", args.source, args.mountpoint]
    if args.kernel_cache:
        argv.append("--kernel-cache")
    if not args.verify:
        argv.append("--no-verify")
    if args.no_backing:
        argv.append("--no-backing")
    for opt, value in (("-f", args.fmt), ("--index", args.index), ("--parent", args.parent),
                       ("-o", args.options or None)):
        if value:
            argv += [opt, value]
    log = _log_path(args.mountpoint)
    try:
        os.makedirs(os.path.dirname(log), exist_ok=True)
        logf = open(log, "w+b")
    except OSError as e:
        raise SourceError(f"{log}: cannot create the mount's log: {e.strerror}") from None
    with logf:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=logf, start_new_session=True)
        while True:
            mounted = os.path.ismount(args.mountpoint)
            rc = None if mounted else child.poll()
            if mounted or rc is not None:
                break
            time.sleep(0.05)
        logf.seek(0)
        said = "".join(line for line in logf.read().decode(errors="replace")
                       .splitlines(keepends=True) if not line.startswith(LIBFUSE_NOISE))
    if mounted:
        sys.stderr.write(said)  # what came before the mount: warnings, the spool notice
        print(f"vmarc: mounted {args.source} on {args.mountpoint}; its messages go to {log}",
              file=sys.stderr)
        return 0
    os.unlink(log)
    ours = [line for line in said.splitlines() if line.startswith("vmarc")]
    libfuse = "; ".join(line.strip() for line in said.splitlines()
                        if line.strip() and not line.startswith("vmarc"))
    if not ours:  # libfuse refused during INIT, with no word from vmarc
        ours = [f"vmarc: {args.mountpoint}: FUSE mount failed (exit {rc})"
                + ("" if libfuse else "; run with -F to see libfuse's reason")]
    if libfuse:
        ours[-1] += f" [libfuse: {libfuse}]"
    print("\n".join(ours), file=sys.stderr)
    return rc or 1


def _log_path(mountpoint: str) -> str:
    from ..access import cache_dir
    stem = "".join(c if c.isalnum() or c in "._-" else "-"
                   for c in os.path.realpath(mountpoint).strip("/")) or "root"
    return os.path.join(cache_dir(), "mounts", f"{stem}.log")
