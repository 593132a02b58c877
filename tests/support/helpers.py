"""Running the real command line from tests, and what a clean failure looks like."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Files made by real software (the Proxmox sample, ../shared/realdata) stay in the shared
# folder beside the checkout (CI lays a copy beside its clone); they are never copied
# into the repository. VMARC_SHARED points elsewhere.
SHARED = os.environ.get("VMARC_SHARED") or os.path.join(os.path.dirname(ROOT), "shared")
SHARED_FIXTURES = os.path.join(SHARED, "fixtures")
SHARED_REALDATA = os.path.join(SHARED, "realdata")


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
    proc = subprocess.run(
        [sys.executable, "-m", "vmarc", *map(str, args)],
        stdin=stdin,
        input=input,
        stdout=stdout,
        stderr=subprocess.PIPE,
        timeout=timeout,
    )
    return Result(proc)


_PEAK_PROBE = """
import resource, subprocess, sys
with open(sys.argv[1], "wb") as out, open(sys.argv[2], "wb") as err:
    code = subprocess.run([sys.executable, "-m", "vmarc", *sys.argv[3:]], stdout=out,
                          stderr=err, stdin=subprocess.DEVNULL).returncode
print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def vmarc_peak(*args):
    """Run the command line; returns (Result, its peak RSS in KiB). It is started from a
    small launcher: a child forked from the test process would count the test's own
    memory in its peak."""
    import tempfile
    import types

    with tempfile.NamedTemporaryFile() as out, tempfile.NamedTemporaryFile() as err:
        probe = subprocess.run(
            [sys.executable, "-c", _PEAK_PROBE, out.name, err.name, *map(str, args)],
            capture_output=True,
            text=True,
            check=True,
        )
        code, peak = map(int, probe.stdout.split())
        done = types.SimpleNamespace(returncode=code, stdout=out.read(), stderr=err.read())
    return Result(done), peak


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
