"""Codec benchmark: what sftpgate's optimizer saves on the corpus, how fast it converts compared
with the reference command-line tools on the same files, and a worker's peak memory.

    python bench/codecs.py [--quick]

Prints markdown on stdout (progress goes to stderr), for bench/run.py and the README:

- Bytes saved per kind: every file of ../shared/corpus through `optimize_file` with the default
  configuration (in --quick the videos use preset ultrafast instead of medium).
- Speed: the same corpus files through sftpgate's code and through `cjxl --lossless_jpeg=1` at the
  same effort, and through the `ffmpeg` CLI with the same libx265 CRF and preset. Medians of
  3 runs (1 in --quick) of the summed wall time; ratio = reference time ÷ sftpgate time, so
  ≥ 1.00× means sftpgate is at least as fast. Both sides use all cores. The libraries differ in
  version (see the header), so the ratio compares builds as well as the glue around them.
- Video quality: SSIM (FFmpeg's ssim filter) of each converted corpus video against its source.
- Peak memory: `optimize_file` in a fresh process (as a worker runs it) on a 48 MP JPEG and on
  1080p30 H.264 clips of 5 s and 60 s made here (only 5 s at preset ultrafast in --quick);
  peak = the process's ru_maxrss.

--quick (< 60 s on an idle 2-core machine) runs once, with preset ultrafast, and times only the
converted corpus files under 1 MB.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.metadata
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"
PY = sys.executable
if str(ROOT) not in sys.path:  # `python bench/codecs.py` from anywhere finds sftpgate
    sys.path.insert(0, str(ROOT))

import av  # noqa: E402
import pillow_jxl  # noqa: E402
from PIL import Image  # noqa: E402

from sftpgate.config import OptimizeConfig, VideoConfig  # noqa: E402
from sftpgate.optimize import OptimizeResult, jpeg, optimize_file, video  # noqa: E402

MB = 1_000_000
MIB = 1 << 20
KIND_ORDER = ("jpeg", "png", "video")

# Runs optimize_file in a fresh interpreter, like a codec worker, and reports its own peak RSS.
_CHILD = """
import json, resource, sys
from pathlib import Path
from sftpgate.config import OptimizeConfig, VideoConfig
from sftpgate.optimize import optimize_file
src, work, preset = sys.argv[1], sys.argv[2], sys.argv[3]
config = OptimizeConfig(video=VideoConfig(preset=preset))
result = optimize_file(Path(src), Path(work), config, "UTC")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"decision": result.decision, "reason": result.reason, "seconds": result.seconds,
                  "bytes_in": result.bytes_in, "bytes_out": result.bytes_out, "peak": peak}))
"""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def median(values: Iterable[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def run_quiet(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=True)


# -- header --------------------------------------------------------------------------------------


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0] if lines else "?"


def _x265_version(argv: list[str]) -> str:
    """x265 announces its version on stderr when it opens at log level info."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    found = re.search(r"HEVC encoder version (\S+)", done.stderr)
    return found.group(1) if found else "?"


def header(quick: bool) -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "?",
    )
    mem_gib = int(Path("/proc/meminfo").read_text().split()[1]) / 1024**2
    pyav_x265 = _x265_version(
        [
            PY, "-c",
            "import av; o = av.open('/dev/null', 'w', format='null'); "
            "s = o.add_stream('libx265', rate=1, options={'x265-params': 'log-level=info'}); "
            "s.width = s.height = 64; s.pix_fmt = 'yuv420p'; s.codec_context.open()",
        ]
    )  # fmt: skip
    cli_x265 = _x265_version(
        [
            "ffmpeg", "-hide_banner", "-f", "lavfi", "-i", "testsrc=size=64x64:rate=1",
            "-frames:v", "1", "-c:v", "libx265", "-f", "null", "-",
        ]
    )  # fmt: skip
    libavcodec = ".".join(map(str, av.library_versions["libavcodec"]))
    return (
        f"Machine: {os.cpu_count()} CPUs ({model}), {mem_gib:.1f} GiB RAM, {platform.system()} "
        f"{platform.release()}; load average at start {os.getloadavg()[0]:.2f} (the machine may "
        f"be shared: treat ±15 % as noise). Mode: {'--quick' if quick else 'full'}.\n\n"
        f"sftpgate side: Python {platform.python_version()}, Pillow {Image.__version__}, "
        f"pillow-jxl-plugin {importlib.metadata.version('pillow-jxl-plugin')} (libjxl built in), "
        f"PyAV {av.__version__} (libavcodec {libavcodec}, x265 {pyav_x265}). "
        f"References: {_first_line(['cjxl', '--version'])}; "
        f"{_first_line(['ffmpeg', '-version']).split(' Copyright')[0]} (x265 {cli_x265})."
    )


