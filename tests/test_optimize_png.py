"""PNG → lossless JPEG XL: pixels and ICC verified by libjxl's CLI, keep decisions with reasons."""

from __future__ import annotations

import dataclasses
import io
import shutil
import subprocess
import zlib
from pathlib import Path

import pillow_jxl
import pytest
from PIL import Image, PngImagePlugin

from sftpgate.config import OptimizeConfig, PngConfig
from sftpgate.optimize import OptimizeResult, jxlboxes, jxlicc, optimize_file
from tests.readers import exiftool, exiftool_icc, icc_description

CONFIG = OptimizeConfig(png=PngConfig(effort=3))  # effort 3: same pixels, faster tests
PHOTO = "png/photo-rgba-icc.png"  # RGBA, "Display" ICC, EXIF, XMP, IPTC in a text chunk
SCREENSHOT = "png/screenshot-phone-p3-xmp.png"  # 16-bit, Display P3 ICC, XMP


def _djxl(jxl: Path, tmp_path: Path) -> tuple[Image.Image, bytes | None]:
    """Pixels and ICC as libjxl's own CLI (0.7, not the plugin's 0.12) decodes them."""
    if shutil.which("djxl") is None:
        pytest.skip("djxl is not installed (apt-get install libjxl-tools)")
    png, icc = tmp_path / "djxl.png", tmp_path / "djxl.icc"
    subprocess.run(
        ["djxl", str(jxl), str(png), f"--icc_out={icc}"], check=True, capture_output=True
    )
    with Image.open(png) as im:
        im.load()
        return im.copy(), icc.read_bytes() if icc.exists() else None


def _photo_without_iptc(corpus: Path, target: Path, **changes: object) -> Path:
    """The corpus photo PNG rewritten without its IPTC text chunk (so it may be converted):
    same pixels, ICC, EXIF and XMP, saved by Pillow."""
    with Image.open(corpus / PHOTO) as im:
        im.load()
        info = PngImagePlugin.PngInfo()
        info.add_itxt("XML:com.adobe.xmp", im.info["XML:com.adobe.xmp"])
        options = {"icc_profile": im.info["icc_profile"], "exif": im.info["exif"], "pnginfo": info}
        options.update(changes)
        for key, value in changes.items():
            if value is None:  # Pillow falls back to im.info for options not given
                im.info.pop(key, None)
        im.save(target, "PNG", **{k: v for k, v in options.items() if v is not None})
    return target


def test_icc_png_converts_pixel_exact_with_its_profile(corpus: Path, tmp_path: Path) -> None:
    src = _photo_without_iptc(corpus, tmp_path / "photo.png")
    result = optimize_file(src, tmp_path / "work", CONFIG, "")
    assert (result.decision, result.extension) == ("converted", ".jxl"), result.reason
    assert "pixel-identical" in result.reason
    assert result.metadata_kept == ("EXIF", "XMP", "ICC")
    output = Path(result.output or "")
    pixels, icc = _djxl(output, tmp_path)
    with Image.open(src) as original:
        assert pixels.mode == original.mode == "RGBA"
        assert pixels.tobytes() == original.tobytes()
        assert icc == original.info["icc_profile"]
    # Independent readers: exiftool on the JXL boxes, exiftool on the profile djxl extracted.
    assert icc_description(output) == icc_description(src) == "Display"
    tags = ["Orientation", "UserComment", "XMPToolkit"]
    assert exiftool(output, tags) == exiftool(src, tags)
    assert exiftool(output, ["XMPToolkit"])["XMPToolkit"] == "XMP Core 6.0.0"
    assert exiftool_icc(output) == icc  # read from the JXL itself, no djxl in between


def test_p3_profile_is_where_exiftool_reads_it(corpus: Path, tmp_path: Path) -> None:
    # exiftool never decodes the codestream's ICC; without the `colr` box it reports no profile and
    # Immich, which picks the sRGB preview path unless ProfileDescription (or ColorSpace) says
    # otherwise, would render a Display P3 screenshot as sRGB.
    with Image.open(corpus / SCREENSHOT) as im:
        im.load()  # Pillow reads the 16-bit screenshot as 8-bit: an 8-bit P3 PNG, as phones write
        src = tmp_path / "p3.png"
        im.save(src, "PNG", icc_profile=im.info["icc_profile"])
    flat = dataclasses.replace(CONFIG, min_savings=0.0)  # flat colours: PNG is nearly as small
    result = optimize_file(src, tmp_path / "work", flat, "")
    assert result.decision == "converted" and result.metadata_kept == ("ICC",), result.reason
    output = Path(result.output or "")
    with Image.open(src) as original:
        icc = original.info["icc_profile"]
        pixels, djxl_icc = _djxl(output, tmp_path)
        assert (pixels.tobytes(), djxl_icc) == (original.tobytes(), icc)  # codestream unchanged
        _is_jpeg, _info, plugin_pixels, plugin_icc, _boxes = pillow_jxl.Decoder()(
            output.read_bytes()
        )
        assert (plugin_pixels, plugin_icc) == (original.tobytes(), icc)
    assert jxlboxes.box_types(output.read_bytes())[-2:] == [b"colr", b"jxlc"]
    tags = ["ProfileDescription", "ColorSpecMethod", "ColorSpace"]
    assert exiftool(output, tags) == {
        "ProfileDescription": "Display P3",
        "ColorSpecMethod": 3,  # any ICC; no enumerated JPEG 2000 ColorSpace alongside it
        "ColorSpace": None,
    }
    assert exiftool(src, ["ProfileDescription"])["ProfileDescription"] == "Display P3"
    assert exiftool_icc(output) == exiftool_icc(src) == icc


