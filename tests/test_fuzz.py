"""Seeded mutations of a small XVA, VMA, dynamic VHD, qcow2, VMDK (sparse and
streamOptimized), VHDX, OVA and a part of a Xen Orchestra remote through verify and
convert (tests/support/fuzz.py): exit codes 0-3 only and never a traceback, nothing left
behind after a failure, an XVA or OVA output either refused or exact, and peak memory
under 256 MiB."""

import json
import subprocess
import sys

import pytest

from tests.support.helpers import ROOT, need


@pytest.mark.parametrize("seed", [1, 2])
def test_mutated_inputs(seed, tmp_path):
    need("qemu-img")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.support.fuzz",
            "--cases",
            "200",
            "--seed",
            str(seed),
            "--work",
            str(tmp_path / "w"),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert res.stdout, res.stderr
    found = json.loads(res.stdout.splitlines()[-1])
    assert found["cases"] == 200
    assert found["findings"] == [], found["findings"][:5]
    assert found["peak_rss_mib"] < 256, found
