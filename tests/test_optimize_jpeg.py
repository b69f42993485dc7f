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
from PIL import Image, ImageCms, ImageOps

from sftpgate.config import JpegConfig, OptimizeConfig
from sftpgate.optimize import OptimizeResult, jpeg, jxlboxes, optimize_file
from tests.readers import exiftool, exiftool_icc

CONFIG = OptimizeConfig()
ADOBE = "jpeg/canon-eos7d-adobergb-xmp.jpg"  # Adobe RGB (1998) ICC, EXIF, XMP
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


def test_icc_profile_is_carried_in_the_codestream_and_a_colr_box(
    converted: dict[str, OptimizeResult], manifest: dict[str, dict[str, str]], corpus: Path
) -> None:
    # libjxl's decoder reads the codestream's profile; exiftool never does, it reads the box.
    checked = 0
    for name in converted_names(manifest):
        with Image.open(corpus / name) as im:
            icc = im.info.get("icc_profile")
        output = Path(converted[name].output or "")
        types = jxlboxes.box_types(output.read_bytes())
        if manifest[name]["icc_profile"] == "no":
            assert icc is None and "ICC" not in converted[name].metadata_kept
            assert b"colr" not in types and exiftool_icc(output) is None, name
            continue
        _, _, _, jxl_icc, _ = pillow_jxl.Decoder()(output.read_bytes())
        assert jxl_icc == icc and "ICC" in converted[name].metadata_kept, name
        assert exiftool_icc(output) == icc, name
        assert types.count(b"colr") == 1 and types[-2:] == [b"colr", b"jxlp"], name
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


def test_exiftool_sees_the_icc_description_in_the_jxl(
    converted: dict[str, OptimizeResult], manifest: dict[str, dict[str, str]]
) -> None:
    names = converted_names(manifest)
    for name, tags in zip(
        names, _exiftool([Path(converted[n].output or "") for n in names]), strict=True
    ):
        expected = manifest[name]["icc_profile"]
        assert tags.get("ProfileDescription") == (None if expected == "no" else expected), name


def test_adobe_rgb_profile_is_where_exiftool_reads_it(
    converted: dict[str, OptimizeResult], corpus: Path
) -> None:
    # Without the `colr` box exiftool reports no profile for the .jxl, and a library that picks
    # its colour handling from ProfileDescription would show this Adobe RGB photo as sRGB.
    src, output = corpus / ADOBE, Path(converted[ADOBE].output or "")
    assert jxlboxes.box_types(output.read_bytes())[2:] == [
        b"jxlp", b"jbrd", b"Exif", b"xml ", b"colr", b"jxlp"
    ]  # fmt: skip
    colour = ["ProfileDescription", "ColorSpecMethod", "Jpeg2000:ColorSpace"]
    assert exiftool(output, colour) == {
        "ProfileDescription": "Adobe RGB (1998)",
        "ColorSpecMethod": 3,  # any ICC; no enumerated JPEG 2000 colour space beside it
        "Jpeg2000:ColorSpace": None,
    }
    assert exiftool(src, ["ProfileDescription"])["ProfileDescription"] == "Adobe RGB (1998)"
    assert exiftool_icc(output) == exiftool_icc(src) is not None
    # EXIF and XMP still read as before, including XMP's ColorSpace (65535, Uncalibrated: how
    # Adobe RGB is marked there).
    tags = ["XMP:ColorSpace", "XMP:Rating", "XMP:Label", "Make", "Model", "DateTimeOriginal"]
    assert exiftool(output, tags) == exiftool(src, tags)
    assert exiftool(output, ["XMP:ColorSpace", "XMP:Label", "Make"]) == {
        "XMP:ColorSpace": 65535,
        "XMP:Label": "blau",
        "Make": "Canon",
    }


