"""The long crash soak: the CI crash test, but with 500 SIGKILLs and more photos.

    python bench/soak.py [--kills 500] [--files 400]

It runs tests/test_crash.py with larger numbers and prints one table row: kills, photos, time,
and the verdict (every photo in Immich exactly once, nothing left behind). Everything runs on
127.0.0.1, and the test only ever kills the sftpgate process it started itself.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=500)
    parser.add_argument("--files", type=int, default=400)
    args = parser.parse_args()
    env = {
        **os.environ,
        "SFTPGATE_CRASH_KILLS": str(args.kills),
        "SFTPGATE_CRASH_FILES": str(args.files),
    }
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_crash.py"],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    seconds = time.monotonic() - started
    verdict = "every photo exactly once" if result.returncode == 0 else "FAILED"
    print("| kills | photos | minutes | result |\n|---:|---:|---:|---|")
    print(f"| {args.kills} | {args.files} | {seconds / 60:.1f} | {verdict} |")
    if result.returncode != 0:
        print(result.stdout[-4000:], result.stderr[-2000:], sep="\n")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
