"""Make one file smaller without losing anything: the optimizer's public API.

`optimize_file` runs inside a worker process (see the pipeline), so its argument and result are
plain picklable values, and it never raises for bad input: whatever goes wrong becomes an
"unreadable" result with the reason, and nothing partial is left in `work_dir`.
"""

from __future__ import annotations

import errno
import hashlib
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sftpgate.config import OptimizeConfig
from sftpgate.optimize import bursts, dates, jpeg, kinds, png, video

__all__ = ["OptimizeResult", "optimize_file"]

CONVERTED, KEPT, UNREADABLE = "converted", "kept", "unreadable"
# The work folder could not be written (disk full, quota, read-only): nothing is wrong with the
# file, so the pipeline keeps the original untouched and tries again later.
RETRY = "retry"
_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


@dataclass(frozen=True)
class OptimizeResult:
    kind: str  # jpeg | png | heic | avif | webp | gif | jxl | raw | video | unknown
    decision: str  # converted | kept | unreadable | retry
    reason: str  # one readable sentence: why kept/unreadable, or what was done
    output: str | None  # the optimized file inside work_dir (converted only)
    extension: str | None  # extension for Immich when converted (".jxl"); None = client's name
    bytes_in: int
    bytes_out: int  # == bytes_in unless converted
    captured_at: datetime | None  # timezone-aware capture time from the content, or None
    metadata_kept: tuple[str, ...]  # which of EXIF / XMP / ICC the stored file carries
    seconds: float
    # The video half of a Live Photo: Immich links it to its photo and hides it.
    live_photo_video: bool = False
    burst: bursts.Burst | None = None  # the camera's burst this photo belongs to


_ALREADY_EFFICIENT = {
    "heic": "kept as it is: HEIC is already efficiently compressed",
    "avif": "kept as it is: AVIF is already efficiently compressed",
    "webp": "kept as it is: WebP is not converted (already compressed; JPEG XL would not save enough)",
    "jxl": "kept as it is: the file is already JPEG XL",
    "gif": "kept as it is: GIF is not converted",
    "raw": "kept as it is: camera RAW files are never converted",
}
_MEGABYTE = 1 << 20


def optimize_file(
    src: Path,
    work_dir: Path,
    config: OptimizeConfig,
    timezone: str,
    played_as_is: video.PlayedAsIs | None = None,
) -> OptimizeResult:
    """Decide and, where worthwhile, convert `src`; write the result atomically into `work_dir`.

    `timezone` is an IANA zone for EXIF dates without an offset ("" = the local zone).
    `played_as_is`: a video the destination plays as it is is kept as it is (a converted copy
    would be re-encoded there); None converts every video worth it.
    """
    out = _Outcome(Path(src), timezone)
    try:
        return _optimize(out, Path(work_dir), config, played_as_is)
    except Exception as exc:  # never raise in a worker: the reason goes to undone/'s sidecar
        message = str(exc) or type(exc).__name__
        if disk_error(exc):
            return out.make(RETRY, f"the work folder cannot be written ({message}); will try again")
        return out.make(UNREADABLE, f"cannot be optimized: {message}")


def disk_error(exc: BaseException) -> bool:
    """An error of the work folder's disk, not of the file being converted."""
    return isinstance(exc, OSError) and exc.errno in _DISK_ERRORS


class _Outcome:
    """Builds the result; knows kind and size as soon as they are found, so that even an
    unexpected exception reports them."""

    def __init__(self, src: Path, timezone: str) -> None:
        self.src = src
        self.timezone = timezone
        self.started = time.monotonic()
        self.kind = "unknown"
        self.size = 0

    def make(
        self,
        decision: str,
        reason: str,
        metadata: tuple[str, ...] = (),
        output: Path | None = None,
        bytes_out: int | None = None,
        live_photo_video: bool = False,
    ) -> OptimizeResult:
        captured = burst = None
        if decision in (CONVERTED, KEPT):
            captured = dates.capture_time(self.src, self.kind, self.timezone)
            burst = bursts.burst_of(self.src, self.kind)
        return OptimizeResult(
            kind=self.kind,
            decision=decision,
            reason=reason,
            output=str(output) if output else None,
            extension=output.suffix if output else None,
            bytes_in=self.size,
            bytes_out=self.size if bytes_out is None else bytes_out,
            captured_at=captured,
            metadata_kept=metadata,
            seconds=round(time.monotonic() - self.started, 3),
            live_photo_video=live_photo_video,
            burst=burst,
        )


