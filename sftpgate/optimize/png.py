"""PNG → lossless JPEG XL, pixels verified equal.

A PNG is converted only when everything it holds has a place in the JPEG XL: 8-bit (or less)
pixels, EXIF (`eXIf` → `Exif` box), XMP (`iTXt XML:com.adobe.xmp` → `xml ` box) and the ICC
profile (written into the codestream header by jxlicc.py, since the encoder cannot, and copied
into a `colr` box, where exiftool can read it). Anything else is passed through with the
reason, because the conversion would lose it:

- 16-bit PNGs: Pillow reads 16-bit colour as 8-bit (measured on the corpus screenshot, 1% of its
  samples use the low byte), and the encoder has no 16-bit colour mode;
- animated PNGs: Immich plays APNG; a still JPEG XL would drop the animation;
- text chunks other than XMP (ImageMagick's "Raw profile type iptc" holds IPTC keywords), HDR
  chunks (cICP, mDCv, cLLi), provenance (caBX) and any chunk we do not know;
- gAMA / cHRM without an ICC or sRGB chunk: the JPEG XL would say sRGB instead;
- an EXIF orientation other than 1, which would disagree with the codestream's own orientation.

The chunk list is read from the file itself (headers only, the image data is skipped), so what
Pillow chooses to expose does not decide what may be dropped.
"""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import pillow_jxl
from PIL import Image

from sftpgate.optimize import jxlboxes, jxlicc, kinds

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Chunks whose content ends up in the JPEG XL, or that only describe how PNG stores pixels.
_CARRIED = frozenset(
    {b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"iCCP", b"sRGB", b"eXIf", b"gAMA", b"cHRM"}
)
# Presentation hints with no meaning for a photo library: pixel density, significant bits,
# background colour, palette histogram, Apple's parallel-decoding index, modification time.
_DROPPABLE = frozenset({b"pHYs", b"sBIT", b"bKGD", b"hIST", b"sPLT", b"iDOT", b"tIME"})
_TEXT = frozenset({b"tEXt", b"zTXt", b"iTXt"})
_XMP_KEY = b"XML:com.adobe.xmp"
_ORIENTATION = 0x0112
_MAX_CHUNKS = 100_000  # a real PNG has a handful plus its IDATs; more is a crafted file


@dataclass(frozen=True)
class Chunks:
    types: frozenset[bytes]
    text_keys: tuple[str, ...]  # keywords of text chunks other than XMP
    bit_depth: int
    problem: str | None = None


def read_chunks(path: Path) -> Chunks:
    """Chunk types and text keywords, reading chunk headers only."""
    types: set[bytes] = set()
    keys: list[str] = []
    bit_depth = 0
    size = path.stat().st_size
    with path.open("rb") as f:
        if f.read(8) != _SIGNATURE:
            return Chunks(frozenset(), (), 0, "not a PNG signature")
        pos = 8
        for _ in range(_MAX_CHUNKS):
            header = f.read(8)
            if len(header) < 8:
                return Chunks(frozenset(types), tuple(keys), bit_depth, "the PNG has no IEND")
            length, chunk = struct.unpack(">I4s", header)
            if pos + 12 + length > size:
                return Chunks(frozenset(types), tuple(keys), bit_depth, "the PNG is truncated")
            types.add(chunk)
            if chunk == b"IHDR":
                bit_depth = f.read(9)[8]
                f.seek(pos + 8 + length + 4)
            elif chunk in _TEXT:
                keyword = f.read(min(length, 80)).split(b"\x00", 1)[0]
                if keyword != _XMP_KEY:
                    keys.append(keyword.decode("latin-1"))
                f.seek(pos + 8 + length + 4)
            else:
                f.seek(length + 4, 1)
            pos += 12 + length
            if chunk == b"IEND":
                return Chunks(frozenset(types), tuple(keys), bit_depth)
    return Chunks(frozenset(types), tuple(keys), bit_depth, "the PNG has too many chunks")


class KeepPng(Exception):
    """The PNG is sound but must be passed through; the message is the reason."""


class DamagedPng(Exception):
    """The PNG's image data cannot be decoded; the message is the reason."""


def keep_reason(chunks: Chunks) -> str | None:
    """Why this PNG must be passed through unchanged, judged from its chunk list, or None."""
    if b"acTL" in chunks.types:
        return "kept as it is: animated PNG (APNG); a JPEG XL still would lose the animation"
    if chunks.bit_depth == 16:
        return (
            "kept as it is: 16-bit PNG; the JPEG XL encoder has no 16-bit colour mode and "
            "Pillow reads 16-bit colour as 8-bit"
        )
    if chunks.text_keys:
        keys = ", ".join(sorted(set(chunks.text_keys)))
        return f"kept as it is: the PNG's text metadata ({keys}) has no place in JPEG XL"
    unknown = sorted(c.decode("latin-1") for c in chunks.types - _CARRIED - _DROPPABLE - _TEXT)
    if unknown:
        return f"kept as it is: the PNG has chunks JPEG XL cannot carry ({', '.join(unknown)})"
    return None


