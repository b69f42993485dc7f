"""What Immich stores of a video: sftpgate's file plus the H.264 copy Immich encodes of it.

At its default settings Immich plays a video as it is only when its video codec is H.264 (with
4:2:0 chroma), its audio AAC, MP3 or "libopus" (a name ffprobe never reports: Opus counts as not
accepted) and its container MP4, MOV, Ogg or WebM; otherwise its video-conversion job writes a
second file into its encoded-video folder, and the original stays too. So an HEVC file from
sftpgate costs its own bytes *plus* Immich's 720p H.264 copy, while an H.264 original sent
unchanged costs its bytes alone. For every corpus video this section measures both choices:

- convert: sftpgate's real optimizer (`optimize_file`, default config, in this process) and then
  Immich's copy of its output;
- keep: the original, plus Immich's copy of the original where Immich would make one.

Immich's copy is made with the `ffmpeg` CLI and the arguments Immich's `BaseConfig`/`H264Config`
build at its defaults (server/src/utils/media.ts, services/media.service.ts, config.ts), and its
CPU seconds are the ffmpeg child's rusage. Live Photo videos are listed, not measured: sftpgate
never converts them, so both choices store the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CORPUS, Bench, BenchError, Section, fmt, tail

# Immich's defaults (server/src/config.ts): target H.264/AAC, transcode policy "required".
ACCEPTED_VIDEO = ("h264",)
ACCEPTED_AUDIO = ("aac", "mp3", "libopus")
ACCEPTED_CONTAINERS = ("mp4", "mov", "ogg", "webm")  # MP4 is accepted whatever the list says
TARGET_RESOLUTION = 720  # of the short side
CRF = 23
PRESET = "ultrafast"
# Immich names a container by ffprobe's long name where it knows it (every ISO-BMFF file, MP4
# and 3GP included, is "QuickTime / MOV"), else by ffprobe's short name.
CONTAINER_BY_LONG_NAME = {"QuickTime / MOV": "mov", "Matroska / WebM": "webm"}
LIVE_PHOTO_KEY = "com.apple.quicktime.content.identifier"

# What Immich's job does with a file: nothing, or one of its ffmpeg runs. A remux copies both
# streams into a new MP4 (a container it does not accept), "audio" re-encodes only the audio.
NONE, REMUX, AUDIO, VIDEO, ALL = "none", "remux", "audio", "video", "all"


@dataclass(frozen=True)
class Probe:
    """The parts of ffprobe's answer Immich's decision reads."""

    container: str
    video: dict[str, Any]  # the main video stream
    audio: dict[str, Any] | None  # the main audio stream
    live_photo: bool

    @property
    def codecs(self) -> str:
        audio = self.audio["codec_name"] if self.audio else "no audio"
        return f"{self.video['codec_name']}+{audio}"

    @property
    def rotation(self) -> int:
        for side in self.video.get("side_data_list", []):
            if "rotation" in side:
                return int(side["rotation"])
        return 0


@dataclass(frozen=True)
class Copy:
    """Immich's encoded copy of one file: what its job does, the bytes it writes, its CPU."""

    plan: str
    bytes: int = 0
    cpu: float = 0.0
    command: str = ""  # the ffmpeg command line, for the section's notes

    def cell(self) -> str:
        return "none" if self.plan == NONE else f"{self.bytes:,} ({self.plan})"


@dataclass(frozen=True)
class Row:
    name: str
    original: int
    codecs: str
    decision: str  # what sftpgate did, for the table
    converted: int  # sftpgate's output (== original when it kept the file)
    sftpgate_cpu: float
    convert_copy: Copy
    keep_copy: Copy

    @property
    def keep_unchanged(self) -> bool:
        """Would `keep` send this original as it is? Only where Immich plays its video stream
        itself; a video Immich re-encodes anyway is converted under either choice."""
        return self.keep_copy.plan not in (VIDEO, ALL)


