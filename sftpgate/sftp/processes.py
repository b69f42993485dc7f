"""SSH connections served by child processes, each on a core of its own.

One Python process runs asyncssh's packet loop for all its connections on one core, so several
phones at once queue there. With `sftp.processes` ≥ 1 the service only accepts: it turns away
banned addresses and connections over `max_connections`, and hands each accepted socket (with
`socket.send_fds`) to the connection process with the fewest connections. That process runs the
SSH transport, the SFTP protocol, hashing and writes (the same `SftpGateway` classes as in
process), reads the listings it shows from the ledger file (read-only, beside the service's
commits), and asks the service, over a second socket, for everything that changes state: the
`Intake` calls (CLOSE is still answered only after the service committed the upload), a
failed login for the ban count, the session gauge, each user's sessions (the service tells every
process how many the others hold, for `max_sessions_per_user`). The service stays the ledger's
only writer.

A connection process that dies is replaced; what its connections had not closed stays a part in
.staging/ (removed when stale), and nothing reaches watch/ without a committed CLOSE. One that
loses the service (its socket ends) closes its connections and exits. Stopping asks every
process to close its connections, park cut-off uploads and exit; one that is still there when
the time is up is killed.

Messages both ways are pickled, each with a 4-byte length: the two ends are this program's own
processes over a socketpair nobody else holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import signal
import socket
import struct
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import asyncssh

from ..config import Config, parse_listen
from ..intake import Intake, Upload
from ..layout import Layout
from ..ledger import Ledger, LedgerThread
from ..logs import event, setup_logging
from ..metrics import Metrics
from ..networks import Networks
from .proxy import HeaderFront, carried_client, read_header
from .server import GateSSHServer, LoginGuard, SftpGateway

__all__ = ["ConnectionProcesses"]

_LENGTH = struct.Struct("!I")
# The intake calls a connection process may make: the async ones an SFTP session uses.
_INTAKE_CALLS = frozenset(
    {
        "finalize_upload",
        "rename",
        "rename_remembered",
        "set_mtime",
        "removed",
        "forget",
    }
)
# Instruments a connection process changes; the values live in the service's registry.
_GAUGES = frozenset({"sftp_sessions"})
_COUNTERS = frozenset({"sftp_auth_failures"})
# What is left of the stop grace for killing and reaping a process that did not exit.
_KILL_RESERVE_SECONDS = 0.5


async def _read(reader: asyncio.StreamReader) -> Any:
    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    return pickle.loads(await reader.readexactly(length))


def _write(writer: asyncio.StreamWriter, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(_LENGTH.pack(len(data)) + data)


def _sendable(exc: BaseException) -> BaseException:
    """The exception itself when the other side can unpickle it, else its text."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(str(exc) or type(exc).__name__)
    return exc


# -- in the service ------------------------------------------------------------------------------


class _Child:
    """One connection process, as the service sees it."""

    def __init__(self, proc: asyncio.subprocess.Process, handover: socket.socket) -> None:
        self.proc = proc
        self.handover = handover  # SOCK_SEQPACKET: one accepted socket per message
        self.writer: asyncio.StreamWriter | None = None
        self.connections: set[int] = set()
        self.gauges: dict[str, float] = dict.fromkeys(_GAUGES, 0.0)  # its share of each gauge
        self.sessions: Counter[str] = Counter()  # its SFTP sessions per user
        self.served: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid


