"""Video → HEVC / AV1 with PyAV on real clips, checked with Debian's ffprobe and exiftool.

Encodes use preset ultrafast (and SVT-AV1 preset 12): these tests are about what survives, not
about quality.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import struct
import subprocess
import time
from fractions import Fraction
from pathlib import Path

import av
import pytest
from PIL import Image, ImageChops, ImageStat

from sftpgate.config import OptimizeConfig, VideoConfig
from sftpgate.optimize import OptimizeResult, optimize_file, video
from tests.readers import exiftool, ffprobe, video_metadata

FAST = VideoConfig(preset="ultrafast", av1_preset=12)
CONFIG = OptimizeConfig(video=FAST)
ROTATED = "video/apple-iphone6-rot90-gps.mov"  # rotate 90, Apple keys, 2 mebx tracks
ANDROID = "video/android6-1080p-gps.mp4"  # ©xyz location, 0.17 s
IPHONE5 = "video/apple-iphone5-1080p-gps.mov"  # edit lists end both tracks inside a sample
SAMSUNG = "video/samsung-s22-hevc-rot90-gps.mp4"  # full range, BT.470BG primaries
CORPUS_VIDEOS = (ROTATED, ANDROID, IPHONE5, SAMSUNG)
COLOUR_KEYS = ("color_range", "color_primaries", "color_transfer", "color_space")


@pytest.fixture(scope="module")
def converted(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, OptimizeResult]:
    work = tmp_path_factory.mktemp("video-work")
    return {name: optimize_file(corpus / name, work, CONFIG, "UTC") for name in CORPUS_VIDEOS}


def _frame_seconds(path: Path) -> float:
    video_stream = next(s for s in ffprobe(path)["streams"] if s["codec_type"] == "video")
    return float(1 / Fraction(video_stream["avg_frame_rate"]))


def _within_a_frame(src: Path) -> float:
    """One frame of the source, plus a tick of each movie header (1/600 s Apple, 1/1000 s FFmpeg)."""
    return _frame_seconds(src) + 1 / 600 + 1 / 1000


def _same_video_metadata(src: Path, output: Path) -> None:
    before, after = video_metadata(src), video_metadata(output)
    difference = abs(float(after.pop("duration")) - float(before.pop("duration")))
    assert difference <= _within_a_frame(src)
    assert after == before


def _luma_at(path: Path, seconds: float) -> Image.Image:
    """The frame shown at `seconds`, as Debian's ffmpeg decodes it (not rotated)."""
    video_stream = next(s for s in ffprobe(path)["streams"] if s["codec_type"] == "video")
    size = (video_stream["width"], video_stream["height"])
    raw = subprocess.run(
        [
            "ffmpeg", "-v", "error", "-noautorotate", "-ss", f"{seconds:.3f}", "-i", str(path),
            "-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "gray", "-",
        ],
        capture_output=True,
        check=True,
    ).stdout  # fmt: skip
    return Image.frombytes("L", size, raw)


@pytest.mark.parametrize("name", CORPUS_VIDEOS)
def test_colour_duration_and_pixels_match_the_source(
    name: str, converted: dict[str, OptimizeResult], corpus: Path
) -> None:
    result, src = converted[name], corpus / name
    assert result.decision == "converted", result.reason
    output = Path(result.output or "")
    before, after = ffprobe(src), ffprobe(output)
    tolerance = _within_a_frame(src)

    def by_kind(probe: dict[str, object]) -> list[dict[str, object]]:
        wanted = ("video", "audio")
        return sorted(
            (s for s in probe["streams"] if s["codec_type"] in wanted),
            key=lambda s: s["codec_type"] != "video",
        )

    assert len(by_kind(before)) == len(by_kind(after))
    for source_stream, output_stream in zip(by_kind(before), by_kind(after), strict=True):
        difference = float(output_stream["duration"]) - float(source_stream["duration"])
        assert abs(difference) <= tolerance, (source_stream["codec_type"], difference)
    source_video, output_video = by_kind(before)[0], by_kind(after)[0]
    declared = {
        k: source_video[k] for k in COLOUR_KEYS if source_video.get(k, "unknown") != "unknown"
    }
    assert {k: output_video.get(k) for k in declared} == declared
    assert (
        abs(float(after["format"]["duration"]) - float(before["format"]["duration"])) <= tolerance
    )
    # Both files show their frames at the same times, so the first frame from there is the same.
    middle = float(source_video["duration"]) / 2
    difference = ImageChops.difference(_luma_at(src, middle), _luma_at(output, middle))
    assert ImageStat.Stat(difference).mean[0] <= video.MAX_LUMA_DIFFERENCE


