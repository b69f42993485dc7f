"""An attacker's view: no way out of watch/<user>/, nothing but SFTP, limits that hold, garbage
that cannot take the server down, and no secret in the logs or metrics."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from .conftest import API_KEY, PASSWORD, eventually, gate_config
from .test_sftp_clients import (
    ServerProcess,
    connect,
    need,
    run,
    running_gate,
    sftp_batch,
    ssh_options,
)

# Locations an escape would reach from watch/phone/ (three levels below tmp_path).
OUTSIDE_REL = "../../../outside/secret.txt"


def snapshot(tmp_path: Path) -> dict[str, bytes | None]:
    """Every file and folder under tmp_path that no SFTP action may create or change: all but the
    user's own root and what the service itself writes (ledger, staging, undone/, Immich's)."""
    own = ("data/watch/phone", "data/watch/undone", "data/.", "data/sftpgate.db", "immich-storage")
    out: dict[str, bytes | None] = {}
    for p in tmp_path.rglob("*"):
        rel = p.relative_to(tmp_path).as_posix()
        if rel.startswith(own):
            continue
        out[rel] = p.read_bytes() if p.is_file() and not p.is_symlink() else None
    return out


async def attempt(coro: Any) -> str:
    """'refused' for an SFTP error, else 'done' (then the effect must stay inside the jail)."""
    try:
        await coro
    except asyncssh.SFTPError:
        return "refused"
    return "done"


EVIL = [
    "..",
    "../..",
    OUTSIDE_REL,
    "/../../../outside/secret.txt",
    "a/../../../../outside/secret.txt",
    "./../outside",
    "..//..//..//outside//secret.txt",
    "/etc/passwd",
    "/tmp",
    "\\..\\..\\outside",
    "....//....//outside",
    "%2e%2e/%2e%2e/outside",
]


async def test_paths_outside_the_jail_are_refused_or_stay_inside(gate, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    before = snapshot(tmp_path)
    root = gate.layout.watch / "phone"
    async with connect(gate.sftp.port) as conn, conn.start_sftp_client() as sftp:
        async with sftp.open("inside.tmp", "wb") as f:
            await f.write(b"inside")
        for path in EVIL:
            with pytest.raises(asyncssh.SFTPError):
                async with sftp.open(path, "rb") as f:
                    assert b"secret" not in await f.read()
            await attempt(sftp.stat(path))
            await attempt(sftp.mkdir(path + "_dir"))
            await attempt(sftp.setstat(path, asyncssh.SFTPAttrs(permissions=0o777)))
            await attempt(sftp.remove(path))
            await attempt(sftp.rmdir(path))
            await attempt(sftp.rename(path, "moved_in.tmp"))
            await attempt(sftp.posix_rename("inside.tmp", path + ".tmp"))
            assert await attempt(sftp.symlink("inside.tmp", path)) == "refused"
            assert await attempt(sftp.symlink(path, "link")) == "refused"
            assert await attempt(sftp.link("inside.tmp", path)) == "refused"
            assert await attempt(sftp.readlink(path)) == "refused"
            real = await sftp.realpath(path)
            assert real.startswith("/") and str(tmp_path) not in real
            with contextlib.suppress(asyncssh.SFTPError):
                async with sftp.open(path + ".tmp", "wb") as f:
                    await f.write(b"pwned")
        assert await sftp.realpath("../../..") == "/"
    async with connect(gate.sftp.port) as conn, conn.start_sftp_client(path_encoding=None) as sftp:
        for raw in (b"a\x00../../x", b"\x00", b"\xff\xfe.tmp", b"a/" * 3000, b"n" * 300 + b".tmp"):
            with pytest.raises(asyncssh.SFTPError):
                await sftp.stat(raw)
            with pytest.raises(asyncssh.SFTPError):
                async with sftp.open(raw, "wb") as f:
                    await f.write(b"x")
            with pytest.raises(asyncssh.SFTPError):
                await sftp.mkdir(raw)
    assert snapshot(tmp_path) == before
    assert (outside / "secret.txt").read_text() == "secret"
    assert root.is_dir() and not any(p.is_symlink() for p in root.rglob("*"))


async def test_a_symlink_planted_in_the_jail_is_never_followed(gate, tmp_path):
    """Someone with disk access (a share of watch/) links out: SFTP must not follow it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    root = gate.layout.watch / "phone"
    (root / "door").symlink_to(outside)
    (root / "file-door.tmp").symlink_to(outside / "secret.txt")
    async with connect(gate.sftp.port) as conn, conn.start_sftp_client() as sftp:
        for path in ("door/secret.txt", "door", "file-door.tmp"):
            with pytest.raises(asyncssh.SFTPError):
                async with sftp.open(path, "rb") as f:
                    await f.read()
            with pytest.raises(asyncssh.SFTPError):
                await sftp.stat(path)
        with pytest.raises(asyncssh.SFTPError):
            async with sftp.open("door/new.tmp", "wb") as f:
                await f.write(b"x")
        with pytest.raises(asyncssh.SFTPError):
            await sftp.rename("file-door.tmp", "renamed.tmp")
        assert not {"door", "file-door.tmp"} & set(await sftp.listdir("."))
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]


