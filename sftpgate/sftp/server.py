"""The SSH side: host keys, who may log in, and an SSH server that offers the SFTP subsystem only.

Shell, exec (and so scp), port, agent and X11 forwarding are refused. Unknown users go through the
same password check as known ones (against a dummy hash), so neither answer nor timing tells an
attacker which user names exist. Failed attempts are delayed, counted, and an address with too many
recent failures is turned away for a while.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import time
from collections import defaultdict, deque
from collections.abc import Callable
from pathlib import Path

import asyncssh
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from ..config import Config, UserConfig, parse_listen
from ..intake import Intake
from ..layout import Layout
from ..logs import event
from ..metrics import Metrics
from . import protocol
from .filesystem import GateSFTPServer

HOST_KEY_TYPES = (("ssh-ed25519", "ssh_host_ed25519_key"), ("ssh-rsa", "ssh_host_rsa_key"))
FAILED_LOGIN_DELAY_SECONDS = 1.0
BAN_AFTER_FAILURES = 10
BAN_WINDOW_SECONDS = 600.0

_hasher = PasswordHasher()
# Verified against for unknown users and key-only users, so a wrong user costs the same time.
_DUMMY_HASH = _hasher.hash("sftpgate-dummy-password")


def hash_password(password: str) -> str:
    """A salted argon2id hash for `password_hash:` in the config."""
    return _hasher.hash(password)


def verify_password(user: UserConfig | None, password: str) -> bool:
    if user is None or not (user.password or user.password_hash):
        _verify_hash(_DUMMY_HASH, password)
        return False
    if user.password_hash:
        return _verify_hash(user.password_hash, password)
    _verify_hash(_DUMMY_HASH, password)  # equal cost for plain and hashed passwords
    return hmac.compare_digest(user.password.encode(), password.encode())


def _verify_hash(hashed: str, password: str) -> bool:
    try:
        return _hasher.verify(hashed, password)
    except (VerificationError, InvalidHashError):
        return False


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
    """Key lines from the config, or the authorized_keys file a single entry points to."""
    if not user.authorized_keys:
        return None
    lines = list(user.authorized_keys)
    if (
        len(lines) == 1
        and not lines[0].lstrip().startswith(("ssh-", "ecdsa-", "sk-"))
        and " " not in lines[0].strip()
    ):
        return asyncssh.read_authorized_keys(str(base(lines[0])))
    return asyncssh.import_authorized_keys("\n".join(lines) + "\n")


class LoginGuard:
    """Counts failed logins per address; too many within the window turns the address away."""

    def __init__(self, limit: int = BAN_AFTER_FAILURES, window: float = BAN_WINDOW_SECONDS) -> None:
        self.limit = limit
        self.window = window
        self._failures: dict[str, deque[float]] = defaultdict(deque)

    def _recent(self, addr: str) -> deque[float]:
        q = self._failures[addr]
        cutoff = time.monotonic() - self.window
        while q and q[0] < cutoff:
            q.popleft()
        return q

    def refused(self, addr: str) -> bool:
        return len(self._recent(addr)) >= self.limit

    def failed(self, addr: str) -> None:
        self._recent(addr).append(time.monotonic())


class GateSSHServer(asyncssh.SSHServer):
    def __init__(self, gate: SftpGateway) -> None:
        self.gate = gate
        self.addr = "?"
        self._conn: asyncssh.SSHServerConnection | None = None
        self._counted = False

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        peer = conn.get_extra_info("peername")
        self.addr = peer[0] if peer else "?"
        if self.gate.guard.refused(self.addr):
            event("login refused", level=30, address=self.addr, reason="too many failed logins")
            conn.close()

    def begin_auth(self, username: str) -> bool:
        user = self.gate.users.get(username)
        keys = self.gate.authorized_keys.get(username) if user else None
        if keys is not None and self._conn is not None:
            self._conn.set_authorized_keys(keys)
        return True  # every user name must authenticate, known or not

    def password_auth_supported(self) -> bool:
        return True

    async def validate_password(self, username: str, password: str) -> bool:
        user = self.gate.users.get(username)
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(None, verify_password, user, password)
        if not ok:
            await self._failed(username, "password")
        return ok

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        # Only reached when set_authorized_keys was not called (unknown or key-less user).
        return False

    def auth_completed(self) -> None:
        self.gate.metrics.sftp_sessions.inc()
        self._counted = True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._counted:
            self.gate.metrics.sftp_sessions.dec()

    async def _failed(self, username: str, method: str) -> None:
        self.gate.guard.failed(self.addr)
        self.gate.metrics.sftp_auth_failures.inc()
        event("login failed", level=30, address=self.addr, method=method)
        await asyncio.sleep(FAILED_LOGIN_DELAY_SECONDS)  # slows guessing; not synchronisation


class SftpGateway:
    """Owns the listening SSH server for the configured users."""

    def __init__(self, config: Config, layout: Layout, intake: Intake, metrics: Metrics) -> None:
        self.config = config
        self.layout = layout
        self.intake = intake
        self.metrics = metrics
        self.guard = LoginGuard()
        self.users = {u.name: u for u in config.sftp.users}
        self.authorized_keys = {
            u.name: keys
            for u in config.sftp.users
            if (keys := load_authorized_keys(u, config.path)) is not None
        }
        self._server: asyncssh.SSHAcceptor | None = None

    async def start(self) -> None:
        protocol.install(self.config.sftp.max_write_bytes)
        host, port = parse_listen(self.config.sftp.listen)
        host_keys = ensure_host_keys(self.config.path(self.config.sftp.host_keys_dir))
        self._server = await asyncssh.listen(
            host,
            port,
            server_host_keys=host_keys,
            server_factory=lambda: GateSSHServer(self),
            sftp_factory=lambda chan: GateSFTPServer(chan, self.layout, self.intake),
            allow_scp=False,
            agent_forwarding=False,
            x11_forwarding=False,
            allow_pty=False,
            login_timeout=self.config.sftp.login_timeout_seconds,
            # Larger SSH packets and window help clients that use them (notes/sftp-bench.md §5).
            max_pktsize=256 * 1024,
            window=8 * 1024 * 1024,
        )

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
