"""The benchmark, one command: `python bench/run.py [--quick] [--only SECTION] [--profile]
[--multi-only] [--single-only]`.

Sections: ingest (bench/ingest.py), codecs (bench/codecs.py, when present), pipeline
(bench/pipeline.py), memory (bench/memory.py), immich (bench/immich_copies.py), gil (bench/gil.py); `profile` (py-spy on the server during the big
upload) runs with --profile or --only profile. Prints one header line (machine, versions, date,
load) and ONE markdown table per section, and writes the same to bench/results/latest.md (raw
samples: latest.json). --multi-only limits the ingest section to its several-streams-at-once
rows (idle and busy), --single-only to its single-stream idle rows. --quick (CI) uses small data and one
repetition and finishes in about a minute; the full run takes about an hour on 2 cores. Everything runs on 127.0.0.1; every process
the benchmark starts is stopped by its PID, and its temp folder is removed.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH, PY, ROOT, Bench, Section, loadavg, machine_header, write_json

SECTIONS = ("ingest", "codecs", "pipeline", "memory", "immich", "gil", "profile")
DEFAULT = ("ingest", "codecs", "pipeline", "memory", "immich", "gil")


def codecs_section(bench: Bench) -> Section:
    """bench/codecs.py (written separately) as one section: its own output, verbatim."""
    script = BENCH / "codecs.py"
    argv = [PY, str(script), *(["--quick"] if bench.quick else [])]
    timeout = 90 if bench.quick else 4 * 3600
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"bench/codecs.py exited {p.returncode}: {p.stderr.strip()[-800:]}")
    return Section(
        "codecs", "Conversion: sftpgate's worker vs cjxl and ffmpeg", [], [], text=p.stdout
    )


def gil_section(bench: Bench) -> Section:
    """bench/gil.py as one section: its own output, verbatim (it starts no process of its own, so
    it runs as a child to keep its switch-interval changes and threads out of this process)."""
    argv = [PY, str(BENCH / "gil.py"), *(["--quick"] if bench.quick else [])]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=120 if bench.quick else 900)
    if p.returncode != 0:
        raise RuntimeError(f"bench/gil.py exited {p.returncode}: {p.stderr.strip()[-800:]}")
    return Section("gil", "Does the SSH crypto release the GIL?", [], [], text=p.stdout)


def _runner(name: str) -> Callable[[Bench], Section]:
    if name == "ingest":
        import ingest

        return ingest.run
    if name == "profile":
        import ingest

        return ingest.profile
    if name == "pipeline":
        import pipeline

        return pipeline.run
    if name == "memory":
        import memory

        return memory.run
    if name == "immich":
        import immich_copies

        return immich_copies.run
    if name == "codecs":
        return codecs_section
    if name == "gil":
        return gil_section
    raise ValueError(name)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="sftpgate benchmark")
    parser.add_argument("--quick", action="store_true", help="small data, 1 rep (CI, < 2 min)")
    parser.add_argument(
        "--only", action="append", choices=SECTIONS, help="run only this section (repeatable)"
    )
    parser.add_argument("--profile", action="store_true", help="also profile with py-spy")
    parser.add_argument(
        "--multi-only", action="store_true", help="ingest: only the several-streams-at-once rows"
    )
    parser.add_argument(
        "--single-only", action="store_true", help="ingest: only the single-stream rows, idle"
    )
    parser.add_argument("--reps", type=int, help="repetitions (default 3, --quick 1)")
    parser.add_argument(
        "--results", type=Path, default=BENCH / "results", help="where latest.md goes"
    )
    args = parser.parse_args(argv)
    names = list(args.only or DEFAULT)
    if args.profile and "profile" not in names:
        names.append("profile")
    if "codecs" in names and not (BENCH / "codecs.py").exists():
        names.remove("codecs")
    reps = args.reps or (1 if args.quick else 3)

    signal.signal(signal.SIGTERM, _terminate)
    tmp = Path(tempfile.mkdtemp(prefix="sftpgate-bench-"))
    bench = Bench(
        quick=args.quick,
        reps=reps,
        tmp=tmp,
        results=args.results,
        multi_only=args.multi_only,
        single_only=args.single_only,
    )
    started = time.monotonic()
    header = machine_header()
    mode = (
        "--quick (small data, 1 rep: proves the benchmark works, not the speed)"
        if args.quick
        else f"full, {reps} reps"
    )
    head = f"# sftpgate benchmark\n\n{header} · mode: {mode}\n"
    print(head, flush=True)
    parts = [head]
    failed: list[str] = []
    try:
        for name in names:
            t0 = time.monotonic()
            bench.log(f"section {name} …")
            try:
                section = _runner(name)(bench)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # one broken section must not hide the others
                failed.append(name)
                section = Section(
                    name, f"{name}: FAILED", [], [], text=f"{type(exc).__name__}: {exc}"
                )
            finally:
                bench.stop_all()
            section.notes.append(f"Section time {time.monotonic() - t0:.0f} s.")
            text = section.markdown()
            print(text, flush=True)
            parts.append(text)
    except KeyboardInterrupt:
        bench.log("interrupted: stopping what the benchmark started")
        return 130
    finally:
        bench.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
        tail = f"Total time {time.monotonic() - started:.0f} s; load average at end {loadavg()}.\n"
        print(tail, flush=True)
        parts.append(tail)
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / "latest.md").write_text("\n".join(parts))
        write_json(args.results / "latest.json", {"header": header, "raw": bench.raw})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
