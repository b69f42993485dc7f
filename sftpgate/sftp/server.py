"""The SSH side: host keys, who may log in, and an SSH server that offers the SFTP subsystem only.

Shell, exec (and so legacy scp), port, agent and X11 forwarding and every other subsystem are
refused. Unknown users go through the same password check as known ones (against a dummy hash),
and every failed attempt is answered after the same fixed delay, so neither answer nor timing tells
an attacker which user names exist. Failures are counted per address; an address with too many
recent failures is turned away for a while, unless it is in `sftp.ban_allowlist`. Behind a TCP
proxy the address is the client's, from the PROXY header (proxy.py).

Limits (all under `sftp:`): SSH connections in total, SFTP sessions per user, idle time-out, open
handles per session (enforced in protocol.py).

Stopping closes every connection, idle or mid-upload, and waits (bounded) until each session has
closed its files: an upload cut off there is parked for a resume, one whose CLOSE was under way
is finished.
"""

from __future__ import annotations

import asyncio
import os
import time
import weakref
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncssh
from asyncssh.stream import SSHServerStreamSession

from ..accounts import known_hash_scheme
from ..config import Config, UserConfig, parse_listen
from ..intake import Intake
from ..layout import Layout
from ..logs import event
from ..metrics import Metrics
from ..networks import Networks
from . import protocol
from .filesystem import GateSFTPServer, PartStore
from .passwords import hash_password
from .passwords import verify_password as _verify
from .proxy import ProxyHeaderListener

__all__ = ["LoginGuard", "SftpGateway", "hash_password", "known_hash_scheme", "verify_password"]

HOST_KEY_TYPES = (("ssh-ed25519", "ssh_host_ed25519_key"), ("ssh-rsa", "ssh_host_rsa_key"))
# Forced commands that mean "SFTP only" in OpenSSH setups people migrate from; any other forced
# command makes the key useless here, since nothing is ever executed.
_SFTP_COMMANDS = ("internal-sftp", "/usr/lib/openssh/sftp-server", "/usr/libexec/sftp-server")


def verify_password(user: UserConfig | None, password: str) -> bool:
    if user is None:
        return _verify("", "", password)  # still pays for a dummy argon2 check
    return _verify(user.password, user.password_hash, password)