# -- corpus savings -------------------------------------------------------------------------------


def corpus_savings(config: OptimizeConfig, work: Path) -> dict[str, OptimizeResult]:
    with (CORPUS / "MANIFEST.tsv").open(newline="") as f:
        names = sorted(row["file"] for row in csv.DictReader(f, delimiter="\t"))
    results = {}
    for name in names:
        log(f"  optimize {name}")
        results[name] = optimize_file(CORPUS / name, work, config, "UTC")
    return results


def savings_table(results: dict[str, OptimizeResult], video_preset: str) -> str:
    rows = []
    groups: dict[str, list[OptimizeResult]] = {}
    for result in results.values():
        kind = result.kind if result.kind in KIND_ORDER else "other"
        groups.setdefault(kind, []).append(result)
    for kind in (*KIND_ORDER, "other"):
        group = groups.get(kind, [])
        before = sum(r.bytes_in for r in group)
        after = sum(r.bytes_out for r in group)
        per_file = [1 - r.bytes_out / r.bytes_in for r in group if r.decision == "converted"]
        label = {"other": "HEIC, AVIF, WebP, GIF, RAW, unknown", "video": "video → HEVC"}.get(
            kind, f"{kind.upper()} → JPEG XL lossless"
        )
        decisions = Counter(r.decision for r in group)
        rows.append(
            [
                label,
                str(len(group)),
                f"{decisions['converted']} / {decisions['kept']} / {decisions['unreadable']}",
                f"{before / MB:.2f} → {after / MB:.2f} MB",
                f"{1 - after / before:.1%}" if before else "—",
                f"{median(per_file):.1%}" if per_file else "—",
            ]
        )
    before = sum(r.bytes_in for r in results.values())
    after = sum(r.bytes_out for r in results.values())
    rows.append(
        [
            "**whole corpus**",
            str(len(results)),
            "",
            f"{before / MB:.2f} → {after / MB:.2f} MB",
            f"{1 - after / before:.1%}",
            "",
        ]
    )
    title = f"**Bytes saved on the corpus** (default settings; video CRF 28, preset {video_preset})"
    head = [
        "kind",
        "files",
        "converted / kept / unreadable",
        "bytes",
        "saved",
        "median saving per converted file",
    ]
    return f"{title}\n\n{table(head, rows)}"


# -- speed -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Speed:
    label: str
    files: int
    ours: list[float]
    reference: list[float]
    tool: str


