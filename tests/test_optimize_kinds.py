"""Kind by content, and what optimize_file does with every non-JPEG and every broken corpus file."""

from __future__ import annotations

import re
import struct
import time
from pathlib import Path

import pytest

from sftpgate.config import OptimizeConfig
from sftpgate.optimize import kinds, optimize_file

CONFIG = OptimizeConfig()

# MANIFEST's kind column says "bad" / "edge" for these; what their content really is:
CONTENT_KIND = {
    "bad/corrupt-entropy.jpg": "jpeg",
    "bad/exif-ifd0-offset-out-of-range.jpg": "jpeg",
    "bad/ftyp-only.mp4": "video",
    "bad/html-named.jpg": "unknown",
    "bad/jpeg-with-png-extension.png": "jpeg",
    "bad/png-claims-100000x100000.png": "png",
    "bad/random-bytes.jpg": "unknown",
    "bad/text-named.heic": "unknown",
    "bad/truncated-half.jpg": "jpeg",
    "bad/truncated-mid-mdat.3gp": "video",
    "bad/truncated-no-moov.mp4": "video",
    "bad/zero-byte.jpg": "unknown",
    "edge/google-motionphoto-broken.jpg": "jpeg",
    "edge/nikon-d70s-jpeg-named.nef": "jpeg",
    "edge/png-invalid-iccp-adler32.png": "png",
}

# bad/ files: (decision, pattern the reason must match). Two are sound JPEGs under a wrong name
# or with broken EXIF; converting them loses nothing (bit-exact).
BAD_OUTCOME = {
    "bad/corrupt-entropy.jpg": ("unreadable", r"damaged JPEG.*(broken|corrupt|invalid)"),
    "bad/exif-ifd0-offset-out-of-range.jpg": ("converted", r"bit-exact"),
    "bad/ftyp-only.mp4": ("unreadable", r"no 'moov'"),
    "bad/html-named.jpg": ("unreadable", r"HTML page"),
    "bad/jpeg-with-png-extension.png": ("converted", r"bit-exact"),
    "bad/png-claims-100000x100000.png": ("unreadable", r"decompression bomb.*100000×100000"),
    "bad/random-bytes.jpg": ("unreadable", r"not a photo or video format"),
    "bad/text-named.heic": ("unreadable", r"plain text"),
    "bad/truncated-half.jpg": ("unreadable", r"damaged JPEG.*truncated"),
    "bad/truncated-mid-mdat.3gp": ("unreadable", r"truncated.*'mdat'"),
    "bad/truncated-no-moov.mp4": ("unreadable", r"truncated.*'mdat'"),
    "bad/zero-byte.jpg": ("unreadable", r"empty \(0 bytes\)"),
}


def expected_kind(name: str, row: dict[str, str]) -> str:
    return CONTENT_KIND.get(name, row["kind"])


def test_kind_of_every_corpus_file_matches_the_manifest(
    corpus: Path, manifest: dict[str, dict[str, str]]
) -> None:
    assert set(CONTENT_KIND) <= set(manifest)
    assert {row["kind"] for row in manifest.values()} - {"bad", "edge"} <= set(kinds.KINDS)
    wrong = {
        name: kinds.detect_kind(corpus / name)
        for name, row in manifest.items()
        if kinds.detect_kind(corpus / name) != expected_kind(name, row)
    }
    assert wrong == {}
    assert len(manifest) >= 50


def test_every_bad_file_returns_quickly_with_a_clear_reason(
    corpus: Path, manifest: dict[str, dict[str, str]], tmp_path: Path
) -> None:
    bad = sorted(name for name in manifest if name.startswith("bad/"))
    assert sorted(BAD_OUTCOME) == bad
    for name in bad:
        work = tmp_path / name.replace("/", "_")
        started = time.monotonic()
        result = optimize_file(corpus / name, work, CONFIG, "Europe/Berlin")
        elapsed = time.monotonic() - started
        decision, pattern = BAD_OUTCOME[name]
        assert elapsed < 3, (name, elapsed)
        assert result.kind == CONTENT_KIND[name], name
        assert result.decision == decision, (name, result.reason)
        assert re.search(pattern, result.reason), (name, result.reason)
        assert result.bytes_in == int(manifest[name]["size_bytes"])
        if decision == "unreadable":
            assert result.output is None and result.bytes_out == result.bytes_in
            assert result.captured_at is None and result.metadata_kept == ()
            assert not work.exists() or list(work.iterdir()) == [], name


def test_png_bomb_is_refused_from_its_header(corpus: Path, tmp_path: Path) -> None:
    src = corpus / "bad/png-claims-100000x100000.png"
    with src.open("rb") as f:
        head = f.read(kinds.HEAD_SIZE)
    probe = kinds.probe(src, "png", head, CONFIG.max_pixels)
    assert (probe.width, probe.height) == (100000, 100000)
    assert probe.problem and "decompression bomb" in probe.problem
    assert "250 MP limit (optimize.max_pixels)" in probe.problem


