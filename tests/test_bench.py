"""The benchmark still works: `python bench/run.py --quick` runs every section and prints its table.

No timing assertions: speed lives in bench/; this only proves the benchmark runs — real
sftpgate and sshd processes, real clients, the stand-in Immich — and prints what it measured.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"
NEEDED = ("sftp", "rclone", "/usr/sbin/sshd")


@pytest.mark.timeout(600)  # bench/codecs.py --quick alone can take ~3 min on a busy box
def test_quick_benchmark_prints_one_table_per_section(tmp_path: Path) -> None:
    missing = [tool for tool in NEEDED if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (.ci/run installs them)")
    if not (CORPUS / "MANIFEST.tsv").is_file():
        pytest.skip(f"media corpus not found at {CORPUS}")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--results", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=580,
        cwd=ROOT,
    )
    out = proc.stdout
    assert proc.returncode == 0, f"{out[-3000:]}\n{proc.stderr[-3000:]}"
    header = next(line for line in out.splitlines() if line.startswith("Machine:"))
    for word in ("CPUs", "RAM", "Python", "asyncssh", "OpenSSH", "rclone", "load average"):
        assert word in header, header
    for title in (
        "## Ingest",
        "## Pipeline",
        "## Memory",
        "## What Immich stores",
        "## Does the SSH",
    ):
        assert title in out, out[-3000:]
    sections = [s for s in out.split("\n## ")[1:] if not s.startswith("Conversion")]
    for section in sections:
        rows = [line for line in section.splitlines() if line.startswith("|")]
        assert len(rows) >= 3, section  # header, separator and at least one row
        assert "fail" not in "\n".join(rows), section
    # Ingest: every client against both servers, idle.
    ingest = next(s for s in sections if s.startswith("Ingest"))
    for client in ("| sftp |", "| paramiko |", "| rclone |"):
        assert client in ingest
    # … several clients at once against each of them …
    for client in (
        "| rclone --transfers 4 |",
        "| 2 × sftp |",
        "| 2 × sftp -f |",
        "| 4 × paramiko |",
    ):
        assert client in ingest
    # … and against the stock asyncssh server, the ceiling of one event loop.
    assert "| stock asyncssh MB/s |" in ingest
    # Immich's copies: the measured video, a totals row, and the choice that stores fewer bytes.
    immich = next(s for s in sections if s.startswith("What Immich stores"))
    assert "| **total** |" in immich
    assert "Fewer bytes in total" in immich or "Both choices store the same bytes" in immich
    assert (tmp_path / "latest.md").read_text().count("\n## ") >= 4