def test_path_mapping_never_leaves_the_root(tmp_path):
    """Fuzz: any byte string a client sends maps below the root (after resolving every real
    symlink on disk) or is refused with an SFTP error."""
    from sftpgate.layout import Layout
    from sftpgate.sftp.filesystem import GateSFTPServer

    class Chan:
        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return "phone" if name == "username" else default

    layout = Layout(tmp_path / "data")
    root_dir = layout.user_root("phone")
    (root_dir / "a" / "b").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root_dir / "evil").symlink_to(tmp_path / "outside")
    (root_dir / "a" / "up").symlink_to("../..")
    server = GateSFTPServer(Chan(), layout, None)  # type: ignore[arg-type]
    root = server.root
    segment = st.sampled_from(
        ["..", ".", "", "a", "b", "evil", "up", "x", "...", "é", " ", "\\", "\x00", "a\x00b"]
    )
    texts = st.lists(segment, max_size=14).map("/".join)
    prefixed = st.tuples(st.sampled_from(["", "/", "//", "./"]), texts).map("".join)
    paths = prefixed.map(str.encode) | st.binary(max_size=64)

    @settings(max_examples=1500, deadline=None, database=None)
    @given(paths)
    def check(path: bytes) -> None:
        try:
            local = server.map_path(path).decode()
        except asyncssh.SFTPError:
            return
        real = os.path.realpath(local)
        assert real == root or real.startswith(root + "/"), (path, local)
        assert ".." not in local.split("/")
        assert server.reverse_map_path(local.encode()).startswith(b"/")

    check()


async def test_setstat_cannot_lock_the_server_out_or_change_owners(gate):
    root = gate.layout.watch / "phone"
    async with connect(gate.sftp.port) as conn, conn.start_sftp_client() as sftp:
        async with sftp.open("f.tmp", "wb") as f:
            await f.write(b"12345")
        await sftp.chmod("f.tmp", 0)
        assert (root / "f.tmp").stat().st_mode & 0o777 == 0o600
        await sftp.chmod("f.tmp", 0o4777)
        assert (root / "f.tmp").stat().st_mode & 0o7777 == 0o755
        owner = (root / "f.tmp").stat().st_uid
        await sftp.setstat("f.tmp", asyncssh.SFTPAttrs(uid=12345, gid=12345))
        assert (root / "f.tmp").stat().st_uid == owner
        with pytest.raises(asyncssh.SFTPPermissionDenied):
            await sftp.truncate("f.tmp", 1)  # bytes already recorded cannot change in place
        assert (root / "f.tmp").read_bytes() == b"12345"
        await sftp.mkdir("d", asyncssh.SFTPAttrs(permissions=0))
        assert (root / "d").stat().st_mode & 0o777 == 0o700
        with pytest.raises(asyncssh.SFTPPermissionDenied):
            await sftp.rmdir("/")
        await sftp.rmdir("d")
        with pytest.raises(asyncssh.SFTPError):
            await sftp.rmdir(".")
    assert root.is_dir()