def test_profile_in_several_app2_chunks_is_joined(corpus: Path, tmp_path: Path) -> None:
    # A profile over 64 KB is split into numbered APP2 chunks; the corpus has a split profile only
    # in a CMYK JPEG (kept), so the Adobe RGB profile is split into three chunks here.
    with Image.open(corpus / ADOBE) as im:
        icc = im.info["icc_profile"]
        single = io.BytesIO()
        im.save(single, "JPEG", quality=90, icc_profile=icc)
    data = single.getvalue()
    start = data.index(b"ICC_PROFILE\x00") - 4  # the APP2 marker and its length
    end = start + 2 + struct.unpack_from(">H", data, start + 2)[0]
    assert data[start + 4 : end] == b"ICC_PROFILE\x00\x01\x01" + icc  # Pillow wrote one chunk
    third = len(icc) // 3
    parts = [icc[:third], icc[third : 2 * third], icc[2 * third :]]
    chunks = [
        b"ICC_PROFILE\x00" + bytes((number, 3)) + part for number, part in enumerate(parts, 1)
    ]
    app2 = b"".join(b"\xff\xe2" + struct.pack(">H", 2 + len(c)) + c for c in chunks)
    src = tmp_path / "split.jpg"
    src.write_bytes(data[:start] + app2 + data[end:])
    assert jpeg.parse_jpeg(src.read_bytes()).icc == icc
    assert exiftool_icc(src) == icc  # exiftool joins the chunks the same way

    result = optimize_file(src, tmp_path / "work", dataclasses.replace(CONFIG, min_savings=0.0), "")
    assert result.decision == "converted" and "ICC" in result.metadata_kept, result.reason
    output = Path(result.output or "")
    assert exiftool_icc(output) == icc
    assert exiftool(output, ["ProfileDescription"])["ProfileDescription"] == "Adobe RGB (1998)"
    assert pillow_jxl.Decoder()(output.read_bytes())[2] == src.read_bytes()
    if shutil.which("djxl"):
        rebuilt = tmp_path / "rebuilt.jpg"
        subprocess.run(["djxl", str(output), str(rebuilt)], check=True, capture_output=True)
        assert rebuilt.read_bytes() == src.read_bytes()  # the three chunks exactly as they were


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
    # they are damaged photos, not merely untranscodable ones: undone/, as the product promises for damaged files.
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
    # 65000×65000 made libjxl take 39 s and 12 GiB before failing.
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


def test_mode_keep(corpus: Path, tmp_path: Path) -> None:
    keep = dataclasses.replace(CONFIG, jpeg=JpegConfig(mode="keep"))
    kept = optimize_file(corpus / "jpeg/canon-sx60-orient6.jpg", tmp_path, keep, "")
    assert (kept.decision, "optimize.jpeg.mode" in kept.reason) == ("kept", True)
    assert list(tmp_path.iterdir()) == []


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


# -- lossy mode ----------------------------------------------------------------------------------

LOSSY = dataclasses.replace(CONFIG, jpeg=JpegConfig(mode="lossy", quality=90, effort=3))
LOSSY_TAGS = ("DateTimeOriginal", "OffsetTimeOriginal", "GPSLatitude", "GPSLongitude", "Make")


def _djxl_pixels(jxl: Path, tmp_path: Path) -> Image.Image:
    if shutil.which("djxl") is None:
        pytest.skip("djxl is not installed (apt-get install libjxl-tools)")
    target = tmp_path / "decoded.png"
    subprocess.run(["djxl", str(jxl), str(target)], check=True, capture_output=True)
    with Image.open(target) as im:
        return im.convert("RGB")


def _mean_difference(a: Image.Image, b: Image.Image) -> float:
    pairs = zip(a.tobytes(), b.tobytes(), strict=True)
    return sum(abs(x - y) for x, y in pairs) / (a.width * a.height * 3)


@pytest.mark.parametrize(
    "name", ["jpeg/samsung-sm-j327t1-orient6.jpg", "jpeg/canon-a85-orient8.jpg"]
)
def test_lossy_applies_the_orientation_and_resets_the_tag(
    corpus: Path, tmp_path: Path, name: str
) -> None:
    src = corpus / name
    result = optimize_file(src, tmp_path / "work", LOSSY, "")
    assert result.decision == "converted" and "lossy JPEG XL" in result.reason, result.reason
    assert "orientation applied" in result.reason
    output = Path(result.output or "")
    before, after = _exiftool([src])[0], _exiftool([output])[0]
    assert before["Orientation"] in (6, 8) and after["Orientation"] == 1
    assert {t: after.get(t) for t in EXIFTOOL_TAGS if t != "Orientation"} == {
        t: before.get(t) for t in EXIFTOOL_TAGS if t != "Orientation"
    }
    decoded = _djxl_pixels(output, tmp_path)
    with Image.open(src) as im:
        upright = ImageOps.exif_transpose(im).convert("RGB")
    assert decoded.size == upright.size != im.size  # width and height swapped
    assert _mean_difference(decoded, upright) < 3  # the same picture, upright


def test_lossy_converts_adobe_rgb_to_srgb(corpus: Path, tmp_path: Path) -> None:
    # An Adobe RGB JPEG without IPTC (made from the corpus file's pixels and profile), so lossy
    # mode applies: the JXL must show the colours a colour-managed viewer shows for the JPEG.
    with Image.open(corpus / "jpeg/canon-eos7d-adobergb-xmp.jpg") as im:
        icc, exif = im.info["icc_profile"], im.info["exif"]
        src = tmp_path / "adobe.jpg"
        im.save(src, "JPEG", quality=95, icc_profile=icc, exif=exif)
    result = optimize_file(src, tmp_path / "work", LOSSY, "")
    assert result.decision == "converted" and "'Adobe RGB (1998)' to sRGB" in result.reason
    assert result.metadata_kept == ("EXIF",)
    output = Path(result.output or "")
    # The codestream declares sRGB by enumeration and holds no profile: no `colr` box, and no
    # profile is what exiftool reports, which readers take as sRGB.
    info = subprocess.run(["jxlinfo", str(output)], capture_output=True, text=True).stdout
    assert "sRGB primaries, sRGB transfer function" in info and "ICC" not in info
    assert b"colr" not in jxlboxes.box_types(output.read_bytes())
    assert exiftool(output, ["ProfileDescription"])["ProfileDescription"] is None
    decoded = _djxl_pixels(output, tmp_path)
    with Image.open(src) as im:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        managed = ImageCms.profileToProfile(im, profile, ImageCms.createProfile("sRGB"))
        unmanaged = im.convert("RGB")
    assert managed is not None
    assert _mean_difference(decoded, managed) < 2 < _mean_difference(decoded, unmanaged)


