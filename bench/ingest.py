"""Ingest: sftpgate vs OpenSSH sshd (internal-sftp), same clients, same ciphers, side by side.

A third server runs the idle rows only: stock asyncssh (`asyncssh.SFTPServer` writing straight
into a folder: no hashing, no fsync, no ledger) with sftpgate's SSH settings and protocol layer
(sftpgate/sftp/protocol.py: without it rclone cannot upload), on uvloop. It is the ceiling of one
Python event loop running asyncssh on this machine, measured in the same minutes: how far
sftpgate is from it is sftpgate's own cost; how far it is from OpenSSH is asyncssh's.

Data sets: one big file (1 GiB; --quick: 48 MiB) and many photo-sized files (200 × 5 MiB;
--quick: 12 × 5 MiB) of random bytes, written once to a temp dir. Clients: OpenSSH `sftp -b`,
rclone (`:sftp:` remote on the command line; `--transfers 1` in the single-stream rows, since by
default it copies four files at once, each over a connection of its own), paramiko (in its own
process; it times connect → close itself). The cipher is forced on the client side; paramiko has
no chacha20-poly1305 and rclone 1.60 cannot be told a cipher (it picks aes128-gcm), so those pairs
are not run.

Per run: MB/s (10^6 payload bytes per second) and server CPU seconds per GB (utime+stime of the
server process, all threads, plus reaped children: for sshd the per-connection transport and
internal-sftp processes; for sftpgate its codec workers are *not* included). Runs are interleaved
rep → mode → data set → client/cipher → server (the server order alternates per rep), every
upload is checked (count and bytes) and deleted afterwards.

`sftp -f` is OpenSSH's client asking for fsync@openssh.com after each file: sshd then flushes
every upload to disk as sftpgate always does (sftpgate answers a CLOSE only once the file is
durable), so that row compares the two at the same durability.

Modes: "idle" (random bytes are "unknown" files: they go to undone/ at once) and "busy": a feeder
keeps ~8 distinct corpus JPEGs waiting in watch/feeder/ (a second user) so both codec workers
convert all the time, for the sftpgate *and* the OpenSSH runs.

Several streams at once (idle and busy): households sync several phones at once
and rclone opens four connections by default; OpenSSH gives each connection processes of its own,
sftpgate serves them all from one Python process. The photo set goes up as rclone --transfers 4,
two `sftp` clients (with and without -f) and four paramiko clients at once, each with its share
of the files; MB/s is all bytes over the wall time from the first client's start to the last
one's end. `--multi-only` (here or in bench/run.py) runs only these rows.

A fourth server runs the idle rows and the busy several-streams rows: the same sftpgate with
`sftp.processes: 2`, its connections served by two child processes (their CPU is counted with the
service's); busy, it shares the machine with the first sftpgate's converting workers, as OpenSSH
does. `--single-only` runs only the single-stream idle rows.

Run alone: `python bench/ingest.py [--quick] [--multi-only | --single-only]`. `python bench/ingest.py
--paramiko-client JSON` is the paramiko client process the benchmark starts, `--asyncssh-server
JSON` the stock asyncssh server.
"""

from __future__ import annotations

import json
import linecache
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    CORPUS,
    GB,
    MB,
    MIB,
    PY,
    ROOT,
    Bench,
    BenchError,
    Gate,
    Section,
    Sshd,
    Standin,
    cell,
    cpu_seconds,
    distinct_jpeg,
    free_port,
    loadavg,
    median,
    poll,
    random_file,
    ratio,
    wait_port,
)

CIPHERS = {"chacha20": "chacha20-poly1305@openssh.com", "aes128-gcm": "aes128-gcm@openssh.com"}
# (client, cipher) pairs; paramiko has no chacha20, rclone 1.60 has no cipher option.
COMBOS = [
    ("sftp", "chacha20"),
    ("sftp", "aes128-gcm"),
    ("sftp -f", "aes128-gcm"),
    ("paramiko", "aes128-gcm"),
    ("rclone", "aes128-gcm"),
]
# What run_client runs for a single-stream row's client: rclone copies `--transfers` files at once,
# each over its own SSH connection (4 by default), so one stream is one transfer.
ONE_STREAM = {"rclone": "rclone --transfers 1"}
# Several streams at once: (row label, client as run_client knows it, client processes at once).
# rclone is one process that opens one connection per transfer (4 is also its default).
MULTI = [
    ("rclone --transfers 4", "rclone --transfers 4", 1),
    ("2 × sftp", "sftp", 2),
    ("2 × sftp -f", "sftp -f", 2),
    ("4 × paramiko", "paramiko", 4),
]
MULTI_CIPHER = "aes128-gcm"  # the one cipher every client has (rclone picks it itself)
# The sftpgate variant with its connections in child processes: one per core of this machine.
PROCESSES = 2
PROCS = f"sftpgate-p{PROCESSES}"  # its name in the samples
PROCS_LABEL = f"× {PROCESSES} processes"  # in the table
FEED_SOURCES = [
    "jpeg/apple-iphone6s-livephoto.jpg",
    "jpeg/apple-iphone5-orient3-gps.jpg",
    "jpeg/hmd-nokia8.3-gps.jpg",
    "jpeg/canon-a85-orient8.jpg",
    "jpeg/samsung-sm-j327t1-orient6.jpg",
]


