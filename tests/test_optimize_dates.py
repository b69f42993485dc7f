"""Capture time from content: aware datetimes with the EXIF offset, else the configured zone."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from sftpgate.optimize import kinds
from sftpgate.optimize.dates import (
    UploadDate,
    capture_time,
    name_time,
    parse_exif_datetime,
    upload_date,
)

STILL_KINDS = ("jpeg", "heic", "avif", "webp", "raw", "png", "gif")
BERLIN = ZoneInfo("Europe/Berlin")


def _manifest_naive(value: str) -> datetime:
    return datetime.strptime(value[:19], "%Y:%m:%d %H:%M:%S")


@pytest.mark.parametrize(
    ("name", "offset"),
    [
        ("jpeg/hmd-nokia8.3-gps.jpg", timedelta(hours=3)),
        ("jpeg/apple-iphone6s-livephoto.jpg", timedelta(hours=1)),
        ("jpeg/google-pixel8pro-p3-ultrahdr.jpg", timedelta(hours=1)),
        ("heic/apple-iphone13promax-orient6.heic", timedelta(hours=1)),
        ("heic/samsung-s22-motionphoto-orient6-gps.heic", timedelta(hours=5, minutes=30)),
        ("raw/canon-m50-stub.cr3", timedelta(0)),
    ],
)
def test_offset_tag_wins_over_the_configured_zone(
    corpus: Path, manifest: dict[str, dict[str, str]], name: str, offset: timedelta
) -> None:
    kind = manifest[name]["kind"]
    when = capture_time(corpus / name, kind, "America/New_York")
    assert when is not None and when.utcoffset() == offset
    naive = _manifest_naive(manifest[name]["datetime_original_or_creation_time"])
    assert when.replace(tzinfo=None, microsecond=0) == naive


def test_missing_offset_uses_the_configured_zone(corpus: Path) -> None:
    src = corpus / "jpeg/htc-desire-gps.jpg"  # 2011:05:06 09:59:48, no OffsetTimeOriginal
    new_york = capture_time(src, "jpeg", "America/New_York")
    berlin = capture_time(src, "jpeg", "Europe/Berlin")
    assert new_york == datetime(2011, 5, 6, 9, 59, 48, tzinfo=ZoneInfo("America/New_York"))
    assert new_york is not None and new_york.utcoffset() == timedelta(hours=-4)  # EDT in May
    assert berlin is not None and berlin.utcoffset() == timedelta(hours=2)
    assert new_york - berlin == timedelta(hours=6)  # same wall clock, different instants


def test_empty_zone_means_the_local_zone(corpus: Path) -> None:
    when = capture_time(corpus / "jpeg/htc-desire-gps.jpg", "jpeg", "")
    assert when is not None and when.tzinfo is not None
    assert when == datetime(2011, 5, 6, 9, 59, 48).astimezone()


def test_broken_exif_gives_none_without_raising(corpus: Path) -> None:
    src = corpus / "bad/exif-ifd0-offset-out-of-range.jpg"
    assert capture_time(src, "jpeg", "Europe/Berlin") is None


@pytest.mark.parametrize(
    "name",
    ["bad/zero-byte.jpg", "bad/random-bytes.jpg", "bad/html-named.jpg", "bad/truncated-half.jpg"],
)
@pytest.mark.parametrize("kind", [*STILL_KINDS, "jxl", "video", "unknown"])
def test_never_raises_on_garbage(corpus: Path, name: str, kind: str) -> None:
    when = capture_time(corpus / name, kind, "Europe/Berlin")
    assert when is None or when.tzinfo is not None


def test_every_corpus_still_agrees_with_the_manifest(
    corpus: Path, manifest: dict[str, dict[str, str]]
) -> None:
    compared = 0
    for name, row in manifest.items():
        kind = kinds.detect_kind(corpus / name)
        value = row["datetime_original_or_creation_time"]
        when = capture_time(corpus / name, kind, "Europe/Berlin")
        if name == "bad/exif-ifd0-offset-out-of-range.jpg" or kind not in STILL_KINDS:
            continue  # its date is only in XMP; videos come with the PyAV probe
        if value == "-":
            assert when is None, name
            continue
        assert when is not None and when.tzinfo is not None, name
        assert when.replace(tzinfo=None, microsecond=0) == _manifest_naive(value), name
        compared += 1
    assert compared >= 25


def test_capture_time_of_the_jxl_equals_the_jpeg(corpus: Path, tmp_path: Path) -> None:
    from sftpgate.config import OptimizeConfig
    from sftpgate.optimize import optimize_file

    result = optimize_file(corpus / "jpeg/hmd-nokia8.3-gps.jpg", tmp_path, OptimizeConfig(), "UTC")
    assert result.captured_at is not None
    assert capture_time(Path(result.output or ""), "jxl", "UTC") == result.captured_at


@pytest.mark.parametrize(
    ("value", "offset", "subsec", "expected"),
    [
        ("2024:06:01 12:34:56", "+02:00", "5", "2024-06-01T12:34:56.500000+02:00"),
        ("2024:06:01 12:34:56\x00", "-0330", "", "2024-06-01T12:34:56-03:30"),
        (b"2024:06:01 12:34:56", b"Z", b"0123", "2024-06-01T12:34:56.012300+00:00"),
        ("2024:01:15 08:00:00", None, None, "2024-01-15T08:00:00+01:00"),  # Berlin, winter
        ("2024:01:15 08:00:00", "+99:99", None, "2024-01-15T08:00:00+01:00"),  # bad offset
        ("2024:01:15 08:00:00", "garbage", None, "2024-01-15T08:00:00+01:00"),
        ("0000:00:00 00:00:00", "+01:00", None, None),
        ("    :  :     :  :  ", None, None, None),
        ("2024:13:01 00:00:00", None, None, None),
        (None, "+01:00", None, None),
        (12345, None, None, None),
    ],
)
def test_parse_exif_datetime(
    value: object, offset: object, subsec: object, expected: str | None
) -> None:
    when = parse_exif_datetime(value, offset, subsec, "Europe/Berlin")
    assert (when.isoformat() if when else None) == expected


def test_unknown_zone_name_falls_back_to_local() -> None:
    when = parse_exif_datetime("2024:01:15 08:00:00", None, None, "Mars/Olympus_Mons")
    assert when == datetime(2024, 1, 15, 8, 0, 0).astimezone()


def test_every_corpus_video_date_agrees_with_ffprobe(
    corpus: Path, manifest: dict[str, dict[str, str]]
) -> None:
    from tests.readers import ffprobe

    compared = 0
    for name, row in manifest.items():
        if row["kind"] != "video":
            continue
        tags = ffprobe(corpus / name)["format"]["tags"]
        when = capture_time(corpus / name, "video", "America/New_York")
        assert when is not None and when.tzinfo is not None, name
        apple = tags.get("com.apple.quicktime.creationdate")
        if apple:  # local time with its offset, preferred (as Immich does)
            assert when == datetime.strptime(apple, "%Y-%m-%dT%H:%M:%S%z"), name
        else:  # creation_time is UTC; the configured zone plays no part
            assert when.utcoffset() == timedelta(0), name
            utc = row["datetime_original_or_creation_time"]
            assert when.isoformat() == datetime.fromisoformat(utc).isoformat(), name
        compared += 1
    assert compared == 7


# --- the date in the file name, and which date is sent ---------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # WhatsApp gives the day only: noon in the configured zone.
        ("IMG-20230415-WA0007.jpg", "2023-04-15T12:00:00+02:00"),
        ("VID-20230105-WA0001.mp4", "2023-01-05T12:00:00+01:00"),
        ("img-20230415-wa0007.jpeg", "2023-04-15T12:00:00+02:00"),
        ("Screenshot_20240102-131415.png", "2024-01-02T13:14:15+01:00"),
        ("Screenshot_20240702-131415_Chrome.jpg", "2024-07-02T13:14:15+02:00"),
        ("Screenshot_2024-01-02-13-14-15.png", "2024-01-02T13:14:15+01:00"),
        ("Screenshot_2024-01-02-13-14-15-123_com.android.chrome.png", "2024-01-02T13:14:15+01:00"),
        # Pixel names are UTC, given in the configured zone.
        ("PXL_20230415_103000123.jpg", "2023-04-15T12:30:00.123000+02:00"),
        ("PXL_20230115_233000000.MP.jpg", "2023-01-16T00:30:00+01:00"),
        ("IMG_20200101_120000.jpg", "2020-01-01T12:00:00+01:00"),
        ("IMG_20200101_120000_1.jpg", "2020-01-01T12:00:00+01:00"),
        ("VID_20200701_235959.mp4", "2020-07-01T23:59:59+02:00"),
        ("20230415_103000.jpg", "2023-04-15T10:30:00+02:00"),
        ("signal-2023-05-14-203012.jpg", "2023-05-14T20:30:12+02:00"),
        ("signal-2023-05-14-20-30-12-123.mp4", "2023-05-14T20:30:12+02:00"),
        ("IMG_20240229_080000.jpg", "2024-02-29T08:00:00+01:00"),  # a leap day
    ],
)
def test_name_time_reads_the_patterns(name: str, expected: str) -> None:
    when = name_time(name, "Europe/Berlin")
    assert when is not None and when.isoformat() == expected


@pytest.mark.parametrize(
    "name",
    [
        "IMG_1234.jpg",  # digits, but a counter
        "DSC01234.JPG",
        "holiday 20230415_103000.jpg",  # a date, but not where phones put it
        "IMG_20200101_1200001.jpg",  # runs on into more digits
        "IMG_2020010_120000.jpg",
        "IMG-20230415.jpg",  # WhatsApp's counter missing
        "IMG_20231301_120000.jpg",  # month 13
        "IMG_20230230_120000.jpg",  # February 30
        "IMG_20230228_250000.jpg",  # hour 25
        "IMG_20230229_120000.jpg",  # not a leap year
        "Screenshot_20240102-136015.png",  # minute 60
        "IMG-19890101-WA0001.jpg",  # before 1990
        "PXL_20990101_000000000.jpg",  # far in the future
        "signal-2023-00-14-203012.jpg",  # month 0
        "",
    ],
)
def test_name_time_ignores_names_without_a_possible_date(name: str) -> None:
    assert name_time(name, "Europe/Berlin") is None


def test_name_time_refuses_a_day_after_tomorrow_but_not_today() -> None:
    today = datetime.now(ZoneInfo("Europe/Berlin"))
    later = today + timedelta(days=3)
    assert name_time(f"IMG_{today:%Y%m%d}_000000.jpg", "Europe/Berlin") is not None
    assert name_time(f"IMG_{later:%Y%m%d}_000000.jpg", "Europe/Berlin") is None


def test_name_time_in_the_local_zone_when_none_is_configured() -> None:
    when = name_time("IMG_20200101_120000.jpg", "")
    assert when == datetime(2020, 1, 1, 12, 0, 0).astimezone()
    assert when is not None and when.tzinfo is not None


def test_name_time_follows_the_configured_zone() -> None:
    berlin = name_time("Screenshot_20240102-131415.png", "Europe/Berlin")
    new_york = name_time("Screenshot_20240102-131415.png", "America/New_York")
    assert berlin is not None and new_york is not None
    assert new_york - berlin == timedelta(hours=6)  # same wall clock, different instants


def test_a_pixel_name_is_one_instant_in_every_zone() -> None:
    berlin = name_time("PXL_20230415_103000123.jpg", "Europe/Berlin")
    new_york = name_time("PXL_20230415_103000123.jpg", "America/New_York")
    local = name_time("PXL_20230415_103000123.jpg", "")
    assert berlin == new_york == local == datetime(2023, 4, 15, 10, 30, 0, 123000, tzinfo=UTC)
    assert new_york is not None and new_york.utcoffset() == timedelta(hours=-4)


MTIME = datetime(2025, 3, 1, 9, 0, 0, tzinfo=ZoneInfo("Europe/Berlin"))


def test_an_embedded_date_wins_over_the_name(corpus: Path, tmp_path: Path) -> None:
    renamed = tmp_path / "IMG_20200101_120000.jpg"
    shutil.copyfile(corpus / "jpeg/htc-desire-gps.jpg", renamed)  # EXIF 2011:05:06 09:59:48
    chosen = upload_date(
        capture_time(renamed, "jpeg", "Europe/Berlin"), renamed.name, MTIME, "Europe/Berlin"
    )
    assert chosen == UploadDate(datetime(2011, 5, 6, 9, 59, 48, tzinfo=BERLIN), "content")


def test_without_an_embedded_date_the_name_then_the_mtime(tmp_path: Path) -> None:
    from PIL import Image

    whatsapp = tmp_path / "IMG-20230415-WA0007.jpg"
    Image.new("RGB", (16, 16), "teal").save(whatsapp)  # no EXIF at all
    content = capture_time(whatsapp, "jpeg", "Europe/Berlin")
    assert content is None
    chosen = upload_date(content, whatsapp.name, MTIME, "Europe/Berlin")
    assert chosen == UploadDate(datetime(2023, 4, 15, 12, 0, tzinfo=BERLIN), "name")
    assert upload_date(None, "photo.jpg", MTIME, "Europe/Berlin") == UploadDate(MTIME, "mtime")
    assert upload_date(None, "IMG_20231301_120000.jpg", MTIME, "UTC").source == "mtime"
