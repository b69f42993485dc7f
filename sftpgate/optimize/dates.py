"""When a photo or video was taken (Immich's `fileCreatedAt`): always timezone-aware, or None.

From the content: EXIF DateTimeOriginal (+ OffsetTimeOriginal), then DateTimeDigitized
(+ OffsetTimeDigitized), as Immich itself prefers them; for video Apple's creationdate, then the
container's creation_time. IFD0 DateTime is deliberately not used: editors rewrite it, so it is a
modification time. Without an offset tag the wall-clock time is read in the configured zone,
because that is where the camera's clock was most likely set.

Files without an embedded date (WhatsApp images, screenshots, edited exports) often carry it in
their name, the way phones and messengers name them; `upload_date` picks the content's date, else
the name's, else the file's mtime.
"""

from __future__ import annotations

import contextlib
import re
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from datetime import timezone as dt_timezone
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo

import av
from PIL import Image

from sftpgate.optimize import jxlboxes, kinds

EXIF_IFD = 0x8769
_DATETIME_ORIGINAL, _OFFSET_ORIGINAL, _SUBSEC_ORIGINAL = 36867, 36881, 37521
_DATETIME_DIGITIZED, _OFFSET_DIGITIZED, _SUBSEC_DIGITIZED = 36868, 36882, 37522
_DATETIME_RE = re.compile(r"(\d{4}):(\d{2}):(\d{2})[ T](\d{2}):(\d{2}):(\d{2})")
_OFFSET_RE = re.compile(r"([+-])(\d{2}):?(\d{2})")
# Canon CR3: moov/uuid(85c0b687-...) holds CMT1 (IFD0) and CMT2 (the Exif IFD) as TIFF blobs.
_CR3_UUID = bytes.fromhex("85c0b687820f11e08111f4ce462b6a48")
PIL_FORMATS = {
    "jpeg": "JPEG",
    "png": "PNG",
    "webp": "WEBP",
    "avif": "AVIF",
    "heic": "HEIF",
    "gif": "GIF",
}
_MAX_METADATA = 16 * 1024 * 1024  # no real EXIF block comes near this; guards brob expansion


def zone(name: str) -> tzinfo | None:
    """The IANA zone `name`, or None for the system local zone ("" or an unknown name).

    Config validation rejects unknown names at start-up; falling back to local time here keeps
    capture_time total (it must never raise inside a worker).
    """
    if not name:
        return None
    try:
        return ZoneInfo(name)
    except (KeyError, ValueError, OSError):  # ZoneInfoNotFoundError is a KeyError
        return None


def parse_exif_datetime(value: object, offset: object, subsec: object, tz: str) -> datetime | None:
    """Combine EXIF date, offset and sub-second strings into an aware datetime (None if invalid)."""
    text = _text(value)
    match = _DATETIME_RE.fullmatch(text) if text else None
    if match is None:
        return None  # missing, blank ("    :  :     :  :  ") or garbled
    year, month, day, hour, minute, second = (int(part) for part in match.groups())
    try:
        naive = datetime(year, month, day, hour, minute, second)
    except ValueError:
        return None  # "0000:00:00 00:00:00" and other impossible dates
    fraction = _text(subsec)
    if fraction.isdigit():
        naive = naive.replace(microsecond=int((fraction + "000000")[:6]))
    offset_text = _text(offset)
    offset_match = _OFFSET_RE.fullmatch(offset_text) if offset_text else None
    if offset_text in ("Z", "+00:00", "-00:00"):
        return naive.replace(tzinfo=UTC)
    if offset_match:
        sign, hours, minutes = offset_match.groups()
        delta = timedelta(hours=int(hours), minutes=int(minutes))
        if delta < timedelta(hours=24):
            return naive.replace(tzinfo=dt_timezone(-delta if sign == "-" else delta))
    return _in_zone(naive, tz)


def _in_zone(naive: datetime, tz: str) -> datetime:
    """A wall-clock time read in the configured zone (the local zone for "" or an unknown name)."""
    configured = zone(tz)
    if configured is None:
        return naive.astimezone()
    return naive.replace(tzinfo=configured)


def _text(value: object) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str):
        return ""
    return value.strip("\x00 ").strip()


def _from_exif(exif: Image.Exif, tz: str) -> datetime | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns "Corrupt EXIF data" and carries on
        try:
            sub = exif.get_ifd(EXIF_IFD)
        except Exception:
            sub = {}
    # Some writers put the Exif tags straight into IFD0 (CR3's CMT2 blob is that way by design).
    tags: dict[int, object] = {**dict(exif), **dict(sub)}
    for when, offset, subsec in (
        (_DATETIME_ORIGINAL, _OFFSET_ORIGINAL, _SUBSEC_ORIGINAL),
        (_DATETIME_DIGITIZED, _OFFSET_DIGITIZED, _SUBSEC_DIGITIZED),
    ):
        found = parse_exif_datetime(tags.get(when), tags.get(offset), tags.get(subsec), tz)
        if found is not None:
            return found
    return None


