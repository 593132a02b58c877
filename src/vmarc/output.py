"""Output files that appear only when complete.

Data goes to a hidden temporary name beside the target; commit() fsyncs and renames it
into place, and any error or Ctrl-C before that removes it. Nothing half-written stays.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

from .errors import SourceError, UsageError


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
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
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