def test_rotation_apple_keys_and_audio_survive(
    converted: dict[str, OptimizeResult], corpus: Path
) -> None:
    result = converted[ROTATED]
    assert (result.decision, result.extension) == ("converted", ".mov"), result.reason
    output = Path(result.output or "")
    _same_video_metadata(corpus / ROTATED, output)
    assert video_metadata(output)["rotation"] == -90  # the display matrix, not rotated pixels
    streams = ffprobe(output)["streams"]
    hevc = next(s for s in streams if s["codec_type"] == "video")
    assert (hevc["codec_name"], hevc["codec_tag_string"]) == ("hevc", "hvc1")
    assert "dropped data tracks" in result.reason and "Core Media Metadata" in result.reason
    assert result.metadata_kept == ("creation_time", "location", "make/model", "rotation", "audio")
    assert result.bytes_out == output.stat().st_size < result.bytes_in


def test_android_location_box_is_carried_byte_for_byte(
    converted: dict[str, OptimizeResult], corpus: Path
) -> None:
    result = converted[ANDROID]
    assert (result.decision, result.extension) == ("converted", ".mp4"), result.reason
    output = Path(result.output or "")
    _same_video_metadata(corpus / ANDROID, output)
    # FFmpeg alone would rewrite ©xyz as a rounded 3GPP 'loci' box; the original box is kept.
    tags = ["UserData:GPSCoordinates", "UserData:LocationInformation"]
    assert exiftool(output, tags) == exiftool(corpus / ANDROID, tags)
    udta = (corpus / ANDROID).read_bytes()
    start = udta.index(b"udta") - 4
    box = udta[start : start + struct.unpack(">I", udta[start : start + 4])[0]]
    assert box in output.read_bytes()


def test_converted_hevc_is_already_efficient_the_second_time(
    converted: dict[str, OptimizeResult], tmp_path: Path
) -> None:
    again = optimize_file(Path(converted[ANDROID].output or ""), tmp_path, CONFIG, "UTC")
    assert again.decision == "kept" and "already efficient HEVC" in again.reason
    assert again.captured_at == converted[ANDROID].captured_at is not None
    assert list(tmp_path.iterdir()) == []


def test_live_photo_video_is_kept(corpus: Path, tmp_path: Path) -> None:
    result = optimize_file(corpus / "video/apple-iphone6s-livephoto.mov", tmp_path, CONFIG, "")
    assert result.decision == "kept" and "Live Photo" in result.reason
    tag = ffprobe(corpus / "video/apple-iphone6s-livephoto.mov")["format"]["tags"]
    assert "com.apple.quicktime.content.identifier" in tag
    assert list(tmp_path.iterdir()) == []


def test_av1_mode(corpus: Path, tmp_path: Path) -> None:
    config = dataclasses.replace(CONFIG, video=dataclasses.replace(FAST, mode="av1"))
    result = optimize_file(corpus / ROTATED, tmp_path, config, "")
    assert (result.decision, result.extension) == ("converted", ".mp4"), result.reason
    output = Path(result.output or "")
    assert (
        next(s for s in ffprobe(output)["streams"] if s["codec_type"] == "video")["codec_name"]
        == "av1"
    )
    _same_video_metadata(corpus / ROTATED, output)


def test_mode_keep(corpus: Path, tmp_path: Path) -> None:
    config = dataclasses.replace(CONFIG, video=dataclasses.replace(FAST, mode="keep"))
    result = optimize_file(corpus / ANDROID, tmp_path, config, "")
    assert result.decision == "kept" and "optimize.video.mode" in result.reason