@dataclass
class Dataset:
    name: str
    label: str
    files: list[Path]
    src: Path  # the file (big) or the folder (photos)

    @property
    def bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    @property
    def is_dir(self) -> bool:
        return self.src.is_dir()


def make_datasets(bench: Bench, photos_too: bool = True, big_too: bool = True) -> list[Dataset]:
    d = bench.mkdtemp("data")
    big_size = 32 * MIB if bench.quick else 1024 * MIB
    n_photos = 8 if bench.quick else 200
    out = []
    if big_too:
        big = d / "big.bin"
        random_file(big, big_size, seed=1)
        out.append(Dataset("big", f"1 × {big_size // MIB} MiB", [big], big))
    if not photos_too:
        return out
    photos = d / "photos"
    photos.mkdir()
    files = []
    for i in range(n_photos):
        p = photos / f"IMG_{i:04d}.jpg"  # random bytes under a photo's name
        random_file(p, 5 * MIB, seed=100 + i)
        files.append(p)
    return [*out, Dataset("photos", f"{n_photos} × 5 MiB", files, photos)]


def shares(ds: Dataset, n: int) -> list[Dataset]:
    """`ds` dealt out to `n` clients, each share a folder of hard links (`sftp -b` puts a whole
    folder; links keep the bytes in the page cache once); made once per (data set, n)."""
    if n == 1:
        return [ds]
    parts = []
    for i in range(n):
        folder = ds.src.parent / f"{ds.name}-{n}way" / f"part{i}"
        files = ds.files[i::n]
        if not folder.exists():
            folder.mkdir(parents=True)
            for f in files:
                os.link(f, folder / f.name)
        linked = [folder / f.name for f in files]
        parts.append(Dataset(f"{ds.name}-{n}way-{i}", ds.label, linked, folder))
    return parts


# -- the two servers, seen the same way -----------------------------------------------------------


class Target:
    name: str
    port: int
    user: str

    def prepare(self, dest: str) -> None:
        raise NotImplementedError

    def cpu(self) -> float:
        raise NotImplementedError

    def verify_and_clean(self, dest: str, ds: Dataset) -> None:
        raise NotImplementedError


class GateTarget(Target):
    def __init__(self, gate: Gate, name: str = "sftpgate") -> None:
        self.name = name
        self.gate = gate
        self.port = gate.port
        self.user = "phone"
        self.pending: list[str] = []  # uploads to delete once the pipeline has finished them

    def prepare(self, dest: str) -> None:
        (self.gate.user_root() / dest).mkdir()

    def cpu(self) -> float:
        return self.gate.cpu()

    def verify_and_clean(self, dest: str, ds: Dataset) -> None:
        """Check the ledger recorded every file; delete them once the pipeline is done with them
        (now when it is idle; in the busy mode they queue behind the feeder's JPEGs: later)."""
        n = len(ds.files)

        def landed() -> tuple[int, int] | None:
            count, size = self.gate.ledger(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM originals"
                " WHERE user = 'phone' AND path LIKE ?",
                (f"{dest}/%",),
            )[0]
            return (count, size) if count >= n else None

        count, size = poll(landed, 60, f"{dest} to land in sftpgate's ledger")
        self.pending.append(dest)
        if count != n or size != ds.bytes:
            raise BenchError(f"sftpgate got {count} files / {size} bytes, sent {n} / {ds.bytes}")

    def clean(self, wait: bool) -> None:
        """Delete finished uploads (all of them when `wait`: the pipeline must be idle)."""
        for dest in list(self.pending):

            def final(d: str = dest) -> bool:
                rows = self.gate.ledger(
                    "SELECT COUNT(*) FROM originals WHERE user = 'phone' AND path LIKE ?"
                    " AND state NOT IN ('done', 'undone')",
                    (f"{d}/%",),
                )
                return rows[0][0] == 0

            if wait:
                poll(final, 120, f"{dest} to leave sftpgate's pipeline")
            elif not final():
                continue
            for d in (self.gate.user_root() / dest, self.gate.watch / "undone" / "phone" / dest):
                shutil.rmtree(d, ignore_errors=True)
            self.pending.remove(dest)


