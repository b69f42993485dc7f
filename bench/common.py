"""Shared helpers for the benchmark: processes it starts (and stops by PID), /proc accounting,
test data, the machine header and markdown tables.

Everything runs on 127.0.0.1. Every process the benchmark starts is registered in `Bench.procs`
and stopped by its own PID when the section (or the whole run) ends, also on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
CORPUS = ROOT.parent / "shared" / "corpus"
PY = sys.executable
SSHD = "/usr/sbin/sshd"
API_KEY = "bench-api-key-0123456789"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MB = 1_000_000
GB = 1_000_000_000
MIB = 1 << 20

if str(ROOT) not in sys.path:  # `python bench/run.py` from anywhere finds sftpgate
    sys.path.insert(0, str(ROOT))


class BenchError(Exception):
    """A measurement could not be taken (a process did not start, a client failed)."""


# -- the run's context ------------------------------------------------------------------------


@dataclass
class Bench:
    quick: bool
    reps: int
    tmp: Path
    results: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    # Ingest: only the several-streams-at-once rows (run.py --multi-only), idle and busy, to
    # re-measure them without the single-stream rows.
    multi_only: bool = False
    # Ingest: only the single-stream rows, idle (run.py --single-only): no feeder converting,
    # no several-streams rows.
    single_only: bool = False
    _client_key: Path | None = None
    _host_keys: Path | None = None

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    def mkdtemp(self, name: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.tmp))

    @property
    def client_key(self) -> Path:
        """One ed25519 client key (OpenSSH format) for every client and both servers."""
        if self._client_key is None:
            import asyncssh

            path = self.tmp / "client-key" / "id_ed25519"
            path.parent.mkdir()
            key = asyncssh.generate_private_key("ssh-ed25519", comment="bench")
            path.write_bytes(key.export_private_key())
            path.chmod(0o600)
            path.with_suffix(".pub").write_bytes(key.export_public_key())
            self._client_key = path
        return self._client_key

    @property
    def host_keys(self) -> Path:
        """sftpgate's host key folder, shared by every instance of this run (RSA is slow to make)."""
        if self._host_keys is None:
            self._host_keys = self.tmp / "host-keys"
            self._host_keys.mkdir()
        return self._host_keys

    def start(self, argv: Sequence[str], log: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = subprocess.Popen(
                list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kwargs
            )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        """Stop one process this run started, by its PID: signal, wait, then SIGKILL."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(reversed(self.procs)):
            self.stop(proc)


# -- /proc ------------------------------------------------------------------------------------


def proc_stat(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()  # fields from 3 (state) on


def cpu_seconds(pid: int, children: bool = True) -> float:
    """utime+stime of the process (all its threads), plus its reaped children's (cutime+cstime)."""
    f = proc_stat(pid)
    ticks = int(f[11]) + int(f[12])  # utime, stime (fields 14, 15)
    if children:
        ticks += int(f[13]) + int(f[14])  # cutime, cstime (fields 16, 17)
    return ticks / CLK_TCK


def child_pids(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out += [int(p) for p in (task / "children").read_text().split()]
    return out


def rss_bytes(pid: int, key: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def wait_children_gone(pid: int, timeout: float = 10.0) -> None:
    """sshd reaps its per-connection processes shortly after the client leaves; their CPU time
    only reaches the listener's cutime/cstime then."""
    deadline = time.monotonic() + timeout
    while child_pids(pid) and time.monotonic() < deadline:
        time.sleep(0.02)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent on anything but idle and I/O wait since boot (/proc/stat):
    the whole machine's work, whichever process did it."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[:7])
    return (user + nice + system + irq + softirq) / CLK_TCK


# -- small utilities ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"process exited with {proc.returncode}: {tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise BenchError(f"nothing listens on port {port} after {timeout} s: {tail(log)}")


def tail(path: Path, n: int = 1500) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-n:]
    return ""


def http_json(url: str, body: object | None = None, timeout: float = 5.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def http_text(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return str(r.read().decode())


def poll(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def median(values: Iterable[float]) -> float:
    vals = [v for v in values if v == v]  # drop NaN (failed runs)
    return statistics.median(vals) if vals else float("nan")


def fmt(value: float, digits: int = 0) -> str:
    if value != value:  # NaN
        return "fail"
    return f"{value:,.{digits}f}"


def ratio(a: float, b: float) -> str:
    if a != a or b != b or b == 0:  # NaN: not measured or failed
        return "—"
    return f"{a / b:.2f}×"


def spread(values: Sequence[float], digits: int = 0) -> str:
    vals = [v for v in values if v == v]
    if len(vals) < 2:
        return ""
    return f" ({fmt(min(vals), digits)}–{fmt(max(vals), digits)})"


def cell(values: Sequence[float], digits: int = 0, spread_too: bool = True) -> str:
    """A table cell: median (min–max); "—" when not measured, "fail" when every run failed."""
    if not values:
        return "—"
    return fmt(median(values), digits) + (spread(values, digits) if spread_too else "")


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Section:
    """One section's output: a title, ONE markdown table, and short notes under it."""

    name: str
    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    text: str | None = None  # a section printed by another tool (codecs.py), verbatim

    def markdown(self) -> str:
        parts = [f"## {self.title}", ""]
        if self.text is not None:
            parts.append(self.text.strip())
        else:
            parts.append(table(self.header, self.rows))
        if self.notes:
            parts.append("")
            parts += [f"- {n}" for n in self.notes]
        return "\n".join(parts) + "\n"


# -- machine and versions ----------------------------------------------------------------------


def _version(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    text = (p.stdout or p.stderr).strip().splitlines()
    return text[0] if text else "?"


def machine_header() -> str:
    import asyncssh

    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    ssh = _version(["ssh", "-V"]).split(",")[0]
    rclone = _version(["rclone", "version"])
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"Machine: {os.cpu_count()} CPUs ({model}), {mem_kb / 1024**2:.1f} GiB RAM, "
        f"{platform.system()} {platform.release()} · Python {platform.python_version()} · "
        f"asyncssh {asyncssh.__version__} · {ssh} · {rclone} · {date} · "
        f"load average at start {loadavg()}"
    )


# -- test data ----------------------------------------------------------------------------------


def random_file(path: Path, size: int, seed: int) -> None:
    """Incompressible bytes, written once (the page cache then serves every client)."""
    rng = random.Random(seed)
    block = 4 * MIB
    with path.open("wb") as f:
        left = size
        while left > 0:
            n = min(block, left)
            f.write(rng.randbytes(n))
            left -= n


def distinct_jpeg(data: bytes, n: int) -> bytes:
    """The same photo with a COM segment naming it: a different SHA-1, still a valid JPEG
    (as tests/test_crash.py does), so the ledger's dedupe does not skip it."""
    comment = f"sftpgate bench photo {n}".encode()
    return data[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + data[2:]


def distinct_mp4(data: bytes, n: int) -> bytes:
    """The same video with a trailing ISO-BMFF `free` box: a different SHA-1, still valid."""
    payload = f"sftpgate bench video {n}".encode()
    return data + (len(payload) + 8).to_bytes(4, "big") + b"free" + payload


# -- the processes under test -------------------------------------------------------------------


class Standin:
    """`python -m sftpgate.immich.standin` as a process (assets kept in memory, bytes dropped)."""

    def __init__(self, bench: Bench, name: str = "standin") -> None:
        self.bench = bench
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = bench.tmp / f"{name}-{self.port}.log"
        self.proc = bench.start(
            [PY, "-m", "sftpgate.immich.standin", "--port", str(self.port), "--api-key", API_KEY],
            self.log,
            cwd=ROOT,
        )
        wait_port(self.port, self.proc, self.log)

    def counters(self) -> dict[str, int]:
        return dict(http_json(f"{self.url}/_standin/state")["counters"])

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def assets(self) -> list[dict[str, Any]]:
        return list(http_json(f"{self.url}/_standin/assets", timeout=30))

    def stop(self) -> None:
        self.bench.stop(self.proc)


class Gate:
    """`python -m sftpgate.main --config X serve` as a process, from a temp config."""

    def __init__(
        self,
        bench: Bench,
        immich_url: str,
        name: str = "gate",
        data_dir: Path | None = None,
        extra_users: Sequence[dict[str, Any]] = (),
        **sections: dict[str, Any],
    ) -> None:
        import yaml

        self.bench = bench
        self.dir = bench.mkdtemp(name)
        self.data = data_dir or self.dir / "data"
        self.port, self.metrics_port = free_port(), free_port()
        pub = bench.client_key.with_suffix(".pub").read_text().strip()
        doc: dict[str, Any] = {
            "data_dir": str(self.data),
            "timezone": "UTC",
            "immich": {"url": immich_url, "api_key": API_KEY},
            "sftp": {
                "listen": f"127.0.0.1:{self.port}",
                "host_keys_dir": str(bench.host_keys),
                "users": [{"name": "phone", "authorized_keys": [pub]}, *extra_users],
            },
            "metrics": {"listen": f"127.0.0.1:{self.metrics_port}"},
            "optimize": {"workers": 2},
            "watch": {"settle_seconds": 1, "scan_interval_seconds": 0.5},
            "retry": {"ping_interval_seconds": 1},
        }
        for key, values in sections.items():
            doc.setdefault(key, {}).update(values)
        self.config = self.dir / "config.yaml"
        self.config.write_text(yaml.safe_dump(doc))
        self.log = self.dir / "service.log"
        self.proc = bench.start(
            [PY, "-m", "sftpgate.main", "--config", str(self.config), "serve"], self.log, cwd=ROOT
        )

        def healthy() -> bool:
            if self.proc.poll() is not None:
                raise BenchError(f"sftpgate exited with {self.proc.returncode}: {tail(self.log)}")
            try:
                http_text(f"http://127.0.0.1:{self.metrics_port}/healthz", timeout=1)
                return True
            except (urllib.error.URLError, OSError):
                return False

        poll(healthy, 90, "sftpgate to start")

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def watch(self) -> Path:
        return self.data / "watch"

    def user_root(self, user: str = "phone") -> Path:
        return self.watch / user

    def cpu(self) -> float:
        """The service's own CPU (every thread), its connection processes' (`sftp.processes`)
        and reaped children's; live codec workers not."""
        return cpu_seconds(self.pid) + sum(
            cpu_seconds(pid, children=False) for pid in self._children(b"sftpgate.sftp.processes")
        )

    def workers(self) -> list[int]:
        return self._children(b"multiprocessing", but_not=b"resource_tracker")

    def _children(self, marker: bytes, but_not: bytes | None = None) -> list[int]:
        """The live child processes whose command line has `marker` (and not `but_not`)."""
        pids = []
        for pid in child_pids(self.pid):
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                if marker in cmd and (but_not is None or but_not not in cmd):
                    pids.append(pid)
        return pids

    def workers_cpu(self) -> float:
        total = 0.0
        for pid in self.workers():
            with contextlib.suppress(OSError):
                total += cpu_seconds(pid, children=False)
        return total

    def ledger(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        db = sqlite3.connect(f"file:{self.data / 'sftpgate.db'}?mode=ro", uri=True, timeout=10)
        try:
            return list(db.execute(sql, tuple(args)))
        finally:
            db.close()

    def metric(self, name: str) -> float:
        text = http_text(f"http://127.0.0.1:{self.metrics_port}/metrics")
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and (line[len(name)] in " {"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> None:
        self.bench.stop(self.proc)


class Sshd:
    """OpenSSH's sshd with internal-sftp on 127.0.0.1, with its own config (not the system's)."""

    def __init__(self, bench: Bench) -> None:
        import asyncssh

        if not Path(SSHD).exists():
            raise BenchError(f"{SSHD} is not installed (apt-get install openssh-server)")
        self.bench = bench
        self.dir = bench.mkdtemp("sshd")
        self.root = self.dir / "root"
        self.root.mkdir()
        self.port = free_port()
        self.user = os.environ.get("USER") or __import__("getpass").getuser()
        host_key = self.dir / "ssh_host_ed25519_key"
        key = asyncssh.generate_private_key("ssh-ed25519")
        host_key.write_bytes(key.export_private_key())
        host_key.chmod(0o600)
        auth = self.dir / "authorized_keys"
        shutil.copy(bench.client_key.with_suffix(".pub"), auth)
        conf = self.dir / "sshd_config"
        conf.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nPidFile none\n"
            f"AuthorizedKeysFile {auth}\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            "PermitRootLogin prohibit-password\nAllowTcpForwarding no\nX11Forwarding no\n"
            "PermitTTY no\nMaxStartups 100\nMaxSessions 100\n"
            # DEBUG1 only so that the negotiated cipher shows up in the log (notes §1).
            "LogLevel DEBUG1\nSubsystem sftp internal-sftp\n"
            f"ForceCommand internal-sftp -d {self.root}\n"
        )
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        self.log = self.dir / "sshd.log"
        self.proc = bench.start([SSHD, "-D", "-e", "-f", str(conf)], self.log)
        wait_port(self.port, self.proc, self.log)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        """The listener plus every per-connection process it reaped (transport, internal-sftp)."""
        wait_children_gone(self.pid)
        return cpu_seconds(self.pid)

    def last_cipher(self) -> str:
        lines = [
            line for line in tail(self.log, 20000).splitlines() if "client->server cipher" in line
        ]
        if not lines:
            return "?"
        return lines[-1].split("cipher:", 1)[1].split()[0]

    def stop(self) -> None:
        self.bench.stop(self.proc)


def write_json(path: Path, doc: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=str))