def jpeg_speed(names: list[str], effort: int, reps: int, tmp: Path) -> list[Speed]:
    inputs = []
    for name in names:
        data = (CORPUS / name).read_bytes()
        info = jpeg.parse_jpeg(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Corrupt EXIF data" of the bad/ sample
            with Image.open(io.BytesIO(data)) as im:
                inputs.append((CORPUS / name, data, info, im.size))
    encoder_only, full, cjxl = [], [], []
    for rep in range(reps):
        log(f"  JPEG speed, run {rep + 1}/{reps}")

        def encode() -> None:
            for _path, data, info, (w, h) in inputs:
                mode = "L" if info.components == 1 else "RGB"
                pillow_jxl.Encoder(mode=mode, lossless=True, effort=effort)(data, w, h, True)

        def transcode() -> None:
            for _path, data, info, (w, h) in inputs:
                done = jpeg.transcode_lossless(data, info, w, h, effort)
                assert done.decision == "converted", done.reason

        def reference() -> None:
            for path, *_rest in inputs:
                out = tmp / "cjxl.jxl"
                run_quiet(["cjxl", str(path), str(out), "--lossless_jpeg=1", "-e", str(effort)])

        encoder_only.append(timed(encode))
        full.append(timed(transcode))
        cjxl.append(timed(reference))
    tool = f"cjxl --lossless_jpeg=1 -e {effort}"
    return [
        Speed("JPEG → JXL, encoder call only", len(inputs), encoder_only, cjxl, tool),
        Speed(
            "JPEG → JXL, sftpgate's whole step (encode, plain boxes, bit-exact decode check)",
            len(inputs),
            full,
            cjxl,
            tool,
        ),
    ]


def video_speed(names: list[str], config: VideoConfig, reps: int, tmp: Path) -> list[Speed]:
    ours, with_verify, cli = [], [], []
    for rep in range(reps):
        log(f"  video speed, run {rep + 1}/{reps}")
        ours_total = verify_total = cli_total = 0.0
        for name in names:
            src = CORPUS / name
            with src.open("rb") as f:
                head = f.read(64)
            started = time.perf_counter()
            info = video.inspect(src, head, OptimizeConfig().max_pixels)  # the CLI probes too
            fmt = video.output_format(info, config)
            out = tmp / f"ours.{fmt}"
            encoded = video.transcode(src, info, out, config)
            ours_total += time.perf_counter() - started
            verify_total += timed(partial(video.verify, info, out, encoded, config))
            argv = [
                "ffmpeg", "-y", "-v", "error", "-i", str(src), "-map", "0:v:0", "-map", "0:a?",
                "-c:v", "libx265", "-crf", str(config.crf), "-preset", config.preset,
                "-x265-params", "log-level=error", "-tag:v", "hvc1", "-c:a", "copy",
                "-map_metadata", "0", str(tmp / f"cli.{fmt}"),
            ]  # fmt: skip
            cli_total += timed(partial(run_quiet, argv))
        ours.append(ours_total)
        with_verify.append(ours_total + verify_total)
        cli.append(cli_total)
    tool = f"ffmpeg -c:v libx265 -crf {config.crf} -preset {config.preset} -c:a copy"
    return [
        Speed(
            f"video → HEVC (preset {config.preset}), PyAV transcode", len(names), ours, cli, tool
        ),
        Speed(
            "video → HEVC, plus sftpgate's full decode check", len(names), with_verify, cli, tool
        ),
    ]


def speed_table(speeds: list[Speed], reps: int) -> str:
    rows = [
        [
            s.label,
            str(s.files),
            f"{median(s.ours):.2f} s",
            f"{median(s.reference):.2f} s",
            s.tool,
            f"**{median(s.reference) / median(s.ours):.2f}×**",
        ]
        for s in speeds
    ]
    head = ["conversion", "files", "sftpgate", "reference", "reference command", "ratio"]
    title = (
        f"**Speed on the same corpus files** (summed wall time, median of {reps} "
        f"run{'s' if reps > 1 else ''}; ratio = reference ÷ sftpgate, ≥ 1.00× = as fast or faster)"
    )
    return f"{title}\n\n{table(head, rows)}"


def ssim(output: Path, source: Path) -> float:
    """FFmpeg's SSIM ("All") of the converted video against its source, frame by frame."""
    done = subprocess.run(
        ["ffmpeg", "-hide_banner", "-i", str(output), "-i", str(source), "-lavfi",
         "[0:v][1:v]ssim", "-f", "null", "-"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    found = re.search(r"All:([0-9.]+)", done.stderr)
    if not found:
        raise RuntimeError(f"no SSIM in ffmpeg's output for {output}")
    return float(found.group(1))


# -- memory ----------------------------------------------------------------------------------------


def make_48mp_jpeg(target: Path) -> None:
    """8000×6000 at quality 92, 4:2:0, from a real 9 MP phone photo scaled up."""
    with Image.open(CORPUS / "jpeg/hmd-nokia8.3-gps.jpg") as im:
        big = im.convert("RGB").resize((8000, 6000), Image.Resampling.BICUBIC)
    big.save(target, "JPEG", quality=92, subsampling="4:2:0")


def make_1080p_clip(target: Path, seconds: int) -> None:
    """1080p30 H.264 + AAC, testsrc2 with a sine tone, made by the ffmpeg CLI."""
    run_quiet(
        [
            "ffmpeg", "-y", "-v", "error",
            "-f", "lavfi", "-i", f"testsrc2=size=1920x1080:rate=30:duration={seconds}",
            "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={seconds}",
            "-c:v", "libx264", "-preset", "veryfast", "-crf", "18", "-pix_fmt", "yuv420p",
            "-c:a", "aac", "-b:a", "128k", "-metadata", "creation_time=2024-06-01T12:34:56Z",
            str(target),
        ]
    )  # fmt: skip


def worker_peak(src: Path, work: Path, preset: str) -> dict[str, object]:
    done = run_quiet([PY, "-c", _CHILD, str(src), str(work), preset])
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_table(rows: list[tuple[str, dict[str, object]]]) -> str:
    lines = [
        [
            label,
            f"{int(r['bytes_in']) / MB:.1f} MB → {int(r['bytes_out']) / MB:.1f} MB "
            f"({r['decision']})",
            f"{float(r['seconds']):.1f} s",
            f"**{int(r['peak']) / MIB:,.0f} MiB**",
        ]
        for label, r in rows
    ]
    title = "**Peak memory of one worker** (`optimize_file` in a fresh process, ru_maxrss)"
    return f"{title}\n\n{table(['job', 'result', 'time', 'peak RSS'], lines)}"


# -- main ------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="1 run, fast presets, 5 s clip (< 60 s)"
    )
    args = parser.parse_args()
    for tool in ("cjxl", "ffmpeg"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (apt-get install libjxl-tools ffmpeg)")
    quick: bool = args.quick
    reps = 1 if quick else 3
    base = OptimizeConfig()
    preset = "ultrafast" if quick else base.video.preset
    config = dataclasses.replace(base, video=dataclasses.replace(base.video, preset=preset))
    started = time.monotonic()
    parts = [header(quick)]
    with tempfile.TemporaryDirectory(prefix="sftpgate-bench-codecs-") as tmp_name:
        tmp = Path(tmp_name)
        log("corpus savings")
        results = corpus_savings(config, tmp / "work")
        parts.append(savings_table(results, preset))

        converted = {n: r for n, r in results.items() if r.decision == "converted"}
        # --quick times only the files under 1 MB (the ratio, not the total, is the result).
        small = {n for n, r in converted.items() if not quick or r.bytes_in < MB}
        jpegs = sorted(n for n, r in converted.items() if r.kind == "jpeg" and n in small)
        videos = sorted(n for n, r in converted.items() if r.kind == "video" and n in small)
        speeds = jpeg_speed(jpegs, base.jpeg.effort, reps, tmp)
        speeds += video_speed(videos, config.video, reps, tmp)
        parts.append(speed_table(speeds, reps))
        scores = {n: ssim(Path(converted[n].output or ""), CORPUS / n) for n in videos}
        parts.append(
            "Video quality, SSIM of each converted corpus video against its source: "
            + ", ".join(f"{Path(n).stem} {s:.3f}" for n, s in scores.items())
            + f" (median {median(scores.values()):.3f})."
        )

        log("peak memory")
        big = tmp / "48mp.jpg"
        make_48mp_jpeg(big)
        memory = [("48 MP JPEG (8000×6000, q92) → lossless JPEG XL", worker_peak(big, tmp, preset))]
        lengths = (5,) if quick else (5, 60)
        for seconds in lengths:
            clip = tmp / f"clip-{seconds}s.mp4"
            log(f"  {seconds} s 1080p clip")
            make_1080p_clip(clip, seconds)
            label = f"1080p30 H.264 {seconds} s → HEVC (CRF {base.video.crf}, preset {preset})"
            memory.append((label, worker_peak(clip, tmp, preset)))
        parts.append(memory_table(memory))
    parts.append(
        f"Run took {time.monotonic() - started:.0f} s; load average at the end "
        f"{os.getloadavg()[0]:.2f}."
    )
    print("\n\n".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