def _encode_clip(path: Path, fmt: str, codec: str, frames: int, **context: object) -> None:
    """A short synthetic clip (moving gradient) written with PyAV."""
    with av.open(str(path), "w", format=fmt) as out:
        out.metadata["creation_time"] = "2021-06-01T10:00:00.000000Z"
        stream = out.add_stream(codec, rate=15)
        stream.width, stream.height = 176, 144
        for key, value in context.items():
            setattr(stream.codec_context, key, value)
        for index in range(frames):
            frame = av.VideoFrame(176, 144, "rgb24")
            frame.planes[0].update(bytes((x * 3 + index * 7) % 256 for x in range(176 * 144 * 3)))
            frame = frame.reformat(format=stream.codec_context.pix_fmt)
            frame.pts, frame.time_base = index, Fraction(1, 15)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def test_amr_audio_is_converted_to_aac_for_mp4(corpus: Path, tmp_path: Path) -> None:
    # The corpus 3GP's own AMR-NB audio, with its video re-encoded at a wasteful bitrate so that
    # HEVC has something to save. MP4 cannot hold AMR, so the audio must become AAC.
    src = tmp_path / "phone.3gp"
    with (
        av.open(str(corpus / "video/legacy-phone-mpeg4-amr.3gp")) as inp,
        av.open(str(src), "w", format="3gp") as out,
    ):
        out.metadata["creation_time"] = inp.metadata["creation_time"]
        audio = out.add_stream_from_template(inp.streams.audio[0])
        # The 3GP demuxer returns several AMR frames per packet, which the muxer refuses.
        amr = av.CodecContext.create("amrnb", "r")
        vout = out.add_stream("mpeg4", rate=15)
        vout.width, vout.height, vout.pix_fmt = 176, 144, "yuv420p"
        vout.codec_context.bit_rate = 2_000_000
        samples = 0
        for packet in inp.demux():
            if packet.stream.type == "audio" and packet.dts is not None:
                for frame_packet in amr.parse(bytes(packet)):
                    frame_packet.pts = frame_packet.dts = samples
                    frame_packet.time_base, frame_packet.stream = Fraction(1, 8000), audio
                    samples += 160  # AMR-NB: 20 ms frames
                    out.mux(frame_packet)
            elif packet.stream.type == "video":
                for frame in packet.decode():
                    frame.pict_type = av.video.frame.PictureType.NONE
                    out.mux(vout.encode(frame))
        out.mux(vout.encode(None))
    result = optimize_file(src, tmp_path / "work", CONFIG, "UTC")
    assert (result.decision, result.extension) == ("converted", ".mp4"), result.reason
    assert "amrnb converted to AAC" in result.reason
    probe = ffprobe(Path(result.output or ""))
    audio_streams = [s for s in probe["streams"] if s["codec_type"] == "audio"]
    assert [(s["codec_name"], s["sample_rate"]) for s in audio_streams] == [("aac", "8000")]
    before = ffprobe(src)["format"]
    assert abs(float(probe["format"]["duration"]) - float(before["duration"])) <= 1 / 15
    assert probe["format"]["tags"]["creation_time"] == before["tags"]["creation_time"]


def test_hdr_video_is_kept(tmp_path: Path) -> None:
    src = tmp_path / "hdr.mp4"
    _encode_clip(
        src, "mp4", "libx265", 4, pix_fmt="yuv420p10le", color_trc=16, color_primaries=9,
        colorspace=9, bit_rate=20_000_000,
    )  # fmt: skip
    assert ffprobe(src)["streams"][0]["color_transfer"] == "smpte2084"
    result = optimize_file(src, tmp_path / "work", CONFIG, "")
    assert result.decision == "kept" and "PQ" in result.reason


def test_top_level_xmp_box_is_carried(corpus: Path, tmp_path: Path) -> None:
    # Adobe tools store XMP in a top-level 'uuid' box; it is metadata, so it must travel along.
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="sftpgate test"/>'
    uuid = bytes.fromhex("be7acfcb97a942e89c71999491e3afac")
    box = struct.pack(">I4s", 8 + 16 + len(xmp), b"uuid") + uuid + xmp
    src = tmp_path / "with-xmp.mp4"
    src.write_bytes((corpus / ANDROID).read_bytes() + box)
    assert exiftool(src, ["XMPToolkit"])["XMPToolkit"] == "sftpgate test"
    result = optimize_file(src, tmp_path / "work", CONFIG, "")
    assert result.decision == "converted", result.reason
    output = Path(result.output or "")
    assert output.read_bytes().endswith(box)
    assert exiftool(output, ["XMPToolkit"])["XMPToolkit"] == "sftpgate test"


