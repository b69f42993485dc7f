"""JPEG: read the marker structure, decide whether to transcode, and transcode to JPEG XL losslessly.

The transcode is libjxl's "JPEG bitstream reconstruction": the .jxl holds the JPEG's DCT
coefficients plus a `jbrd` box, and decodes back to the original file byte for byte. We only call
it the way that was measured to be safe:

- dimensions come from a header-only `Image.open` (the caller's probe), never from the encoder,
  because libjxl allocates for whatever the SOF claims before it notices anything is wrong;
- `Encoder(..., lossless=True)` on the file's bytes with `jpeg_encode=True`; the constructor's default
  `quality=1.0` would write a smaller, NOT bit-exact file that still carries a `jbrd` box, and
  `Image.save()` from a stream silently falls back to a lossy pixel encode;
- `brob` metadata boxes are rewritten to plain boxes (see jxlboxes.py);
- the JPEG's ICC profile, which libjxl keeps only inside the codestream, is copied into a `colr`
  box, where exiftool reads it (see `jxlboxes.icc_box`);
- the result is accepted only if `Decoder` gives back exactly the original bytes.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from dataclasses import dataclass

import pillow_jxl
from PIL import Image, ImageCms, ImageOps

from sftpgate.optimize import jxlboxes

_EXIF_ID = b"Exif\x00\x00"
_XMP_ID = b"http://ns.adobe.com/xap/1.0/\x00"
_XMP_EXTENSION_ID = b"http://ns.adobe.com/xmp/extension/\x00"
_ICC_ID = b"ICC_PROFILE\x00"
_MPF_ID = b"MPF\x00"
_PHOTOSHOP_ID = b"Photoshop 3.0\x00"

# SOF markers: C0-C3, C5-C7, C9-CB, CD-CF (C4 = DHT, C8 = JPG extension, CC = DAC).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# libjxl can only represent 8-bit Huffman-coded baseline, extended and progressive JPEGs.
_TRANSCODABLE_SOF = frozenset({0xC0, 0xC1, 0xC2})
_SOF_NAMES = {
    0xC3: "lossless (SOF3) JPEG",
    0xC5: "hierarchical JPEG",
    0xC6: "hierarchical JPEG",
    0xC7: "hierarchical JPEG",
    0xC9: "arithmetic-coded JPEG",
    0xCA: "arithmetic-coded JPEG",
    0xCB: "arithmetic-coded JPEG",
    0xCD: "arithmetic-coded JPEG",
    0xCE: "arithmetic-coded JPEG",
    0xCF: "arithmetic-coded JPEG",
}
# Inside entropy-coded data a 0xFF byte is followed by 0x00 (stuffing) or RST0-7; anything else
# (except more 0xFF fill bytes) is the next marker. A regex finds it at C speed.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
# Markers that have no length field.
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


class JpegFormatError(ValueError):
    """The bytes do not have the marker structure of a JPEG."""


@dataclass(frozen=True)
class JpegInfo:
    sof_marker: int
    precision: int
    width: int
    height: int
    components: int
    has_exif: bool
    has_xmp: bool
    has_icc: bool
    has_mpf: bool  # Multi-Picture Format index: more images (gain map, depth, preview) follow
    xmp: bytes  # the main XMP packet, b"" if none
    image_end: int | None  # offset just past EOI; None when the file ends before EOI
    trailing: bytes  # up to 4 KiB of what follows EOI (b"" if nothing, or only zero/FF padding)
    trailing_size: int  # total bytes after EOI that are not padding
    damage: str = ""  # what is wrong after the first scan started (truncated, garbage), or ""
    exif: bytes = b""  # the TIFF structure of the first EXIF segment, b"" if none
    has_extended_xmp: bool = False  # XMP continued in extension segments (e.g. a depth map)
    has_iptc: bool = False  # IPTC-IIM (keywords, captions) in the APP13 Photoshop resources
    icc: bytes = b""  # the ICC profile, its APP2 chunks joined in file order; b"" if none

    def metadata(self) -> tuple[str, ...]:
        kinds = (("EXIF", self.has_exif), ("XMP", self.has_xmp), ("ICC", self.has_icc))
        return tuple(name for name, present in kinds if present)


def parse_jpeg(data: bytes) -> JpegInfo:
    """Walk the JPEG markers up to EOI. Raises JpegFormatError when the structure is broken."""
    if not data.startswith(b"\xff\xd8"):
        raise JpegFormatError("no JPEG start-of-image marker")
    pos = 2
    sof: tuple[int, int, int, int, int] | None = None
    has_exif = has_xmp = has_icc = has_mpf = seen_sos = False
    has_extended_xmp = has_iptc = False
    xmp = exif = b""
    icc_chunks: list[bytes] = []
    image_end: int | None = None
    damage = ""
    try:
        while pos + 1 < len(data):
            if data[pos] != 0xFF:
                raise JpegFormatError(f"invalid data where a JPEG marker belongs (offset {pos})")
            marker = data[pos + 1]
            if marker == 0xFF:  # fill byte before a marker
                pos += 1
                continue
            if marker == 0xD9:
                image_end = pos + 2
                break
            if marker in _STANDALONE:
                pos += 2
                continue
            if pos + 4 > len(data):
                break
            (length,) = struct.unpack_from(">H", data, pos + 2)
            if length < 2:
                raise JpegFormatError(f"marker 0x{marker:02X} at offset {pos} has length {length}")
            segment_end = pos + 2 + length
            if segment_end > len(data):
                raise JpegFormatError(
                    f"the file ends inside marker segment 0x{marker:02X} (truncated JPEG header)"
                )
            segment = data[pos + 4 : segment_end]
            if marker == 0xE1:
                if segment.startswith(_EXIF_ID):
                    has_exif = True
                    exif = exif or segment[len(_EXIF_ID) :]
                elif segment.startswith(_XMP_ID):
                    has_xmp = True
                    xmp = xmp or segment[len(_XMP_ID) :]
                elif segment.startswith(_XMP_EXTENSION_ID):
                    has_extended_xmp = True
            elif marker == 0xED and segment.startswith(_PHOTOSHOP_ID):
                has_iptc = has_iptc or _photoshop_has_iptc(segment[len(_PHOTOSHOP_ID) :])
            elif marker == 0xE2:
                if segment.startswith(_ICC_ID):
                    has_icc = True
                    # After the identifier: chunk number and chunk count, one byte each. libjxl
                    # joins the chunks in file order (and refuses them out of sequence), so this
                    # is the profile the codestream will carry.
                    icc_chunks.append(segment[len(_ICC_ID) + 2 :])
                elif segment.startswith(_MPF_ID):
                    has_mpf = True
            elif marker in _SOF_MARKERS and sof is None:
                if len(segment) < 6:
                    raise JpegFormatError("start-of-frame segment is too short")
                precision, height, width, components = struct.unpack_from(">BHHB", segment)
                sof = (marker, precision, width, height, components)
            pos = segment_end
            if marker == 0xDA:  # start of scan: skip the entropy-coded data to the next marker
                if sof is None:
                    raise JpegFormatError("image data (SOS) before the frame header (SOF)")
                seen_sos = True
                found = _NEXT_MARKER.search(data, pos)
                if found is None:
                    break  # the file ends inside the scan: truncated
                pos = found.start()
    except JpegFormatError as exc:
        if not seen_sos:
            raise
        # The headers are sound and only the image data after them is broken: report it and let
        # the transcoder and its bit-exact check decide (see transcode_lossless).
        damage = str(exc)
    if image_end is None and not damage:
        damage = "the file ends inside the image data (truncated)"
    if sof is None or not seen_sos:
        raise JpegFormatError("no image data (the JPEG has no frame or scan)")
    marker, precision, width, height, components = sof
    if width == 0 or height == 0:
        raise JpegFormatError(f"the frame header claims {width}×{height} pixels")
    trailing = data[image_end:] if image_end is not None else b""
    # Some cameras and apps pad files with zeros or 0xFF after EOI; that is not content.
    significant = trailing if trailing.strip(b"\x00\xff") else b""
    return JpegInfo(
        sof_marker=marker,
        precision=precision,
        width=width,
        height=height,
        components=components,
        has_exif=has_exif,
        has_xmp=has_xmp,
        has_icc=has_icc,
        has_mpf=has_mpf,
        xmp=xmp,
        image_end=image_end,
        trailing=significant[:4096],
        trailing_size=len(significant),
        damage=damage,
        exif=exif,
        has_extended_xmp=has_extended_xmp,
        has_iptc=has_iptc,
        icc=b"".join(icc_chunks),
    )


_IPTC_RESOURCE = 0x0404
_IIM_TAG = 0x1C
_IIM_APPLICATION_RECORD = 2


def _photoshop_has_iptc(resources: bytes) -> bool:
    """Whether Photoshop image resources ("8BIM" blocks) hold IPTC-IIM data with content.

    Many cameras and editors write APP13 with only resolution info, a record version or empty
    fields; only actual values (a caption, keywords, a date) are metadata worth keeping."""
    pos = 0
    while pos + 12 <= len(resources) and resources[pos : pos + 4] == b"8BIM":
        (resource,) = struct.unpack_from(">H", resources, pos + 4)
        name_length = resources[pos + 6]
        name_end = pos + 7 + name_length + ((name_length + 1) % 2)  # Pascal string, even size
        if name_end + 4 > len(resources):
            return False
        (size,) = struct.unpack_from(">I", resources, name_end)
        start = name_end + 4
        if resource == _IPTC_RESOURCE and _iim_has_content(resources[start : start + size]):
            return True
        pos = start + size + (size % 2)
    return False


def _iim_has_content(iim: bytes) -> bool:
    """Whether an IPTC-IIM block has a non-blank application-record value (2:xx, not 2:00)."""
    pos = 0
    while pos + 5 <= len(iim) and iim[pos] == _IIM_TAG:
        record, dataset, size = (
            iim[pos + 1],
            iim[pos + 2],
            struct.unpack_from(">H", iim, pos + 3)[0],
        )
        pos += 5
        if size & 0x8000:  # extended size: the next (size & 0x7FFF) bytes hold the length
            count = size & 0x7FFF
            size = int.from_bytes(iim[pos : pos + count], "big")
            pos += count
        value = iim[pos : pos + size]
        if record == _IIM_APPLICATION_RECORD and dataset != 0 and value.strip(b" \x00"):
            return True
        pos += size
    return False


def keep_reason(info: JpegInfo) -> str | None:
    """Why this JPEG must be passed through unchanged, or None when it may be transcoded.

    A lossless transcode would keep every byte (the reconstruction is bit-exact, trailers
    included), but viewers and Immich read a .jxl as one still image: an embedded motion-photo
    video or a gain map would sit invisible in the `jbrd` box until someone converts back.
    """
    xmp = info.xmp
    if (
        b"MotionPhoto" in xmp
        or b"MicroVideo" in xmp
        or b"ftyp" in info.trailing[:64]
        or b"MotionPhoto_Data" in info.trailing
    ):
        return "kept as it is: motion photo (the JPEG carries an embedded video)"
    if b"hdrgm" in xmp or (info.has_mpf and b"hdrgm" in info.trailing):
        return "kept as it is: Ultra HDR JPEG with a gain map (JPEG XL would hide the HDR version)"
    if info.has_mpf and info.trailing_size:
        return (
            "kept as it is: the JPEG holds more images after the main one "
            "(MPF: gain map, depth map or preview)"
        )
    if info.trailing_size:
        return (
            f"kept as it is: {info.trailing_size:,} bytes of other data follow the end of the JPEG "
            "image (embedded video, preview or app data)"
        )
    if info.components == 4:
        return "kept as it is: CMYK JPEG cannot be transcoded losslessly to JPEG XL"
    if info.sof_marker not in _TRANSCODABLE_SOF:
        name = _SOF_NAMES.get(info.sof_marker, f"SOF 0x{info.sof_marker:02X} JPEG")
        return f"kept as it is: {name} cannot be transcoded losslessly to JPEG XL"
    if info.precision != 8:
        return (
            f"kept as it is: {info.precision}-bit JPEG cannot be transcoded losslessly to JPEG XL"
        )
    if info.components not in (1, 3):
        return f"kept as it is: JPEG with {info.components} colour components cannot be transcoded"
    if info.has_iptc and not info.has_xmp:
        # JPEG XL has no IPTC box: libjxl keeps APP13 inside the reconstruction data, where no
        # reader (exiftool, so Immich) looks. Editors that write IPTC mirror it into XMP (the
        # Metadata Working Group rule), so only IPTC without any XMP would become invisible.
        return (
            "kept as it is: its IPTC metadata (keywords, captions) has no XMP copy and would be "
            "invisible in a JPEG XL (hidden in the reconstruction data)"
        )
    return None


@dataclass(frozen=True)
class Transcode:
    decision: str  # converted | kept | unreadable
    reason: str
    jxl: bytes | None = None  # the verified .jxl (converted only)
    metadata: tuple[str, ...] = ()


def _damage_reason(data: bytes, info: JpegInfo) -> str | None:
    """Full Pillow decode, used only after libjxl refused the bitstream: tells a damaged JPEG
    (truncated, corrupt entropy data) from a sound JPEG that libjxl merely cannot represent."""
    try:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as im:
            im.load()
    except Exception as exc:
        if info.damage:
            return f"damaged JPEG, its image data cannot be decoded: {info.damage} ({exc})"
        return f"damaged JPEG, its image data cannot be decoded: {exc}"
    return None


def transcode_lossless(
    data: bytes, info: JpegInfo, width: int, height: int, effort: int
) -> Transcode:
    """JPEG → lossless JPEG XL with plain metadata boxes, verified bit-exact. Never raises."""
    try:
        jxl = _encode(data, info, width, height, effort)
    except Exception as exc:
        # libjxl refuses what it cannot represent ("Input is invalid", "JPEG bitstream
        # reconstruction data could not be represented"). Decision: a JPEG that Pillow cannot decode
        # either is damaged (truncated, corrupt scan); the product sends corrupt or truncated content
        # to undone/ so a person notices the broken photo (on_error: upload-original still uploads
        # it). A JPEG that decodes fine is sound and merely beyond libjxl: upload it unchanged.
        # Conversely, a damaged JPEG that libjxl does transcode and reconstruct bit-exact has lost
        # nothing by the conversion, so it is converted like any other.
        damage = _damage_reason(data, info)
        if damage is not None:
            return Transcode("unreadable", damage)
        return Transcode(
            "kept", f"kept as it is: libjxl cannot transcode this JPEG losslessly ({exc})"
        )
    try:
        return _verify(data, info, jxl)
    except Exception as exc:
        # The source was accepted by libjxl, so it is sound; it is our output that failed. The
        # original is uploaded unchanged rather than sent to undone/.
        return Transcode("kept", f"kept as it is: the JPEG XL could not be verified ({exc})")


def _encode(data: bytes, info: JpegInfo, width: int, height: int, effort: int) -> bytes:
    # lossless=True is essential: the constructor's default quality=1.0 makes libjxl write a
    # smaller file that still has a jbrd box but no longer reconstructs bit-exact.
    mode = "L" if info.components == 1 else "RGB"
    encoder = pillow_jxl.Encoder(mode=mode, lossless=True, effort=effort)
    return encoder(data, width, height, jpeg_encode=True)


def _verify(data: bytes, info: JpegInfo, jxl: bytes) -> Transcode:
    """Rewrite brob boxes, add the ICC box, then accept the .jxl only if it carries the metadata
    and decodes back to exactly `data`."""
    jxl = jxlboxes.decompress_brob_boxes(jxl, limit=len(data))
    if info.icc:
        # Bit-exact reconstruction below also proves the box right: libjxl rebuilds the APP2
        # chunks from the codestream's profile, so they match only if the two profiles are equal.
        jxl = jxlboxes.insert_before_last_codestream_box(jxl, jxlboxes.icc_box(info.icc))
    types = jxlboxes.box_types(jxl)
    missing = [
        name
        for name, present, box in (("EXIF", info.has_exif, b"Exif"), ("XMP", info.has_xmp, b"xml "))
        if present and box not in types
    ]
    if missing or b"brob" in types:
        return Transcode(
            "kept",
            f"kept as it is: the JPEG XL would not carry readable {', '.join(missing) or 'metadata'}",
        )

    # The check that makes deleting the original safe: decode what we will store and compare.
    is_jpeg, _info, reconstructed, icc, _boxes = pillow_jxl.Decoder()(jxl)
    if not is_jpeg or reconstructed != data:
        return Transcode(
            "kept", "kept as it is: the JPEG XL did not reconstruct the JPEG bit-exact"
        )
    icc_kept = info.has_icc and bool(icc)
    metadata = tuple(
        name
        for name, present in (("EXIF", info.has_exif), ("XMP", info.has_xmp), ("ICC", icc_kept))
        if present
    )
    return Transcode(
        "converted", "lossless JPEG XL transcode, reconstructs the JPEG bit-exact", jxl, metadata
    )


# -- lossy mode ----------------------------------------------------------------------------------

_ORIENTATION_TAG = 0x0112
_SHORT = 3


def lossy_blocker(info: JpegInfo) -> str | None:
    """Why lossy mode would lose something this JPEG carries (the lossless transcode keeps every
    byte, so the caller uses that instead), or None."""
    if info.has_extended_xmp:
        return "its extended XMP (e.g. a depth map) has no place in a lossy JPEG XL"
    if info.has_iptc:
        return "its IPTC metadata (keywords, captions) has no place in a lossy JPEG XL"
    if info.components == 1 and info.has_icc:
        return "a grayscale JPEG with an ICC profile cannot be converted to sRGB"
    return None


def exif_with_orientation_reset(tiff: bytes) -> bytes:
    """`tiff` (an EXIF structure) with IFD0's Orientation set to 1, every other byte unchanged.

    Re-serialising with Pillow (`Exif.tobytes()`) would drop the thumbnail and break maker notes
    that use absolute offsets (the Live Photo pairing UUID lives in Apple's), so the one value is
    patched in place. Raises ValueError when the structure cannot be walked.
    """
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        raise ValueError("the EXIF has no TIFF header")
    (ifd0,) = struct.unpack_from(order + "I", tiff, 4)
    if ifd0 + 2 > len(tiff):
        raise ValueError("the EXIF's first directory lies outside it")
    (count,) = struct.unpack_from(order + "H", tiff, ifd0)
    for entry in range(ifd0 + 2, min(ifd0 + 2 + 12 * count, len(tiff) - 11), 12):
        tag, kind, number = struct.unpack_from(order + "HHI", tiff, entry)
        if tag == _ORIENTATION_TAG and kind == _SHORT and number == 1:
            return tiff[: entry + 8] + struct.pack(order + "H", 1) + tiff[entry + 10 :]
    return tiff  # no Orientation tag: nothing to reset


@dataclass(frozen=True)
class Lossy:
    jxl: bytes
    metadata: tuple[str, ...]
    notes: tuple[str, ...]  # what was done to pixels: rotated, colours converted


def transcode_lossy(data: bytes, info: JpegInfo, quality: int, effort: int) -> Lossy:
    """Decode, apply the EXIF orientation, convert the ICC colours to sRGB, encode lossy JPEG XL
    with the EXIF (orientation reset) and XMP in plain boxes; verify it decodes. Raises on failure.

    The plugin's pixel path always declares sRGB and drops the ICC (measured), and
    an XYB-encoded image cannot be relabelled afterwards, so the colours are converted first.
    No `colr` box then: the codestream holds no profile, only the enumerated sRGB, and exiftool
    reporting no profile is what readers take for sRGB.
    """
    notes: list[str] = []
    with Image.open(io.BytesIO(data), formats=["JPEG"]) as im:
        im.load()
        icc = im.info.get("icc_profile")
        oriented = ImageOps.exif_transpose(im)
        if oriented.size != im.size or oriented.tobytes() != im.tobytes():
            notes.append("orientation applied to the pixels")
    if icc and oriented.mode == "RGB":
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        name = ImageCms.getProfileDescription(source).strip()
        oriented = ImageCms.profileToProfile(
            oriented, source, ImageCms.createProfile("sRGB"), outputMode="RGB"
        )
        notes.append(f"colours converted from {name!r} to sRGB")
    if oriented.mode not in ("RGB", "L"):
        raise ValueError(f"unexpected pixel mode {oriented.mode}")
    encoder = pillow_jxl.Encoder(mode=oriented.mode, lossless=False, quality=quality, effort=effort)
    codestream = encoder(oriented.tobytes(), oriented.width, oriented.height, jpeg_encode=False)
    boxes: list[tuple[bytes, bytes]] = []
    if info.exif:
        exif = exif_with_orientation_reset(info.exif)
        left = Image.Exif()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Corrupt EXIF data": then there is no orientation
            left.load(exif)
        if left.get(_ORIENTATION_TAG, 1) != 1:  # Pillow read an orientation we could not patch
            raise ValueError("the EXIF orientation could not be reset")
        boxes.append((b"Exif", b"\x00\x00\x00\x00" + exif))
    if info.xmp:
        boxes.append((b"xml ", info.xmp))
    jxl = jxlboxes.container(codestream, boxes) if boxes else codestream
    is_jpeg, decoded, pixels, _icc, _boxes = pillow_jxl.Decoder()(jxl)
    channels = 1 if oriented.mode == "L" else 3
    if is_jpeg or (decoded.width, decoded.height) != oriented.size:
        raise ValueError("the lossy JPEG XL does not decode to the expected dimensions")
    if len(pixels) != oriented.width * oriented.height * channels:
        raise ValueError("the lossy JPEG XL did not decode completely")
    metadata = tuple(name for name, ok in (("EXIF", info.exif), ("XMP", info.xmp)) if ok)
    return Lossy(jxl, metadata, tuple(notes))