class ConnectionProcesses:
    """The SFTP server with `sftp.processes` connection processes behind one listening socket.

    Offers what the service and tests use of `SftpGateway`: `start`, `port`, `parts`, `stop`.
    """

    def __init__(self, config: Config, layout: Layout, intake: Intake, metrics: Metrics) -> None:
        self.config = config
        self.sftp = config.sftp
        self.metrics = metrics
        # The in-process gateway's parts, never listening here: it prepares what the children
        # share (folders, host keys: created once, here, so two children never race to create
        # them), keeps the bans, and loads and cleans the parts at start (every process reads
        # the same directory).
        self._gate = SftpGateway(config, layout, intake, metrics)
        self.guard = self._gate.guard
        self.parts = self._gate.parts
        self.intake = intake
        self.children: list[_Child] = []
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._proxies = Networks(self.sftp.proxy_protocol)
        self._reading_headers: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._next_id = 0

    @property
    def connections(self) -> int:
        return sum(len(c.connections) for c in self.children)

    @property
    def port(self) -> int:
        assert self._listener is not None
        return int(self._listener.getsockname()[1])

    async def start(self) -> None:
        self._gate.prepare()
        self._gate.server_options()  # creates missing host keys, before any child reads them
        self.parts.load()
        for _ in range(self.sftp.processes):
            self.children.append(await self._spawn())
        host, port = parse_listen(self.sftp.listen)
        self._listener = socket.create_server(
            (host, port),
            family=socket.AF_INET6 if ":" in host else socket.AF_INET,
            backlog=128,
            reuse_port=False,
        )
        self._listener.setblocking(False)
        self._accepting = asyncio.create_task(self._accept_forever())

    async def _spawn(self) -> _Child:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        rpc_ours, rpc_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                __name__,
                str(theirs.fileno()),
                str(rpc_theirs.fileno()),
                pass_fds=(theirs.fileno(), rpc_theirs.fileno()),
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            theirs.close()
            rpc_theirs.close()
        child = _Child(proc, ours)
        reader, child.writer = await asyncio.open_unix_connection(sock=rpc_ours)
        _write(child.writer, self.config)
        child.served = asyncio.create_task(self._serve(child, reader))
        event("connection process started", pid=child.pid)
        return child

    async def _accept_forever(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peer = await loop.sock_accept(self._listener)
            except OSError as exc:  # out of descriptors, say: the next accept may work
                event("accept failed", level=30, error=str(exc))
                await asyncio.sleep(0.1)  # not synchronisation: lets descriptors free up
                continue
            client = (str(peer[0]), int(peer[1]))
            if client[0] in self._proxies:
                task = asyncio.create_task(self._hand_over_proxied(sock, client))
                self._reading_headers.add(task)
                task.add_done_callback(self._reading_headers.discard)
                continue
            with sock:
                self._hand_over(sock, client[0], None)

    async def _hand_over_proxied(self, sock: socket.socket, proxy: tuple[str, int]) -> None:
        """A connection from a listed proxy: its header is read here, so the bans and limits
        below count the client it names, and the connection process starts with SSH."""
        with sock:
            header = await read_header(sock, proxy[0])
            if header is not None:
                client = carried_client(header, proxy[0])
                self._hand_over(sock, (client or proxy)[0], client)

    def _hand_over(self, sock: socket.socket, addr: str, carried: tuple[str, int] | None) -> None:
        """`carried`: the client a PROXY header named, for the connection process to see as
        the peer."""
        if self.connections >= self.sftp.max_connections:
            event("login refused", level=30, address=addr, reason="too many connections")
            return
        if self.guard.refused(addr):
            event("login refused", level=30, address=addr, reason="too many failed logins")
            return
        child = min(
            (c for c in self.children if c.proc.returncode is None),
            key=lambda c: len(c.connections),
            default=None,
        )
        if child is None:
            event("login refused", level=30, address=addr, reason="no connection process")
            return
        self._next_id += 1
        message = pickle.dumps((self._next_id, carried))
        try:
            # Blocking, but only for as long as the child's queue of sockets not yet taken is
            # full (the kernel's buffer holds hundreds): accepting pauses rather than refuses.
            socket.send_fds(child.handover, [message], [sock.fileno()])
        except OSError as exc:  # the child is gone; its exit is handled in _serve
            event("login refused", level=30, address=addr, reason=f"hand-over failed: {exc}")
            return
        child.connections.add(self._next_id)

    async def _serve(self, child: _Child, reader: asyncio.StreamReader) -> None:
        """Answer one child's requests until its socket ends; then replace it, unless stopping."""
        calls: set[asyncio.Task[None]] = set()
        try:
            while True:
                message = await _read(reader)
                kind = message[0]
                if kind == "call":
                    task = asyncio.create_task(self._call(child, *message[1:]))
                    calls.add(task)
                    task.add_done_callback(calls.discard)
                elif kind == "closed":
                    child.connections.discard(message[1])
                elif kind == "login failed":
                    self.guard.failed(message[1])
                elif kind == "metric":
                    self._count(child, message[1], message[2])
                elif kind == "sessions":
                    child.sessions[message[1]] += message[2]
                    self._tell_sessions(message[1])
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        code = await child.proc.wait()
        for task in calls:
            task.cancel()
        for name, value in child.gauges.items():  # its sessions ended with it
            getattr(self.metrics, name).dec(value)
        self.children.remove(child)
        for user in child.sessions:
            self._tell_sessions(user)
        child.handover.close()
        if child.writer is not None:
            child.writer.close()
        if self._stopping:
            return
        event(
            "connection process died",
            level=40,
            pid=child.pid,
            code=code,
            connections=len(child.connections),
            outcome="replaced; its unfinished uploads stay parts",
        )
        try:
            self.children.append(await self._spawn())
        except OSError as exc:
            event("connection process failed to start", level=40, error=str(exc))

    async def _call(self, child: _Child, request: int, name: str, args: tuple[Any, ...]) -> None:
        try:
            if name not in _INTAKE_CALLS:
                raise ValueError(f"not an intake call: {name}")
            reply: tuple[Any, ...] = (
                "reply",
                request,
                True,
                await getattr(self.intake, name)(*args),
            )
        except Exception as exc:
            reply = ("reply", request, False, _sendable(exc))
        if child.writer is not None and not child.writer.is_closing():
            _write(child.writer, reply)

    def _tell_sessions(self, user: str) -> None:
        """Tell every child how many sessions `user` has on the others: the per-user limit is
        checked in the child, synchronously, when a session is asked for."""
        total = sum(c.sessions[user] for c in self.children)
        for c in self.children:
            if c.writer is not None and not c.writer.is_closing():
                _write(c.writer, ("sessions", user, total - c.sessions[user]))

    def _count(self, child: _Child, name: str, delta: float) -> None:
        if name in _GAUGES:
            child.gauges[name] += delta
            getattr(self.metrics, name).inc(delta)
        elif name in _COUNTERS and delta > 0:
            getattr(self.metrics, name).inc(delta)

    async def stop(self, timeout: float) -> None:
        """Stop accepting, have every child close its connections (cut-off uploads parked) and
        exit within `timeout`; kill the ones still there then."""
        self._stopping = True
        for task in (self._accepting, *self._reading_headers):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._listener is not None:
            self._listener.close()
        children = list(self.children)
        own_grace = max(0.0, timeout - _KILL_RESERVE_SECONDS)
        for child in children:
            if child.writer is not None and not child.writer.is_closing():
                _write(child.writer, ("stop", own_grace))
        waits = [c.served for c in children if c.served is not None]
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*waits)
        except TimeoutError:
            left = [c for c in children if c.proc.returncode is None]
            event(
                "sftp stop timed out",
                level=30,
                seconds=timeout,
                connections=sum(len(c.connections) for c in left),
                outcome=f"killing {len(left)} connection process(es)",
            )
            for child in left:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()
            await asyncio.gather(*waits, return_exceptions=True)