def probe(path: Path) -> Probe:
    p = subprocess.run(
        ["ffprobe", "-v", "error", "-show_format", "-show_streams", "-of", "json", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if p.returncode != 0:
        raise BenchError(f"ffprobe {path.name}: {p.stderr.strip()[-400:]}")
    info = json.loads(p.stdout)
    fmt_info = info["format"]
    streams = info["streams"]
    video = _main_stream(
        [
            s
            for s in streams
            if s["codec_type"] == "video" and not s.get("disposition", {}).get("attached_pic")
        ]
    )
    if video is None:
        raise BenchError(f"{path.name} has no video stream")
    container = CONTAINER_BY_LONG_NAME.get(fmt_info.get("format_long_name", ""))
    return Probe(
        container=container or fmt_info["format_name"],
        video=video,
        audio=_main_stream([s for s in streams if s["codec_type"] == "audio"]),
        live_photo=LIVE_PHOTO_KEY in fmt_info.get("tags", {}),
    )


def _main_stream(streams: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Immich's choice: the stream with the most frames, of those whose codec is known."""
    known = [s for s in streams if s.get("codec_name", "unknown") != "unknown"]
    known.sort(key=lambda s: int(s.get("nb_frames", 0) or 0), reverse=True)
    return known[0] if known else None


def immich_plan(p: Probe) -> str:
    """MediaService.getTranscodeTarget and isRemuxRequired at the default policy "required"."""
    pixel_format = p.video.get("pix_fmt") or "yuv420p"
    video = p.video["codec_name"] not in ACCEPTED_VIDEO or not pixel_format.endswith("420p")
    audio = p.audio is not None and p.audio["codec_name"] not in ACCEPTED_AUDIO
    if video and audio:
        return ALL
    if video:
        return VIDEO
    if audio:
        return AUDIO
    return REMUX if p.container not in ACCEPTED_CONTAINERS else NONE


def immich_argv(src: Path, dst: Path, p: Probe, plan: str) -> list[str]:
    """The ffmpeg command Immich's H264Config builds for `plan` at the default settings
    (software encoding, no bitrate cap, threads 0 = x264's own choice); Immich writes MP4."""
    encode_video = plan in (VIDEO, ALL)
    argv = [
        "ffmpeg", "-nostdin", "-y", "-i", str(src),
        "-c:v", "h264" if encode_video else "copy",
        "-c:a", "aac" if plan in (AUDIO, ALL) else "copy",
        "-movflags", "faststart", "-fps_mode", "passthrough",
        "-map", f"0:{p.video['index']}", "-map_metadata", "-1",
    ]  # fmt: skip
    if p.audio is not None:
        argv += ["-map", f"0:{p.audio['index']}"]
    if encode_video:
        filters = _video_filters(p)
        if filters:
            argv += ["-vf", ",".join(filters)]
    return [*argv, "-preset", PRESET, "-crf", str(CRF), str(dst)]


def _video_filters(p: Probe) -> list[str]:
    """BaseConfig.getFilterOptions: scale the short side to 720 (and odd sizes to even ones);
    the display matrix makes a 90°-rotated video "vertical", as ffmpeg rotates it first."""
    width, height = int(p.video["width"]), int(p.video["height"])
    filters = []
    if width % 2 or height % 2 or min(width, height) > TARGET_RESOLUTION:
        vertical = height > width or abs(p.rotation) == 90
        side = TARGET_RESOLUTION
        filters.append(f"scale={side}:-2" if vertical else f"scale=-2:{side}")
    if p.video.get("color_transfer") in ("smpte2084", "arib-std-b67"):
        # Immich tone-maps HDR with jellyfin-ffmpeg's own `tonemapx` filter, which stock
        # ffmpeg lacks; sftpgate keeps HDR video as it is, so no corpus file gets here.
        raise BenchError("HDR video: Immich's tone-mapping filter is not available here")
    if not (p.video.get("pix_fmt") or "yuv420p").endswith("420p"):
        filters.append("format=yuv420p")
    return filters


def immich_copy(bench: Bench, src: Path, work: Path) -> Copy:
    """Make Immich's copy of `src` as Immich would, if it would; its bytes and ffmpeg's CPU."""
    p = probe(src)
    plan = immich_plan(p)
    if plan == NONE:
        return Copy(NONE)
    dst = work / f"immich-{src.stem}.mp4"
    log = work / f"immich-{src.stem}.log"
    argv = immich_argv(src, dst, p, plan)
    proc = bench.start(argv, log)
    # wait4 reaps the child and returns its own rusage (every x264 thread), nothing else's.
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    bench.stop(proc)  # already reaped: this only forgets it
    if proc.returncode != 0:
        raise BenchError(
            f"ffmpeg (Immich's copy of {src.name}) exited {proc.returncode}: {tail(log)}"
        )
    size = dst.stat().st_size
    dst.unlink()
    command = " ".join([*argv[:4], "IN", *argv[5:-1], "OUT.mp4"])
    return Copy(plan, size, usage.ru_utime + usage.ru_stime, command)


def measure(bench: Bench, src: Path, work: Path) -> Row:
    from sftpgate.config import OptimizeConfig
    from sftpgate.optimize import optimize_file

    original = probe(src)
    keep_copy = immich_copy(bench, src, work)
    cpu0 = time.process_time()  # the whole process: PyAV's encoder threads run in it
    result = optimize_file(src, work, OptimizeConfig(), "UTC")
    sftpgate_cpu = time.process_time() - cpu0
    if result.decision == "converted" and result.output:
        output = Path(result.output)
        decision = f"converted → {probe(output).codecs}"
        convert_copy = immich_copy(bench, output, work)
        converted = output.stat().st_size
        output.unlink()
    elif result.decision == "kept":  # the same file goes to Immich under either choice
        decision, convert_copy, converted = result.reason, keep_copy, result.bytes_in
    else:
        raise BenchError(f"sftpgate could not optimize {src.name}: {result.reason}")
    return Row(
        src.name,
        result.bytes_in,
        original.codecs,
        decision,
        converted,
        sftpgate_cpu,
        convert_copy,
        keep_copy,
    )


def _saving(stored: int, original: int) -> str:
    """Whole per cent, negative for a loss; rounded as an int, so -0.4 % reads 0 %, not -0 %."""
    return f"{round(100 * (1 - stored / original))}%" if original else "—"


def run(bench: Bench) -> Section:
    videos = sorted((CORPUS / "video").iterdir(), key=lambda p: p.stat().st_size)
    probes = {v: probe(v) for v in videos}
    live = [v for v in videos if probes[v].live_photo]
    measured = [v for v in videos if v not in live]
    if bench.quick:
        measured = measured[:1]
    work = bench.mkdtemp("immich")
    try:
        rows_data = []
        for src in measured:
            bench.log(f"immich: {src.name}")
            rows_data.append(measure(bench, src, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    header = [
        "video", "original, bytes", "codecs", "sftpgate",
        "convert: sftpgate's file", "convert: Immich's copy (job)", "convert: stored",
        "convert: saving", "convert: sftpgate CPU s", "convert: Immich CPU s",
        "keep: Immich's copy (job)", "keep: stored", "keep: saving", "keep: Immich CPU s",
    ]  # fmt: skip
    rows: list[list[str]] = []
    for r in rows_data:
        convert = r.converted + r.convert_copy.bytes
        keep = r.original + r.keep_copy.bytes
        rows.append(
            [
                r.name, f"{r.original:,}", r.codecs, r.decision,
                f"{r.converted:,}", r.convert_copy.cell(), f"{convert:,}",
                _saving(convert, r.original), fmt(r.sftpgate_cpu, 2), fmt(r.convert_copy.cpu, 2),
                r.keep_copy.cell(), f"{keep:,}", _saving(keep, r.original), fmt(r.keep_copy.cpu, 2),
            ]
        )  # fmt: skip
    for v in live:
        decision = "kept: Live Photo video (sftpgate never converts it)"
        rows.append([v.name, f"{v.stat().st_size:,}", probes[v].codecs, decision] + ["—"] * 10)

    original = sum(r.original for r in rows_data)
    convert_bytes = sum(r.converted + r.convert_copy.bytes for r in rows_data)
    convert_cpu = sum(r.convert_copy.cpu for r in rows_data)
    keep_bytes = sum(r.original + r.keep_copy.bytes for r in rows_data)
    keep_cpu = sum(r.keep_copy.cpu for r in rows_data)
    # `keep` as the setting works: originals Immich would re-encode anyway are converted.
    mixed = [
        (r.original, r.keep_copy) if r.keep_unchanged else (r.converted, r.convert_copy)
        for r in rows_data
    ]
    setting_bytes = sum(size + copy.bytes for size, copy in mixed)
    setting_cpu = sum(copy.cpu for _, copy in mixed)
    sftpgate_cpu = sum(r.sftpgate_cpu for r in rows_data)
    setting_sftpgate_cpu = sum(r.sftpgate_cpu for r in rows_data if not r.keep_unchanged)
    rows.append(
        [
            "**total**", f"{original:,}", "", "",
            f"{sum(r.converted for r in rows_data):,}",
            f"{sum(r.convert_copy.bytes for r in rows_data):,}", f"{convert_bytes:,}",
            _saving(convert_bytes, original), fmt(sftpgate_cpu, 2), fmt(convert_cpu, 2),
            f"{sum(r.keep_copy.bytes for r in rows_data):,}", f"{keep_bytes:,}",
            _saving(keep_bytes, original), fmt(keep_cpu, 2),
        ]
    )  # fmt: skip
    rows.append(
        [
            "**total, `keep` as the setting does it** (videos Immich re-encodes anyway are "
            "converted)", f"{original:,}", "", "", "", "", "", "", fmt(setting_sftpgate_cpu, 2), "",
            f"{sum(copy.bytes for _, copy in mixed):,}", f"{setting_bytes:,}",
            _saving(setting_bytes, original), fmt(setting_cpu, 2),
        ]
    )  # fmt: skip

    if convert_bytes == setting_bytes:
        verdict = f"**Both choices store the same bytes ({convert_bytes:,}).**"
    else:
        winner = "convert" if convert_bytes < setting_bytes else "keep"
        verdict = f"**Fewer bytes in total: `{winner}`.**"
    bench.raw["immich"] = [
        {
            "video": r.name,
            "original": r.original,
            "decision": r.decision,
            "converted": r.converted,
            "sftpgate_cpu": r.sftpgate_cpu,
            "convert_copy": vars(r.convert_copy),
            "keep_copy": vars(r.keep_copy),
        }
        for r in rows_data
    ]
    ffmpeg = subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True, timeout=10)
    version = ffmpeg.stdout.split(" Copyright", 1)[0] if ffmpeg.stdout else "ffmpeg"
    copies = [c for r in rows_data for c in (r.convert_copy, r.keep_copy) if c.command]
    # Show a command that scales, if any did: it has every part Immich adds.
    example = max(copies, key=lambda c: "-vf" in c.command, default=Copy(NONE))
    notes = [
        f"{verdict} convert stores {convert_bytes:,} bytes, a saving of "
        f"{_saving(convert_bytes, original)} on the {original:,} of the originals, and costs "
        f"Immich {convert_cpu:.2f} CPU s; keep stores {setting_bytes:,} "
        f"({_saving(setting_bytes, original)}) and costs Immich {setting_cpu:.2f} CPU s (every "
        f"original as it is: {keep_bytes:,} bytes, {_saving(keep_bytes, original)}, "
        f"{keep_cpu:.2f} CPU s).",
        "Immich's decision at its defaults (policy `required`): the video is re-encoded when its "
        "codec is not h264 or its pixel format does not end in `420p`; the audio when it is not "
        "aac, mp3 or libopus; a file needing neither is remuxed (streams copied into an MP4) only "
        "when its container is not MP4, MOV, Ogg or WebM — every ISO-BMFF file (MP4, MOV, 3GP) "
        "reads as MOV, so the 3GP is re-encoded for its MPEG-4 Part 2 video and AMR audio, not "
        "its container. Any of these writes an encoded copy; the job column says which ran.",
        f"Immich's copy, as its H264Config builds it (here one of the {example.plan} jobs above): "
        f"`{example.command}` — the scale filter only when the short "
        f"side is above {TARGET_RESOLUTION} or a side is odd (`{TARGET_RESOLUTION}:-2` for a "
        "portrait or 90°-rotated video), `format=yuv420p` only for other chroma, tone-mapping "
        "only for HDR, `-c:a copy` when the audio is accepted.",
        "CPU: Immich's = the ffmpeg child's utime+stime (wait4 rusage, all threads); sftpgate's "
        "= this process's CPU during `optimize_file` (default config: HEVC, CRF 28, preset "
        "medium). Immich ships jellyfin-ffmpeg; this is "
        f"{version} with Debian's libx264, so sizes may differ "
        "from a real Immich by a few per cent.",
        "Live Photo videos are sftpgate's `kept` under both choices, so they add the same bytes "
        "to both and are not in the totals.",
    ]
    if bench.quick:
        notes.append("--quick: only the smallest video.")
    return Section("immich", "What Immich stores of a video: convert vs keep", header, rows, notes)