@pytest.mark.parametrize(
    "encoding",
    [
        pytest.param([], id="plain"),
        pytest.param(["-bf", "3", "-g", "12"], id="b-frames"),
        pytest.param(["-bf", "2", "-output_ts_offset", "30"], id="starts-at-30s"),
    ],
)
def test_mpeg2_program_stream_keeps_its_duration(encoding: list[str], tmp_path: Path) -> None:
    # An MPEG program stream starts at a clock value (0.53 s here, 30 s when cut from a longer
    # recording): kept in the MP4 as an empty edit, the file lasted 8.86 s instead of 8.33 s.
    src = tmp_path / "camcorder.mpg"
    subprocess.run(
        [
            "ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=320x240:rate=25",
            "-f", "lavfi", "-i", "sine", "-t", "8.32", "-c:v", "mpeg2video", *encoding,
            "-c:a", "mp2", "-f", "vob", str(src),
        ],
        check=True,
    )  # fmt: skip
    before = ffprobe(src)
    assert float(before["format"]["start_time"]) >= 0.5
    result = optimize_file(src, tmp_path / "work", CONFIG, "UTC")
    assert (result.decision, result.extension) == ("converted", ".mp4"), result.reason
    after = ffprobe(Path(result.output or ""))
    frame = 1 / 25
    assert float(after["format"]["start_time"]) < frame
    assert abs(float(after["format"]["duration"]) - float(before["format"]["duration"])) <= frame
    video_stream, audio_stream = after["streams"]
    # 208 frames of 1/25 s; the reader only estimates the source's (8.24 s with B-frames).
    assert (video_stream["nb_frames"], video_stream["duration"]) == ("208", "8.320000")
    source_audio = before["streams"][1]
    assert source_audio["codec_type"] == audio_stream["codec_type"] == "audio"
    assert abs(float(audio_stream["duration"]) - float(source_audio["duration"])) <= frame


def test_verify_refuses_an_output_that_differs(corpus: Path, tmp_path: Path) -> None:
    src = corpus / ROTATED
    with src.open("rb") as f:
        info = video.inspect(src, f.read(64), CONFIG.max_pixels)
    output = tmp_path / "out.mov"
    encoded = video.transcode(src, info, output, FAST)
    video.verify(info, output, encoded, FAST)  # the real source: passes
    reference = encoded.reference
    assert reference is not None
    negative = Image.eval(reference.luma, lambda v: 255 - v)
    one_frame = 1 / info.fps
    for changed, differing, match in (
        (dataclasses.replace(info, rotation=0), encoded, "rotation"),
        (info, dataclasses.replace(encoded, frames=121), "frames"),
        (dataclasses.replace(info, duration=info.duration + one_frame + 0.01), encoded, "duration"),
        (info, dataclasses.replace(encoded, video_seconds=Fraction(5)), "video stream"),
        (dataclasses.replace(info, audio_durations=(Fraction(3),)), encoded, "audio stream 1"),
        (dataclasses.replace(info, audio_codecs=()), encoded, "audio streams"),
        (dataclasses.replace(info, color_primaries=9), encoded, "colour primaries"),
        (dataclasses.replace(info, color_range=2), encoded, "colour range"),
        (dataclasses.replace(info, metadata={**info.metadata, "location": "+1+1/"}), encoded, "lacks"),
        (info, dataclasses.replace(encoded, reference=dataclasses.replace(reference, luma=negative)), "differs"),
        (info, dataclasses.replace(encoded, reference=dataclasses.replace(reference, time=Fraction(9))), "no frame"),
    ):  # fmt: skip
        with pytest.raises(video.VideoError, match=match):
            video.verify(changed, output, differing, FAST)
    # Within a frame passes: the tolerance is not looser than it says, nor tighter.
    video.verify(
        dataclasses.replace(info, duration=info.duration + 0.9 * one_frame), output, encoded, FAST
    )


