"""Video → HEVC (libx265) or AV1 (libsvtav1) with PyAV, streaming, verified.

How the traps of FFmpeg and PyAV are handled:

- Rotation: read from the first decoded frame's display matrix *before* anything is muxed, and
  set on the output stream before the first packet; FFmpeg silently ignores it once the header
  has been written (an early audio packet is enough).
- Container metadata (creation date, Apple `com.apple.quicktime.*` keys, Android `©xyz`
  location, make/model, GoPro settings...): FFmpeg's muxer rewrites or drops much of it (with
  `use_metadata_tags` it turns the Android `©xyz` location into a rounded 3GPP `loci` box and
  stores every key twice). So the muxer writes only the technical boxes and `creation_time`,
  and afterwards the source's own `moov/udta` and `moov/meta` boxes, plus its top-level metadata
  boxes (XMP `uuid`, Samsung `sefd`), are copied into the output byte for byte. The output
  keeps its index (`moov`) at the end, as phones write it, so no chunk offset has to move.
- Timing: MPEG program and transport streams start at a clock value (~0.5 s and more); the MP4
  muxer would keep that as an empty edit before every track, and the file would play that long
  of nothing and last that much longer. So every timestamp is moved back by the source's start.
  A QuickTime/MP4 track may also end inside its last sample (an edit list that cuts the last
  frame, or the encoder padding of the last audio packet), but FFmpeg's reader hands over whole
  samples; the last frame or packet of each stream is cut to the end the source declares, or
  the output would last up to a frame (or an audio packet) longer.
- Colour: primaries, transfer, matrix and range are set on the encoder from the source, which
  writes them into the bitstream's VUI; without them players guess, and the picture shifts.
- Decoded frames carry the source's picture types; left in place they would force x265 into the
  source's GOP structure, so they are reset (what the ffmpeg CLI does). Keeping a key frame where
  the source had one (as IDR frames) was measured at CRF 28, preset medium: +10 % to +47 % bytes
  on the phone clips (1 s GOPs), +27 % on the GoPro's (1/3 s), too much for thumbnails that
  would be picked from the same frames.
- Memory is bounded: packets are demuxed, decoded, encoded and muxed one at a time, so the
  resident size depends on the resolution, not on the length.

The result is used only after an independent decode of the file we will upload: the same number
of frames as were encoded, the same dimensions, rotation and colour properties, the same number
of audio streams, the container's and every stream's duration within a frame of the source's, a
decoded frame close to the source's at the same time, and every container metadata key of the
source with the same value.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO, TypeVar

import av
import av.audio.stream
import av.container
import av.stream
from av.video.frame import PictureType
from PIL import Image, ImageChops, ImageStat

from sftpgate.config import VideoConfig
from sftpgate.optimize import kinds

# Keys that describe the file rather than the recording; FFmpeg writes its own.
_TECHNICAL_KEYS = frozenset({"major_brand", "minor_version", "compatible_brands", "encoder"})
_LIVE_PHOTO_KEY = "com.apple.quicktime.content.identifier"
_STREAM_KEYS = ("creation_time", "language", "handler_name")
# PQ and HLG: Dolby Vision / HDR10 side data would not survive a re-encode.
_HDR_TRANSFERS = {16: "PQ (HDR10 / Dolby Vision)", 18: "HLG"}
# Top-level boxes that are media or layout, rebuilt by the muxer; all others are metadata.
_LAYOUT_BOXES = frozenset({b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot"})
_MAX_METADATA_BOX = 64 * 1024 * 1024  # a moov/udta or meta beyond this is not metadata
# A movie header counts whole ticks: 1/600 s in Apple's files, 1/1000 s in FFmpeg's. Source and
# output may each be off by one, on top of the one frame a duration may differ by.
HEADER_ROUNDING = Fraction(1, 600) + Fraction(1, 1000)
# Mean absolute luma difference (of 255) allowed between the output's decoded middle frame and
# the source's. Measured on the corpus clips and an MPEG-2 clip: HEVC CRF 28 preset medium
# 0.5-3.6 (3.6 the noisy GoPro), ultrafast up to 3.5, AV1 CRF 35 preset 8 up to 2.3. A wrong
# frame, range or matrix gives far more.
MAX_LUMA_DIFFERENCE = 6.0
# FFmpeg's values for a colour property the stream does not declare. The range has only 0; for
# the others 2 is "unspecified" and 0 "reserved" (for the matrix, RGB, which a 4:2:0 output
# cannot be).
_UNDECLARED = {"colour range": frozenset({0})}
_UNDECLARED_OTHERWISE = frozenset({0, 2})


class VideoError(Exception):
    """The transcode or its verification failed; the message says why."""


@dataclass(frozen=True)
class VideoInfo:
    """What the PyAV probe found (never the file name)."""

    problem: str | None = None  # why the file cannot be read at all
    container: str = ""  # "mov" (QuickTime brand) or "mp4": the output keeps the family
    bmff: bool = False  # ISO BMFF / QuickTime, so boxes can be carried over
    codec: str = ""
    width: int = 0
    height: int = 0
    rotation: int = 0  # counter-clockwise degrees, from the display matrix
    pix_fmt: str = ""
    color_range: int = 0  # FFmpeg's enums: AVColorRange, AVColorPrimaries, ...
    color_primaries: int = 2
    color_trc: int = 2
    colorspace: int = 2  # the matrix coefficients
    fps: float = 0.0
    bit_rate: int = 0  # of the video stream, bits per second
    duration: float = 0.0  # seconds
    video_streams: int = 0
    audio_codecs: tuple[str, ...] = ()
    audio_durations: tuple[Fraction | None, ...] = ()  # seconds, where the container says
    subtitle_streams: int = 0
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def bits_per_pixel(self) -> float:
        pixels_per_second = self.width * self.height * self.fps
        return self.bit_rate / pixels_per_second if pixels_per_second else 0.0

    @property
    def colour(self) -> dict[str, int]:
        return {
            "colour range": self.color_range,
            "colour primaries": self.color_primaries,
            "transfer characteristics": self.color_trc,
            "matrix coefficients": self.colorspace,
        }


def inspect(path: Path, head: bytes, max_pixels: int) -> VideoInfo:
    """Probe with PyAV: streams, codec, first decoded frame (rotation, pixel format). Never raises.

    Frames larger than `max_pixels` are refused from the header, before the decoder allocates."""
    bmff = len(head) >= 8 and (head[4:8] == b"ftyp" or head[4:8] in kinds.QUICKTIME_FIRST_ATOMS)
    quicktime = bmff and (head[4:8] != b"ftyp" or head[8:12] == b"qt  ")
    try:
        with av.open(str(path), metadata_errors="replace") as container:
            family = "mov" if quicktime else "mp4"
            return _inspect(container, bmff, family, path.stat().st_size, max_pixels)
    except Exception as exc:
        return VideoInfo(problem=f"the video cannot be read: {exc}")


def _inspect(
    container: av.container.InputContainer,
    bmff: bool,
    family: str,
    file_size: int,
    max_pixels: int,
) -> VideoInfo:
    videos = container.streams.video
    audio = tuple(s.codec_context.name for s in container.streams.audio)
    audio_durations = tuple(_declared_duration(s) for s in container.streams.audio)
    subtitles = len(container.streams.subtitles)
    metadata = dict(container.metadata)
    duration = container.duration / 1e6 if container.duration else 0.0
    if not videos:
        return VideoInfo(
            container=family,
            bmff=bmff,
            audio_codecs=audio,
            audio_durations=audio_durations,
            metadata=metadata,
            duration=duration,
        )
    stream = videos[0]
    bomb = kinds.bomb_reason(stream.width, stream.height, max_pixels)
    if bomb:
        return VideoInfo(problem=bomb)
    first = next(container.decode(stream), None)
    if first is None:
        return VideoInfo(problem="the video stream holds no decodable frame")
    context = stream.codec_context
    rate = stream.average_rate or stream.guessed_rate or Fraction(30)
    # No per-stream figure (Matroska): the whole file's rate is an upper bound.
    file_rate = 8 * file_size / duration if duration else 0
    return VideoInfo(
        container=family,
        bmff=bmff,
        codec=context.name,
        width=stream.width,
        height=stream.height,
        rotation=int(first.rotation or 0),
        pix_fmt=first.format.name,
        # The frame's values come from the bitstream; the stream's only from the container.
        color_range=int(first.color_range or context.color_range or 0),
        color_primaries=int(first.color_primaries or context.color_primaries or 2),
        color_trc=int(first.color_trc or context.color_trc or 2),
        colorspace=int(first.colorspace or context.colorspace or 2),
        fps=float(rate),
        bit_rate=int(context.bit_rate or file_rate),
        duration=duration,
        video_streams=len(videos),
        audio_codecs=audio,
        audio_durations=audio_durations,
        subtitle_streams=subtitles,
        metadata=metadata,
    )


def _declared_duration(stream: av.stream.Stream) -> Fraction | None:
    if stream.duration is None or stream.time_base is None:
        return None
    return stream.duration * stream.time_base


def _data_stream_name(stream: av.stream.Stream) -> str:
    """FFmpeg's codec name for a data stream it can copy (GoPro `gpmd` telemetry is bin_data);
    "" for the ones it cannot (Apple `mebx` timed metadata, timecode, GoPro SOS)."""
    return stream.name or ""


def _data_stream_label(stream: av.stream.Stream) -> str:
    return stream.metadata.get("handler_name", "").strip() or "data"


_LOCATION_KEYS = ("location", "com.apple.quicktime.location.ISO6709")
_DEVICE_KEYS = ("make", "model", "com.apple.quicktime.make", "com.apple.quicktime.model")
_DATE_KEYS = ("creation_time", "com.apple.quicktime.creationdate")


def metadata_present(info: VideoInfo) -> tuple[str, ...]:
    """What the source carries of what a conversion must keep (for reports)."""
    keys = info.metadata
    present = (
        ("creation_time", any(k in keys for k in _DATE_KEYS)),
        ("location", any(k in keys for k in _LOCATION_KEYS)),
        ("make/model", any(k in keys for k in _DEVICE_KEYS)),
        ("rotation", bool(info.rotation)),
        ("audio", bool(info.audio_codecs)),
    )
    return tuple(name for name, ok in present if ok)


def is_live_photo_video(info: VideoInfo) -> bool:
    return _LIVE_PHOTO_KEY in info.metadata


@dataclass(frozen=True)
class PlayedAsIs:
    """The video codecs the place a video goes to (Immich) plays without encoding the video
    stream again. Immich also encodes it again when its chroma is not 4:2:0; another audio codec
    or container only costs a copy whose video stream is copied, whatever sftpgate sends."""

    video_codecs: tuple[str, ...]

    def plays(self, info: VideoInfo) -> bool:
        return info.codec in self.video_codecs and info.pix_fmt in _CHROMA_420


_CHROMA_420 = ("yuv420p", "yuvj420p")


def keep_reason(
    info: VideoInfo, config: VideoConfig, played_as_is: PlayedAsIs | None = None
) -> str | None:
    """Why this video is passed through unchanged, or None when it should be converted."""
    if config.mode == "keep":
        return "kept as it is: video conversion is disabled (optimize.video.mode: keep)"
    if is_live_photo_video(info):
        return (
            "kept as it is: Live Photo video (converting it would break Immich's pairing with "
            "its still photo)"
        )
    if not info.video_streams:
        return "kept as it is: the file holds no video stream"
    if info.video_streams > 1:
        return f"kept as it is: the file holds {info.video_streams} video streams"
    if info.subtitle_streams:
        return "kept as it is: the video has subtitle streams, which are not converted"
    if info.color_trc in _HDR_TRANSFERS:
        return (
            f"kept as it is: {_HDR_TRANSFERS[info.color_trc]} video; its HDR metadata would not "
            "survive re-encoding"
        )
    if played_as_is is not None and played_as_is.plays(info):
        return (
            f"kept as it is: {info.codec} is played as it is where it goes, and a converted copy "
            "would be re-encoded there (optimize.video.when_immich_retranscodes: keep)"
        )
    if info.codec == "av1":  # re-encoding AV1 as HEVC would only add loss
        return "kept as it is: the video is already AV1"
    if info.codec == "hevc" and info.bits_per_pixel < config.efficient_bits_per_pixel:
        return (
            f"kept as it is: already efficient HEVC ({info.bits_per_pixel:.3f} bits per pixel, "
            f"below optimize.video.efficient_bits_per_pixel {config.efficient_bits_per_pixel})"
        )
    return None


def output_format(info: VideoInfo, config: VideoConfig) -> str:
    """The muxer for the output: the source's family, except AV1, which FFmpeg's QuickTime muxer
    cannot carry (measured: "Invalid argument" at the header), so AV1 always goes into MP4."""
    return "mp4" if config.mode == "av1" else info.container


@dataclass(frozen=True)
class Encoded:
    frames: int  # video frames encoded
    audio: str  # what happened to the audio, for the reason
    dropped: tuple[str, ...]  # labels of data streams that could not be carried
    video_seconds: Fraction = Fraction(0)  # from the first frame's start to the last one's end
    reference: Reference | None = None  # a decoded source frame, to compare the output's with


@dataclass(frozen=True)
class Reference:
    """The luma of one decoded source frame and when it is shown in the output (seconds)."""

    time: Fraction
    luma: Image.Image


class TooSlow(VideoError):
    """The conversion would not finish within its time budget."""


@dataclass
class Budget:
    """Stops a conversion that cannot finish in time, early: the worker pool would otherwise kill
    it at optimize.time_limit_seconds and the file would count as failed, not merely kept."""

    seconds: float
    expected_frames: int
    started: float = field(default_factory=time.monotonic)

    def check(self, frames: int) -> None:
        elapsed = time.monotonic() - self.started
        done = frames / self.expected_frames if self.expected_frames else 0.0
        # After 5% of the frames the rate is known well enough to project the total.
        projected = elapsed / done if done >= 0.05 else elapsed
        if projected > self.seconds:
            raise TooSlow(
                f"converting would take about {projected / 60:.0f} min, more than the "
                f"{self.seconds / 60:.0f} min this file may take (optimize.time_limit_seconds)"
            )


def transcode(
    src: Path, info: VideoInfo, dst: Path, config: VideoConfig, budget: Budget | None = None
) -> Encoded:
    """Write the converted video to `dst` (container family of `info`), metadata carried over.

    Raises on any codec or container error (TooSlow when `budget` runs out); the caller
    removes `dst`.
    """
    with (
        av.open(str(src), metadata_errors="replace") as inp,
        av.open(str(dst), "w", format=output_format(info, config)) as out,
    ):
        encoded = _transcode_streams(inp, out, info, config, budget)
    if info.bmff:
        carry_metadata_boxes(src, dst)
    return encoded


def _video_encoder(
    out: av.container.OutputContainer, vin: av.video.stream.VideoStream, config: VideoConfig
) -> av.video.stream.VideoStream:
    rate = vin.average_rate or vin.guessed_rate or Fraction(30)
    if config.mode == "av1":
        # SVT-AV1 prints its banner at "info" level on stderr; errors are still reported.
        os.environ.setdefault("SVT_LOG", "1")
        options = {"crf": str(config.av1_crf), "preset": str(config.av1_preset)}
        vout = out.add_stream("libsvtav1", rate=rate, options=options)
    else:
        options = {
            "crf": str(config.crf),
            "preset": config.preset,
            "x265-params": "log-level=error",
        }
        vout = out.add_stream("libx265", rate=rate, options=options)
        vout.codec_context.codec_tag = "hvc1"  # Apple players refuse the default hev1
    return vout


def _leave_realtime(policy: int) -> None:
    """SVT-AV1 starts its threads, and moves the one that opens it, at SCHED_FIFO priority 99
    whenever it may (as root): a codec at real-time priority would stall the SFTP server and the
    whole machine. Every thread of the process goes back to the opener's `policy`."""
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            if os.sched_getscheduler(int(task)) in (os.SCHED_FIFO, os.SCHED_RR):
                os.sched_setscheduler(int(task), policy, os.sched_param(0))