class SshdTarget(Target):
    name = "OpenSSH"

    def __init__(self, sshd: Sshd) -> None:
        self.sshd = sshd
        self.port = sshd.port
        self.user = sshd.user

    def prepare(self, dest: str) -> None:
        (self.sshd.root / dest).mkdir()

    def cpu(self) -> float:
        return self.sshd.cpu()

    def verify_and_clean(self, dest: str, ds: Dataset) -> None:
        check_and_remove(self.sshd.root / dest, ds, "sshd")


def check_and_remove(folder: Path, ds: Dataset, server: str) -> None:
    """An upload into a plain folder: every file and byte arrived; then delete it."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    shutil.rmtree(folder, ignore_errors=True)
    if len(files) != len(ds.files) or size != ds.bytes:
        raise BenchError(f"{server} got {len(files)} files / {size} bytes, sent {ds.bytes}")


class AsyncsshTarget(Target):
    """The stock asyncssh server (module doc), a process of its own; idle rows only."""

    name = "asyncssh"

    def __init__(self, bench: Bench) -> None:
        import asyncssh

        self.bench = bench
        self.dir = bench.mkdtemp("asyncssh")
        self.root = self.dir / "root"
        self.root.mkdir()
        self.port = free_port()
        self.user = "phone"
        host_key = self.dir / "ssh_host_ed25519_key"
        host_key.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key())
        spec = {
            "port": self.port,
            "root": str(self.root),
            "host_key": str(host_key),
            "authorized_keys": str(bench.client_key.with_suffix(".pub")),
        }
        log = self.dir / "server.log"
        self.proc = bench.start([PY, __file__, "--asyncssh-server", json.dumps(spec)], log)
        wait_port(self.port, self.proc, log)

    def prepare(self, dest: str) -> None:
        (self.root / dest).mkdir()

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def verify_and_clean(self, dest: str, ds: Dataset) -> None:
        check_and_remove(self.root / dest, ds, "asyncssh")

    def stop(self) -> None:
        self.bench.stop(self.proc)


def asyncssh_server(spec: dict[str, Any]) -> None:
    """The stock asyncssh server process: serve `root` until stopped."""
    import asyncio

    import asyncssh
    import uvloop

    sys.path.insert(0, str(ROOT))
    from sftpgate.config import SftpConfig
    from sftpgate.sftp import protocol

    protocol.install(SftpConfig().max_write_bytes)
    root = spec["root"].encode()

    async def serve() -> None:
        await asyncssh.listen(
            "127.0.0.1",
            spec["port"],
            server_host_keys=[spec["host_key"]],
            authorized_client_keys=spec["authorized_keys"],
            sftp_factory=lambda chan: asyncssh.SFTPServer(chan, chroot=root),
            allow_scp=False,
            max_pktsize=256 * 1024,  # sftpgate's SSH settings (sftpgate/sftp/server.py)
            window=8 * 1024 * 1024,
        )
        await asyncio.Event().wait()

    uvloop.run(serve())


# -- the clients ------------------------------------------------------------------------------------


Span = tuple[float, float]  # time.monotonic() at a client's start and end


def run_client(
    bench: Bench, client: str, cipher: str, target: Target, ds: Dataset, dest: str
) -> Span:
    """Upload `ds` into `dest`; return when the upload started and ended (see module doc).
    `client` is "sftp", "sftp -f", "paramiko" or "rclone" followed by rclone's own options."""
    key = str(bench.client_key)
    timeout = 120 + ds.bytes / (10 * MB)
    if client in ("sftp", "sftp -f"):
        batch = bench.tmp / f"batch-{ds.name}.txt"  # one per share: clients may run at once
        if ds.is_dir:
            batch.write_text(f"put {ds.src}/* {dest}/\n")
        else:
            batch.write_text(f"put {ds.src} {dest}/{ds.src.name}\n")
        argv = [
            "sftp", "-q", "-F", "/dev/null", "-b", str(batch), "-P", str(target.port),
            "-i", key, "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "-o", f"Ciphers={CIPHERS[cipher]}",
            *(["-f"] if client == "sftp -f" else []), f"{target.user}@127.0.0.1",
        ]  # fmt: skip
        return _timed(argv, timeout)
    if client.split()[0] == "rclone":
        conf = bench.tmp / "rclone.conf"
        conf.touch()
        verb, dst = ("copy", f":sftp:{dest}") if ds.is_dir else ("copyto", f":sftp:{dest}/big.bin")
        argv = [
            "rclone", verb, str(ds.src), dst, "--config", str(conf), "-q",
            "--retries", "1", "--low-level-retries", "1",
            "--sftp-host", "127.0.0.1", "--sftp-port", str(target.port),
            "--sftp-user", target.user, "--sftp-key-file", key,
            "--sftp-shell-type", "none", "--sftp-md5sum-command", "none",
            "--sftp-sha1sum-command", "none", "--sftp-disable-hashcheck",
            *client.split()[1:],
        ]  # fmt: skip
        return _timed(argv, timeout)
    if client == "paramiko":
        spec = {
            "port": target.port,
            "user": target.user,
            "key": key,
            "cipher": CIPHERS[cipher],
            "files": [[str(f), f"{dest}/{f.name}"] for f in ds.files],
        }
        p = subprocess.run(
            [PY, __file__, "--paramiko-client", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if p.returncode != 0:
            raise BenchError(f"paramiko failed: {p.stderr.strip()[-500:]}")
        out = json.loads(p.stdout)
        return float(out["started"]), float(out["ended"])
    raise ValueError(client)


def _timed(argv: list[str], timeout: float) -> Span:
    started = time.monotonic()
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    ended = time.monotonic()
    if p.returncode != 0:
        raise BenchError(
            f"{argv[0]} exited {p.returncode}: {(p.stderr or p.stdout).strip()[-500:]}"
        )
    return started, ended


def paramiko_client(spec: dict[str, Any]) -> None:
    """The paramiko client process: connect → put every file (confirm=True) → close."""
    import paramiko

    key = paramiko.Ed25519Key.from_private_key_file(spec["key"])
    # CLOCK_MONOTONIC is one clock for every process here: the parent compares the spans of
    # clients that ran at once.
    started = time.monotonic()
    sock = socket.create_connection(("127.0.0.1", spec["port"]))
    transport = paramiko.Transport(sock)
    transport.get_security_options().ciphers = (spec["cipher"],)
    transport.connect(username=spec["user"], pkey=key)
    sftp = paramiko.SFTPClient.from_transport(transport)
    assert sftp is not None
    for src, dst in spec["files"]:
        sftp.put(src, dst)
    cipher = transport.local_cipher
    sftp.close()
    transport.close()
    ended = time.monotonic()
    print(json.dumps({"started": started, "ended": ended, "cipher": cipher}))


# -- the busy mode's feeder --------------------------------------------------------------------------


class Feeder:
    """Keeps `pending` distinct JPEGs waiting in watch/feeder/ so both codec workers stay busy."""

    def __init__(self, gate: Gate, pending: int = 8) -> None:
        self.gate = gate
        self.pending = pending
        self.dir = gate.user_root("feeder")
        self.tmp = gate.dir / "feed-tmp"  # same file system: files appear by rename, whole
        self.tmp.mkdir(exist_ok=True)
        self.sources = [(CORPUS / s).read_bytes() for s in FEED_SOURCES]
        self.fed = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="feeder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            waiting = sum(1 for _ in os.scandir(self.dir))
            for _ in range(self.pending - waiting):
                n = self.fed
                data = distinct_jpeg(self.sources[n % len(self.sources)], n)
                tmp = self.tmp / f"IMG_{n:06d}.jpg"
                tmp.write_bytes(data)
                os.rename(tmp, self.dir / tmp.name)
                self.fed += 1
            self._stop.wait(0.1)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def stop_and_drain(self, timeout: float = 120) -> None:
        self.stop()

        def drained() -> bool:
            if any(os.scandir(self.dir)):
                return False
            rows = self.gate.ledger(
                "SELECT COUNT(*) FROM originals WHERE state IN"
                " ('received', 'queued', 'optimizing', 'uploading')"
            )
            return rows[0][0] == 0

        poll(drained, timeout, "the feeder's JPEGs to be delivered", interval=0.1)


# -- the run ------------------------------------------------------------------------------------------


@dataclass
class Sample:
    mbps: float
    cpu_per_gb: float
    workers_cores: float
    cipher_seen: str = ""


@dataclass
class Results:
    samples: dict[tuple[str, str, str, str, str], list[Sample]] = field(
        default_factory=lambda: defaultdict(list)
    )
    errors: list[str] = field(default_factory=list)

    def values(self, key: tuple[str, str, str, str, str], attr: str) -> list[float]:
        return [getattr(s, attr) for s in self.samples.get(key, [])]


def measure(
    bench: Bench,
    target: Target,
    gate: Gate,
    client: str,
    cipher: str,
    ds: Dataset,
    dest: str,
    streams: int = 1,
) -> Sample:
    """One run: `streams` clients at once, each uploading its share of `ds` into `dest`; MB/s
    is all bytes over the time from the first client's start to the last one's end."""
    target.prepare(dest)
    parts = shares(ds, streams)
    cpu0, wcpu0 = target.cpu(), gate.workers_cpu()
    started = time.perf_counter()
    with ThreadPoolExecutor(len(parts)) as pool:
        futures = [
            pool.submit(run_client, bench, client, cipher, target, part, dest) for part in parts
        ]
        spans = [f.result() for f in futures]
    wall = time.perf_counter() - started
    seconds = max(end for _, end in spans) - min(start for start, _ in spans)
    cpu = target.cpu() - cpu0
    workers = (gate.workers_cpu() - wcpu0) / wall
    seen = target.sshd.last_cipher() if isinstance(target, SshdTarget) else ""
    target.verify_and_clean(dest, ds)
    return Sample(ds.bytes / seconds / MB, cpu / (ds.bytes / GB), workers, seen)


def run(bench: Bench) -> Section:
    multi_only = bench.multi_only
    datasets = make_datasets(bench, big_too=not multi_only)
    photos = datasets[-1]
    standin = Standin(bench)
    gate = Gate(
        bench,
        standin.url,
        extra_users=[{"name": "feeder", "password": "feeder-password-not-used"}],
    )
    # sftpgate again with its connections in PROCESSES child processes (not in the busy
    # single-stream rows, to keep the section's time).
    gate_procs = Gate(bench, standin.url, name="gate-procs", sftp={"processes": PROCESSES})
    sshd = Sshd(bench)
    stock = AsyncsshTarget(bench)
    gate_target = GateTarget(gate)
    procs_target = GateTarget(gate_procs, PROCS)
    targets: list[Target] = [gate_target, SshdTarget(sshd), stock, procs_target]
    feeder = Feeder(gate)
    res = Results()
    gap = 0.0 if bench.quick else 3.0  # idle before each run (notes §1: page-cache effects)
    runs = 0

    def each_server(
        rep: int,
        mode: str,
        ds: Dataset,
        label: str,
        client: str,
        cipher: str,
        streams: int = 1,
        several: bool = False,
    ) -> None:
        """One upload into every server in turn (the order alternates per rep); `label` is the
        row's client column, `client` what run_client runs, `streams` how many client processes
        at once, `several` whether it is a several-streams row (rclone's is one process)."""
        nonlocal runs
        order = targets if rep % 2 == 0 else targets[::-1]
        for target in order:
            if mode == "busy" and (target is stock or (target is procs_target and not several)):
                continue
            runs += 1
            gate_target.clean(wait=mode == "idle")
            procs_target.clean(wait=True)
            time.sleep(gap)
            key = (mode, ds.name, label, cipher, target.name)
            try:
                s = measure(bench, target, gate, client, cipher, ds, f"r{runs:04d}", streams)
            except (BenchError, subprocess.TimeoutExpired) as exc:
                res.errors.append(f"{'/'.join(key)}: {exc}")
                bench.log(f"ingest {'/'.join(key)} FAILED: {exc}")
                s = Sample(float("nan"), float("nan"), float("nan"))
            res.samples[key].append(s)
            bench.log(
                f"ingest rep {rep + 1} {mode:4} {ds.name:6} {label:20} "
                f"{cipher:10} {target.name:8} {s.mbps:7.1f} MB/s "
                f"{s.cpu_per_gb:5.2f} CPU-s/GB workers {s.workers_cores:.2f}"
            )

    try:
        for rep in range(bench.reps):
            for mode in ("idle", "busy"):
                if bench.single_only and mode == "busy":
                    continue
                if mode == "busy":
                    fed_before = feeder.fed
                    feeder.start()
                    time.sleep(1.0 if bench.quick else 3.0)  # the first JPEGs reach the workers
                for ds in [] if multi_only else datasets:
                    for client, cipher in COMBOS:
                        if bench.quick and mode == "busy" and (client, cipher) != COMBOS[0]:
                            continue  # --quick: the busy mode is proven with one client
                        each_server(rep, mode, ds, client, ONE_STREAM.get(client, client), cipher)
                if not bench.single_only and not (bench.quick and mode == "busy"):
                    for label, client, streams in MULTI:
                        each_server(
                            rep, mode, photos, label, client, MULTI_CIPHER, streams, several=True
                        )
                if mode == "busy":
                    feeder.stop_and_drain()
                    bench.raw.setdefault("ingest_feeder_jpegs", []).append(feeder.fed - fed_before)
                    gate_target.clean(wait=True)
    finally:
        feeder.stop()
        stock.stop()
        sshd.stop()
        gate.stop()
        gate_procs.stop()
        standin.stop()
        for ds in datasets:  # the data sets and their shares (shares()) share one folder
            shutil.rmtree(ds.src.parent, ignore_errors=True)
    bench.raw["ingest"] = {"/".join(k): [vars(s) for s in v] for k, v in res.samples.items()}
    return _section(bench, datasets, res)


def _section(bench: Bench, datasets: list[Dataset], res: Results) -> Section:
    rows = []
    busy_workers: list[float] = []
    photos = datasets[-1]
    # Single-stream rows (every data set × client/cipher), then the several-streams-at-once rows.
    lines = [(ds, client, cipher) for ds in datasets for client, cipher in COMBOS]
    lines += [(photos, label, MULTI_CIPHER) for label, _, _ in MULTI]
    for ds, client, cipher in lines:
        if not res.samples.get(("idle", ds.name, client, cipher, "OpenSSH")):
            continue  # not run (--multi-only)
        got = {
            (mode, server, attr): res.values((mode, ds.name, client, cipher, server), attr)
            for mode in ("idle", "busy")
            for server in ("sftpgate", "OpenSSH", "asyncssh", PROCS)
            for attr in ("mbps", "cpu_per_gb", "workers_cores")
        }
        busy_workers += got["busy", "sftpgate", "workers_cores"]
        busy_workers += got["busy", "OpenSSH", "workers_cores"]
        g_idle, o_idle = got["idle", "sftpgate", "mbps"], got["idle", "OpenSSH", "mbps"]
        g_cpu, o_cpu = (
            got["idle", "sftpgate", "cpu_per_gb"],
            got["idle", "OpenSSH", "cpu_per_gb"],
        )
        g_busy, o_busy = got["busy", "sftpgate", "mbps"], got["busy", "OpenSSH", "mbps"]
        a_idle, a_cpu = got["idle", "asyncssh", "mbps"], got["idle", "asyncssh", "cpu_per_gb"]
        p_idle, p_cpu = got["idle", PROCS, "mbps"], got["idle", PROCS, "cpu_per_gb"]
        p_busy = got["busy", PROCS, "mbps"]
        cipher_label = cipher
        if client.startswith("rclone"):
            seen = res.samples.get(("idle", ds.name, client, cipher, "OpenSSH"), [])
            picked = {s.cipher_seen.split("@")[0] for s in seen} - {"", "?"}
            cipher_label = f"{'/'.join(sorted(picked)) or cipher} (rclone's choice)"
        rows.append(
            [
                ds.label,
                client,
                cipher_label,
                cell(g_idle),
                cell(o_idle),
                ratio(median(g_idle), median(o_idle)),
                cell(g_cpu, 2, spread_too=False),
                cell(o_cpu, 2, spread_too=False),
                ratio(median(g_cpu), median(o_cpu)),
                cell(g_busy),
                cell(o_busy),
                ratio(median(g_busy), median(o_busy)),
                ratio(median(g_busy), median(g_idle)),
                cell(a_idle),
                cell(a_cpu, 2, spread_too=False),
                ratio(median(g_idle), median(a_idle)),
                ratio(median(a_idle), median(o_idle)),
                cell(p_idle),
                cell(p_cpu, 2, spread_too=False),
                ratio(median(p_idle), median(o_idle)),
                ratio(median(p_idle), median(a_idle)),
                cell(p_busy),
                ratio(median(p_busy), median(p_idle)),
            ]
        )
    header = [
        "data",
        "client",
        "cipher",
        "sftpgate MB/s",
        "OpenSSH MB/s",
        "MB/s ratio",
        "sftpgate CPU s/GB",
        "OpenSSH CPU s/GB",
        "CPU ratio",
        "busy: sftpgate MB/s",
        "busy: OpenSSH MB/s",
        "busy: MB/s ratio",
        "sftpgate busy/idle",
        "stock asyncssh MB/s",
        "stock asyncssh CPU s/GB",
        "sftpgate / stock asyncssh",
        "stock asyncssh / OpenSSH",
        f"sftpgate {PROCS_LABEL} MB/s",
        f"sftpgate {PROCS_LABEL} CPU s/GB",
        f"sftpgate {PROCS_LABEL} / OpenSSH",
        f"sftpgate {PROCS_LABEL} / stock asyncssh",
        f"busy: sftpgate {PROCS_LABEL} MB/s",
        f"sftpgate {PROCS_LABEL} busy/idle",
    ]
    fed = bench.raw.get("ingest_feeder_jpegs", [])
    notes = [
        f"Medians of {bench.reps} interleaved run(s) (min–max in brackets); ratios are "
        "sftpgate / OpenSSH; targets: MB/s ratio ≥ 1.0, CPU ratio ≤ 1.1, busy/idle ≥ 0.8.",
        "Server CPU: utime+stime from /proc of the server process incl. reaped children "
        "(sshd: its per-connection processes; sftpgate: its own threads, not its codec workers).",
        f"Busy: codec workers converted {sum(fed)} JPEGs during the busy runs, using "
        f"{median(busy_workers):.2f} cores (median over runs) in the background (SCHED_IDLE); "
        "the OpenSSH busy runs share the machine with the same workers."
        if fed
        else "Busy: not run (--single-only).",
        "Stock asyncssh (idle only): asyncssh's own SFTPServer with sftpgate's SSH settings and "
        "protocol layer on uvloop, writing straight into a folder (no hashing, no fsync, no "
        "ledger); it honours `sftp -f`'s fsync@openssh.com. The ceiling of one Python event "
        "loop running asyncssh here: sftpgate / stock asyncssh is sftpgate's own cost, stock "
        "asyncssh / OpenSSH is asyncssh's.",
        "Several streams at once (the last four rows, idle and busy): "
        f"{photos.label} shared out between the clients (2 × sftp: half each; 4 × paramiko: a "
        "quarter each; rclone: one process, one connection per transfer), all at once; MB/s is "
        "all bytes over the wall time from the first client's start to the last one's end, "
        "CPU s/GB the server's CPU over all bytes (sshd: one set of processes per connection; "
        "sftpgate and stock asyncssh: every connection in one process)."
        if not bench.single_only
        else "Several streams at once: not run (--single-only).",
        "Single-stream rows: rclone runs with `--transfers 1` (by default it copies four files "
        "at once, each over a connection of its own).",
        f"sftpgate {PROCS_LABEL} (idle, and busy in the several-streams rows): the same service "
        f"with `sftp.processes: {PROCESSES}`, every connection served by the least busy of its "
        f"{PROCESSES} connection processes, the service committing each CLOSE; CPU s/GB counts "
        "the service and its connection processes; busy, the machine is shared with the first "
        "sftpgate's converting workers, as the OpenSSH busy runs are.",
        "Not run: paramiko × chacha20 (paramiko has no chacha20-poly1305); rclone × chacha20 "
        "(rclone 1.60 has no cipher option).",
        f"Load average after the section: {loadavg()}.",
    ]
    notes += [f"Failed: {e}" for e in res.errors[:5]]
    return Section(
        "ingest",
        "Ingest: sftpgate vs OpenSSH internal-sftp (idle, and while workers convert)",
        header,
        rows,
        notes,
    )


# -- py-spy profile of the server during a big upload --------------------------------------------------


def profile(bench: Bench) -> Section:
    """Record the sftpgate server with py-spy during a 1 GiB upload (per client/cipher)."""
    spy = Path(PY).with_name("py-spy")
    if not spy.exists():
        spy_path = shutil.which("py-spy")
        if spy_path is None:
            raise BenchError("py-spy is not installed (.venv/bin/pip install py-spy)")
        spy = Path(spy_path)
    ds = make_datasets(bench, photos_too=False)[0]
    standin = Standin(bench)
    gate = Gate(bench, standin.url)
    target = GateTarget(gate)
    rows: list[list[str]] = []
    notes: list[str] = [
        "py-spy record at 200 Hz (no --native): wall-clock samples of threads that are not idle; "
        "C work (ciphers, SHA-1, syscalls) is charged to the Python line that calls it. Shares "
        "are of the event-loop thread's samples (the thread that limits ingest).",
    ]
    out_dir = bench.results
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        for n, (client, cipher) in enumerate([COMBOS[0], COMBOS[1], COMBOS[3]]):
            raw = out_dir / f"profile-{client}-{cipher}.txt"
            log = bench.tmp / f"py-spy-{n}.log"
            spy_proc = bench.start(
                [str(spy), "record", "--pid", str(gate.pid), "--rate", "200", "--format", "raw",
                 "--output", str(raw), "--nonblocking"],
                log,
            )  # fmt: skip
            time.sleep(1.0)
            dest = f"p{n}"
            s = measure(bench, target, gate, client, cipher, ds, dest)
            bench.stop(spy_proc, signal.SIGINT)
            poll(raw.exists, 30, "py-spy's output")
            top, others = _top_frames(raw)
            total = sum(top.values()) or 1
            label = (
                f"{client} × {cipher}: {s.mbps:.0f} MB/s, {s.cpu_per_gb:.2f} CPU-s/GB, "
                f"{total} samples"
            )
            for (name, path, lineno), count in sorted(top.items(), key=lambda kv: -kv[1])[:10]:
                code = linecache.getline(path, lineno).strip()[:60].replace("|", "/")
                short = "/".join(Path(path).parts[-2:])
                rows.append(
                    [
                        label,
                        f"{name} ({short}:{lineno})",
                        f"`{code}`",
                        f"{100 * count / total:.1f} %",
                    ]
                )
                label = ""
            shares = _categories(top)
            other_total = sum(others.values())
            busiest = sorted(others.items(), key=lambda kv: -kv[1])[:3]
            notes.append(
                f"{client} × {cipher}, event-loop thread by category: "
                + ", ".join(f"{k} {100 * v / total:.0f} %" for k, v in shares.items())
                + f". Other threads: {other_total} samples ("
                + "; ".join(
                    f"{name} {Path(path).name}:{lineno} `{linecache.getline(path, lineno).strip()[:40]}` {c}"
                    for (name, path, lineno), c in busiest
                )
                + ")."
            )
            notes.append(f"Raw stacks: {raw}")
    finally:
        gate.stop()
        standin.stop()
        shutil.rmtree(ds.src.parent, ignore_errors=True)
    return Section(
        "profile",
        "Profile: sftpgate's event-loop thread during the big upload (py-spy, leaf frames)",
        ["client × cipher", "leaf frame (file:line)", "source line", "share of samples"],
        rows,
        notes,
    )


Frame = tuple[str, str, int]  # function, file, line


def _top_frames(raw: Path) -> tuple[dict[Frame, int], dict[Frame, int]]:
    """Samples per leaf frame from py-spy's collapsed stacks: (event-loop thread, other threads).
    Other threads (stacks rooted in Thread._bootstrap) are executor jobs (fsync at CLOSE, ledger
    commits) and watchfiles' inotify thread, which py-spy often counts while it waits."""
    main: dict[Frame, int] = defaultdict(int)
    others: dict[Frame, int] = defaultdict(int)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        name, _, where = frames[-1].partition(" (")
        path, _, lineno = where.rstrip(")").rpartition(":")
        frame = (name, path, int(lineno) if lineno.isdigit() else 0)
        threaded = any(f.startswith("Thread._bootstrap") for f in frames[:2])
        (others if threaded else main)[frame] += int(count)
    return main, others


CATEGORIES = [  # (category, words in the leaf frame's source line or function name)
    ("SHA-1 of the upload", ("sha1", "hashlib")),
    ("file write (pwrite)", ("pwrite", ".write(self.fd", "os.write")),
    ("fsync", ("fsync",)),
    ("asyncssh input-buffer slicing", ("_inpbuf", "_packet[", "recv_buf")),
    ("crypto", ("encrypt", "decrypt", "verify", "chacha", "poly1305", "cipher", "Cipher", "mac")),
    ("socket send", ("transport.write", "_send", "sendmsg")),
    ("event loop", ("run_forever", "_run_once", "select", "Runner.run", "run_until")),
    ("handing work to executor threads", ("_worker", "_WorkItem", "futures/thread", "submit")),
]


def _categories(top: dict[Frame, int]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for (name, path, lineno), count in top.items():
        text = f"{name} {path} {linecache.getline(path, lineno)}"
        for category, words in CATEGORIES:
            if any(w in text for w in words):
                out[category] += count
                break
        else:
            out["other Python (SFTP/SSH layers, sftpgate)"] += count
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--multi-only", action="store_true", help="only several streams at once")
    parser.add_argument("--single-only", action="store_true", help="only single streams, idle")
    parser.add_argument("--paramiko-client", metavar="JSON", help=argparse.SUPPRESS)
    parser.add_argument("--asyncssh-server", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.paramiko_client:
        paramiko_client(json.loads(args.paramiko_client))
        return 0
    if args.asyncssh_server:
        asyncssh_server(json.loads(args.asyncssh_server))
        return 0
    from run import main as run_main

    chosen = {
        "--quick": args.quick,
        "--multi-only": args.multi_only,
        "--single-only": args.single_only,
    }
    flags = [flag for flag, on in chosen.items() if on]
    return run_main([*flags, "--only", "ingest"])


if __name__ == "__main__":
    sys.exit(main())