@pytest.mark.parametrize(
    ("folder", "word"),
    [
        ("heic", "HEIC"),
        ("avif", "AVIF"),
        ("webp", "WebP"),
        ("gif", "GIF"),
        ("raw", "RAW"),
    ],
)
def test_other_kinds_are_kept_byte_for_byte(
    corpus: Path, manifest: dict[str, dict[str, str]], tmp_path: Path, folder: str, word: str
) -> None:
    names = sorted(n for n in manifest if n.startswith(f"{folder}/"))
    assert names
    for name in names:
        result = optimize_file(corpus / name, tmp_path, CONFIG, "")
        assert (result.kind, result.decision) == (manifest[name]["kind"], "kept"), result.reason
        assert result.reason.startswith("kept as it is") and word in result.reason, result.reason
        assert (result.output, result.extension) == (None, None)
        assert result.bytes_out == result.bytes_in == int(manifest[name]["size_bytes"])
    assert list(tmp_path.iterdir()) == []


def test_motion_photo_heic_says_so(corpus: Path, tmp_path: Path) -> None:
    src = corpus / "heic/samsung-s22-motionphoto-orient6-gps.heic"
    result = optimize_file(src, tmp_path, CONFIG, "")
    assert result.decision == "kept" and "motion photo" in result.reason
    assert result.metadata_kept[:1] == ("EXIF",)


def test_metadata_of_kept_files_follows_the_manifest(
    corpus: Path, manifest: dict[str, dict[str, str]], tmp_path: Path
) -> None:
    checked = 0
    for name, row in manifest.items():
        if row["kind"] not in ("png", "webp", "avif", "jpeg"):
            continue  # HEIC XMP lives in an item pillow-heif does not always expose
        result = optimize_file(corpus / name, tmp_path / "w", CONFIG, "")
        assert ("XMP" in result.metadata_kept) == (row["has_xmp"] == "yes"), name
        assert ("ICC" in result.metadata_kept) == (row["icc_profile"] != "no"), name
        checked += 1
    assert checked >= 20


def test_truncated_heic_is_unreadable(corpus: Path, tmp_path: Path) -> None:
    data = (corpus / "heic/apple-iphone8-gps.heic").read_bytes()
    src = tmp_path / "cut.heic"
    src.write_bytes(data[: len(data) // 2])
    result = optimize_file(src, tmp_path / "work", CONFIG, "")
    assert (result.kind, result.decision) == ("heic", "unreadable")
    assert "truncated" in result.reason


def test_a_converted_jxl_is_recognised_and_kept(corpus: Path, tmp_path: Path) -> None:
    first = optimize_file(corpus / "jpeg/htc-desire-gps.jpg", tmp_path / "a", CONFIG, "")
    again = optimize_file(Path(first.output or ""), tmp_path / "b", CONFIG, "")
    assert (again.kind, again.decision) == ("jxl", "kept")
    assert again.metadata_kept == ("EXIF",)
    assert again.captured_at == first.captured_at is not None


def _ftyp(major: bytes, *compatible: bytes) -> bytes:
    body = major + b"\x00\x00\x00\x00" + b"".join(compatible)
    return struct.pack(">I", 8 + len(body)) + b"ftyp" + body + b"\x00" * 32


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (_ftyp(b"mif1", b"mif1", b"heic"), "heic"),
        (_ftyp(b"mif1", b"mif1", b"avif"), "avif"),
        (_ftyp(b"avis", b"avis", b"msf1"), "avif"),
        (_ftyp(b"heix", b"mif1"), "heic"),
        (_ftyp(b"crx ", b"crx ", b"isom"), "raw"),
        (_ftyp(b"qt  ", b"qt  "), "video"),
        (_ftyp(b"3gp4", b"3gp4"), "video"),
        (_ftyp(b"M4A ", b"M4A "), "unknown"),
        (b"\x00\x00\x00\x08wide" + b"\x00" * 16, "video"),
        (b"\x1a\x45\xdf\xa3" + b"\x00" * 16, "video"),
        (b"RIFF\x00\x00\x00\x00AVI LIST", "video"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "webp"),
        (b"\xff\x0a\xfa\x7f", "jxl"),
        (b"II*\x00\x08\x00\x00\x00", "raw"),
        (b"MM\x00*\x00\x00\x00\x08", "raw"),
        (b"GIF89a\x01\x00", "gif"),
        (b"\xff\xd8\xff\xdb", "jpeg"),
        (b"\xff\xd8\x00\x00", "unknown"),
        (b"", "unknown"),
    ],
)
def test_sniff_magic(head: bytes, kind: str) -> None:
    assert kinds.sniff(head) == kind


def test_describe_unknown() -> None:
    assert "empty" in kinds.describe_unknown(b"", 0)
    assert "HTML" in kinds.describe_unknown(b"\n<!DOCTYPE html><html>", 22)
    assert "plain text" in kinds.describe_unknown(b"hello\n", 6)
    assert "brand 'M4A '" in kinds.describe_unknown(_ftyp(b"M4A "), 60)
    assert "not a photo or video" in kinds.describe_unknown(bytes(range(256)), 256)


def test_unexpected_errors_become_unreadable_results(tmp_path: Path) -> None:
    missing = optimize_file(tmp_path / "gone.jpg", tmp_path / "work", CONFIG, "")
    assert missing.decision == "unreadable" and "gone.jpg" in missing.reason
    folder = optimize_file(tmp_path, tmp_path / "work", CONFIG, "")
    assert folder.decision == "unreadable"