def _transcode_streams(
    inp: av.container.InputContainer,
    out: av.container.OutputContainer,
    info: VideoInfo,
    config: VideoConfig,
    budget: Budget | None,
) -> Encoded:
    vin = inp.streams.video[0]
    vin.thread_type = "AUTO"
    vout = _video_encoder(out, vin, config)
    # 10-bit sources stay 10-bit; everything else is 8-bit 4:2:0, the format players expect.
    target_format = "yuv420p10le" if "10" in info.pix_fmt else "yuv420p"
    ctx = vout.codec_context
    ctx.width, ctx.height, ctx.pix_fmt = vin.width, vin.height, target_format
    ctx.time_base = vout.time_base = vin.time_base  # keep the source's timestamps (VFR)
    ctx.color_range = info.color_range
    ctx.color_primaries = info.color_primaries
    ctx.color_trc = info.color_trc
    ctx.colorspace = info.colorspace
    if info.rotation:
        vout.set_display_rotation(info.rotation)  # before the first mux, or it is lost
    out.metadata.update(_recording_keys(info, inp))
    _copy_stream_keys(vin, vout)
    policy = os.sched_getscheduler(0)
    ctx.open()
    _leave_realtime(policy)

    audio_notes: list[str] = []
    routes: dict[int, tuple[str, av.stream.Stream]] = {vin.index: ("video", vout)}
    for ain in inp.streams.audio:
        name = ain.codec_context.name
        if name in out.supported_codecs:
            aout = out.add_stream_from_template(ain)
            routes[ain.index] = ("copy", aout)
            audio_notes.append(f"{name} copied")
        else:
            aout = out.add_stream("aac", rate=ain.codec_context.sample_rate)
            aout.codec_context.layout = ain.codec_context.layout
            aout.codec_context.bit_rate = _aac_bit_rate(ain)
            routes[ain.index] = ("aac", aout)
            container = out.format.name.upper()
            audio_notes.append(f"{name} converted to AAC (not allowed in {container})")
        _copy_stream_keys(ain, aout)
    dropped: list[str] = []
    for din in inp.streams.data:
        if not _data_stream_name(din):
            dropped.append(_data_stream_label(din))
            continue
        dout = out.add_stream_from_template(din)
        _copy_stream_keys(din, dout)
        routes[din.index] = ("copy", dout)

    # Seconds every timestamp moves back; a negative start is audio priming, which the muxer
    # keeps out of the presentation by itself.
    shift = max(Fraction(0), Fraction(inp.start_time or 0, av.time_base))
    ends = {i: _declared_end(inp.streams[i], shift) for i in routes} if info.bmff else {}
    timings = {i: _Timing(_ticks(shift, inp.streams[i]), ends.get(i)) for i in routes}
    video = _VideoSink(vout, target_format, info, budget)
    selected = [inp.streams[index] for index in routes]
    for packet in inp.demux(*selected):
        index = packet.stream.index
        route, target = routes[index]
        if route == "copy":
            # The demuxer's final empty packet has no dts.
            item = timings[index].fit(packet) if packet.dts is not None else None
            if item is not None:
                item.stream = target
                out.mux(item)
            continue
        for frame in packet.decode():
            item = timings[index].fit(frame)
            if isinstance(item, av.VideoFrame):
                video.put(item)
            elif isinstance(item, av.AudioFrame):
                out.mux(target.encode(item))
    video.finish()
    for route, target in routes.values():
        if route == "aac":
            out.mux(target.encode(None))
    audio = "; ".join(audio_notes) or "no audio"
    return Encoded(video.frames, audio, tuple(dropped), video.span.seconds, video.reference)