def _optimize(
    out: _Outcome, work_dir: Path, config: OptimizeConfig, played_as_is: video.PlayedAsIs | None
) -> OptimizeResult:
    src = out.src
    out.size = src.stat().st_size
    with src.open("rb") as f:
        head = f.read(kinds.HEAD_SIZE)
    kind = out.kind = kinds.sniff(head)
    # JPEG bytes are needed whole for the transcode; read them once, and check they are the bytes
    # we sized (a file still being written is caught here rather than half-converted).
    data = src.read_bytes() if kind == "jpeg" else None
    if data is not None and len(data) != out.size:
        raise OSError(f"the file changed while being read ({out.size:,} → {len(data):,} bytes)")

    probe = kinds.probe(src, kind, head, config.max_pixels, data)
    if probe.problem:
        return out.make(UNREADABLE, probe.problem)
    if kind == "jpeg" and data is not None and probe.jpeg is not None:
        return _optimize_jpeg(out, data, probe, work_dir, config)
    if kind == "png":
        return _optimize_png(out, probe, work_dir, config)
    if kind == "video":
        return _optimize_video(out, head, work_dir, config, played_as_is)
    if kind == "heic" and probe.note == "motion photo":
        reason = "kept as it is: HEIC motion photo (the image and its embedded video stay together)"
        return out.make(KEPT, reason, probe.metadata)
    if kind == "gif" and probe.note:
        return out.make(KEPT, "kept as it is: animated GIF is not converted", probe.metadata)
    return out.make(KEPT, _ALREADY_EFFICIENT[kind], probe.metadata)


def _too_small_a_saving(saving: float, what: str, config: OptimizeConfig) -> str | None:
    if saving >= config.min_savings:
        return None
    return (
        f"kept as it is: {what} would save only {saving:.1%}, less than "
        f"optimize.min_savings ({config.min_savings:.0%})"
    )


def _optimize_jpeg(
    out: _Outcome, data: bytes, probe: kinds.Probe, work_dir: Path, config: OptimizeConfig
) -> OptimizeResult:
    info = probe.jpeg
    if info is None:  # the probe always sets it for a readable JPEG
        raise ValueError("JPEG structure missing from the probe")
    if config.jpeg.mode == "keep":
        return out.make(
            KEPT,
            "kept as it is: JPEG conversion is disabled (optimize.jpeg.mode: keep)",
            probe.metadata,
        )
    reason = jpeg.keep_reason(info)
    if reason:
        return out.make(KEPT, reason, probe.metadata)
    note = ""
    if config.jpeg.mode == "lossy":
        lossy, note = _lossy_jpeg(out, data, info, work_dir, config)
        if lossy is not None:
            return lossy
    done = jpeg.transcode_lossless(data, info, probe.width, probe.height, config.jpeg.effort)
    if done.decision != CONVERTED or done.jxl is None:
        metadata = probe.metadata if done.decision == KEPT else ()
        return out.make(done.decision, done.reason, metadata)
    saving = 1 - len(done.jxl) / len(data)
    small = _too_small_a_saving(saving, "JPEG XL", config)
    if small:
        return out.make(KEPT, small + note, probe.metadata)
    output = write_atomically(work_dir, output_name(out.src, _sha1(data), ".jxl"), done.jxl)
    return out.make(
        CONVERTED,
        f"converted to JPEG XL by lossless transcoding, verified bit-exact: {len(data):,} → "
        f"{len(done.jxl):,} bytes ({saving:.1%} smaller){note}",
        done.metadata,
        output,
        len(done.jxl),
    )


def _lossy_jpeg(
    out: _Outcome, data: bytes, info: jpeg.JpegInfo, work_dir: Path, config: OptimizeConfig
) -> tuple[OptimizeResult | None, str]:
    """The converted result of lossy mode, or (None, why the lossless transcode is used)."""
    blocker = jpeg.lossy_blocker(info)
    if blocker:
        return None, f" (lossy mode not used: {blocker})"
    quality = config.jpeg.quality
    try:
        lossy = jpeg.transcode_lossy(data, info, quality, config.jpeg.effort)
    except Exception as exc:  # a sound JPEG that libjxl or ImageCms refused: lossless still works
        return None, f" (lossy mode failed: {exc})"
    saving = 1 - len(lossy.jxl) / len(data)
    if saving < config.min_savings:
        return None, f" (lossy JPEG XL would save only {saving:.1%})"
    output = write_atomically(work_dir, output_name(out.src, _sha1(data), ".jxl"), lossy.jxl)
    done = "; ".join(("decodes at full size", *lossy.notes))
    reason = (
        f"converted to lossy JPEG XL (quality {quality}): {done}: {len(data):,} → "
        f"{len(lossy.jxl):,} bytes ({saving:.1%} smaller)"
    )
    return out.make(CONVERTED, reason, lossy.metadata, output, len(lossy.jxl)), ""


def _optimize_png(
    out: _Outcome, probe: kinds.Probe, work_dir: Path, config: OptimizeConfig
) -> OptimizeResult:
    if config.png.mode == "keep":
        reason = "kept as it is: PNG conversion is disabled (optimize.png.mode: keep)"
        return out.make(KEPT, reason, probe.metadata)
    chunks = png.read_chunks(out.src)
    if chunks.problem:
        return out.make(UNREADABLE, f"the PNG cannot be read: {chunks.problem}")
    reason = png.keep_reason(chunks)
    if reason:
        return out.make(KEPT, reason, probe.metadata)
    try:
        done = png.convert(out.src, config.png.effort, config.max_pixels)
    except png.DamagedPng as exc:
        return out.make(UNREADABLE, str(exc))
    except png.KeepPng as exc:
        return out.make(KEPT, str(exc), probe.metadata)
    saving = 1 - len(done.jxl) / out.size
    small = _too_small_a_saving(saving, "lossless JPEG XL", config)
    if small:
        return out.make(KEPT, small, probe.metadata)
    digest = _file_sha1(out.src)
    output = write_atomically(work_dir, output_name(out.src, digest, ".jxl"), done.jxl)
    return out.make(
        CONVERTED,
        f"converted to lossless JPEG XL ({done.mode}), verified pixel-identical: {out.size:,} → "
        f"{len(done.jxl):,} bytes ({saving:.1%} smaller)",
        done.metadata,
        output,
        len(done.jxl),
    )