def ensure_host_keys(directory: Path) -> list[asyncssh.SSHKey]:
    """Load the host keys, creating each missing one once (mode 0600), so they never change."""
    directory.mkdir(parents=True, exist_ok=True)
    keys = []
    for alg, name in HOST_KEY_TYPES:
        path = directory / name
        if not path.exists():
            key = (
                asyncssh.generate_private_key(alg, key_size=3072)
                if alg == "ssh-rsa"
                else asyncssh.generate_private_key(alg)
            )
            tmp = path.with_name(f".{name}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key.export_private_key())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            (directory / f"{name}.pub").write_bytes(key.export_public_key())
            event("host key created", path=str(path), fingerprint=key.get_fingerprint())
        os.chmod(path, 0o600)
        keys.append(asyncssh.read_private_key(path))
    return keys


def load_authorized_keys(
    user: UserConfig, base: Callable[[str], Path]
) -> asyncssh.SSHAuthorizedKeys | None:
    """Key lines from the config, or the authorized_keys file a single entry points to.

    OpenSSH's options apply (`from=` is checked by asyncssh against the client's address); a
    forced command that only starts SFTP is dropped so that such keys keep working.
    """
    if not user.authorized_keys:
        return None
    lines = list(user.authorized_keys)
    if (
        len(lines) == 1
        and not lines[0].lstrip().startswith(("ssh-", "ecdsa-", "sk-"))
        and " " not in lines[0].strip()
    ):
        keys = asyncssh.read_authorized_keys(str(base(lines[0])))
    else:
        keys = asyncssh.import_authorized_keys("\n".join(lines) + "\n")
    for entry in getattr(keys, "_user_entries", []):
        command = entry.options.get("command")
        if isinstance(command, str) and command.split(" ", 1)[0] in _SFTP_COMMANDS:
            del entry.options["command"]
    return keys


class LoginGuard:
    """Counts failed logins per address; `limit` failures within `window` seconds turn the
    address away until enough of them are older than the window."""

    def __init__(
        self, limit: int, window: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.window = window
        self.clock = clock
        self._failures: dict[str, deque[float]] = defaultdict(deque)

    def _recent(self, addr: str) -> deque[float]:
        q = self._failures[addr]
        cutoff = self.clock() - self.window
        while q and q[0] < cutoff:
            q.popleft()
        return q

    def refused(self, addr: str) -> bool:
        refused = len(self._recent(addr)) >= self.limit
        if not self._failures[addr]:
            del self._failures[addr]  # no memory kept for addresses with nothing recent
        return refused

    def failed(self, addr: str) -> None:
        self._recent(addr).append(self.clock())
        if len(self._failures) > 10_000:  # many addresses (a scan): drop the ones gone quiet
            for a in [a for a in self._failures if not self._recent(a)]:
                del self._failures[a]


class _SftpSession(SSHServerStreamSession):
    """asyncssh's own session, counted against the user's session limit while it is open."""

    def __init__(self, owner: GateSSHServer, user: str) -> None:
        super().__init__(None, lambda chan: owner.gate.new_sftp_server(chan, owner), 3, False)
        self._owner = owner
        self._user = user
        self._released = False

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self._released:
            self._released = True
            self._owner.gate.session_changed(self._user, -1)


class GateSSHServer(asyncssh.SSHServer):
    def __init__(self, gate: SftpGateway) -> None:
        self.gate = gate
        self.addr = "?"
        self.user: str | None = None
        self._conn: asyncssh.SSHServerConnection | None = None
        self._counted = False
        self._auth_tried = False
        self._failure_counted = False
        self._idle: asyncio.TimerHandle | None = None
        self.last_activity = time.monotonic()
        self.closed = asyncio.Event()

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        peer = conn.get_extra_info("peername")
        self.addr = peer[0] if peer else "?"
        self.gate.live.add(self)
        if self.gate.connections > self.gate.sftp.max_connections:
            event("login refused", level=30, address=self.addr, reason="too many connections")
            conn.close()
        elif self.gate.guard.refused(self.addr):
            event("login refused", level=30, address=self.addr, reason="too many failed logins")
            conn.close()

    def begin_auth(self, username: str) -> bool:
        # From here on, a connection that ends without logging in counts as one failure: with
        # authorized keys set, asyncssh rejects wrong keys without asking us.
        self._auth_tried = True
        user = self.gate.users.get(username)
        keys = self.gate.authorized_keys.get(username) if user else None
        if keys is not None and self._conn is not None:
            self._conn.set_authorized_keys(keys)
        return True  # every user name must authenticate, known or not

    def password_auth_supported(self) -> bool:
        return True

    async def validate_password(self, username: str, password: str) -> bool:
        self._auth_tried = True
        user = self.gate.users.get(username)
        loop = asyncio.get_running_loop()
        started = loop.time()
        ok = await loop.run_in_executor(None, verify_password, user, password)
        if not ok:
            # Padded to one fixed delay from the start of the check, so a known user with a
            # slow hash and an unknown user take the same time to be told no.
            self._count_failure("password")
            remaining = self.gate.sftp.failed_login_delay_seconds - (loop.time() - started)
            if remaining > 0:
                await asyncio.sleep(remaining)  # slows guessing; not synchronisation
        return ok

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        # Only reached when set_authorized_keys was not called (unknown or key-less user).
        return False

    def auth_completed(self) -> None:
        assert self._conn is not None
        self.user = self._conn.get_extra_info("username")
        self.gate.metrics.sftp_sessions.inc()
        self._counted = True
        self.touch()
        self._arm_idle(self.gate.sftp.idle_timeout_seconds)

    def session_requested(self) -> bool | _SftpSession:
        # Called for every session channel because the gateway passes no sftp_factory to
        # asyncssh: the session limit is checked here, where refusing is a clean channel error.
        if self.user is None:
            return False
        if self.gate.sessions_of(self.user) >= self.gate.sftp.max_sessions_per_user:
            event("session refused", level=30, user=self.user, reason="too many sessions")
            return False
        self.gate.session_changed(self.user, 1)
        return _SftpSession(self, self.user)

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    def _arm_idle(self, delay: float) -> None:
        if self.gate.sftp.idle_timeout_seconds > 0:
            self._idle = asyncio.get_running_loop().call_later(delay, self._check_idle)

    def _check_idle(self) -> None:
        idle = time.monotonic() - self.last_activity
        timeout = self.gate.sftp.idle_timeout_seconds
        if idle < timeout:
            self._arm_idle(timeout - idle)
            return
        event("idle timeout", user=self.user, address=self.addr, seconds=round(idle))
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gate.live.discard(self)
        self.closed.set()
        if self._idle is not None:
            self._idle.cancel()
        if self._counted:
            self.gate.metrics.sftp_sessions.dec()
        elif self._auth_tried:
            # Gave up (or was cut off) after offering wrong keys: one failure for the address.
            self._count_failure("publickey")

    def _count_failure(self, method: str) -> None:
        if method == "publickey" and self._failure_counted:
            return
        self._failure_counted = True
        never_banned = self.addr in self.gate.ban_allowlist
        if not never_banned:
            self.gate.guard.failed(self.addr)
        self.gate.metrics.sftp_auth_failures.inc()
        event(
            "login failed",
            level=30,
            address=self.addr,
            method=method,
            ban="never (sftp.ban_allowlist)" if never_banned else None,
        )


class SftpGateway:
    """Owns the listening SSH server for the configured users."""

    def __init__(self, config: Config, layout: Layout, intake: Intake, metrics: Metrics) -> None:
        self.config = config
        self.sftp = config.sftp
        self.layout = layout
        self.intake = intake
        self.metrics = metrics
        self.guard = LoginGuard(self.sftp.ban_after_failures, self.sftp.ban_seconds)
        self.ban_allowlist = Networks(self.sftp.ban_allowlist)
        self.users = {u.name: u for u in config.sftp.users}
        self.authorized_keys = {
            u.name: keys
            for u in config.sftp.users
            if (keys := load_authorized_keys(u, config.path)) is not None
        }
        self.live: set[GateSSHServer] = set()
        self.sessions: Counter[str] = Counter()
        # SFTP sessions whose files may still be open (asyncssh holds them while they run).
        self._sftp_servers: weakref.WeakSet[GateSFTPServer] = weakref.WeakSet()
        self.parts = PartStore(layout.root / ".resume", self.sftp.resume_keep_seconds)
        self._server: asyncssh.SSHAcceptor | None = None

    @property
    def connections(self) -> int:
        return len(self.live)

    def sessions_of(self, user: str) -> int:
        """The SFTP sessions `user` has open, for the per-user limit."""
        return self.sessions[user]

    def session_changed(self, user: str, delta: int) -> None:
        self.sessions[user] += delta

    def new_sftp_server(self, chan: Any, owner: GateSSHServer) -> GateSFTPServer:
        server = GateSFTPServer(
            chan,
            self.layout,
            self.intake,
            parts=self.parts,
            max_handles=self.sftp.max_handles,
            on_activity=owner.touch,
        )
        self._sftp_servers.add(server)
        return server

    def prepare(self) -> None:
        """What every process serving connections needs before the first one."""
        protocol.install(self.sftp.max_write_bytes)
        for user in self.sftp.users:
            for folder in user.folders:
                (self.layout.user_root(user.name) / folder).mkdir(parents=True, exist_ok=True)

    def server_options(self) -> dict[str, Any]:
        """asyncssh's options for one connection, listening here or in a connection process."""
        return {
            "server_host_keys": ensure_host_keys(self.config.path(self.sftp.host_keys_dir)),
            "allow_scp": False,
            "agent_forwarding": False,
            "x11_forwarding": False,
            "allow_pty": False,
            "login_timeout": self.sftp.login_timeout_seconds,
            "encryption_algs": self.sftp.ciphers,  # empty: asyncssh's defaults
            # Larger SSH packets and window help the clients that use them.
            "max_pktsize": 256 * 1024,
            "window": 8 * 1024 * 1024,
        }

    async def start(self) -> None:
        self.prepare()
        self.parts.load()
        host, port = parse_listen(self.sftp.listen)
        proxies = Networks(self.sftp.proxy_protocol)
        self._server = await asyncssh.listen(
            host,
            port,
            # Through the listener that reads PROXY headers first, when proxies are configured.
            tunnel=ProxyHeaderListener(proxies) if proxies else (),
            server_factory=lambda: GateSSHServer(self),
            **self.server_options(),
        )

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self, timeout: float) -> None:
        """Stop listening, close every connection and wait at most `timeout` seconds for them to
        end and for their sessions to finish or park their uploads. asyncssh's wait_closed alone
        does not end connections, and may wait for them for ever."""
        if self._server is not None:
            self._server.close()
        connections, sessions = list(self.live), list(self._sftp_servers)
        for connection in connections:
            connection.close()
        waits = [c.closed.wait() for c in connections] + [s.ended.wait() for s in sessions]
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*waits)
                if self._server is not None:
                    await self._server.wait_closed()
        except TimeoutError:
            event(
                "sftp stop timed out",
                level=30,
                seconds=timeout,
                connections=self.connections,
                outcome="exiting with connections still closing",
            )