# -- in a connection process ---------------------------------------------------------------------


class _Link:
    """The connection process's end of its socket to the service: calls and notes."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._next = 0

    def note(self, *message: Any) -> None:
        if not self.writer.is_closing():
            _write(self.writer, message)

    async def call(self, name: str, *args: Any) -> Any:
        if self.writer.is_closing():
            raise ConnectionError("the service is gone")
        self._next += 1
        future = asyncio.get_running_loop().create_future()
        self._pending[self._next] = future
        _write(self.writer, ("call", self._next, name, args))
        return await future

    def answered(self, request: int, ok: bool, value: Any) -> None:
        future = self._pending.pop(request, None)
        if future is None or future.done():
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def lost(self) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("the service is gone"))
        self._pending.clear()


class RemoteIntake(Intake):
    """The intake of the service, seen from a connection process: every change is the
    service's, asked for over the link.

    What listings and stat read (`remembered`, `remembered_in_dir`, and `is_temporary`) runs
    here, on a read-only connection to the ledger file: WAL mode lets it read while the service
    commits, and a CLOSE answered after its commit is seen by the next read. A folder of 10,000
    remembered photos is then read on this process's core, not copied over the link.
    """

    def __init__(self, link: _Link, config: Config, layout: Layout) -> None:
        super().__init__(
            layout,
            LedgerThread(Ledger(layout.ledger, readonly=True)),
            None,  # type: ignore[arg-type]  # no metrics here: the service counts
            [u.name for u in config.sftp.users],
            config.sftp.temp_patterns,
            config.sftp.remember_days,
            config.watch.settle_seconds,
            lambda: None,
        )
        self.link = link

    async def finalize_upload(self, up: Upload) -> None:
        await self.link.call("finalize_upload", up)

    async def rename(self, user: str, old: str, new: str) -> None:
        await self.link.call("rename", user, old, new)

    async def rename_remembered(self, user: str, old: str, new: str) -> None:
        await self.link.call("rename_remembered", user, old, new)

    async def set_mtime(self, user: str, path: str, mtime: float) -> bool:
        return bool(await self.link.call("set_mtime", user, path, mtime))

    async def removed(self, user: str, path: str) -> None:
        await self.link.call("removed", user, path)

    async def forget(self, user: str, path: str) -> bool:
        return bool(await self.link.call("forget", user, path))


class _RemoteInstrument:
    """A gauge or counter whose value lives in the service's registry."""

    def __init__(self, link: _Link, name: str) -> None:
        self._link, self._name = link, name

    def inc(self, amount: float = 1.0) -> None:
        self._link.note("metric", self._name, amount)

    def dec(self, amount: float = 1.0) -> None:
        self._link.note("metric", self._name, -amount)


