"""JPEG XL container boxes: list them, rewrite Brotli-compressed (`brob`) boxes as plain ones,
build a container around a bare codestream, and add a box to an existing container.

libjxl's lossless JPEG transcode stores the JPEG's EXIF and XMP in `brob` boxes. exiftool reads
those only when Perl's IO::Compress::Brotli is installed (Debian's exiftool 12.57 is not; Immich's
image has it only since immich-app/base-images#14), so a date, GPS position or orientation would
silently vanish for those readers. Plain `Exif` / `xml ` boxes cost a few hundred bytes and every
reader understands them; libjxl still reconstructs the JPEG bit-exact from them (measured, and
checked on every conversion). Layout of a `brob` box: [size]['brob'][inner type][Brotli data].
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

import brotli

JXL_CONTAINER_SIGNATURE = b"\x00\x00\x00\x0cJXL \x0d\x0a\x87\x0a"
JXL_CODESTREAM_SIGNATURE = b"\xff\x0a"

# Box types that ISO/IEC 18181-2 forbids inside `brob`; finding one means the file is not what
# libjxl wrote, so we refuse instead of producing a container that readers would misinterpret.
_NOT_COMPRESSIBLE = frozenset(
    {b"brob", b"jxlc", b"jxlp", b"jbrd", b"JXL ", b"ftyp", b"jxll", b"jxli"}
)


class JxlBoxError(ValueError):
    """The bytes are not a well-formed JPEG XL container."""


@dataclass(frozen=True)
class Box:
    type: bytes  # four bytes, e.g. b"Exif"
    start: int  # offset of the box header
    payload_start: int  # offset of the first payload byte
    end: int  # offset just past the box


def iter_boxes(data: bytes) -> Iterator[Box]:
    """Yield the top-level boxes of a JPEG XL container; raise JxlBoxError if they do not tile it."""
    if not data.startswith(JXL_CONTAINER_SIGNATURE):
        raise JxlBoxError("not a JPEG XL container (no 'JXL ' signature box)")
    pos = 0
    while pos < len(data):
        if pos + 8 > len(data):
            raise JxlBoxError(f"box header cut short at offset {pos}")
        size, box_type = struct.unpack_from(">I4s", data, pos)
        header = 8
        if size == 1:  # 64-bit "largesize" follows the type
            if pos + 16 > len(data):
                raise JxlBoxError(f"box header cut short at offset {pos}")
            (size,) = struct.unpack_from(">Q", data, pos + 8)
            header = 16
        elif size == 0:  # the last box runs to the end of the file
            size = len(data) - pos
        if size < header or pos + size > len(data):
            raise JxlBoxError(f"box {box_type!r} at offset {pos} claims {size} bytes past the end")
        yield Box(box_type, pos, pos + header, pos + size)
        pos += size


def box_types(data: bytes) -> list[bytes]:
    """Types of the top-level boxes, in file order (for tests and reporting)."""
    return [box.type for box in iter_boxes(data)]


def _plain_box(box_type: bytes, payload: bytes) -> bytes:
    size = 8 + len(payload)
    if size <= 0xFFFFFFFF:
        return struct.pack(">I4s", size, box_type) + payload
    return struct.pack(">I4sQ", 1, box_type, size + 8) + payload


def _brotli_decompress(compressed: bytes, limit: int) -> bytes:
    # The limit guards against a Brotli bomb. Our input is libjxl's output for a JPEG we hold in
    # memory, so its metadata can never legitimately be larger than that JPEG.
    decompressor = brotli.Decompressor()
    out = decompressor.process(compressed, output_buffer_limit=limit)
    if not decompressor.is_finished() or len(out) > limit:
        raise JxlBoxError(f"a brob box expands to more than {limit} bytes")
    return out


def decompress_brob_boxes(data: bytes, limit: int) -> bytes:
    """Return `data` with every `brob` box replaced by the plain box it wraps.

    Box order is kept: libjxl matches Exif/xml boxes to the JPEG's APP segments by order when it
    reconstructs the JPEG, so reordering could break bit-exactness.
    """
    parts: list[bytes] = []
    for box in iter_boxes(data):
        if box.type != b"brob":
            parts.append(data[box.start : box.end])
            continue
        payload = data[box.payload_start : box.end]
        if len(payload) < 4:
            raise JxlBoxError(f"brob box at offset {box.start} has no inner type")
        inner_type = payload[:4]
        if inner_type in _NOT_COMPRESSIBLE:
            raise JxlBoxError(
                f"brob box at offset {box.start} wraps a forbidden {inner_type!r} box"
            )
        parts.append(_plain_box(inner_type, _brotli_decompress(payload[4:], limit)))
    return b"".join(parts)


_FTYP = struct.pack(">I4s4sI4s", 20, b"ftyp", b"jxl ", 0, b"jxl ")
# `colr` method 3, "any ICC" (JPEG 2000 part 2): method 2 would promise a matrix/TRC-only
# profile, which we do not check. Precedence and approximation 0 are what exiftool itself writes.
_COLR_ANY_ICC = bytes((3, 0, 0))


def icc_box(icc: bytes) -> tuple[bytes, bytes]:
    """A JPEG 2000-style colour specification box holding `icc`, for `container`.

    exiftool reads JPEG XL files with its JPEG 2000 box parser and does not decode the ICC profile
    inside the codestream (it takes only the image size from there), so without this box it reports
    no profile at all and a library that picks its colour handling from exiftool's
    ProfileDescription treats a Display P3 image as sRGB. libjxl decoders skip box types JPEG XL
    does not define, so this copy never changes how the image decodes: the codestream's profile
    stays the one that counts.
    """
    return b"colr", _COLR_ANY_ICC + icc


def insert_before_last_codestream_box(data: bytes, box: tuple[bytes, bytes]) -> bytes:
    """`data` (a JPEG XL container) with the (type, payload) `box` added just before its last
    `jxlc` / `jxlp` box, where `container` puts its boxes too.

    Everything libjxl wrote ahead of it (the header's `jxlp`, `jbrd`, `Exif`, `xml `) keeps its
    order, which the JPEG reconstruction depends on. exiftool finds a box anywhere, and libjxl's
    decoders (0.7 and 0.12) skip a box they do not know wherever it is (measured).
    """
    last = None
    for found in iter_boxes(data):
        if found.type in (b"jxlc", b"jxlp"):
            last = found
    if last is None:
        raise JxlBoxError("the container holds no codestream box")
    return data[: last.start] + _plain_box(*box) + data[last.start :]


def container(codestream: bytes, boxes: list[tuple[bytes, bytes]]) -> bytes:
    """A JPEG XL container: signature, `ftyp`, the given (type, payload) boxes in order, and the
    bare `codestream` in one `jxlc` box (ISO/IEC 18181-2 §3)."""
    if not codestream.startswith(JXL_CODESTREAM_SIGNATURE):
        raise JxlBoxError("not a bare JPEG XL codestream")
    parts = [JXL_CONTAINER_SIGNATURE, _FTYP]
    parts += [_plain_box(box_type, payload) for box_type, payload in boxes]
    parts.append(_plain_box(b"jxlc", codestream))
    return b"".join(parts)
