"""ova.xml: XAPI's XML-RPC `<value><struct>` description of an exported VM.

`version` says who exported it; `objects` is a list of {class, id, snapshot} records for
VM, VBD, VIF, VDI, SR, network... Integers are written as strings; values with no type
element are strings too (Xen Orchestra writes those).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from ..errors import FormatError

MAX_OVA_XML = 64 << 20  # XAPI's ova.xml is a few hundred KiB at most


def _value(elem: ET.Element, where: str):
    kids = list(elem)
    if not kids:
        return elem.text or ""
    typed = kids[0]
    tag = typed.tag
    if tag == "struct":
        out = {}
        for member in typed.findall("member"):
            name = member.findtext("name")
            val = member.find("value")
            if name is None or val is None:
                raise FormatError(f"{where}: struct member without name or value")
            out[name] = _value(val, where)
        return out
    if tag == "array":
        data = typed.find("data")
        return [] if data is None else [_value(v, where) for v in data.findall("value")]
    if tag == "boolean":
        return (typed.text or "").strip() == "1"
    return typed.text or ""


def parse(data: bytes, where: str) -> dict:
    """The top-level struct ({'version': ..., 'objects': [...]})."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise FormatError(f"{where}: ova.xml is not well-formed XML: {e}") from None
    if root.tag != "value":
        raise FormatError(f"{where}: ova.xml root is <{root.tag}>, expected <value>")
    top = _value(root, where)
    if not isinstance(top, dict) or not isinstance(top.get("objects"), list):
        raise FormatError(f"{where}: ova.xml has no 'objects' array")
    for obj in top["objects"]:
        if not (isinstance(obj, dict) and isinstance(obj.get("class"), str)
                and isinstance(obj.get("id"), str) and isinstance(obj.get("snapshot"), dict)):
            raise FormatError(f"{where}: ova.xml object without class, id or snapshot")
    return top


def to_int(value, what: str, where: str) -> int:
    try:
        n = int(str(value).strip())
    except ValueError:
        raise FormatError(f"{where}: {what} is not an integer: {value!r}") from None
    if n < 0:
        raise FormatError(f"{where}: {what} is negative: {n}")
    return n
