import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The real Proxmox sample: ../shared/fixtures beside the checkout when it is there,
# else the copy kept in tests/fixtures (a CI clone may live anywhere).
_SHARED = os.path.join(os.path.dirname(ROOT), "shared", "fixtures")
SHARED_FIXTURES = (_SHARED if os.path.exists(os.path.join(_SHARED, "proxmox-test.vma.gz"))
                   else os.path.join(ROOT, "tests", "fixtures"))
sys.path.insert(0, os.path.dirname(__file__))


class Result:
    def __init__(self, proc):
        self.code = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr

    @property
    def text(self):
        return self.out.decode(errors="replace")

    @property
    def errtext(self):
        return self.err.decode(errors="replace")

    def __repr__(self):
        return f"<exit {self.code} stdout={self.out[:300]!r} stderr={self.err[:600]!r}>"


def vmarc(*args, stdin=None, input=None, timeout=300, stdout=subprocess.PIPE):
    """Run the real command line in a subprocess; returns a Result."""
    proc = subprocess.run([sys.executable, "-m", "vmarc", *map(str, args)], stdin=stdin,
                          input=input, stdout=stdout, stderr=subprocess.PIPE,
                          timeout=timeout)
    return Result(proc)


def assert_clean_failure(res, code, *needles):
    """One line on stderr naming the problem, the given exit code, no traceback."""
    assert res.code == code, res
    err = res.errtext
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    for n in needles:
        assert n in err, (n, err)


def need(tool):
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is not installed: run ./setup.sh")


@pytest.fixture
def cli():
    return vmarc
