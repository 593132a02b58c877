"""Every command's --output json validates against docs/json-schema.json, for every
format, intact and damaged."""

import json
import os

import pytest
from jsonschema import Draft202012Validator

from tests.support import vmagen
from tests.support import xvagen as g
from tests.support.helpers import ROOT
from tests.support.helpers import vmarc as run
from tests.test_access import CASES

with open(os.path.join(ROOT, "docs", "json-schema.json")) as f:
    SCHEMA = json.load(f)
VALIDATOR = Draft202012Validator(SCHEMA)


def valid(res, command):
    doc = json.loads(res.out)
    errors = sorted(VALIDATOR.iter_errors(doc), key=str)
    assert not errors, (command, [e.message for e in errors[:5]], doc)
    assert doc["vmarc_json"] == 1 and doc["command"] == command
    return doc


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_format(case, tmp_path):
    src, disks = CASES[case](tmp_path)
    key = next(iter(disks))
    sel = ["--disk", key] if len(disks) > 1 else []
    info = valid(run("info", src, "--output", "json"), "info")
    assert set(info["disks"][0]) == {"id", "name", "size", "device", "index", "details"}
    assert valid(run("info", src, "--output", "json", "--configs"), "info")
    doc = valid(run("verify", src, "--output", "json"), "verify")
    assert doc["ok"] and doc["checked"]["disks"]
    out = tmp_path / "o.raw"
    doc = valid(run("convert", src, out, *sel, "--output", "json"), "convert")
    assert doc["outputs"][0]["size"] == os.path.getsize(out)
    assert doc["outputs"][0]["allocated"] == os.stat(out).st_blocks * 512
    doc = valid(run("extract", src, tmp_path / "x", "--output", "json"), "extract")
    assert all(os.path.exists(o["path"]) for o in doc["outputs"])
    doc = valid(
        run(
            "create", "-O", "vma", tmp_path / "c.vma", "--disk", f"scsi0={out}", "--output", "json"
        ),
        "create",
    )
    assert doc["sources"][0]["format"] == "raw"


def test_damaged_verify_and_intact_disk_summary(tmp_path):
    d1 = g.pattern_disk(2 * g.MiB)
    d2 = g.pattern_disk(3 * g.MiB, seed=2)
    blob = g.build(
        g.XvaSpec(disks=[g.XDisk("Ref:1", d1, "a", "0"), g.XDisk("Ref:2", d2, "b", "1")])
    )
    bad = bytearray(blob)
    bad[blob.index(b"Ref:2/00000001\0") + 600] ^= 1
    cut = tmp_path / "bad.xva"
    cut.write_bytes(bytes(bad[: blob.index(b"Ref:2/00000002\0") + 700]))
    res = run("verify", cut, "--output", "json")
    assert res.code == 2
    doc = valid(res, "verify")
    causes = [p["cause"] for p in doc["problems"]]
    assert causes == ["checksum", "truncated", "truncated"], causes
    first = doc["problems"][0]
    assert (first["disk"], first["offset"], first["source"]["member"]) == (
        "Ref:2",
        g.MiB,
        "Ref:2/00000001",
    )
    doc = valid(
        run("convert", cut, tmp_path / "a.raw", "--disk", "xvda", "--output", "json"), "convert"
    )
    assert len(doc["warnings"]) == 1 and "damaged" in doc["warnings"][0]
    vma = tmp_path / "v.vma"
    vma.write_bytes(vmagen.build([("drive-scsi0", vmagen.disk_bytes(g.MiB))])[:-9000])
    valid(run("verify", vma, "--output", "json"), "verify")
