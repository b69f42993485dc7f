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
    "DateTimeOriginal",
    "OffsetTimeOriginal",
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
    return {t: doc.get(t) for t in tags}


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