def _optimize_video(
    out: _Outcome,
    head: bytes,
    work_dir: Path,
    config: OptimizeConfig,
    played_as_is: video.PlayedAsIs | None,
) -> OptimizeResult:
    src = out.src
    before = src.stat()
    info = video.inspect(src, head, config.max_pixels)
    if info.problem:
        return out.make(UNREADABLE, info.problem)
    metadata = video.metadata_present(info)
    reason = video.keep_reason(info, config.video, played_as_is)
    if reason:
        return out.make(KEPT, reason, metadata, live_photo_video=video.is_live_photo_video(info))
    name = output_name(src, _file_sha1(src), "." + video.output_format(info, config.video))
    with AtomicOutput(work_dir, name) as target:
        # The encode gets 80% of the worker's time limit; verification decodes it all again.
        budget = video.Budget(
            0.8 * config.time_limit_seconds, round(info.duration * info.fps), out.started
        )
        try:
            encoded = video.transcode(src, info, target.temp, config.video, budget)
        except video.TooSlow as exc:
            target.discard()
            return out.make(KEPT, f"kept as it is: {exc}", metadata)
        except Exception as exc:  # the source decoded at probe time: keep it, say why
            target.discard()
            if disk_error(exc):
                raise
            return out.make(KEPT, f"kept as it is: the conversion failed ({exc})", metadata)
        after = src.stat()
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            raise OSError("the file changed while it was being converted")
        size = target.temp.stat().st_size
        saving = 1 - size / out.size
        small = _too_small_a_saving(saving, "the conversion", config)
        if small:
            target.discard()
            return out.make(KEPT, small, metadata)
        try:
            video.verify(info, target.temp, encoded, config.video)
        except Exception as exc:
            target.discard()
            return out.make(
                KEPT, f"kept as it is: the video could not be verified ({exc})", metadata
            )
        output = target.commit()
    return out.make(
        CONVERTED,
        f"converted to {video.describe(info, config.video, encoded)}; verified (decodes, "
        f"duration within a frame, dimensions, rotation, colour, a frame's pixels, audio, "
        f"metadata): {out.size:,} → {size:,} bytes "
        f"({saving:.1%} smaller)",
        metadata,
        output,
        size,
    )


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _file_sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with path.open("rb") as f:
        while chunk := f.read(_MEGABYTE):
            digest.update(chunk)
    return digest.hexdigest()


def output_name(src: Path, digest: str, extension: str) -> str:
    """Deterministic name of the optimized file for this original (`digest`: SHA-1 of its bytes).

    A re-run after a crash rewrites the same path with the same bytes, so the upload keeps its
    checksum and Immich answers "duplicate". The source path is part of the name because two
    users may upload identical bytes: with one shared file, finishing one upload and removing
    its work file would pull it from under the other.
    """
    where = hashlib.sha1(os.fsencode(src.absolute())).hexdigest()[:12]
    return f"{digest}-{where}{extension}"


class AtomicOutput:
    """A file in `work_dir` that appears under its final name only complete and synced.

    Write to `temp`, then `commit()`; leaving the block without committing (an exception, or
    `discard()`) leaves nothing behind, not even the final name: the caller then reports the file
    as kept or unreadable, and an orphan in .work/ would never be cleaned up.
    """

    def __init__(self, work_dir: Path, name: str) -> None:
        work_dir.mkdir(parents=True, exist_ok=True)
        self.work_dir = work_dir
        self.final = work_dir / name
        # Unique per process: two workers converting identical bytes (a duplicate upload) write
        # identical output, and os.replace makes either result whole.
        self.temp = work_dir / f".{name}.{os.getpid()}.tmp"
        self.committed = False

    def __enter__(self) -> AtomicOutput:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self.committed:
            self.discard()

    def commit(self) -> Path:
        try:
            with self.temp.open("rb+") as f:
                os.fsync(f.fileno())
            os.replace(self.temp, self.final)
            directory = os.open(self.work_dir, os.O_RDONLY)
            try:
                os.fsync(directory)  # the rename must be durable before anyone deletes the original
            finally:
                os.close(directory)
        except BaseException:
            self.discard()
            raise
        self.committed = True
        return self.final

    def discard(self) -> None:
        self.temp.unlink(missing_ok=True)
        self.final.unlink(missing_ok=True)


def write_atomically(work_dir: Path, name: str, data: bytes) -> Path:
    """Write `data` as work_dir/name so that the name only ever holds complete, synced bytes."""
    with AtomicOutput(work_dir, name) as target:
        target.temp.write_bytes(data)
        return target.commit()
