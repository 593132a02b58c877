"""Files made by real software (../shared/realdata/CASES.tsv): each converts to the bytes
that independent readers (qemu-img, libvhdi, dissect.hypervisor) produce, from the file
and from a pipe where the row says so, or is refused in one line; where it says `holes`,
`vmarc map` reports the same unallocated 64 KiB clusters as `qemu-img map`."""

import importlib.util
import json
import os
import subprocess

import pytest

from tests.support.helpers import SHARED_REALDATA, assert_clean_failure, need
from tests.support.helpers import vmarc as run

CLUSTER = 65536


def _cases():
    rows = []
    with open(os.path.join(SHARED_REALDATA, "CASES.tsv")) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            file, expect, *opts = line.rstrip("\n").split("\t")
            rows.append((file, expect, (opts[0] if opts else "").split()))
    return rows


def _digest_module():
    spec = importlib.util.spec_from_file_location(
        "sparsedigest", os.path.join(SHARED_REALDATA, "sparsedigest.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def sample(tmp_path):
    """The case's folder decompressed (qcow2 backing and data files are found by name)."""

    def unpack(file):
        folder = os.path.dirname(file)
        for name in os.listdir(os.path.join(SHARED_REALDATA, folder)):
            if name.endswith(".zst"):
                os.makedirs(tmp_path / folder, exist_ok=True)
                subprocess.run(
                    [
                        "zstd",
                        "-dqf",
                        os.path.join(SHARED_REALDATA, folder, name),
                        "-o",
                        tmp_path / folder / name[:-4],
                    ],
                    check=True,
                )
        return tmp_path / file

    return unpack


def _holes(rows) -> set[int]:
    """The 64 KiB clusters wholly inside stretches that hold no data."""
    found = set()
    for r in rows:
        if not r["data"]:
            found.update(range(-(-r["start"] // CLUSTER), (r["start"] + r["length"]) // CLUSTER))
    return found


@pytest.mark.parametrize("file,expect,opts", _cases(), ids=[c[0] for c in _cases()])
def test_real_sample(file, expect, opts, tmp_path, sample, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = sample(file)
    extra = [o for o in opts if o not in ("pipe", "holes")]
    out = tmp_path / "out.raw"
    if expect.startswith("refuse"):
        res = run("convert", path, out, *extra)
        if expect == "refuse2":  # damaged or not a real archive
            assert_clean_failure(res, 2)
        else:  # cannot be read as given
            assert res.code in (1, 2), res
            assert_clean_failure(res, res.code)
        assert not out.exists()
        return
    _, want, size = expect.split(":")
    digest = _digest_module().digest
    res = run("convert", path, out, *extra)
    assert res.code == 0, res
    assert (digest(out), os.path.getsize(out)) == (want, int(size))
    if "pipe" in opts:
        out.unlink()
        with open(path, "rb") as f:
            res = run("convert", "-", out, *extra, stdin=f)
        assert res.code == 0, res
        assert (digest(out), os.path.getsize(out)) == (want, int(size))
    if "holes" in opts:
        need("qemu-img")
        theirs = json.loads(
            subprocess.run(
                ["qemu-img", "map", "--output=json", path],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        res = run("map", path, "--output", "json")
        assert res.code == 0, res
        assert _holes(json.loads(res.out)) == _holes(theirs)


def _offsets(rows) -> dict[int, int]:
    """File offset of each 64 KiB cluster start that rows map to a file offset."""
    found = {}
    for r in rows:
        if "offset" in r and r.get("data"):
            for c in range(-(-r["start"] // CLUSTER), -(-(r["start"] + r["length"]) // CLUSTER)):
                found[c] = r["offset"] + c * CLUSTER - r["start"]
    return found


@pytest.mark.parametrize(
    "file",
    [
        "dissect.hypervisor/backing-chain-2.qcow2",
        "dissect.hypervisor/data-file.qcow2",
        "dissect.hypervisor/dynamic.vhd",
        "dfvfs/ext2.vhd",
    ],
)
def test_map_gives_the_file_offsets_qemu_img_gives(file, tmp_path, sample, monkeypatch):
    need("qemu-img")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = sample(file)
    fmt = ["-f", "vpc"] if file.endswith(".vhd") else []
    # (qemu-img looks for a data file in its current directory, vmarc beside the image)
    theirs = _offsets(
        json.loads(
            subprocess.run(
                ["qemu-img", "map", *fmt, "--output=json", path.name],
                capture_output=True,
                text=True,
                check=True,
                cwd=path.parent,
            ).stdout
        )
    )
    res = run("map", path, "--output", "json")
    assert res.code == 0, res
    mine = _offsets(json.loads(res.out))
    assert theirs and {c: mine.get(c) for c in theirs} == theirs
    human = run("map", path).text
    first = min(theirs)
    assert f"{theirs[first]:#x}" in human  # the human table shows them too
