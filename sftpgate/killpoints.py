"""Kill points: the crash tests stop a real `sftpgate serve` with SIGKILL at one named step.

`SFTPGATE_KILL_AT=<step>:<before|after>` (e.g. `confirm_asset:after`) makes the process kill
itself the first time it reaches that point; `<step>:<when>:<n>` waits for the n-th time. The
ledger puts a point on both sides of every commit (`ledger.py`), the pipeline and intake on the
file-system actions between commits. Unset, as in every real deployment, `kill_point` is one
comparison with None and does nothing.
"""

from __future__ import annotations

import os
import signal
import threading

_WANTED = os.environ.get("SFTPGATE_KILL_AT") or None
_lock = threading.Lock()
_seen: dict[str, int] = {}


def _parse(wanted: str) -> tuple[str, int]:
    step, when, *count = wanted.split(":")
    return f"{step}:{when}", int(count[0]) if count else 1


def kill_point(name: str) -> None:
    if _WANTED is None:
        return
    point, times = _parse(_WANTED)
    if name != point:
        return
    with _lock:
        _seen[name] = _seen.get(name, 0) + 1
        if _seen[name] == times:
            os.kill(os.getpid(), signal.SIGKILL)