class _RemoteMetrics:
    def __init__(self, link: _Link) -> None:
        self.sftp_sessions = _RemoteInstrument(link, "sftp_sessions")
        self.sftp_auth_failures = _RemoteInstrument(link, "sftp_auth_failures")


class _RemoteGuard(LoginGuard):
    """Bans are the service's: it refuses banned addresses before handing a socket over, and
    is told of every failure that counts."""

    def __init__(self, link: _Link) -> None:
        super().__init__(1, 0.0)
        self._link = link

    def refused(self, addr: str) -> bool:
        return False

    def failed(self, addr: str) -> None:
        self._link.note("login failed", addr)


class _ChildGateway(SftpGateway):
    """The gateway of a connection process: ledger, bans, metrics and the other processes'
    sessions are the service's."""

    def __init__(self, config: Config, layout: Layout, link: _Link) -> None:
        metrics: Any = _RemoteMetrics(link)
        super().__init__(config, layout, RemoteIntake(link, config, layout), metrics)
        self.guard = _RemoteGuard(link)
        self.link = link
        self.elsewhere: Counter[str] = Counter()  # sessions per user on the other processes

    def sessions_of(self, user: str) -> int:
        return super().sessions_of(user) + self.elsewhere[user]

    def session_changed(self, user: str, delta: int) -> None:
        super().session_changed(user, delta)
        self.link.note("sessions", user, delta)


class _HandedOverSockets:
    """asyncssh's tunnel listener interface (as `ProxyHeaderListener` uses it) over the sockets
    the service hands over: `asyncssh.listen(tunnel=...)` gives it the factory of asyncssh's
    own server connections, and nothing listens here."""

    def __init__(self, proxies: bool) -> None:
        self._proxies = proxies  # PROXY headers are configured: the front checks for one
        self._session_factory: Callable[[str, int], Any] | None = None

    async def create_server(
        self, session_factory: Callable[[str, int], Any], listen_host: str, listen_port: int
    ) -> _HandedOverSockets:
        self._session_factory = session_factory
        return self

    def close(self) -> None:
        """Nothing listens here: the service stops handing sockets over."""

    async def wait_closed(self) -> None:
        """Nothing listens here: the service stops handing sockets over."""

    async def serve(self, sock: socket.socket, carried: tuple[str, int] | None) -> None:
        """Run SSH on one handed-over socket until it ends. `carried`: the client the PROXY
        header the service read named; without one, and with `sftp.proxy_protocol` set, the
        first bytes are checked for a header as in the service (refused: not from a proxy)."""
        assert self._session_factory is not None
        factory = self._session_factory
        loop = asyncio.get_running_loop()
        started: asyncio.Future[asyncssh.SSHServerConnection | None] = loop.create_future()

        def start_ssh() -> Any:
            conn = factory("", 0)
            started.set_result(conn)
            return conn

        if carried is None and not self._proxies:
            await loop.connect_accepted_socket(start_ssh, sock)
        else:
            await loop.connect_accepted_socket(
                lambda: _EndingFront(start_ssh, carried, started), sock
            )
        conn = await started
        if conn is not None:
            await conn.wait_closed()


