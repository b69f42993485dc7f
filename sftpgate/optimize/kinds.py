"""What a file is, decided from its content only: magic bytes, then a real probe.

Phones and sync apps get names wrong (a JPEG saved as `.png`, an HTML error page saved as `.jpg`),
so the name is never consulted. `sniff` looks at the first bytes; `probe` then parses the
headers/structure without decoding pixels, so a truncated video or a decompression bomb is
refused cheaply and before any codec allocates memory for it.
"""

from __future__ import annotations

import contextlib
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pillow_heif
from PIL import Image

from sftpgate.optimize import jpeg, jxlboxes

KINDS = ("jpeg", "png", "heic", "avif", "webp", "gif", "jxl", "raw", "video", "unknown")
HEAD_SIZE = 4096  # bytes `sniff` needs at most

# pillow-heif registers a lazy HEIF opener (no pixel decode in Image.open); AVIF is native in
# Pillow 13. Registering twice is harmless, so doing it at import keeps worker processes simple.
pillow_heif.register_heif_opener()

_HEIF_BRANDS = frozenset(
    {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"mif2"}
)
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
# ISO base media / QuickTime brands of camera and phone recordings that Immich accepts.
_VIDEO_BRANDS = frozenset(
    {
        *(b"iso%d" % n for n in range(2, 10)),
        b"isom", b"mp41", b"mp42", b"mp71", b"avc1", b"qt  ", b"M4V ", b"M4VH", b"M4VP",
        b"mmp4", b"dash", b"MSNV", b"XAVC", b"f4v ", b"NDAS", b"CAEP", b"kddi", b"hvc1",
    }
)  # fmt: skip
# QuickTime files written before `ftyp` existed start directly with one of these atoms.
QUICKTIME_FIRST_ATOMS = frozenset({b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"})
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"IIRO", b"IIRS", b"IIU\x00")  # TIFF, ORF, RW2


def _ftyp_brands(head: bytes) -> list[bytes]:
    """Major brand first, then the compatible brands."""
    (size,) = struct.unpack_from(">I", head, 0)
    end = min(max(size, 16), len(head))
    return [head[8:12]] + [head[i : i + 4] for i in range(16, end - 3, 4)]


def sniff(head: bytes) -> str:
    """Kind from the leading bytes alone (pass at least the first HEAD_SIZE bytes)."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith(jxlboxes.JXL_CODESTREAM_SIGNATURE) or head.startswith(
        jxlboxes.JXL_CONTAINER_SIGNATURE
    ):
        return "jxl"
    if len(head) >= 12 and head[4:8] == b"ftyp":
        brands = _ftyp_brands(head)
        if b"crx " in brands:
            return "raw"  # Canon CR3 is ISO base media with brand "crx "
        # The major brand decides; compatible brands break the tie for generic ones like mif1.
        for brand in brands:
            if brand in _AVIF_BRANDS:
                return "avif"
            if brand in _HEIF_BRANDS and brand not in (b"mif1", b"msf1", b"mif2"):
                return "heic"
        if any(brand in _HEIF_BRANDS for brand in brands):
            return "heic"
        if any(brand in _VIDEO_BRANDS or brand.startswith((b"3gp", b"3g2")) for brand in brands):
            return "video"
        return "unknown"
    if len(head) >= 8 and head[4:8] in QUICKTIME_FIRST_ATOMS:
        return "video"
    if head.startswith(b"\x1a\x45\xdf\xa3"):  # Matroska / WebM
        return "video"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "video"
    if head.startswith(b"\x30\x26\xb2\x75\x8e\x66\xcf\x11"):  # ASF / WMV
        return "video"
    if len(head) > 376 and head[0] == head[188] == head[376] == 0x47:  # MPEG transport stream
        return "video"
    if head.startswith(b"\x00\x00\x01\xba"):  # MPEG program stream
        return "video"
    if head[:4] in _TIFF_MAGIC:
        return "raw"  # DNG, NEF, ARW, CR2, ORF, RW2... (a plain TIFF is kept the same way)
    if head[6:14] == b"HEAPCCDR" or head.startswith((b"FUJIFILMCCD-RAW", b"FOVb", b"\x00MRM")):
        return "raw"  # Canon CRW, Fuji RAF, Sigma X3F, Minolta MRW
    return "unknown"


def describe_unknown(head: bytes, size: int) -> str:
    """One sentence saying what an unrecognised file seems to be, for the undone/ sidecar."""
    if size == 0:
        return "the file is empty (0 bytes)"
    if len(head) >= 8 and head[4:8] == b"ftyp":
        brand = head[8:12].decode("latin-1")
        return f"ISO media file with brand {brand!r}, which is neither a photo nor a video format"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "the content is an HTML page, not a photo or video (an error page saved under this name?)"
    try:
        decoded = head.decode("utf-8")
    except UnicodeDecodeError:
        decoded = ""
    if decoded and all(ch.isprintable() or ch in "\t\r\n" for ch in decoded):
        return "the content is plain text, not a photo or video"
    return "the content is not a photo or video format sftpgate recognises (unknown file signature)"


@dataclass(frozen=True)
class Bmff:
    boxes: tuple[tuple[bytes, int, int], ...]  # (type, offset, size) of the top-level boxes
    problem: str | None


def iter_bmff(f: BinaryIO, start: int, end: int) -> Iterator[tuple[bytes, int, int, int]]:
    """Yield (type, offset, header size, box size) for the boxes in f[start:end]; stop at junk.

    Raises ValueError when a box claims more bytes than remain (a truncated file).
    """
    pos = start
    while pos + 8 <= end:
        f.seek(pos)
        header = f.read(16)
        size, box_type = struct.unpack_from(">I4s", header)
        header_size = 8
        if size == 1 and len(header) >= 16:
            (size,) = struct.unpack_from(">Q", header, 8)
            header_size = 16
        elif size == 0:
            size = end - pos
        if not all(0x20 <= c < 0x7F for c in box_type) or size < header_size:
            return  # not a box: vendor trailers after the last box are tolerated
        if pos + size > end:
            raise ValueError(
                f"the file is truncated: its {box_type.decode('latin-1')!r} box needs "
                f"{pos + size:,} bytes but the file has {end:,}"
            )
        yield box_type, pos, header_size, size
        pos += size


def walk_bmff(path: Path, kind: str) -> Bmff:
    """Top-level ISO BMFF / QuickTime structure, and why it is unusable (truncated, no index)."""
    size = path.stat().st_size
    boxes: list[tuple[bytes, int, int]] = []
    with path.open("rb") as f:
        try:
            for box_type, offset, _header, box_size in iter_bmff(f, 0, size):
                boxes.append((box_type, offset, box_size))
        except ValueError as exc:
            return Bmff(tuple(boxes), str(exc))
    types = {box[0] for box in boxes}
    problem = None
    if kind == "video" and b"moov" not in types:
        problem = (
            "the video has no 'moov' index box: the recording was never finalised or the file is "
            "incomplete"
        )
    elif kind in ("heic", "avif", "raw") and b"meta" not in types and b"moov" not in types:
        problem = f"the {kind.upper()} file has no 'meta' box, so it holds no readable image"
    return Bmff(tuple(boxes), problem)


@dataclass(frozen=True)
class Probe:
    kind: str
    problem: str | None = None  # why the content is unreadable; None when it is fine
    width: int = 0
    height: int = 0
    metadata: tuple[str, ...] = ()  # which of EXIF / XMP / ICC the file carries
    note: str = ""  # e.g. "motion photo", "animated"
    jpeg: jpeg.JpegInfo | None = field(default=None, repr=False)


_PIL_FORMATS = {
    "jpeg": "JPEG",
    "png": "PNG",
    "gif": "GIF",
    "webp": "WEBP",
    "avif": "AVIF",
    "heic": "HEIF",
}


def bomb_reason(width: int, height: int, max_pixels: int) -> str | None:
    if width * height <= max_pixels:
        return None
    return (
        f"refused as a decompression bomb: the image claims {width}×{height} = "
        f"{width * height / 1e6:,.0f} megapixels, more than the {max_pixels / 1e6:,.0f} MP limit "
        "(optimize.max_pixels)"
    )


@contextlib.contextmanager
def pixel_limit(max_pixels: int) -> Iterator[None]:
    """Pillow's own bomb guard set to our limit (it raises above 2× and warns above 1×; we refuse
    above 1× ourselves, so its warning is noise)."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            # Also silences "Corrupt EXIF data" and similar: the probe reports problems itself.
            warnings.simplefilter("ignore")
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _pillow_probe(path: Path, kind: str, max_pixels: int) -> Probe:
    """Header-only open: Pillow parses headers and metadata, pixels are never loaded here."""
    try:
        with pixel_limit(max_pixels), Image.open(path, formats=[_PIL_FORMATS[kind]]) as im:
            width, height = im.size
            info = dict(im.info)
            frames = getattr(im, "n_frames", 1)
    except Image.DecompressionBombError as exc:
        return Probe(kind, f"refused as a decompression bomb: {exc}")
    except Exception as exc:
        return Probe(kind, f"the {kind.upper()} cannot be read: {exc}")
    problem = bomb_reason(width, height, max_pixels)
    present = (
        ("EXIF", bool(info.get("exif"))),
        ("XMP", bool(info.get("xmp") or info.get("XML:com.adobe.xmp"))),
        ("ICC", bool(info.get("icc_profile"))),
    )
    metadata = tuple(name for name, ok in present if ok)
    note = f"animated, {frames} frames" if frames > 1 else ""
    return Probe(kind, problem, width, height, metadata, note)


