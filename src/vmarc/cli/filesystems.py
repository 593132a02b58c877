"""vmarc filesystems: every volume on a VM's disks (partition, logical volume, whole
disk) with what it holds, as virt-filesystems --all --long shows it."""

from __future__ import annotations

from .common import add_random_access_args, human_size, open_guest, print_json


def add_parser(sub):
    p = sub.add_parser(
        "filesystems",
        help="list the volumes on the disks: partitions, LVM logical volumes, "
        "their file systems, labels, UUIDs and sizes",
    )
    add_random_access_args(p)
    p.add_argument("--output", choices=["human", "json"], default="human")
    p.set_defaults(run=run, verify=True)


def run(args) -> int:
    with open_guest(args) as guest:
        for v in guest.readable():
            if v.fstype == "ntfs":  # its label is in the MFT, not the boot sector
                guest.filesystem(v)
        volumes = [v.as_dict() for v in guest.volumes]
    if args.output == "json":
        print_json("filesystems", {"volumes": volumes})
        return 0
    rows = [("NAME", "TYPE", "SIZE", "USED", "LABEL", "UUID", "ON")]
    for v in volumes:
        where = f"{v['where']} of {v['disk']}" if v["where"] != "whole disk" else v["where"]
        rows.append(
            (
                v["name"],
                v["type"] or "-",
                human_size(v["size"]),
                human_size(v["used"]) if v["used"] is not None else "-",
                v["label"] or "-",
                v["uuid"] or "-",
                where + (f" ({v['note']})" if v["note"] else ""),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    return 0