class _EndingFront(HeaderFront):
    """The PROXY front of a handed-over socket, which says when it ends without SSH."""

    def __init__(
        self,
        start_ssh: Callable[[], Any],
        carried: tuple[str, int] | None,
        started: asyncio.Future[asyncssh.SSHServerConnection | None],
    ) -> None:
        super().__init__(start_ssh, Networks(()), carried)  # no proxy connects to this process
        self._started = started

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self._started.done():
            self._started.set_result(None)


async def _connection_process(handover: socket.socket, rpc: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_unix_connection(sock=rpc)
    config: Config = await _read(reader)
    setup_logging(config.log.format, config.log.level)
    link = _Link(writer)
    gate = _ChildGateway(config, Layout(config.data_path), link)
    gate.prepare()
    handed = _HandedOverSockets(bool(config.sftp.proxy_protocol))
    server = await asyncssh.listen(
        "", 0, tunnel=handed, server_factory=lambda: GateSSHServer(gate), **gate.server_options()
    )
    stop = asyncio.Event()
    grace = config.shutdown_grace_seconds
    connections: set[asyncio.Task[None]] = set()

    async def serve(conn_id: int, carried: tuple[str, int] | None, sock: socket.socket) -> None:
        try:
            await handed.serve(sock, carried)
        except OSError:
            pass  # gone before it was up (a scan); asyncssh logs what there was of SSH
        finally:
            link.note("closed", conn_id)

    def handed_over() -> None:
        try:
            message, fds, _, _ = socket.recv_fds(handover, 4096, 1)
        except BlockingIOError:
            return
        if not message:  # the service is gone
            stop.set()
            loop.remove_reader(handover)
            return
        conn_id, carried = pickle.loads(message)
        for fd in fds:
            sock = socket.socket(fileno=fd)
            task = asyncio.create_task(serve(conn_id, carried, sock))
            connections.add(task)
            task.add_done_callback(connections.discard)

    async def listen() -> None:
        nonlocal grace
        try:
            while True:
                message = await _read(reader)
                if message[0] == "reply":
                    link.answered(*message[1:])
                elif message[0] == "sessions":
                    gate.elsewhere[message[1]] = message[2]
                elif message[0] == "stop":
                    grace = message[1]
                    stop.set()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            link.lost()
            stop.set()

    handover.setblocking(False)
    loop.add_reader(handover, handed_over)
    listening = asyncio.create_task(listen())
    await stop.wait()
    loop.remove_reader(handover)
    await gate.stop(grace)
    for task in connections:
        task.cancel()
    await asyncio.gather(*connections, return_exceptions=True)
    listening.cancel()
    server.close()
    gate.intake.db.close()
    writer.close()


def _main(argv: list[str]) -> None:
    handover = socket.socket(fileno=int(argv[0]))
    rpc = socket.socket(fileno=int(argv[1]))
    # The service stops its connection processes itself (or they see its socket end); a
    # terminal's Ctrl-C or a signal to the whole group must not cut connections before the
    # service asks, since the service still has to commit the CLOSEs under way.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    run: Callable[[Awaitable[None]], None]
    try:
        import uvloop

        run = uvloop.run  # type: ignore[assignment]
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        run = asyncio.run  # type: ignore[assignment]
    run(_connection_process(handover, rpc))


if __name__ == "__main__":
    _main(sys.argv[1:])