def test_lossy_keeps_exif_maker_note_and_xmp_visible(corpus: Path, tmp_path: Path) -> None:
    src = corpus / "jpeg/apple-iphone6s-livephoto.jpg"  # the Live Photo pairing is in the MakerNote
    result = optimize_file(src, tmp_path / "work", LOSSY, "")
    assert result.decision == "converted" and "lossy" in result.reason
    output = Path(result.output or "")
    tags = ["MediaGroupUUID", *LOSSY_TAGS, "Model"]
    assert exiftool(output, tags) == exiftool(src, tags)
    assert exiftool(output, ["MediaGroupUUID"])["MediaGroupUUID"]


def test_lossy_keeps_xmp(corpus: Path, tmp_path: Path) -> None:
    with Image.open(corpus / "jpeg/canon-sx60-orient6.jpg") as im:
        xmp = im.info["xmp"]
        src = tmp_path / "xmp.jpg"
        im.save(src, "JPEG", quality=95, exif=im.info["exif"], xmp=xmp)
    result = optimize_file(src, tmp_path / "work", LOSSY, "")
    assert result.decision == "converted" and result.metadata_kept == ("EXIF", "XMP")
    tags = ["XMPToolkit", "Rating"]
    assert exiftool(Path(result.output or ""), tags) == exiftool(src, tags)


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("jpeg/android-depthmap-extended-xmp.jpg", "extended XMP"),
        ("jpeg/nikon-d5000-gps-xmp.jpeg", "IPTC"),
    ],
)
def test_lossy_falls_back_to_lossless_rather_than_lose_metadata(
    corpus: Path, tmp_path: Path, name: str, why: str
) -> None:
    result = optimize_file(corpus / name, tmp_path / "work", LOSSY, "")
    assert result.decision == "converted" and "bit-exact" in result.reason
    assert f"lossy mode not used: its {why}" in result.reason


def test_exif_orientation_reset_patches_one_value(corpus: Path) -> None:
    info = jpeg.parse_jpeg((corpus / "jpeg/canon-sx60-orient6.jpg").read_bytes())
    patched = jpeg.exif_with_orientation_reset(info.exif)
    assert len(patched) == len(info.exif)
    assert sum(a != b for a, b in zip(patched, info.exif, strict=True)) == 1
    exif = Image.Exif()
    exif.load(patched)
    assert exif[0x0112] == 1
    with pytest.raises(ValueError):
        jpeg.exif_with_orientation_reset(b"garbage")


def _with_iptc(jpeg_bytes: bytes, datasets: list[tuple[int, bytes]]) -> bytes:
    """`jpeg_bytes` with an APP13 Photoshop segment holding these IPTC application records."""
    iim = b"".join(b"\x1c\x02" + bytes([n]) + struct.pack(">H", len(v)) + v for n, v in datasets)
    iim += b"\x00" * (len(iim) % 2)
    resource = b"8BIM" + struct.pack(">H", 0x0404) + b"\x00\x00" + struct.pack(">I", len(iim))
    payload = b"Photoshop 3.0\x00" + resource + iim
    return (
        jpeg_bytes[:2]
        + b"\xff\xed"
        + struct.pack(">H", 2 + len(payload))
        + payload
        + jpeg_bytes[2:]
    )


def test_iptc_without_xmp_is_kept_visible(corpus: Path, tmp_path: Path) -> None:
    # No XMP mirror: in a JPEG XL the keywords would sit in the jbrd box, where exiftool (and so
    # Immich) cannot see them.
    base = (corpus / "jpeg/htc-desire-gps.jpg").read_bytes()
    tagged, empty = tmp_path / "keywords.jpg", tmp_path / "version-only.jpg"
    tagged.write_bytes(_with_iptc(base, [(0, b"\x00\x04"), (25, b"Mongolia")]))
    empty.write_bytes(_with_iptc(base, [(0, b"\x00\x04"), (120, b"  ")]))
    assert exiftool(tagged, ["Keywords"])["Keywords"] == "Mongolia"
    kept = optimize_file(tagged, tmp_path / "work", CONFIG, "")
    assert kept.decision == "kept" and "IPTC" in kept.reason
    assert optimize_file(empty, tmp_path / "work", CONFIG, "").decision == "converted"