_Timed = TypeVar("_Timed", av.Packet, av.VideoFrame, av.AudioFrame)


def _ticks(seconds: Fraction, stream: av.stream.Stream) -> int:
    """`seconds` in whole ticks of the stream, rounded down: no timestamp may become negative."""
    return math.floor(seconds / stream.time_base)


def _declared_end(stream: av.stream.Stream, shift: Fraction) -> Fraction | None:
    duration = _declared_duration(stream)
    if duration is None:
        return None
    return (stream.start_time or 0) * stream.time_base + duration - shift


class _Timing:
    """Moves one stream's timestamps back by `shift` ticks, and ends it where the source's track
    declares (`end`, seconds): a frame or packet across that end is cut there, one after it is
    left out, as a player of the source never shows it either."""

    def __init__(self, shift: int, end: Fraction | None) -> None:
        self.shift = shift
        self.end = end
        self.following: int | None = None  # where the next audio frame starts (ticks)

    def fit(self, item: _Timed) -> _Timed | None:
        if item.pts is not None:
            item.pts -= self.shift
        elif isinstance(item, av.AudioFrame):
            item.pts = self.following  # AMR decodes a packet into several frames, stamps one
        if isinstance(item, av.Packet) and item.dts is not None:
            item.dts -= self.shift
        if item.pts is None or item.time_base is None:
            return item
        if isinstance(item, av.AudioFrame):
            self.following = item.pts + round(
                Fraction(item.samples, item.sample_rate) / item.time_base
            )
        if self.end is None:
            return item
        left = self.end - item.pts * item.time_base  # seconds the track lasts from this item on
        if left <= 0:
            return None
        if isinstance(item, av.AudioFrame):
            keep = round(left * item.sample_rate)
            return _first_samples(item, keep) if keep < item.samples else item
        keep = round(left / item.time_base)
        if keep < (item.duration or 0):
            item.duration = keep
        return item


