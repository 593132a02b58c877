"""vmarc info: what an archive holds (VM settings, disks, configs)."""

from __future__ import annotations

import sys

from ..formats import open_archive
from .common import add_source_args, human_size, layers, print_json


def add_parser(sub):
    p = sub.add_parser("info", help="show what an archive or image holds")
    add_source_args(p)
    p.add_argument("--output", choices=["human", "json"], default="human")
    p.add_argument(
        "--configs",
        action="store_true",
        help="json: include each config's text (default: name and size)",
    )
    p.set_defaults(run=run)


def run(args) -> int:
    with open_archive(args.source, args.fmt, **layers(args)) as archive:
        data = archive.info(configs=args.configs)
        for problem in archive.open_problems:  # readable, but damaged
            print(f"vmarc: warning: {problem}", file=sys.stderr)
    if args.output == "json":
        print_json("info", data)
        return 0
    comp = f" ({data['compression']}-compressed)" if data["compression"] else ""
    print(f"source: {data['source']}")
    print(f"format: {data['format']}{comp}")
    vm = data["vm"]
    if vm:
        print(f"vm: {vm.get('name', '')}")
        if vm.get("memory"):
            print(f"  memory: {human_size(vm['memory'])}")
        if vm.get("vcpus"):
            print(f"  vcpus: {vm['vcpus']}")
        if vm.get("backup_mode"):  # a Xen Orchestra backup
            print(f"  backup: {vm['backup_mode']}, {vm.get('backup_time', 'time unknown')}")
        st = data.get("settings")
        if st:
            print(
                f"  firmware: {st['firmware']}, ostype: {st['ostype']}, boot: "
                f"{', '.join(st['boot']) or '-'}, CD drives: {st['cdroms']}"
            )
            for mac, net in st["nics"]:
                print(f"  nic: {mac} on {net or '?'}")
    print(f"disks: {len(data['disks'])}")
    for d in data["disks"]:
        dev = f" {d['device']}" if d.get("device") else ""
        print(
            f"  [{d['index']}] {d['id']}{dev}  {human_size(d['size'])} ({d['size']} bytes)"
            f"  {d['name']}"
        )
    if data["configs"]:
        print("configs: " + ", ".join(f"{c['name']} ({c['size']} bytes)" for c in data["configs"]))
    return 0