# -- nothing but SFTP ------------------------------------------------------------------------


async def test_openssh_shell_exec_scp_subsystems_and_forwarding_are_refused(
    gate, client_key, tmp_path
):
    port = gate.sftp.port
    canary = tmp_path / "canary"
    base = [need("ssh"), "-p", str(port), *ssh_options(client_key)]
    cases = {
        "exec": [*base, "phone@127.0.0.1", f"touch {canary}"],
        "shell": [*base, "-T", "phone@127.0.0.1"],
        "pty shell": [*base, "-tt", "phone@127.0.0.1"],
        "subsystem": [*base, "-s", "phone@127.0.0.1", "netconf"],
        "remote forward": [
            *base, "-N", "-o", "ExitOnForwardFailure=yes", "-R", "0:127.0.0.1:22",
            "phone@127.0.0.1",
        ],
        "legacy scp": [
            need("scp"), "-O", "-P", str(port), *ssh_options(client_key), str(client_key) + ".pub",
            "phone@127.0.0.1:scp-o.pub",
        ],
    }  # fmt: skip
    for name, cmd in cases.items():
        result = await run(*cmd, timeout=30)
        assert result.returncode != 0, name
        assert "failed" in result.stderr or "lost connection" in result.stderr, (name, result)
    assert not canary.exists()
    assert not (gate.layout.watch / "phone" / "scp-o.pub").exists()
    await sftp_batch(port, client_key, "pwd\n", tmp_path)  # and SFTP still works


async def test_asyncssh_channels_other_than_sftp_are_refused(gate, monkeypatch, tmp_path):
    created: list[Any] = []
    make = gate.sftp.new_sftp_server
    monkeypatch.setattr(
        gate.sftp,
        "new_sftp_server",
        lambda chan, owner: created.append(make(chan, owner)) or created[-1],
    )
    # With an agent path the client asks for agent forwarding (a server that allowed it would
    # hand out a socket path; checked by hand against asyncssh with agent_forwarding=True).
    agent = str(tmp_path / "agent.sock")
    async with connect(gate.sftp.port, agent_forwarding=True, agent_path=agent) as conn:
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.run("id")
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.create_process()  # a shell
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.create_session(asyncssh.SSHClientSession, subsystem="netconf")
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.create_connection(asyncssh.SSHTCPSession, "127.0.0.1", gate.metrics_port)
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.create_unix_connection(asyncssh.SSHTCPSession, "/run/docker.sock")
        with pytest.raises(asyncssh.ChannelListenError):
            await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", 22)
        with pytest.raises(asyncssh.ChannelListenError):
            await conn.forward_remote_path("/tmp/sftpgate-test.sock", "/tmp/x.sock")
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.create_session(
                asyncssh.SSHClientSession, subsystem="sftp", x11_forwarding=True,
                x11_display="127.0.0.1:0", x11_auth_path="/dev/null",
            )  # fmt: skip
        async with conn.start_sftp_client() as sftp:
            assert await sftp.realpath(".") == "/"
            # This session asked for agent forwarding; the server has no agent socket for it.
            (server,) = created
            assert server._chan.get_connection().get_agent_path() is None


# -- limits ----------------------------------------------------------------------------------


