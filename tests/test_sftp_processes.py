"""`sftp.processes: 2`: connections served by two connection processes behind the service.

Real clients, real processes and a real SIGKILL: uploads are committed by the service and reach
the Immich stand-in, two clients land on different processes, bans and `max_connections` hold
across them, metrics are the service's, a cut-off upload resumes on another process, a stop
parks what was under way, and a killed process is replaced without losing or doubling a file.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from .conftest import CORPUS, eventually, finished, gate_config, started_gate
from .test_sftp_clients import (
    ServerProcess,
    connect,
    ledger_rows,
    rclone_copy_twice,
    sftp_batch,
    sha1,
)
from .test_sftp_proxy import logged, login, refusals, refused_raw, relay, v1, v2

TWO = {"processes": 2}


def gauge(gate: Any, name: str) -> float:
    return float(getattr(gate.metrics, name)._value.get())


async def begin_upload(gate: Any, name: str, body: bytes) -> Any:
    """A new connection that writes `body` into `name` and leaves it open: (connection, file)."""
    conn = await connect(gate.sftp.port)
    sftp = await conn.start_sftp_client()
    f = await sftp.open(name, "wb")
    await f.write(body)
    return conn, f


def serving(gate: Any) -> list[int]:
    """Connections per connection process."""
    return [len(c.connections) for c in gate.sftp.children]


async def test_two_clients_land_on_two_processes_and_their_uploads_reach_immich(
    tmp_path: Path, standin: Any, host_keys_dir: Path, client_key: Path
) -> None:
    photo = (CORPUS / "jpeg" / "apple-iphone4-gps.jpg").read_bytes()
    data = os.urandom(3_000_000)
    async with started_gate(tmp_path, standin, host_keys_dir, client_key, sftp=TWO) as gate:
        pids = {c.pid for c in gate.sftp.children}
        assert len(pids) == 2 and os.getpid() not in pids
        async with (
            connect(gate.sftp.port) as a,
            connect(gate.sftp.port) as b,
            a.start_sftp_client() as sa,
            b.start_sftp_client() as sb,
        ):
            assert serving(gate) == [1, 1]  # each on a process of its own
            await eventually(lambda: gauge(gate, "sftp_sessions") == 2, what="two sessions")

            async def put(sftp: Any, name: str, body: bytes) -> None:
                async with sftp.open(name, "wb") as f:
                    await f.write(body)

            await asyncio.gather(put(sa, "photo.jpg", photo), put(sb, "noise.bin", data))
            assert (await sb.stat("noise.bin")).size == len(data)
        await eventually(lambda: gauge(gate, "sftp_sessions") == 0, what="sessions closed")
        assert gate.metrics.received_bytes._value.get() == len(photo) + len(data)
        await gate.pipeline.wait_for(finished(2), timeout=60)
        rows = await ledger_rows(gate)
        assert rows[("phone", "photo.jpg")].sha1 == sha1(photo)
        assert rows[("phone", "noise.bin")].sha1 == sha1(data)
        assert [a.original_file_name for a in standin.state.assets.values()] == ["photo.jxl"]
        # OpenSSH's client too, and what it lists comes from the service's ledger.
        (tmp_path / "up").mkdir()
        (tmp_path / "up" / "c.bin").write_bytes(data[:1000])
        out = await sftp_batch(gate.sftp.port, client_key, "put c.bin\nls -l\n", tmp_path / "up")
        assert "photo.jpg" in out.stdout and "c.bin" in out.stdout


async def test_rclone_over_both_processes_sets_times_after_close_and_then_sends_nothing(
    tmp_path: Path, standin: Any, host_keys_dir: Path, client_key: Path
) -> None:
    """Through connection processes: CLOSE committed by the service, the SETSTAT by path that
    follows it, and listings read from the ledger file the service writes."""
    async with started_gate(tmp_path, standin, host_keys_dir, client_key, sftp=TWO) as gate:
        await rclone_copy_twice(gate, client_key, tmp_path)


async def test_bans_and_limits_hold_across_processes(
    tmp_path: Path, standin: Any, host_keys_dir: Path, client_key: Path
) -> None:
    sftp = {**TWO, "ban_after_failures": 4, "max_connections": 3, "max_sessions_per_user": 2}
    async with started_gate(tmp_path, standin, host_keys_dir, client_key, sftp=sftp) as gate:

        async def wrong() -> None:
            with pytest.raises(asyncssh.PermissionDenied):
                async with connect(gate.sftp.port, password="wrong"):
                    pass

        attempts = [asyncio.create_task(wrong()) for _ in range(2)]
        # Both processes hold a failing login (each waits out the failed-login delay).
        await eventually(lambda: serving(gate) == [1, 1], what="one attempt on each process")
        await asyncio.gather(*attempts)
        await asyncio.gather(wrong(), wrong())
        assert gate.metrics.sftp_auth_failures._value.get() == 4
        with pytest.raises((asyncssh.Error, OSError)):
            async with connect(gate.sftp.port):  # the right password, but banned now
                pass
        gate.sftp.guard._failures.clear()  # the ban lifted, as after ban_seconds
        await eventually(lambda: serving(gate) == [0, 0], what="the attempts' ends counted")

        async with (
            connect(gate.sftp.port) as c1,
            connect(gate.sftp.port) as c2,
            connect(gate.sftp.port) as c3,
        ):
            assert serving(gate) == [2, 1]  # c1 and c3 on the first, c2 on the second
            with pytest.raises((asyncssh.Error, OSError)):
                async with connect(gate.sftp.port):
                    pass
            assert sum(serving(gate)) == 3
            # Sessions per user count over both processes: c3's would be the third.
            async with c1.start_sftp_client(), c2.start_sftp_client():
                await eventually(
                    lambda: sum(c.sessions["phone"] for c in gate.sftp.children) == 2,
                    what="the service to count both sessions",
                )
                with pytest.raises(asyncssh.ChannelOpenError):
                    await c3.start_sftp_client()


async def test_a_cut_off_upload_resumes_on_the_other_process_and_a_stop_parks_one(
    tmp_path: Path, standin: Any, host_keys_dir: Path, client_key: Path
) -> None:
    data = os.urandom(4_000_000)
    async with started_gate(tmp_path, standin, host_keys_dir, client_key, sftp=TWO) as gate:
        conn, _ = await begin_upload(gate, "clip.bin", data[:1_500_000])
        parker = serving(gate).index(1)
        conn.abort()  # Wi-Fi gone
        part = await eventually(lambda: gate.sftp.parts.get("phone", "clip.bin"), what="a part")
        assert part.size == 1_500_000
        await eventually(lambda: serving(gate) == [0, 0], what="the connection ended")
        async with connect(gate.sftp.port) as first:
            first_on = serving(gate).index(1)
            async with connect(gate.sftp.port) as second:  # on the process the first left free
                other = first if first_on != parker else second
                async with other.start_sftp_client() as s2:
                    assert (await s2.stat("clip.bin")).size == 1_500_000
                    async with s2.open("clip.bin", "ab") as g:
                        await g.write(data[1_500_000:], 1_500_000)
        row = (await ledger_rows(gate))[("phone", "clip.bin")]
        assert (row.sha1, row.size) == (sha1(data), len(data))

        conn, _ = await begin_upload(gate, "late.bin", data[:1_000_000])
        await eventually(
            lambda: sum(p.stat().st_size for p in gate.layout.staging.iterdir()) >= 1_000_000,
            what="the bytes to arrive",
        )
    # The service stopped with the upload open: it is parked, not delivered.
    await asyncio.wait_for(conn.wait_closed(), 10)
    parked = list((tmp_path / "data" / ".resume").glob("*.part"))
    assert [p.read_bytes() for p in parked] == [data[:1_000_000]]
    async with started_gate(tmp_path, standin, host_keys_dir, client_key, sftp=TWO) as gate:
        async with connect(gate.sftp.port) as c, c.start_sftp_client() as s:
            assert (await s.stat("late.bin")).size == 1_000_000
            async with s.open("late.bin", "ab") as g:
                await g.write(data[1_000_000:], 1_000_000)
        row = (await ledger_rows(gate))[("phone", "late.bin")]
        assert (row.sha1, row.size) == (sha1(data), len(data))


async def test_a_killed_process_is_replaced_and_the_retry_delivers_the_file_once(
    tmp_path: Path, standin: Any, host_keys_dir: Path, client_key: Path
) -> None:
    data = os.urandom(6_000_000)
    async with started_gate(tmp_path, standin, host_keys_dir, client_key, sftp=TWO) as gate:
        conn, f = await begin_upload(gate, "movie.bin", data[:2_000_000])
        victim = gate.sftp.children[serving(gate).index(1)]
        survivor = next(c for c in gate.sftp.children if c is not victim)
        os.kill(victim.pid, signal.SIGKILL)
        with pytest.raises((asyncssh.Error, OSError)):
            await f.write(data[2_000_000:], 2_000_000)
            await f.close()
        conn.abort()
        await eventually(
            lambda: len(gate.sftp.children) == 2 and victim not in gate.sftp.children,
            what="a new connection process",
        )
        assert survivor in gate.sftp.children
        assert not (gate.layout.watch / "phone" / "movie.bin").exists()
        assert await ledger_rows(gate) == {}
        await eventually(lambda: gauge(gate, "sftp_sessions") == 0, what="its session gone")
        # The client retries from scratch, on a new connection.
        async with (
            connect(gate.sftp.port) as c,
            c.start_sftp_client() as s,
            s.open("movie.bin", "wb") as g,
        ):
            await g.write(data)
        await gate.pipeline.wait_for(finished(1), timeout=60)
        rows = await gate.db(lambda db: list(db.iter_all()))
        assert [(r.path, r.sha1) for r in rows] == [("movie.bin", sha1(data))]


def connection_processes(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmd = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"sftpgate.sftp.processes" in cmd:
                found.append(int(child))
    return found


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


async def test_connection_processes_end_with_a_killed_service(
    tmp_path: Path, standin: Any, host_keys_dir: Path, client_key: Path
) -> None:
    config = gate_config(tmp_path, standin.url, host_keys_dir, client_key, sftp=TWO)
    async with ServerProcess(config) as server:
        assert server.proc is not None
        children = await eventually(
            lambda: len(pids := connection_processes(server.proc.pid)) == 2 and pids,
            what="two connection processes",
        )
        async with connect(server.port) as conn, conn.start_sftp_client() as sftp:
            await sftp.listdir(".")
            server.proc.kill()
            await server.proc.wait()
            # Their socket to the service ends: they close their connections and exit.
            await eventually(lambda: not any(alive(p) for p in children), what="children gone")
            await asyncio.wait_for(conn.wait_closed(), 10)


async def test_behind_a_proxy_the_header_names_the_client_and_bad_headers_are_refused(
    tmp_path: Path, standin: Any, host_keys_dir: Path, client_key: Path, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, logger="sftpgate")
    sftp = {
        **TWO,
        "proxy_protocol": ["127.0.0.1/32"],
        "ban_after_failures": 2,
        "ban_seconds": 600,
        "failed_login_delay_seconds": 0.05,
    }
    async with started_gate(tmp_path, standin, host_keys_dir, client_key, sftp=sftp) as gate:
        port = gate.sftp.port
        async with (
            relay(port, v1("203.0.113.7")) as (guesser, _),
            relay(port, v2("2001:db8::9")) as (phone, _),
        ):
            await login(phone)
            for _ in range(2):
                with pytest.raises(asyncssh.PermissionDenied):
                    await login(guesser, password="guess")
            await eventually(
                lambda: gauge(gate, "sftp_auth_failures") == 2, what="both failures counted"
            )
            with pytest.raises((asyncssh.Error, OSError)):
                await login(guesser)  # banned by the address in its header...
            assert {"address": "203.0.113.7", "reason": "too many failed logins"} in logged(
                caplog, "login refused"
            )
            await login(phone)  # ...while another phone behind the same proxy is not
        # A malformed header is refused by the service, which goes on serving.
        await refused_raw(port, b"PROXY TCP4 203.0.113.7 127.0.0.1 50000\r\n")
        await eventually(lambda: refusals(caplog), what="the refusal's log line")
        (line,) = refusals(caplog)
        assert line["address"] == "127.0.0.1" and "malformed PROXY v1 header" in line["reason"]
        # A header from an address that is not a proxy is refused by the connection process;
        # plain SSH from there is served.
        async with relay(port, v1("198.51.100.4"), bind="127.0.0.2") as (spoofer, _):
            with pytest.raises((asyncssh.Error, OSError)):
                await login(spoofer)
        await login(port, local_addr=("127.0.0.4", 0))