def test_corpus_png_with_iptc_text_is_kept(corpus: Path, tmp_path: Path) -> None:
    result = optimize_file(corpus / PHOTO, tmp_path, CONFIG, "")
    assert result.decision == "kept" and "Raw profile type iptc" in result.reason
    assert exiftool(corpus / PHOTO, ["Keywords"])["Keywords"]  # what converting would lose
    assert list(tmp_path.iterdir()) == []


def test_16_bit_png_is_kept(corpus: Path, tmp_path: Path) -> None:
    src = corpus / SCREENSHOT
    result = optimize_file(src, tmp_path, CONFIG, "")
    assert result.decision == "kept" and "16-bit" in result.reason
    assert exiftool(src, ["BitDepth"])["BitDepth"] == 16  # the reason is true of the file
    with Image.open(src) as im:
        assert im.mode == "RGB"  # ...and Pillow would have made it 8-bit


def test_animated_png_is_kept(corpus: Path, tmp_path: Path) -> None:
    with Image.open(corpus / "gif/animated-from-livephoto.gif") as gif:
        frames = [frame.convert("RGB") for frame in _frames(gif)]
    src = tmp_path / "anim.png"
    frames[0].save(src, "PNG", save_all=True, append_images=frames[1:], duration=100)
    result = optimize_file(src, tmp_path / "work", CONFIG, "")
    assert result.decision == "kept" and "APNG" in result.reason


def _frames(im: Image.Image) -> list[Image.Image]:
    out = []
    for index in range(im.n_frames):
        im.seek(index)
        out.append(im.copy())
    return out


def test_palette_png_with_transparency_becomes_rgba(corpus: Path, tmp_path: Path) -> None:
    with Image.open(corpus / "gif/static-simple.gif") as gif:
        palette = gif.convert("P")
    src = tmp_path / "palette.png"
    palette.save(src, "PNG", transparency=0)
    result = optimize_file(src, tmp_path / "work", CONFIG, "")
    assert result.decision == "converted", result.reason
    pixels, _icc = _djxl(Path(result.output or ""), tmp_path)
    with Image.open(src) as original:
        assert pixels.tobytes() == original.convert("RGBA").tobytes()


def test_edge_png_with_broken_iccp_checksum_keeps_the_profile(corpus: Path, tmp_path: Path) -> None:
    # exiftool rejects the iCCP (its zlib stream lacks the Adler-32), Pillow recovers the whole
    # sRGB profile; the JXL carries it, so it is readable there for the first time.
    src = corpus / "edge/png-invalid-iccp-adler32.png"
    result = optimize_file(src, tmp_path / "work", CONFIG, "")
    assert result.decision == "converted" and result.metadata_kept == ("ICC",)
    pixels, icc = _djxl(Path(result.output or ""), tmp_path)
    with Image.open(src) as original:
        assert pixels.tobytes() == original.tobytes()
        assert icc == original.info["icc_profile"]
    assert icc_description(src) is None
    assert icc_description(Path(result.output or "")) == "sRGB IEC61966-2.1"


def test_png_without_icc_converts_as_srgb(corpus: Path, tmp_path: Path) -> None:
    src = _photo_without_iptc(corpus, tmp_path / "plain.png", icc_profile=None)
    result = optimize_file(src, tmp_path / "work", CONFIG, "")
    assert result.decision == "converted" and result.metadata_kept == ("EXIF", "XMP")
    output = Path(result.output or "")
    info = subprocess.run(["jxlinfo", str(output)], capture_output=True, text=True).stdout
    assert "sRGB" in info and "ICC" not in info
    assert b"colr" not in jxlboxes.box_types(output.read_bytes())
    assert exiftool_icc(output) is None
    pixels, _icc = _djxl(output, tmp_path)
    with Image.open(src) as original:
        assert pixels.tobytes() == original.tobytes()