def test_a_conversion_that_cannot_finish_in_time_is_kept(corpus: Path, tmp_path: Path) -> None:
    # The worker pool would kill it at the limit and the file would count as failed; stopping
    # from inside keeps the original instead.
    config = dataclasses.replace(CONFIG, time_limit_seconds=0.05)
    result = optimize_file(corpus / "video/gopro-max-gpmf-gps.mp4", tmp_path, config, "")
    assert result.decision == "kept" and "optimize.time_limit_seconds" in result.reason
    assert list(tmp_path.iterdir()) == []


def test_budget_projects_from_the_first_five_percent() -> None:
    two_seconds_ago = time.monotonic() - 2
    budget = video.Budget(10.0, 100, two_seconds_ago)
    budget.check(2)  # 2%: too early to project, 2 s spent so far
    budget.check(50)  # half done in 2 s: about 4 s in all
    with pytest.raises(video.TooSlow, match=r"optimize\.time_limit_seconds"):
        budget.check(10)  # 10% in 2 s: about 20 s in all
    with pytest.raises(video.TooSlow):
        video.Budget(1.0, 0, two_seconds_ago).check(1)  # unknown length: elapsed alone


def test_oversized_frames_are_refused_before_decoding(corpus: Path, tmp_path: Path) -> None:
    small = dataclasses.replace(CONFIG, max_pixels=1_000_000)  # 1920×1080 = 2.07 MP
    result = optimize_file(corpus / ANDROID, tmp_path, small, "")
    assert result.decision == "unreadable" and "1920×1080" in result.reason
    assert "optimize.max_pixels" in result.reason


def _thread_policies() -> set[int]:
    policies = set()
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            policies.add(os.sched_getscheduler(int(task)))
    return policies


def test_no_encoder_thread_runs_at_real_time_priority(corpus: Path, tmp_path: Path) -> None:
    """SVT-AV1 starts its threads (and moves the one that opens it) at SCHED_FIFO 99 when it may:
    such a codec would stall the SFTP server and the machine. Watched on every frame."""
    if os.geteuid() != 0:
        pytest.skip("only root may raise threads to real-time priority: nothing to watch")
    seen: set[int] = set()

    class WatchingBudget(video.Budget):
        def check(self, frames: int) -> None:
            seen.update(_thread_policies())
            super().check(frames)

    src = corpus / ROTATED
    with src.open("rb") as f:
        info = video.inspect(src, f.read(64), CONFIG.max_pixels)
    for mode in ("av1", "hevc"):
        config = dataclasses.replace(FAST, mode=mode)
        video.transcode(src, info, tmp_path / f"{mode}.mov", config, WatchingBudget(3600.0, 0))
    assert seen and not seen & {os.SCHED_FIFO, os.SCHED_RR}, seen


def test_keep_holds_only_what_immich_plays_as_it_is(corpus: Path, tmp_path: Path) -> None:
    """With `when_immich_retranscodes: keep`, an H.264 video whose video stream Immich would
    still encode again (4:2:2 chroma) is converted: keeping it would save nothing there. Other
    audio only makes Immich re-encode the audio, copying the video stream: kept."""
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed (apt-get install ffmpeg)")
    immich = video.PlayedAsIs(video_codecs=("h264",))
    source = corpus / ANDROID  # H.264 4:2:0 + AAC in MP4
    variants = {
        "pcm.mov": ["-c:v", "copy", "-c:a", "pcm_s16le"],
        "422.mp4": [
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv422p",
            "-preset",
            "ultrafast",
            "-c:a",
            "copy",
        ],
    }
    for name, args in variants.items():
        subprocess.run(
            ["ffmpeg", "-v", "error", "-i", str(source), *args, str(tmp_path / name)], check=True
        )

    def reason(path: Path, played_as_is: video.PlayedAsIs | None = immich) -> str | None:
        with path.open("rb") as f:
            info = video.inspect(path, f.read(64 * 1024), CONFIG.max_pixels)
        return video.keep_reason(info, CONFIG.video, played_as_is)

    assert "when_immich_retranscodes: keep" in (reason(source) or "")
    assert "when_immich_retranscodes: keep" in (reason(corpus / ROTATED) or "")  # iPhone MOV
    assert "when_immich_retranscodes: keep" in (reason(tmp_path / "pcm.mov") or "")
    assert reason(tmp_path / "422.mp4") is None
    assert reason(source, None) is None  # Immich plays a converted video as it is: convert