async def test_limits_on_connections_sessions_and_handles(
    tmp_path, standin, host_keys_dir, client_key
):
    users = [{"name": "phone", "password": PASSWORD}, {"name": "other", "password": PASSWORD}]
    async with running_gate(
        tmp_path, standin, host_keys_dir, client_key, users=users,
        max_connections=4, max_sessions_per_user=2, max_handles=20,
    ) as gate:  # fmt: skip
        port = gate.sftp.port
        async with connect(port) as a, connect(port) as b, connect(port, user="other") as c:
            one = await a.start_sftp_client()
            two = await b.start_sftp_client()
            with pytest.raises(asyncssh.ChannelOpenError):  # a third session of phone
                await a.start_sftp_client()
            async with c.start_sftp_client() as theirs:  # another user is not affected
                assert await theirs.realpath(".") == "/"
            # Handles: 20 per session, then SSH_FX_FAILURE until one is closed.
            handles = [await one.open(f"h{i}.tmp", "wb") for i in range(20)]
            with pytest.raises(asyncssh.SFTPFailure, match="Too many open handles"):
                await one.open("h20.tmp", "wb")
            with pytest.raises(asyncssh.SFTPFailure):
                await one.listdir(".")  # OPENDIR counts too
            assert await two.listdir(".")  # per session, not per user
            await handles.pop().close()
            await (await one.open("h20.tmp", "wb")).close()
            # Connections: three are open; a fourth (not even logged in) fills the limit.
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            await eventually(lambda: gate.sftp.connections == 4, what="4 connections")
            with pytest.raises((asyncssh.Error, OSError)):
                async with connect(port, user="other"):
                    pass
            writer.close()
            await eventually(lambda: gate.sftp.connections == 3, what="the socket to go")
            async with connect(port, user="other") as d, d.start_sftp_client() as s:
                assert await s.realpath(".") == "/"
            two.exit()
            await two.wait_closed()
            await eventually(lambda: gate.sftp.sessions["phone"] == 1, what="a session slot")
            async with a.start_sftp_client() as again:
                assert await again.realpath(".") == "/"
            for h in handles:
                await h.close()
            one.exit()


async def test_idle_connections_are_closed_and_busy_ones_are_not(
    tmp_path, standin, host_keys_dir, client_key
):
    async with running_gate(
        tmp_path, standin, host_keys_dir, client_key, idle_timeout_seconds=1.5
    ) as gate:
        loop = asyncio.get_running_loop()
        idle = await connect(gate.sftp.port)
        await idle.start_sftp_client()
        started = loop.time()  # its last request
        busy = await connect(gate.sftp.port)
        sftp = await busy.start_sftp_client()
        closed = asyncio.ensure_future(idle.wait_closed())
        closed_at: list[float] = []
        closed.add_done_callback(lambda _: closed_at.append(loop.time() - started))
        while loop.time() - started < 5:  # requests keep the busy one alive
            await sftp.realpath(".")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(closed), 0.2)
        assert closed_at, "the idle connection is still open"
        assert 1.4 <= closed_at[0] <= 5, closed_at
        assert await sftp.realpath(".") == "/"
        busy.close()