def _colour_or_orientation_reason(info: dict[str, object]) -> str | None:
    """Reasons that need the decoded chunk values (Pillow's `im.info` after `load()`)."""
    if not info.get("icc_profile") and "srgb" not in info:
        gamma = info.get("gamma")
        if "chromaticity" in info or (isinstance(gamma, float) and abs(gamma - 1 / 2.2) > 0.0005):
            return (
                "kept as it is: the PNG declares its own gamma/primaries (gAMA/cHRM) without an "
                "ICC profile; the JPEG XL would say sRGB instead"
            )
    exif = _bytes(info, "exif")
    if exif:
        orientation = _exif(exif).get(_ORIENTATION, 1)
        if orientation != 1:
            return (
                f"kept as it is: the PNG's EXIF says orientation {orientation}, which the JPEG XL "
                "codestream would contradict"
            )
    return None


def _exif(raw: bytes) -> Image.Exif:
    exif = Image.Exif()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Corrupt EXIF data": a broken EXIF has no orientation
        exif.load(raw)
    return exif


def _bytes(info: dict[str, object], key: str) -> bytes:
    value = info.get(key)
    return value if isinstance(value, bytes) else b""


def _pixel_mode(im: Image.Image) -> str:
    """The JPEG XL pixel mode that holds `im` without loss (8 bits per sample)."""
    transparent = "transparency" in im.info
    if im.mode in ("1", "L"):
        return "LA" if transparent else "L"
    if im.mode in ("LA", "RGBA", "PA"):
        return "RGBA" if im.mode == "PA" else im.mode
    if im.mode in ("P", "RGB"):
        return "RGBA" if transparent else "RGB"
    raise KeepPng(f"kept as it is: PNG pixel mode {im.mode} has no lossless JPEG XL equivalent")


@dataclass(frozen=True)
class Converted:
    jxl: bytes
    metadata: tuple[str, ...]  # EXIF / XMP / ICC carried
    mode: str


def convert(path: Path, effort: int, max_pixels: int) -> Converted:
    """Encode the PNG losslessly and verify the JPEG XL decodes to the same pixels and ICC.

    Raises KeepPng when the PNG must stay as it is (with the reason) and DamagedPng when its
    image data cannot be decoded.
    """
    with kinds.pixel_limit(max_pixels), Image.open(path, formats=["PNG"]) as im:
        try:
            im.load()
        except Exception as exc:
            raise DamagedPng(f"damaged PNG, its image data cannot be decoded: {exc}") from exc
        info = dict(im.info)
        reason = _colour_or_orientation_reason(info)
        if reason:
            raise KeepPng(reason)
        mode = _pixel_mode(im)
        pixels = im if im.mode == mode else im.convert(mode)
        raw = pixels.tobytes()
        size = pixels.size
    icc, exif, xmp = (_bytes(info, key) for key in ("icc_profile", "exif", "xmp"))
    codestream = pillow_jxl.Encoder(mode=mode, lossless=True, effort=effort)(
        raw, size[0], size[1], jpeg_encode=False
    )
    if icc:
        try:
            codestream = jxlicc.embed_icc(codestream, icc)
        except jxlicc.JxlHeaderError as exc:
            raise KeepPng(f"kept as it is: its ICC profile cannot be carried ({exc})") from exc
    boxes: list[tuple[bytes, bytes]] = []
    if exif:
        tiff = exif.removeprefix(b"Exif\x00\x00")
        boxes.append((b"Exif", b"\x00\x00\x00\x00" + tiff))  # offset of the TIFF header: 0
    if xmp:
        boxes.append((b"xml ", xmp))
    if icc:
        boxes.append(jxlboxes.icc_box(icc))
    jxl = jxlboxes.container(codestream, boxes) if boxes else codestream

    # The check that makes deleting the original safe: libjxl decodes what we will store.
    is_jpeg, decoded_info, decoded, decoded_icc, _boxes = pillow_jxl.Decoder()(jxl)
    if is_jpeg or decoded_info.mode != mode or decoded != raw:
        raise KeepPng("kept as it is: the JPEG XL did not decode to the same pixels")
    if icc and decoded_icc != icc:
        raise KeepPng("kept as it is: the JPEG XL did not decode with the same ICC profile")
    metadata = tuple(
        name for name, present in (("EXIF", exif), ("XMP", xmp), ("ICC", icc)) if present
    )
    return Converted(jxl, metadata, mode)
