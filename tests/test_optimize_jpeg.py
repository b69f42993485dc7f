"""JPEG → lossless JPEG XL on the real corpus: decisions, bit-exactness, metadata, safety."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pickle
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pillow_jxl
import pytest
from PIL import Image

from sftpgate.config import JpegConfig, OptimizeConfig
from sftpgate.optimize import OptimizeResult, jpeg, jxlboxes, optimize_file

CONFIG = OptimizeConfig()
EXIFTOOL_TAGS = ("DateTimeOriginal", "GPSLatitude", "GPSLongitude", "Orientation", "Make", "Model")


def jpeg_rows(manifest: dict[str, dict[str, str]]) -> list[str]:
    return sorted(name for name, row in manifest.items() if row["kind"] == "jpeg")


def expected_decision(row: dict[str, str]) -> tuple[str, str]:
    """(decision, word the reason must contain), derived from MANIFEST columns, not file names."""
    if "CMYK" in row["codec"]:
        return "kept", "CMYK"
    if "Ultra HDR" in row["notes"]:
        return "kept", "Ultra HDR"
    if row["dimensions"] == "1x1":  # 2.8 KB of EXIF around one pixel: JXL cannot save 5 % here
        return "kept", "min_savings"
    return "converted", "bit-exact"


@pytest.fixture(scope="module")
def converted(
    corpus: Path, manifest: dict[str, dict[str, str]], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, OptimizeResult]:
    """Every corpus JPEG through optimize_file once (the expensive part, shared by the tests)."""
    work = tmp_path_factory.mktemp("work")
    return {
        name: optimize_file(corpus / name, work, CONFIG, "Europe/Berlin")
        for name in jpeg_rows(manifest)
    }


def converted_names(manifest: dict[str, dict[str, str]]) -> list[str]:
    return [n for n in jpeg_rows(manifest) if expected_decision(manifest[n])[0] == "converted"]


def test_every_corpus_jpeg_gets_the_expected_decision(
    converted: dict[str, OptimizeResult], manifest: dict[str, dict[str, str]]
) -> None:
    assert len(converted) >= 16
    for name, result in converted.items():
        decision, word = expected_decision(manifest[name])
        assert result.kind == "jpeg", name
        assert (result.decision, word in result.reason) == (decision, True), (name, result.reason)
        if decision == "converted":
            assert result.extension == ".jxl"
            assert result.output is not None and Path(result.output).is_file()
            assert result.bytes_out == Path(result.output).stat().st_size
            assert result.bytes_out <= result.bytes_in * (1 - CONFIG.min_savings)
        else:
            assert (result.output, result.extension) == (None, None)
            assert result.bytes_out == result.bytes_in == int(manifest[name]["size_bytes"])


def test_converted_files_reconstruct_bit_exact_with_plugin_and_djxl(
    converted: dict[str, OptimizeResult],
    manifest: dict[str, dict[str, str]],
    corpus: Path,
    tmp_path: Path,
) -> None:
    djxl = shutil.which("djxl")
    names = converted_names(manifest)
    assert names
    for name in names:
        original = (corpus / name).read_bytes()
        output = Path(converted[name].output or "")
        is_jpeg, _info, rebuilt, _icc, _boxes = pillow_jxl.Decoder()(output.read_bytes())
        assert is_jpeg and hashlib.sha1(rebuilt).digest() == hashlib.sha1(original).digest(), name
        if djxl:  # the independent libjxl CLI (0.7 on Debian 12) must agree
            target = tmp_path / "rebuilt.jpg"
            subprocess.run([djxl, str(output), str(target)], check=True, capture_output=True)
            assert target.read_bytes() == original, name
    if not djxl:
        pytest.skip("djxl not installed: only the plugin's reconstruction was checked")


def test_no_brob_box_remains_and_metadata_is_in_plain_boxes(
    converted: dict[str, OptimizeResult], manifest: dict[str, dict[str, str]], corpus: Path
) -> None:
    for name in converted_names(manifest):
        result = converted[name]
        types = jxlboxes.box_types(Path(result.output or "").read_bytes())
        info = jpeg.parse_jpeg((corpus / name).read_bytes())
        assert b"brob" not in types, name
        assert (b"Exif" in types, b"xml " in types) == (info.has_exif, info.has_xmp), name
        assert b"jbrd" in types, name  # the reconstruction data that makes it reversible
        assert result.metadata_kept == info.metadata(), name


def test_icc_profile_is_carried_in_the_codestream(
    converted: dict[str, OptimizeResult], manifest: dict[str, dict[str, str]], corpus: Path
) -> None:
    # exiftool 12.57 cannot read the ICC from a JPEG XL at all (it lives in the codestream's colour
    # encoding, not in a box), so the ICC check uses libjxl's decoder directly.
    checked = 0
    for name in converted_names(manifest):
        with Image.open(corpus / name) as im:
            icc = im.info.get("icc_profile")
        if manifest[name]["icc_profile"] == "no":
            assert icc is None and "ICC" not in converted[name].metadata_kept
            continue
        _, _, _, jxl_icc, _ = pillow_jxl.Decoder()(Path(converted[name].output or "").read_bytes())
        assert jxl_icc == icc and "ICC" in converted[name].metadata_kept, name
        checked += 1
    assert checked >= 4  # sRGB, Adobe RGB (two) and Nikon sRGB profiles in the corpus


def _exiftool(paths: list[Path]) -> list[dict[str, object]]:
    exiftool = shutil.which("exiftool")
    if not exiftool:
        pytest.skip("exiftool not installed")
    args = [exiftool, "-j", "-n", *(f"-{tag}" for tag in EXIFTOOL_TAGS), "-ProfileDescription"]
    proc = subprocess.run([*args, *map(str, paths)], check=True, capture_output=True, text=True)
    return json.loads(proc.stdout)


def test_exiftool_reads_the_same_metadata_from_the_jxl(
    converted: dict[str, OptimizeResult], manifest: dict[str, dict[str, str]], corpus: Path
) -> None:
    names = converted_names(manifest)
    originals = _exiftool([corpus / n for n in names])
    outputs = _exiftool([Path(converted[n].output or "") for n in names])
    with_gps = 0
    for name, before, after in zip(names, originals, outputs, strict=True):
        for tag in EXIFTOOL_TAGS:
            assert after.get(tag) == before.get(tag), (name, tag)
        with_gps += "GPSLatitude" in after
        if manifest[name]["make_model"] != "-":
            assert after.get("Make") and after.get("Model"), name
        if manifest[name]["orientation"] not in ("-", ""):
            assert after.get("Orientation") == int(manifest[name]["orientation"]), name
    assert with_gps >= 5


def test_exiftool_sees_the_icc_description_after_reconstruction(
    converted: dict[str, OptimizeResult], manifest: dict[str, dict[str, str]], tmp_path: Path
) -> None:
    names = [n for n in converted_names(manifest) if manifest[n]["icc_profile"] != "no"]
    rebuilt = []
    for index, name in enumerate(names):
        _, _, data, _, _ = pillow_jxl.Decoder()(Path(converted[name].output or "").read_bytes())
        target = tmp_path / f"{index}.jpg"
        target.write_bytes(data)
        rebuilt.append(target)
    for name, tags in zip(names, _exiftool(rebuilt), strict=True):
        assert tags.get("ProfileDescription") == manifest[name]["icc_profile"], name


def test_rerun_writes_the_same_path_and_bytes(corpus: Path, tmp_path: Path) -> None:
    src = corpus / "jpeg" / "htc-desire-gps.jpg"
    first = optimize_file(src, tmp_path, CONFIG, "UTC")
    first_bytes = Path(first.output or "").read_bytes()
    second = optimize_file(src, tmp_path, CONFIG, "UTC")
    assert first.decision == "converted"
    assert second.output == first.output
    assert Path(second.output or "").read_bytes() == first_bytes
    assert [p.name for p in tmp_path.iterdir()] == [Path(first.output or "").name]  # no temp files


def test_identical_bytes_from_two_originals_get_separate_outputs(
    corpus: Path, tmp_path: Path
) -> None:
    data = (corpus / "jpeg/htc-desire-gps.jpg").read_bytes()
    for user in ("alice", "bob"):
        (tmp_path / user).mkdir()
        (tmp_path / user / "IMG_1.jpg").write_bytes(data)
    a = optimize_file(tmp_path / "alice/IMG_1.jpg", tmp_path / "work", CONFIG, "")
    b = optimize_file(tmp_path / "bob/IMG_1.jpg", tmp_path / "work", CONFIG, "")
    assert a.output != b.output
    assert Path(a.output or "").read_bytes() == Path(b.output or "").read_bytes()
    assert Path(a.output or "").name.startswith(hashlib.sha1(data).hexdigest())


def test_result_is_picklable_for_the_worker_pool(corpus: Path, tmp_path: Path) -> None:
    result = optimize_file(corpus / "jpeg" / "htc-desire-gps.jpg", tmp_path, CONFIG, "Asia/Tokyo")
    clone = pickle.loads(pickle.dumps(result))
    assert clone == result and clone.captured_at is not None
    assert dataclasses.is_dataclass(clone)


def test_cmyk_jpeg_is_kept_and_libjxl_really_refuses_it(corpus: Path, tmp_path: Path) -> None:
    src = corpus / "jpeg" / "photoshop-cmyk-swop-multi-icc.jpg"
    result = optimize_file(src, tmp_path, CONFIG, "")
    assert (result.decision, result.output) == ("kept", None)
    assert "CMYK JPEG cannot be transcoded losslessly" in result.reason
    with pytest.raises(RuntimeError):  # why we do not even try: libjxl cannot represent it
        pillow_jxl.Encoder(mode="RGB", lossless=True, effort=7)(src.read_bytes(), 140, 140, True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["bad/truncated-half.jpg", "bad/corrupt-entropy.jpg"])
def test_damaged_jpegs_are_unreadable(corpus: Path, tmp_path: Path, name: str) -> None:
    # Measured: libjxl rejects both ("Input is invalid") and Pillow cannot decode them either, so
    # they are damaged photos, not merely untranscodable ones: undone/, as SPEC §4 says.
    data = (corpus / name).read_bytes()
    with pytest.raises(RuntimeError):
        pillow_jxl.Encoder(mode="RGB", lossless=True, effort=7)(data, 776, 909, jpeg_encode=True)
    result = optimize_file(corpus / name, tmp_path, CONFIG, "")
    assert (result.kind, result.decision) == ("jpeg", "unreadable")
    assert "damaged JPEG" in result.reason
    assert list(tmp_path.iterdir()) == []


def _with_sof_size(data: bytes, width: int, height: int) -> bytes:
    sof = next(data.find(m) for m in (b"\xff\xc0", b"\xff\xc2") if data.find(m) > 0)
    return data[: sof + 5] + struct.pack(">HH", height, width) + data[sof + 9 :]


def test_jpeg_bomb_is_refused_before_any_decode(corpus: Path, tmp_path: Path) -> None:
    # 65000×65000 made libjxl take 39 s and 12 GiB before failing (notes/codecs.md §3).
    bomb = tmp_path / "in" / "bomb.jpg"
    bomb.parent.mkdir()
    bomb.write_bytes(
        _with_sof_size((corpus / "jpeg/htc-desire-gps.jpg").read_bytes(), 65000, 65000)
    )
    started = time.monotonic()
    result = optimize_file(bomb, tmp_path / "work", CONFIG, "")
    assert time.monotonic() - started < 2
    assert result.decision == "unreadable"
    assert "decompression bomb" in result.reason and "65000×65000" in result.reason
    assert not (tmp_path / "work").exists()


def test_max_pixels_comes_from_the_config(corpus: Path, tmp_path: Path) -> None:
    src = corpus / "jpeg" / "htc-desire-gps.jpg"  # 776×909 = 0.7 MP
    small = dataclasses.replace(CONFIG, max_pixels=500_000)
    assert optimize_file(src, tmp_path, small, "").reason.startswith("refused as a decompression")
    assert optimize_file(src, tmp_path, CONFIG, "").decision == "converted"
    assert Image.MAX_IMAGE_PIXELS != 500_000  # the global Pillow limit is restored afterwards


def test_motion_photo_trailer_keeps_the_jpeg(corpus: Path, tmp_path: Path) -> None:
    # Samsung-style motion photo: an MP4 appended after the JPEG's end-of-image marker.
    photo = (corpus / "jpeg/htc-desire-gps.jpg").read_bytes()
    video = (corpus / "video/legacy-phone-mpeg4-amr.3gp").read_bytes()
    src = tmp_path / "motion.jpg"
    src.write_bytes(photo + video)
    result = optimize_file(src, tmp_path / "work", CONFIG, "")
    assert result.decision == "kept" and "motion photo" in result.reason
    assert result.bytes_out == len(photo) + len(video)


def test_google_motion_photo_and_ultra_hdr_are_kept(corpus: Path, tmp_path: Path) -> None:
    motion = optimize_file(corpus / "edge/google-motionphoto-broken.jpg", tmp_path, CONFIG, "")
    hdr = optimize_file(corpus / "jpeg/google-pixel8pro-p3-ultrahdr.jpg", tmp_path, CONFIG, "")
    assert (motion.decision, "motion photo" in motion.reason) == ("kept", True)
    assert (hdr.decision, "Ultra HDR" in hdr.reason) == ("kept", True)
    assert hdr.metadata_kept == ("EXIF", "XMP", "ICC")
    assert list(tmp_path.iterdir()) == []


def test_zero_padding_after_the_image_is_not_content(corpus: Path, tmp_path: Path) -> None:
    src = tmp_path / "padded.jpg"
    data = (corpus / "jpeg/htc-desire-gps.jpg").read_bytes() + b"\x00" * 2048
    src.write_bytes(data)
    result = optimize_file(src, tmp_path / "work", CONFIG, "")
    assert result.decision == "converted"
    _, _, rebuilt, _, _ = pillow_jxl.Decoder()(Path(result.output or "").read_bytes())
    assert rebuilt == data  # the padding is reconstructed too


def test_jpeg_named_otherwise_is_converted(corpus: Path, tmp_path: Path) -> None:
    for name in ("bad/jpeg-with-png-extension.png", "edge/nikon-d70s-jpeg-named.nef"):
        result = optimize_file(corpus / name, tmp_path, CONFIG, "")
        assert (result.kind, result.decision, result.extension) == ("jpeg", "converted", ".jxl")


def test_mode_keep_and_lossy_fallback(corpus: Path, tmp_path: Path) -> None:
    src = corpus / "jpeg/canon-sx60-orient6.jpg"
    keep = dataclasses.replace(CONFIG, jpeg=JpegConfig(mode="keep"))
    lossy = dataclasses.replace(CONFIG, jpeg=JpegConfig(mode="lossy"))
    kept = optimize_file(src, tmp_path, keep, "")
    assert (kept.decision, "optimize.jpeg.mode" in kept.reason) == ("kept", True)
    assert list(tmp_path.iterdir()) == []
    fallback = optimize_file(src, tmp_path, lossy, "")
    assert fallback.decision == "converted" and "lossless transcode was used" in fallback.reason


def test_parse_jpeg_reports_structure(corpus: Path) -> None:
    hdr = jpeg.parse_jpeg((corpus / "jpeg/google-pixel8pro-p3-ultrahdr.jpg").read_bytes())
    assert (hdr.width, hdr.height, hdr.has_mpf, hdr.trailing_size) == (3072, 4080, True, 9554)
    grey = io.BytesIO()
    Image.new("L", (16, 8), 128).save(grey, "JPEG")
    info = jpeg.parse_jpeg(grey.getvalue())
    assert (info.components, info.precision, info.damage, info.trailing_size) == (1, 8, "", 0)
    with pytest.raises(jpeg.JpegFormatError):
        jpeg.parse_jpeg(b"\xff\xd8\xff\xe1\x00\x10Exif")  # cut inside the header


def test_grayscale_jpeg_round_trips(tmp_path: Path) -> None:
    grey = Image.radial_gradient("L").resize((640, 480))
    src = tmp_path / "grey.jpg"
    grey.save(src, "JPEG", quality=92)
    result = optimize_file(src, tmp_path / "work", CONFIG, "")
    assert result.decision == "converted", result.reason
    _, info, rebuilt, _, _ = pillow_jxl.Decoder()(Path(result.output or "").read_bytes())
    assert rebuilt == src.read_bytes() and info.mode == "L"


def test_brob_rewrite_keeps_reconstruction_bit_exact(corpus: Path) -> None:
    data = (corpus / "jpeg/canon-t2i-adobergb-gps-small.jpg").read_bytes()
    raw = pillow_jxl.Encoder(mode="RGB", lossless=True, effort=7)(data, 100, 150, jpeg_encode=True)
    assert b"brob" in jxlboxes.box_types(raw)  # what libjxl writes, invisible to exiftool 12.57
    plain = jxlboxes.decompress_brob_boxes(raw, limit=len(data))
    assert jxlboxes.box_types(plain).count(b"brob") == 0
    assert {b"Exif", b"xml "} <= set(jxlboxes.box_types(plain))
    assert pillow_jxl.Decoder()(plain)[2] == data
    with pytest.raises(jxlboxes.JxlBoxError):
        jxlboxes.decompress_brob_boxes(raw, limit=10)  # the Brotli expansion guard
    with pytest.raises(jxlboxes.JxlBoxError):
        jxlboxes.decompress_brob_boxes(raw[: len(raw) // 2], limit=len(data))  # truncated