async def test_thousands_of_handles_and_garbage_cannot_take_the_server_down(
    tmp_path, standin, host_keys_dir, client_key
):
    config = gate_config(tmp_path, standin.url, host_keys_dir, client_key)
    async with ServerProcess(config) as server:
        port = server.port
        await sftp_batch(port, client_key, f"put {client_key}.pub warm.tmp\n", tmp_path)
        baseline = server.rss_bytes()
        # 1. 3,000 opens at once: 256 succeed (the default limit), the rest get an error.
        async with connect(port) as conn, conn.start_sftp_client() as sftp:
            results = await asyncio.gather(
                *(sftp.open(f"many{i}.tmp", "wb") for i in range(3000)), return_exceptions=True
            )
            assert sum(not isinstance(r, Exception) for r in results) == 256
            assert all(
                isinstance(r, asyncssh.SFTPFailure) for r in results if isinstance(r, Exception)
            )
            conn.abort()
        # 2. Not SSH at all, and SSH followed by junk.
        for junk in (os.urandom(256 * 1024), b"SSH-2.0-evil\r\n" + os.urandom(64 * 1024)):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(junk)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            with contextlib.suppress(ConnectionError):  # the server hangs up (FIN or RST)
                while await asyncio.wait_for(reader.read(65536), 30):
                    pass
            writer.close()
        # 3. Junk inside a logged-in SFTP channel: a 4 GiB length, random packets, a truncation.
        for payload in (
            b"\xff\xff\xff\xff" + os.urandom(1000),
            b"".join(
                len(body).to_bytes(4, "big") + body
                for body in (bytes([n % 256]) + os.urandom(n % 300) for n in range(2000))
            ),
            b"\x00\x00\x00\x05\x01\x00\x00",
        ):
            async with connect(port) as conn:
                chan, _ = await conn.create_session(
                    asyncssh.SSHClientSession, subsystem="sftp", encoding=None
                )
                chan.write(payload)
                chan.write_eof()
                await asyncio.wait_for(chan.wait_closed(), 30)
        # 4. Sixty connections that never log in, all at once.
        stalled = [await asyncio.open_connection("127.0.0.1", port) for _ in range(60)]
        for _, w in stalled:
            w.write(b"SSH-2.0-slow\r\n")
        # Through all that, another client still gets served.
        await sftp_batch(port, client_key, f"put {client_key}.pub after.tmp\n", tmp_path)
        for _, w in stalled:
            w.close()
        growth = server.rss_bytes() - baseline
        print(f"RSS growth after handles and garbage: {growth / 2**20:.1f} MiB")
        assert growth < 64 * 2**20
    landed = tmp_path / "data" / "watch" / "phone"
    assert (landed / "after.tmp").read_bytes() == Path(f"{client_key}.pub").read_bytes()
    assert not any((tmp_path / "data" / ".staging").iterdir())


# -- secrets ---------------------------------------------------------------------------------


async def test_keys_passwords_and_hashes_never_reach_logs_or_metrics(
    tmp_path, standin, host_keys_dir, client_key
):
    import aiohttp

    from sftpgate.sftp.passwords import hash_password

    hashed = hash_password("hash-user-secret")
    wrong = "Wr0ng-Candidate-Pa55"
    users = [
        {
            "name": "phone",
            "password": PASSWORD,
            "authorized_keys": [client_key.with_suffix(".pub").read_text().strip()],
        },
        {"name": "hashuser", "password_hash": hashed},
    ]
    config = gate_config(
        tmp_path, standin.url, host_keys_dir, client_key,
        sftp={"users": users}, log={"level": "debug", "format": "json"},
    )  # fmt: skip
    async with ServerProcess(config) as server:
        port = server.port
        async with connect(port) as conn, conn.start_sftp_client() as sftp:
            await sftp.put(str(client_key.with_suffix(".pub")), "k.tmp")
        async with connect(port, user="hashuser", password="hash-user-secret"):
            pass
        for user in ("phone", "hashuser", "nobody"):
            with pytest.raises(asyncssh.PermissionDenied):
                async with connect(port, user=user, password=wrong):
                    pass
        await sftp_batch(port, client_key, "ls\n", tmp_path)
        metrics_port = next(
            int(line.split('"metrics_port": ')[1].split(",")[0])
            for line in server.lines
            if '"event": "started"' in line
        )
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{metrics_port}/metrics") as r,
        ):
            metrics = await r.text()
    log = "\n".join(server.lines)
    assert "login failed" in log and '"event": "received"' in log  # the log did see it all
    secrets = [PASSWORD, wrong, "hash-user-secret", hashed, hashed.rsplit("$", 1)[1], API_KEY]
    for path in [client_key, *host_keys_dir.glob("ssh_host_*_key")]:
        body = [ln for ln in path.read_text().splitlines() if not ln.startswith("-----")]
        secrets += [ln for ln in body if len(ln) >= 40]
    for secret in secrets:
        assert secret not in log, f"a secret is in the log: {secret[:12]}…"
        assert secret not in metrics, f"a secret is in /metrics: {secret[:12]}…"