def _probe_jpeg(path: Path, data: bytes, max_pixels: int) -> Probe:
    try:
        info = jpeg.parse_jpeg(data)
    except jpeg.JpegFormatError as exc:
        return Probe("jpeg", f"the JPEG cannot be read: {exc}")
    # Refuse from our own SOF parse first, so not even Pillow sees a bomb's header.
    problem = bomb_reason(info.width, info.height, max_pixels)
    if problem:
        return Probe("jpeg", problem, info.width, info.height, info.metadata(), jpeg=info)
    probe = _pillow_probe(path, "jpeg", max_pixels)
    if probe.problem:
        return Probe("jpeg", probe.problem, jpeg=info)
    return Probe("jpeg", None, probe.width, probe.height, info.metadata(), jpeg=info)


def _probe_png(path: Path, head: bytes, max_pixels: int) -> Probe:
    if head[12:16] != b"IHDR" or len(head) < 24:
        return Probe("png", "the PNG cannot be read: it has no IHDR header")
    width, height = struct.unpack_from(">II", head, 16)
    problem = bomb_reason(width, height, max_pixels)
    if problem:
        return Probe("png", problem, width, height)
    probe = _pillow_probe(path, "png", max_pixels)
    if probe.problem is None and b"acTL" in head.split(b"IDAT", 1)[0]:
        return Probe("png", None, probe.width, probe.height, probe.metadata, "animated (APNG)")
    return probe


