"""Which burst a photo belongs to, as the camera wrote it into the file.

Immich's metadata extraction reads the same ids (exiftool's BurstID, BurstUUID, CameraBurstID)
into an asset's `autoStackId` but makes no stack of them; the uploader has to. The ids:

- Apple: `BurstUUID`, tag 0x000B of the maker note ("Apple iOS" header, then a big-endian IFD
  whose offsets count from the start of the maker note). Apple marks no frame as the pick.
- Google Camera: XMP `GCamera:BurstID`, with `GCamera:BurstPrimary` on the frame it picked.
- Google Photos creations: XMP `GCreations:CameraBurstID`.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

from sftpgate.optimize import dates

_MAKER_NOTE = 0x927C
_APPLE_SIGNATURE = b"Apple iOS\x00"
_APPLE_IFD_OFFSET = 14  # signature, a two-byte version, "MM"
_APPLE_BURST_UUID = 0x000B
_ASCII = 2
_GCAMERA = b"http://ns.google.com/photos/1.0/camera/"
_GCREATIONS = b"http://ns.google.com/photos/1.0/creations/"
_MAX_ID = 128  # a UUID is 36 characters; anything longer is not a burst id


@dataclass(frozen=True)
class Burst:
    id: str
    primary: bool  # the frame the camera picked (Google writes it; Apple does not)


def burst_of(path: Path, kind: str) -> Burst | None:
    """The burst `path` was shot in, or None. Never raises: a broken maker note is no burst."""
    if kind not in ("jpeg", "heic"):
        return None
    try:
        exif, xmp = dates.pillow_metadata(path, kind)
        maker_note = exif.get_ifd(dates.EXIF_IFD).get(_MAKER_NOTE)
    except Exception:
        return None
    if isinstance(maker_note, bytes):
        uuid = apple_maker_note_text(maker_note, _APPLE_BURST_UUID)
        if uuid:
            return Burst(uuid, primary=False)
    if xmp:
        burst = _xmp_value(xmp, _GCAMERA, b"BurstID")
        if burst:
            primary = _xmp_value(xmp, _GCAMERA, b"BurstPrimary") in ("1", "True", "true")
            return Burst(burst, primary)
        creation = _xmp_value(xmp, _GCREATIONS, b"CameraBurstID")
        if creation:
            return Burst(creation, primary=False)
    return None


def apple_maker_note_text(note: bytes, tag: int) -> str | None:
    """The ASCII value of `tag` in an Apple maker note, or None."""
    if not note.startswith(_APPLE_SIGNATURE) or note[12:14] != b"MM":
        return None
    (count,) = struct.unpack_from(">H", note, _APPLE_IFD_OFFSET)
    for i in range(count):
        entry = _APPLE_IFD_OFFSET + 2 + 12 * i
        if entry + 12 > len(note):
            return None
        number, kind, length, value = struct.unpack_from(">HHII", note, entry)
        if number != tag:
            continue
        if kind != _ASCII or not 0 < length <= _MAX_ID:
            return None
        data = note[entry + 8 : entry + 8 + length] if length <= 4 else note[value : value + length]
        text = data.split(b"\x00", 1)[0].decode("ascii", "replace").strip()
        return text or None
    return None


def _xmp_value(xmp: bytes, namespace: bytes, name: bytes) -> str | None:
    """A simple property of an XMP packet, written as an attribute or as an element, under
    whatever prefix the packet binds to `namespace`."""
    for prefix in re.findall(rb'xmlns:([\w.-]+)=["\']' + re.escape(namespace) + rb'["\']', xmp):
        qualified = re.escape(prefix + b":" + name)
        found = re.search(
            qualified + rb'\s*=\s*["\']([^"\'<>]{1,%d})["\']' % _MAX_ID, xmp
        ) or re.search(rb"<" + qualified + rb">([^<]{1,%d})</" % _MAX_ID + qualified + rb">", xmp)
        if found:
            return found.group(1).decode("utf-8", "replace").strip() or None
    return None
