"""The whole corpus through real codec worker processes, every converted file checked with readers
that share no code with the optimizer: exiftool, ffprobe (Debian's FFmpeg 5.1) and djxl (libjxl
0.7). One decision per file is written down below; a file added to MANIFEST.tsv without one fails.

Videos use preset ultrafast: what survives does not depend on the preset, and the whole file
must stay well under three minutes on two cores.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from sftpgate.config import OptimizeConfig, VideoConfig
from sftpgate.optimize import OptimizeResult, dates, kinds, optimize_file
from sftpgate.workers import CodecPool, CodecWorkerError
from tests.readers import photo_metadata, video_metadata

CONFIG = OptimizeConfig(video=VideoConfig(preset="ultrafast"))
TIME_LIMIT = 60.0  # per file, enforced by the pool: a hang fails the file, not the run
BAD_FILE_SECONDS = 5.0

CONVERTED_JPEG = ("converted", r"^converted to JPEG XL by lossless transcoding, verified bit-exact")
CONVERTED_VIDEO = ("converted", r"^converted to HEVC .*verified \(decodes, duration")
NOT_CONVERTED = "kept", r"^kept as it is: "

# file -> (decision, pattern its reason must match)
EXPECTED: dict[str, tuple[str, str]] = {
    "avif/canon-70d-exif.avif": ("kept", "AVIF is already efficiently compressed"),
    "bad/corrupt-entropy.jpg": ("unreadable", r"^damaged JPEG"),
    "bad/exif-ifd0-offset-out-of-range.jpg": CONVERTED_JPEG,  # sound pixels, broken EXIF kept as is
    "bad/ftyp-only.mp4": ("unreadable", r"no 'moov' index box"),
    "bad/html-named.jpg": ("unreadable", r"HTML page"),
    "bad/jpeg-with-png-extension.png": CONVERTED_JPEG,
    "bad/png-claims-100000x100000.png": ("unreadable", r"decompression bomb.*100000×100000"),
    "bad/random-bytes.jpg": ("unreadable", r"unknown file signature"),
    "bad/text-named.heic": ("unreadable", r"plain text"),
    "bad/truncated-half.jpg": ("unreadable", r"^damaged JPEG.*truncated"),
    "bad/truncated-mid-mdat.3gp": ("unreadable", r"truncated: its 'mdat' box"),
    "bad/truncated-no-moov.mp4": ("unreadable", r"truncated: its 'mdat' box"),
    "bad/zero-byte.jpg": ("unreadable", r"empty \(0 bytes\)"),
    "edge/google-motionphoto-broken.jpg": ("kept", r"motion photo"),
    "edge/nikon-d70s-jpeg-named.nef": CONVERTED_JPEG,
    "edge/png-invalid-iccp-adler32.png": (
        "converted",
        r"lossless JPEG XL \(RGBA\), verified pixel",
    ),
    "gif/animated-from-livephoto.gif": ("kept", r"animated GIF"),
    "gif/static-simple.gif": ("kept", r"GIF is not converted"),
    "heic/apple-iphone13promax-orient6.heic": ("kept", r"HEIC is already efficient"),
    "heic/apple-iphone8-gps.heic": ("kept", r"HEIC is already efficient"),
    "heic/apple-iphone8-tiny.heic": ("kept", r"HEIC is already efficient"),
    "heic/samsung-s22-motionphoto-orient6-gps.heic": ("kept", r"HEIC motion photo"),
    "jpeg/android-depthmap-extended-xmp.jpg": CONVERTED_JPEG,
    "jpeg/apple-iphone4-gps.jpg": CONVERTED_JPEG,
    "jpeg/apple-iphone5-orient3-gps.jpg": CONVERTED_JPEG,
    "jpeg/apple-iphone6s-livephoto.jpg": CONVERTED_JPEG,
    "jpeg/apple-iphonexr-1x1-gps.jpg": ("kept", r"would save only -?\d.*min_savings"),
    "jpeg/canon-a85-orient8.jpg": CONVERTED_JPEG,
    "jpeg/canon-eos7d-adobergb-xmp.jpg": CONVERTED_JPEG,
    "jpeg/canon-sx60-orient6.jpg": CONVERTED_JPEG,
    "jpeg/canon-t2i-adobergb-gps-small.jpg": CONVERTED_JPEG,
    "jpeg/google-pixel8pro-p3-ultrahdr.jpg": ("kept", r"Ultra HDR JPEG with a gain map"),
    "jpeg/hmd-nokia8.3-gps.jpg": CONVERTED_JPEG,
    "jpeg/htc-desire-gps.jpg": CONVERTED_JPEG,
    "jpeg/nikon-d5000-gps-xmp.jpeg": CONVERTED_JPEG,
    "jpeg/panasonic-lc70-progressive.jpg": CONVERTED_JPEG,
    "jpeg/photoshop-cmyk-swop-multi-icc.jpg": ("kept", r"CMYK JPEG"),
    "jpeg/samsung-sm-j327t1-orient6.jpg": CONVERTED_JPEG,
    "png/photo-rgba-icc.png": ("kept", r"text metadata \(Raw profile type iptc\)"),
    "png/screenshot-phone-p3-xmp.png": ("kept", r"16-bit PNG"),
    "raw/canon-350d-stub.dng": ("kept", r"RAW files are never converted"),
    "raw/canon-m50-stub.cr3": ("kept", r"RAW files are never converted"),
    "video/android6-1080p-gps.mp4": CONVERTED_VIDEO,
    "video/apple-iphone5-1080p-gps.mov": CONVERTED_VIDEO,
    "video/apple-iphone6-rot90-gps.mov": CONVERTED_VIDEO,
    "video/apple-iphone6s-livephoto.mov": ("kept", r"Live Photo video"),
    "video/gopro-max-gpmf-gps.mp4": CONVERTED_VIDEO,
    # 35 kbit/s MPEG-4 at 176×144: HEVC (plus AAC for the AMR audio) is not smaller.
    "video/legacy-phone-mpeg4-amr.3gp": ("kept", r"would save only -?\d.*min_savings"),
    "video/samsung-s22-hevc-rot90-gps.mp4": CONVERTED_VIDEO,
    "webp/animated-lossy.webp": ("kept", r"WebP is not converted"),
    "webp/nikon-p7000-exif-xmp-orient6.webp": ("kept", r"WebP is not converted"),
    "webp/photo-lossy-plain.webp": ("kept", r"WebP is not converted"),
}
# exiftool cannot inflate this iCCP (no Adler-32); the profile Pillow recovers is carried.
ICC_READABLE_ONLY_AFTER = {"edge/png-invalid-iccp-adler32.png": "sRGB IEC61966-2.1"}


@dataclass(frozen=True)
class Run:
    results: dict[str, OptimizeResult | str]  # a CodecWorkerError's message instead of a result
    workers_replaced: bool


async def _optimize_all(corpus: Path, names: list[str], work: Path) -> Run:
    pool = CodecPool(2, background=False, preload=("sftpgate.optimize",))
    await pool.start()
    pids = set(pool.pids)
    results: dict[str, OptimizeResult | str] = {}

    async def one(name: str) -> None:
        try:
            results[name] = await pool.run(
                optimize_file, corpus / name, work, CONFIG, "Europe/Berlin", timeout=TIME_LIMIT
            )
        except CodecWorkerError as exc:
            results[name] = str(exc)

    try:
        # Largest first, so the slow videos overlap with everything else on the two workers.
        order = sorted(names, key=lambda n: -(corpus / n).stat().st_size)
        await asyncio.gather(*(one(name) for name in order))
        replaced = set(pool.pids) != pids
    finally:
        await pool.close()
    return Run(results, replaced)


@pytest.fixture(scope="module")
def run(
    corpus: Path, manifest: dict[str, dict[str, str]], tmp_path_factory: pytest.TempPathFactory
) -> Run:
    work = tmp_path_factory.mktemp("fidelity-work")
    return asyncio.run(_optimize_all(corpus, sorted(manifest), work))


def _result(run: Run, name: str) -> OptimizeResult:
    result = run.results[name]
    assert isinstance(result, OptimizeResult), f"{name}: the worker failed: {result}"
    return result


def _converted(run: Run, kind: str | None = None) -> list[str]:
    names = [n for n, (decision, _) in EXPECTED.items() if decision == "converted"]
    return [n for n in names if kind is None or _result(run, n).kind == kind]


def test_every_corpus_file_has_an_expected_decision(manifest: dict[str, dict[str, str]]) -> None:
    assert sorted(EXPECTED) == sorted(manifest)


def test_every_file_gets_its_decision_and_reason(
    run: Run, corpus: Path, manifest: dict[str, dict[str, str]]
) -> None:
    wrong = {}
    for name, (decision, pattern) in EXPECTED.items():
        result = _result(run, name)
        if result.decision != decision or not re.search(pattern, result.reason):
            wrong[name] = (result.decision, result.reason)
            continue
        assert result.bytes_in == int(manifest[name]["size_bytes"]), name
        if decision == "converted":
            output = Path(result.output or "")
            assert output.is_file() and output.stat().st_size == result.bytes_out, name
            assert result.bytes_out <= result.bytes_in * (1 - CONFIG.min_savings), name
        else:
            assert (result.output, result.bytes_out) == (None, result.bytes_in), name
        if decision == "unreadable":
            assert (result.metadata_kept, result.captured_at) == ((), None), name
    assert wrong == {}


def test_no_bad_file_crashes_or_hangs_a_worker(run: Run) -> None:
    bad = [name for name in EXPECTED if name.startswith("bad/")]
    for name in bad:
        result = _result(run, name)  # a value came back: the worker neither died nor timed out
        assert result.seconds < BAD_FILE_SECONDS, name  # measured inside the worker
    assert len(bad) == 12 and not run.workers_replaced


def test_only_converted_files_leave_an_output(run: Run) -> None:
    results = [_result(run, name) for name in EXPECTED]
    outputs = {Path(r.output).parent for r in results if r.output}
    assert len(outputs) == 1
    (work,) = outputs
    expected = {Path(_result(run, n).output or "").name for n in _converted(run)}
    assert {p.name for p in work.iterdir()} == expected  # no temp files, no kept leftovers


def test_converted_photos_keep_their_metadata(run: Run, corpus: Path) -> None:
    checked = 0
    for name in _converted(run):
        result = _result(run, name)
        if result.kind not in ("jpeg", "png"):
            continue
        before = photo_metadata(corpus / name)
        after = photo_metadata(Path(result.output or ""))
        if name in ICC_READABLE_ONLY_AFTER:
            assert (before["ICC"], after["ICC"]) == (None, ICC_READABLE_ONLY_AFTER[name])
            before["ICC"] = after["ICC"]
        assert after == before, name
        checked += 1
    assert checked == 17


def test_converted_photos_keep_their_capture_time(run: Run) -> None:
    for name in _converted(run):
        result = _result(run, name)
        output = Path(result.output or "")
        again = dates.capture_time(output, kinds.detect_kind(output), "Europe/Berlin")
        assert again == result.captured_at, name


def test_lossless_jpegs_reconstruct_bit_exact_with_djxl(
    run: Run, corpus: Path, tmp_path: Path
) -> None:
    if shutil.which("djxl") is None:
        pytest.skip("djxl is not installed (apt-get install libjxl-tools)")
    names = _converted(run, "jpeg")
    for name in names:
        rebuilt = tmp_path / "rebuilt.jpg"
        output = _result(run, name).output or ""
        subprocess.run(["djxl", output, str(rebuilt)], check=True, capture_output=True)
        assert rebuilt.read_bytes() == (corpus / name).read_bytes(), name
    assert len(names) == 16


def test_lossless_pngs_decode_pixel_exact_with_djxl(run: Run, corpus: Path, tmp_path: Path) -> None:
    if shutil.which("djxl") is None:
        pytest.skip("djxl is not installed (apt-get install libjxl-tools)")
    names = _converted(run, "png")
    for name in names:
        decoded = tmp_path / "decoded.png"
        output = _result(run, name).output or ""
        subprocess.run(["djxl", output, str(decoded)], check=True, capture_output=True)
        with Image.open(corpus / name) as original, Image.open(decoded) as copy:
            assert copy.mode == original.mode and copy.tobytes() == original.tobytes(), name
    assert len(names) == 1


def test_converted_videos_keep_date_location_device_rotation_duration_audio(
    run: Run, corpus: Path, manifest: dict[str, dict[str, str]]
) -> None:
    names = _converted(run, "video")
    for name in names:
        before = video_metadata(corpus / name)
        after = video_metadata(Path(_result(run, name).output or ""))
        assert abs(float(after.pop("duration")) - float(before.pop("duration"))) <= 0.5, name
        assert after == before, name
        # ...and against the manifest, so the check does not rest on one reader alone.
        row = manifest[name]
        assert after["creation_time"] == row["datetime_original_or_creation_time"], name
        location = row["has_gps"].removeprefix("yes (").removesuffix(")")
        assert location in (after["location"], after["apple_location"]), name
        assert after["rotation"] == -int(row["video_rotation_deg"]), name
    assert len(names) == 5