def _tiff_metadata(path: Path) -> tuple[str | None, tuple[str, ...]]:
    """(problem, metadata) from IFD0 of a TIFF-based RAW: its entries must lie inside the file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return "the RAW file is too short to hold a TIFF header", ()
        order = "<" if head[:2] == b"II" else ">"
        (ifd0,) = struct.unpack_from(order + "I", head, 4)
        if not 8 <= ifd0 < size - 2:
            return f"the RAW file's first image directory lies outside the file (offset {ifd0})", ()
        f.seek(ifd0)
        (count,) = struct.unpack(order + "H", f.read(2))
        entries = f.read(12 * count)
        if len(entries) < 12 * count:
            return "the RAW file is truncated inside its first image directory", ()
        tags = {struct.unpack_from(order + "H", entries, 12 * i)[0] for i in range(count)}
    metadata = ["EXIF"]  # a TIFF-based RAW is itself an EXIF structure (Make, Model, dates)
    if 700 in tags:
        metadata.append("XMP")
    if 34675 in tags:
        metadata.append("ICC")
    return None, tuple(metadata)


def probe(path: Path, kind: str, head: bytes, max_pixels: int, data: bytes | None = None) -> Probe:
    """Parse headers/structure of `path` (already sniffed as `kind`) without decoding pixels.

    `data` is the whole file for kinds whose optimizer needs it anyway (JPEG).
    """
    if kind == "jpeg":
        return _probe_jpeg(path, data if data is not None else path.read_bytes(), max_pixels)
    if kind == "png":
        return _probe_png(path, head, max_pixels)
    if kind in ("gif", "webp"):
        return _pillow_probe(path, kind, max_pixels)
    if kind in ("heic", "avif"):
        structure = walk_bmff(path, kind)
        if structure.problem:
            return Probe(kind, structure.problem)
        result = _pillow_probe(path, kind, max_pixels)
        if result.problem is None and b"mpvd" in {box[0] for box in structure.boxes}:
            return Probe(kind, None, result.width, result.height, result.metadata, "motion photo")
        return result
    if kind == "video":
        if len(head) >= 8 and (head[4:8] == b"ftyp" or head[4:8] in QUICKTIME_FIRST_ATOMS):
            return Probe(kind, walk_bmff(path, kind).problem)
        return Probe(kind)  # Matroska, AVI, MPEG-TS...: the PyAV probe will judge these
    if kind == "raw":
        if head[4:8] == b"ftyp":  # CR3
            structure = walk_bmff(path, kind)
            return Probe(
                kind, structure.problem, metadata=("EXIF",) if not structure.problem else ()
            )
        if head[:4] in _TIFF_MAGIC:
            problem, metadata = _tiff_metadata(path)
            return Probe(kind, problem, metadata=metadata)
        return Probe(kind)
    if kind == "jxl":
        # Never Image.open an untrusted .jxl: the plugin decodes every pixel inside open(),
        # before Pillow's bomb check (a 65000×65000 one took 39 s and 12 GiB). Check the
        # container structure only.
        if head.startswith(jxlboxes.JXL_CONTAINER_SIGNATURE):
            try:
                types = jxlboxes.box_types(path.read_bytes())
            except jxlboxes.JxlBoxError as exc:
                return Probe(kind, f"the JPEG XL file cannot be read: {exc}")
            if b"jxlc" not in types and b"jxlp" not in types:
                return Probe(kind, "the JPEG XL container holds no codestream")
            present = (("EXIF", b"Exif" in types), ("XMP", b"xml " in types))
            return Probe(kind, metadata=tuple(name for name, ok in present if ok))
        return Probe(kind)
    return Probe("unknown", describe_unknown(head, path.stat().st_size))


def detect_kind(path: Path) -> str:
    """Kind by content (magic bytes only; `probe` then says whether the content is readable)."""
    with path.open("rb") as f:
        head = f.read(HEAD_SIZE)
    return sniff(head)