def _first_samples(frame: av.AudioFrame, samples: int) -> av.AudioFrame:
    cut = av.AudioFrame(format=frame.format.name, layout=frame.layout.name, samples=samples)
    for source, plane in zip(frame.planes, cut.planes, strict=True):
        plane.update(bytes(source)[: plane.buffer_size])
    cut.sample_rate, cut.pts, cut.time_base = frame.sample_rate, frame.pts, frame.time_base
    return cut


class _Span:
    """When the first of some frames is shown and when the last one ends (seconds)."""

    def __init__(self) -> None:
        self.start: Fraction | None = None
        self.end = Fraction(0)
        self.last: av.VideoFrame | None = None  # the frame that ends last

    def add(self, frame: av.VideoFrame) -> Fraction:
        """Note `frame`; return when it is shown."""
        shown = frame.pts * frame.time_base
        self.start = shown if self.start is None else min(self.start, shown)
        until = shown + (frame.duration or 0) * frame.time_base
        if until >= self.end:
            self.end, self.last = until, frame
        return shown

    @property
    def seconds(self) -> Fraction:
        return self.end - (self.start or 0)


class _VideoSink:
    """Encodes and muxes the decoded frames; notes when the video starts and ends, and keeps the
    luma of the middle frame (the first until the middle is reached) to compare with the output."""

    def __init__(
        self,
        vout: av.video.stream.VideoStream,
        target_format: str,
        info: VideoInfo,
        budget: Budget | None,
    ) -> None:
        self.vout = vout
        self.target_format = target_format
        self.color_range = info.color_range
        self.budget = budget
        self.middle = max(1, round(info.duration * info.fps) // 2)
        self.frames = 0
        self.span = _Span()
        self.reference: Reference | None = None

    def put(self, frame: av.VideoFrame) -> None:
        self.frames += 1
        if self.budget is not None:
            self.budget.check(self.frames)
        shown = self.span.add(frame)
        if self.frames in (1, self.middle):
            self.reference = Reference(shown, _luma(frame))
        prepared = _prepared(frame, self.target_format, self.color_range)
        self.vout.container.mux(self.vout.encode(prepared))

    def finish(self) -> None:
        packets = self.vout.encode(None)
        # The encoders leave packet durations to the muxer, which repeats the one before: the
        # last frame would last a whole frame even where the source's track cuts it short.
        last = self.span.last
        for packet in packets:
            if last is not None and packet.pts == last.pts and packet.time_base is not None:
                packet.duration = round((last.duration or 0) * last.time_base / packet.time_base)
        self.vout.container.mux(packets)


def _luma(frame: av.VideoFrame) -> Image.Image:
    return frame.to_image().convert("L")


def _aac_bit_rate(stream: av.audio.stream.AudioStream) -> int:
    """Twice the source's rate (AAC-LC needs more than speech codecs such as AMR for the same
    quality), within 24-96 kbit/s per channel: LPCM gets 96 kbit/s per channel, not 700."""
    channels = max(1, stream.codec_context.channels)
    source = stream.codec_context.bit_rate or 0
    return max(24_000 * channels, min(2 * source, 96_000 * channels))


def _prepared(frame: av.VideoFrame, target_format: str, color_range: int) -> av.VideoFrame:
    if frame.format.name != target_format:
        # yuvj420p → yuv420p must not squeeze the full range into the limited one: keep the
        # samples as they are and let the stream's range flag say what they mean.
        frame = frame.reformat(
            format=target_format, src_color_range=color_range, dst_color_range=color_range
        )
    frame.pict_type = PictureType.NONE
    return frame


def _recording_keys(info: VideoInfo, inp: av.container.InputContainer) -> dict[str, str]:
    """Container keys for the muxer. For ISO media only creation_time (it sets the mvhd/tkhd
    dates): every other key arrives with the copied boxes. Other containers get them all."""
    if info.bmff:
        created = inp.metadata.get("creation_time")
        return {"creation_time": created} if created else {}
    return {k: v for k, v in inp.metadata.items() if k not in _TECHNICAL_KEYS}


def _copy_stream_keys(src: av.stream.Stream, dst: av.stream.Stream) -> None:
    dst.metadata.update({k: src.metadata[k] for k in _STREAM_KEYS if k in src.metadata})


# -- carrying the source's metadata boxes ------------------------------------------------------


def _children(f: BinaryIO, offset: int, header: int, size: int) -> Iterator[tuple[bytes, int, int]]:
    for box_type, child, _child_header, child_size in kinds.iter_bmff(
        f, offset + header, offset + size
    ):
        yield box_type, child, child_size


def _read(f: BinaryIO, offset: int, size: int) -> bytes:
    if size > _MAX_METADATA_BOX:
        raise VideoError(f"a metadata box of {size:,} bytes is implausibly large")
    f.seek(offset)
    return f.read(size)


def _meta_handler(box: bytes) -> bytes:
    """Handler type of a `meta` box (QuickTime writes it without the full-box header)."""
    at = box.find(b"hdlr")
    return box[at + 12 : at + 16] if at >= 0 else b""


def carry_metadata_boxes(src: Path, dst: Path) -> None:
    """Replace the muxer's `moov/udta` and `moov/meta` in `dst` by the source's, byte for byte,
    and append the source's top-level metadata boxes.

    Only key/value `meta` boxes (handler `mdta`, Apple keys, or `mdir`, iTunes) are carried: they
    hold no file offsets, so they stay valid in a file with different media data.
    """
    carried: list[bytes] = []
    extra: list[tuple[int, int]] = []  # (offset, size) of top-level boxes to append
    with src.open("rb") as f:
        for box_type, offset, header, size in kinds.iter_bmff(f, 0, src.stat().st_size):
            if box_type == b"moov":
                for child, child_offset, child_size in _children(f, offset, header, size):
                    if child == b"udta":
                        carried.append(_read(f, child_offset, child_size))
                    elif child == b"meta":
                        box = _read(f, child_offset, child_size)
                        if _meta_handler(box) in (b"mdta", b"mdir"):
                            carried.append(box)
            elif box_type not in _LAYOUT_BOXES:
                extra.append((offset, size))
    with dst.open("r+b") as f:
        boxes = list(kinds.iter_bmff(f, 0, dst.stat().st_size))
        if not boxes or boxes[-1][0] != b"moov":
            raise VideoError("the muxer did not write the index (moov) last")
        _type, offset, header, size = boxes[-1]
        kept = [
            _read(f, child_offset, child_size)
            for child, child_offset, child_size in _children(f, offset, header, size)
            if child not in (b"udta", b"meta")
        ]
        body = b"".join(kept + carried)
        f.seek(offset)
        f.write((8 + len(body)).to_bytes(4, "big") + b"moov" + body)
        f.truncate()
        with src.open("rb") as source:
            for extra_offset, extra_size in extra:
                source.seek(extra_offset)
                _copy_range(source, f, extra_size)


def _copy_range(source: BinaryIO, target: BinaryIO, size: int) -> None:
    remaining = size
    while remaining:
        chunk = source.read(min(remaining, 1 << 20))
        if not chunk:
            raise VideoError("the source file shrank while its metadata was copied")
        target.write(chunk)
        remaining -= len(chunk)


# -- verification --------------------------------------------------------------------------------


def verify(info: VideoInfo, path: Path, encoded: Encoded, config: VideoConfig) -> None:
    """Decode the output completely and compare it with the source; raise VideoError if it differs."""
    with av.open(str(path), metadata_errors="replace") as container:
        got = _inspect(container, info.bmff, info.container, path.stat().st_size, 2**62)
    decoded = _Decoded(encoded.reference, 1 / Fraction(info.fps) / 2)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        declared = _declared_duration(stream)
        for frame in container.decode(stream):
            decoded.add(frame)
    expected_codec = "av1" if config.mode == "av1" else "hevc"
    if got.codec not in (expected_codec, f"lib{expected_codec}", "libdav1d"):
        raise VideoError(f"the output's video codec is {got.codec}, not {expected_codec}")
    colour = {
        what: value
        for what, value in info.colour.items()
        if value not in _UNDECLARED.get(what, _UNDECLARED_OTHERWISE)
    }
    checks = (
        ("frames", decoded.frames, encoded.frames),
        ("dimensions", (got.width, got.height), (info.width, info.height)),
        ("rotation", got.rotation, info.rotation),
        ("audio streams", len(got.audio_codecs), len(info.audio_codecs)),
        *((what, got.colour[what], value) for what, value in colour.items()),
    )
    for what, actual, expected in checks:
        if actual != expected:
            raise VideoError(
                f"the output's {what} ({actual}) differ from the source's ({expected})"
            )
    _check_durations(info, got, encoded.video_seconds, (declared, decoded.span.seconds))
    if decoded.luma_difference is None:
        raise VideoError("the output has no frame at the time of the source's compared frame")
    if decoded.luma_difference > MAX_LUMA_DIFFERENCE:
        raise VideoError(
            f"a decoded frame differs from the source's by {decoded.luma_difference:.1f}/255 "
            f"on average (more than {MAX_LUMA_DIFFERENCE})"
        )
    wanted = {k: v for k, v in info.metadata.items() if k not in _TECHNICAL_KEYS}
    lost = sorted(k for k, v in wanted.items() if got.metadata.get(k) != v)
    if lost:
        raise VideoError(f"the output lacks the source's metadata: {', '.join(lost)}")


class _Decoded:
    """Counts the output's frames, notes how long they last, and compares the one shown when the
    source's reference frame was (within `near` seconds) with it."""

    def __init__(self, reference: Reference | None, near: Fraction) -> None:
        self.reference = reference
        self.near = near
        self.frames = 0
        self.span = _Span()
        self.luma_difference: float | None = None

    def add(self, frame: av.VideoFrame) -> None:
        self.frames += 1
        shown = self.span.add(frame)
        reference = self.reference
        if reference is not None and abs(shown - reference.time) <= self.near:
            difference = ImageChops.difference(_luma(frame), reference.luma)
            self.luma_difference = ImageStat.Stat(difference).mean[0]


def _check_durations(
    info: VideoInfo, got: VideoInfo, video_seconds: Fraction, video_got: tuple[Fraction | None, ...]
) -> None:
    """The container's and each stream's duration within one frame of the source's (and the
    header rounding). The source's video is measured from its decoded frames: an MPEG program
    stream's reader only estimates it (8.24 s for 8.32 s of B-frame MPEG-2)."""
    tolerance = 1 / Fraction(info.fps) + HEADER_ROUNDING
    pairs = [
        ("duration", Fraction(got.duration), Fraction(info.duration)),
        *(("video stream's duration", seconds, video_seconds) for seconds in video_got),
        *(
            (f"audio stream {n}'s duration", after, before)
            for n, (after, before) in enumerate(
                zip(got.audio_durations, info.audio_durations, strict=True), 1
            )
        ),
    ]
    for what, after, before in pairs:
        if after is not None and before is not None and abs(after - before) > tolerance:
            raise VideoError(
                f"the output's {what} is {float(after):.3f} s, the source's "
                f"{float(before):.3f} s (more than a frame, {float(tolerance):.3f} s, apart)"
            )


def describe(info: VideoInfo, config: VideoConfig, encoded: Encoded) -> str:
    """What was done, for the result's reason (after "converted to ...")."""
    codec = "AV1" if config.mode == "av1" else "HEVC"
    setting = (
        f"CRF {config.av1_crf}, preset {config.av1_preset}"
        if config.mode == "av1"
        else f"CRF {config.crf}, preset {config.preset}"
    )
    note = f"{codec} ({setting}) from {info.codec}, {encoded.frames} frames; {encoded.audio}"
    if encoded.dropped:
        note += f"; dropped data tracks it cannot carry: {', '.join(encoded.dropped)}"
    return note