def _load_exif(tiff: bytes) -> Image.Exif:
    exif = Image.Exif()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exif.load(tiff)
    return exif


@contextlib.contextmanager
def _no_pixel_limit() -> Iterator[None]:
    # Only headers are parsed here (EXIF); no pixels are allocated, so Pillow's bomb guard would
    # only stop us from reading the date of a legitimate 200 MP photo. Bombs are refused by the
    # probe with the configured limit before capture_time is ever called.
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def pillow_metadata(path: Path, kind: str) -> tuple[Image.Exif, bytes | None]:
    """The EXIF and the XMP packet of a picture Pillow reads (`kind` one of PIL_FORMATS)."""
    with _no_pixel_limit(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Corrupt EXIF data" and the like: we return None instead
        with Image.open(path, formats=[PIL_FORMATS[kind]]) as im:
            xmp = im.info.get("xmp")
            return im.getexif(), xmp.encode() if isinstance(xmp, str) else xmp


def _cr3_exif(path: Path) -> bytes | None:
    size = path.stat().st_size
    with path.open("rb") as f:
        for box_type, offset, header, box_size in kinds.iter_bmff(f, 0, size):
            if box_type != b"moov":
                continue
            for inner, inner_offset, inner_header, inner_size in kinds.iter_bmff(
                f, offset + header, offset + box_size
            ):
                f.seek(inner_offset + inner_header)
                if inner != b"uuid" or f.read(16) != _CR3_UUID:
                    continue
                start = inner_offset + inner_header + 16
                for cmt, cmt_offset, cmt_header, cmt_size in kinds.iter_bmff(
                    f, start, inner_offset + inner_size
                ):
                    if cmt == b"CMT2":
                        f.seek(cmt_offset + cmt_header)
                        return f.read(min(cmt_size - cmt_header, _MAX_METADATA))
    return None


def _jxl_exif(path: Path) -> bytes | None:
    data = path.read_bytes()
    if not data.startswith(jxlboxes.JXL_CONTAINER_SIGNATURE):
        return None  # a bare codestream carries no EXIF
    plain = jxlboxes.decompress_brob_boxes(data, _MAX_METADATA)
    for box in jxlboxes.iter_boxes(plain):
        if box.type == b"Exif":
            payload = plain[box.payload_start : box.end]
            (tiff_offset,) = struct.unpack_from(">I", payload)  # the Exif box starts with it
            return payload[4 + tiff_offset :]
    return None


def _video_time(path: Path) -> datetime | None:
    """Apple's `com.apple.quicktime.creationdate` (local time with its offset, and what Immich
    itself prefers), else the container's creation_time (UTC)."""
    with av.open(str(path), metadata_errors="replace") as container:
        metadata = dict(container.metadata)
    for key in ("com.apple.quicktime.creationdate", "creation_time"):
        text = metadata.get(key, "").strip()
        try:
            when = datetime.fromisoformat(text) if text else None
        except ValueError:
            continue
        # FFmpeg already leaves out the zero dates of cameras without a set clock.
        if when is not None and when.tzinfo is not None:
            return when
    return None


def capture_time(path: Path, kind: str, timezone: str) -> datetime | None:
    """When the photo or video was taken, from its content; timezone-aware, or None. Never raises.

    `timezone`: IANA name used when the EXIF date has no offset tag; "" means the local zone.
    """
    try:
        if kind == "video":
            return _video_time(path)
        if kind in PIL_FORMATS:
            return _from_exif(pillow_metadata(path, kind)[0], timezone)
        if kind == "raw":
            with path.open("rb") as f:
                head = f.read(8)
            tiff = _cr3_exif(path) if head[4:8] == b"ftyp" else None
            if tiff is None and head[:4] in (b"II*\x00", b"MM\x00*"):
                tiff = path.read_bytes()  # TIFF-based RAW: the file is the EXIF structure
            return _from_exif(_load_exif(tiff), timezone) if tiff else None
        if kind == "jxl":
            tiff = _jxl_exif(path)
            return _from_exif(_load_exif(tiff), timezone) if tiff else None
    except Exception:
        return None  # broken metadata is common; the caller falls back to the file's mtime
    return None


# --- the date in a file name ----------------------------------------------------------------

_DATE = r"(?P<year>\d{4})(?P<month>\d{2})(?P<day>\d{2})"
_DASHED_DATE = r"(?P<year>\d{4})-(?P<month>\d{2})-(?P<day>\d{2})"
_TIME = r"(?P<hour>\d{2})(?P<minute>\d{2})(?P<second>\d{2})"
_DASHED_TIME = r"(?P<hour>\d{2})-(?P<minute>\d{2})-(?P<second>\d{2})"
# Each pattern matches from the start of the name and may not run on into more digits, so a
# name that merely contains digits ("IMG_1234", "holiday 20230415") is not read as a date.
_NAME_PATTERNS: tuple[tuple[re.Pattern[str], bool], ...] = tuple(
    (re.compile(pattern + r"(?!\d)", re.IGNORECASE), in_utc)
    for pattern, in_utc in (
        # WhatsApp: IMG-20230415-WA0007.jpg, VID-20230415-WA0001.mp4 (the day only)
        (rf"(?:IMG|VID)-{_DATE}-WA\d+", False),
        # Android screenshots: Screenshot_20240102-131415_Chrome.png, Screenshot_2024-01-02-13-14-15
        (rf"Screenshot_{_DATE}[-_]{_TIME}", False),
        (rf"Screenshot_{_DASHED_DATE}-{_DASHED_TIME}", False),
        # Pixel: PXL_20230415_103000123.jpg, milliseconds last; Google Camera names it in UTC.
        (rf"PXL_{_DATE}_{_TIME}(?P<millisecond>\d{{3}})", True),
        # Android cameras: IMG_20200101_120000.jpg, VID_20200101_120000_1.mp4
        (rf"(?:IMG|VID)_{_DATE}_{_TIME}", False),
        # Samsung Camera: 20230415_103000.jpg
        (rf"{_DATE}_{_TIME}", False),
        # Signal: signal-2023-05-14-203012.jpg, newer versions signal-2023-05-14-20-30-12-123.jpg
        (
            rf"signal-{_DASHED_DATE}-(?P<hour>\d{{2}})-?(?P<minute>\d{{2}})-?(?P<second>\d{{2}})",
            False,
        ),
    )
)
# WhatsApp names give the day only. Noon is the time furthest from both midnights, so the photo
# stays on its own day wherever it is shown (any zone within 11 hours of the configured one),
# and such images sort among that day's photos rather than at its very start.
_NOON = 12
# Before phones and cameras named files by date; a name "from" then is a counter, not a date.
_EARLIEST_YEAR = 1990
# A name dated after the upload is no capture date. A day of slack covers every zone.
_FUTURE_SLACK = timedelta(days=1)


def name_time(name: str, timezone: str) -> datetime | None:
    """The capture time a phone or messenger wrote into the file name `name`, or None.

    Local-time names are read in `timezone` (IANA name, "" = the local zone), like EXIF dates
    without an offset; Pixel names are UTC, and the result is that instant in `timezone`. An
    impossible date (month 13, February 30, before 1990, later than tomorrow) means the digits
    are not a date, and the name is ignored.
    """
    for pattern, in_utc in _NAME_PATTERNS:
        match = pattern.match(name)
        if match is None:
            continue
        part = match.groupdict()
        try:
            naive = datetime(
                int(part["year"]),
                int(part["month"]),
                int(part["day"]),
                int(part.get("hour") or _NOON),
                int(part.get("minute") or 0),
                int(part.get("second") or 0),
                int(part.get("millisecond") or 0) * 1000,
            )
        except ValueError:
            return None
        # A UTC name is given in the configured zone: Immich shows the wall-clock time of the
        # offset it gets, and the phone showed its owner local time, not UTC.
        when = (
            naive.replace(tzinfo=UTC).astimezone(zone(timezone))
            if in_utc
            else _in_zone(naive, timezone)
        )
        if naive.year < _EARLIEST_YEAR or when > datetime.now(UTC) + _FUTURE_SLACK:
            return None
        return when
    return None


@dataclass(frozen=True)
class UploadDate:
    when: datetime  # timezone-aware
    source: Literal["content", "name", "mtime"]


def upload_date(content: datetime | None, name: str, mtime: datetime, timezone: str) -> UploadDate:
    """The date to give Immich: the content's own (`capture_time`), else the file name's, else
    the file's `mtime`. An embedded date always wins: it is the camera's, a name may be a copy's.
    """
    if content is not None:
        return UploadDate(content, "content")
    from_name = name_time(name, timezone)
    if from_name is not None:
        return UploadDate(from_name, "name")
    return UploadDate(mtime, "mtime")
