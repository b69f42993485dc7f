"""Independent readers for checking what a stored file carries: exiftool, and djxl for the ICC
profile inside a JPEG XL codestream (exiftool 12.57 reads JXL boxes but not the codestream ICC)."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

PHOTO_TAGS = [
    # The EXIF tags themselves: exiftool otherwise fills in a Composite DateTimeOriginal from
    # IPTC DateCreated/TimeCreated, which libjxl keeps only inside its JPEG reconstruction data.
    "EXIF:DateTimeOriginal",
    "EXIF:OffsetTimeOriginal",
    "GPSLatitude",
    "GPSLongitude",
    "Orientation",
    "Make",
    "Model",
    "XMPToolkit",
]


def _need(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (apt-get install {package})")


def exiftool(path: Path, tags: list[str]) -> dict[str, object]:
    _need("exiftool", "libimage-exiftool-perl")
    out = subprocess.run(
        ["exiftool", "-json", "-n", *[f"-{t}" for t in tags], str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    doc = json.loads(out.stdout)[0]
    return {t: doc.get(t.split(":")[-1]) for t in tags}  # exiftool names keys without group


def exiftool_icc(path: Path) -> bytes | None:
    """The whole ICC profile as exiftool extracts it from the file itself (no djxl)."""
    _need("exiftool", "libimage-exiftool-perl")
    out = subprocess.run(
        ["exiftool", "-b", "-ICC_Profile", str(path)], capture_output=True, check=True
    )
    return out.stdout or None


def icc_description(path: Path) -> str | None:
    """The ICC profile's description, read by exiftool (from the JXL codestream via djxl)."""
    if path.suffix.lower() != ".jxl":
        return exiftool(path, ["ProfileDescription"])["ProfileDescription"]  # type: ignore[return-value]
    _need("djxl", "libjxl-tools")
    info = subprocess.run(["jxlinfo", str(path)], capture_output=True, text=True, check=True).stdout
    if "ICC profile" not in info:
        return None  # an enumerated colour space (sRGB): djxl would synthesise a profile for it
    with tempfile.TemporaryDirectory() as tmp:
        icc = Path(tmp) / "profile.icc"
        subprocess.run(
            ["djxl", str(path), str(Path(tmp) / "pixels.ppm"), f"--icc_out={icc}"],
            capture_output=True,
            check=True,
        )
        return exiftool(icc, ["ProfileDescription"])["ProfileDescription"]  # type: ignore[return-value]


def photo_metadata(path: Path) -> dict[str, object]:
    """What must survive optimizing, as an independent reader sees it."""
    return {**exiftool(path, PHOTO_TAGS), "ICC": icc_description(path)}


def sidecar_dates(sidecar: bytes) -> dict[str, str]:
    """The dates exiftool reads from XMP sidecar bytes, by group-qualified tag
    (`{"XMP:DateTimeOriginal": "2023:04:15 12:00:00.000+02:00", ...}`)."""
    _need("exiftool", "libimage-exiftool-perl")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "asset.xmp"
        path.write_bytes(sidecar)
        out = subprocess.run(
            ["exiftool", "-j", "-G", "-DateTimeOriginal", "-CreateDate", str(path)],
            capture_output=True,
            text=True,
            check=True,
        )
    doc = json.loads(out.stdout)[0]
    return {tag: value for tag, value in doc.items() if tag != "SourceFile"}


def ffprobe(path: Path) -> dict[str, object]:
    """ffprobe's (Debian's FFmpeg 5.1, not the PyAV build under test) view of a video file."""
    _need("ffprobe", "ffmpeg")
    out = subprocess.run(
        [
            "ffprobe", "-v", "error", "-of", "json", "-show_format", "-show_streams",
            "-show_entries", "stream_side_data=rotation", str(path),
        ],
        capture_output=True,
        text=True,
        check=True,
    )  # fmt: skip
    return json.loads(out.stdout)


def video_metadata(path: Path) -> dict[str, object]:
    """What must survive a video conversion, as ffprobe and exiftool see it."""
    probe = ffprobe(path)
    fmt = probe["format"]
    tags = fmt.get("tags", {})
    streams = probe["streams"]
    video = next(s for s in streams if s["codec_type"] == "video")
    rotation = next(
        (int(d["rotation"]) for d in video.get("side_data_list", []) if "rotation" in d), 0
    )
    gps = exiftool(path, ["GPSLatitude", "GPSLongitude", "Make", "Model"])
    return {
        "creation_time": tags.get("creation_time"),
        "location": tags.get("location"),
        "apple_location": tags.get("com.apple.quicktime.location.ISO6709"),
        "apple_creationdate": tags.get("com.apple.quicktime.creationdate"),
        "make": tags.get("com.apple.quicktime.make") or tags.get("make"),
        "model": tags.get("com.apple.quicktime.model") or tags.get("model"),
        "rotation": rotation,
        "audio_streams": sum(1 for s in streams if s["codec_type"] == "audio"),
        "width_height": (video["width"], video["height"]),
        "exiftool": gps,
        "duration": float(fmt["duration"]),
    }


def exiftool_write(src: Path, dst: Path, assignments: list[str]) -> Path:
    """A copy of `src` with tags written by exiftool (`["-XMP-GCamera:BurstID=x", ...]`)."""
    _need("exiftool", "libimage-exiftool-perl")
    if src != dst:
        shutil.copyfile(src, dst)
    subprocess.run(
        ["exiftool", "-q", "-overwrite_original", *assignments, str(dst)],
        capture_output=True,
        check=True,
    )
    return dst