def test_gamma_without_icc_is_kept(corpus: Path, tmp_path: Path) -> None:
    with Image.open(corpus / PHOTO) as im:
        rgb = im.convert("RGB")
    rgb.info.clear()  # no ICC, no EXIF: only the gAMA chunk describes the colours
    src = tmp_path / "gamma.png"
    # Pillow cannot write gAMA itself: splice the chunk in after IHDR by hand.
    buffer = io.BytesIO()
    rgb.save(buffer, "PNG")
    data = buffer.getvalue()
    gama = _chunk(b"gAMA", (100000).to_bytes(4, "big"))  # gamma 1.0: linear light
    src.write_bytes(data[:33] + gama + data[33:])
    result = optimize_file(src, tmp_path / "work", CONFIG, "")
    assert result.decision == "kept" and "gAMA" in result.reason


def _chunk(chunk_type: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(chunk_type + payload).to_bytes(4, "big")
    return len(payload).to_bytes(4, "big") + chunk_type + payload + crc


def test_exif_orientation_png_is_kept(corpus: Path, tmp_path: Path) -> None:
    with Image.open(corpus / PHOTO) as im:
        exif = im.getexif()
        exif[0x0112] = 6
        src = _photo_without_iptc(corpus, tmp_path / "rotated.png", exif=exif.tobytes())
    result = optimize_file(src, tmp_path / "work", CONFIG, "")
    assert result.decision == "kept" and "orientation 6" in result.reason


def test_unknown_chunk_is_kept(corpus: Path, tmp_path: Path) -> None:
    src = _photo_without_iptc(corpus, tmp_path / "c2pa.png")
    data = src.read_bytes()
    src.write_bytes(data[:33] + _chunk(b"caBX", b"content credentials") + data[33:])
    result = optimize_file(src, tmp_path / "work", CONFIG, "")
    assert result.decision == "kept" and "caBX" in result.reason


def test_png_mode_keep(corpus: Path, tmp_path: Path) -> None:
    keep = dataclasses.replace(CONFIG, png=PngConfig(mode="keep"))
    result = optimize_file(corpus / "edge/png-invalid-iccp-adler32.png", tmp_path, keep, "")
    assert result.decision == "kept" and "optimize.png.mode" in result.reason


def test_truncated_png_is_unreadable(corpus: Path, tmp_path: Path) -> None:
    data = (corpus / "edge/png-invalid-iccp-adler32.png").read_bytes()
    src = tmp_path / "cut.png"
    src.write_bytes(data[: len(data) // 2])
    result: OptimizeResult = optimize_file(src, tmp_path / "work", CONFIG, "")
    assert (result.kind, result.decision) == ("png", "unreadable")
    assert "truncated" in result.reason


# -- the ICC header rewrite itself ---------------------------------------------------------------


def _codestream(im: Image.Image, **options: object) -> bytes:
    encoder = pillow_jxl.Encoder(mode=im.mode, effort=3, **options)
    return encoder(im.tobytes(), im.width, im.height, jpeg_encode=False)


def test_embed_icc_is_read_back_by_both_libjxl_versions(corpus: Path, tmp_path: Path) -> None:
    adobe = _adobe_icc(corpus)
    with Image.open(corpus / "jpeg/canon-t2i-adobergb-gps-small.jpg") as im:
        rgb = im.convert("RGB")
    jxl = jxlicc.embed_icc(_codestream(rgb, lossless=True), adobe)
    _is_jpeg, info, pixels, icc, _boxes = pillow_jxl.Decoder()(jxl)
    assert (pixels, icc, info.mode) == (rgb.tobytes(), adobe, "RGB")
    path = tmp_path / "adobe.jxl"
    path.write_bytes(jxlboxes.container(jxl, []))
    decoded, cli_icc = _djxl(path, tmp_path)
    assert (decoded.tobytes(), cli_icc) == (rgb.tobytes(), adobe)
    info_text = subprocess.run(["jxlinfo", str(path)], capture_output=True, text=True).stdout
    assert f"{len(adobe)}-byte ICC profile" in info_text


def _adobe_icc(corpus: Path) -> bytes:
    with Image.open(corpus / "jpeg/canon-eos7d-adobergb-xmp.jpg") as im:
        return im.info["icc_profile"]


def test_embed_icc_refuses_what_it_cannot_rewrite(corpus: Path) -> None:
    icc = _adobe_icc(corpus)
    with Image.open(corpus / "jpeg/htc-desire-gps.jpg") as im:
        rgb = im.convert("RGB").resize((64, 48))
    with pytest.raises(jxlicc.JxlHeaderError, match="XYB"):
        jxlicc.embed_icc(_codestream(rgb, lossless=False, quality=90), icc)  # lossy
    with pytest.raises(jxlicc.JxlHeaderError, match="does not match"):
        jxlicc.embed_icc(_codestream(rgb.convert("L"), lossless=True), icc)  # RGB ICC, grey image
    with pytest.raises(jxlicc.JxlHeaderError, match="acsp"):
        jxlicc.embed_icc(_codestream(rgb, lossless=True), b"not a profile" * 20)
    with pytest.raises(jxlicc.JxlHeaderError, match="already"):
        jxlicc.embed_icc(jxlicc.embed_icc(_codestream(rgb, lossless=True), icc), icc)
