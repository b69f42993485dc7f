"""Who gets in: host keys (ed25519, RSA with rsa-sha2-256/512) that stay the same over restarts,
client keys (ed25519, ecdsa, RSA), authorized_keys with OpenSSH options, passwords (plain,
argon2id from `sftpgate hash-password`, scrypt, crypt(3)), atmoz/sftp's users.conf, and the
brute-force defences: one answer and one delay for every failure, bans per address."""

from __future__ import annotations

import asyncio
import hashlib
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import asyncssh
import pytest
import yaml

from .conftest import API_KEY, PASSWORD, eventually, gate_config
from .test_sftp_clients import need, run, running_gate, sftp_batch

REPO = Path(__file__).resolve().parents[1]


def write_key(path: Path, alg: str, **kw: Any) -> asyncssh.SSHKey:
    key = asyncssh.generate_private_key(alg, comment=path.name, **kw)
    path.write_bytes(key.export_private_key())
    path.chmod(0o600)
    path.with_suffix(".pub").write_bytes(key.export_public_key())
    return key


def pub(key: asyncssh.SSHKey) -> str:
    return key.export_public_key().decode().strip()


async def key_login(port: int, user: str, key: Any, **kw: Any) -> asyncssh.SSHClientConnection:
    return await asyncssh.connect(
        "127.0.0.1", port, username=user, client_keys=[key], password=None, known_hosts=None,
        preferred_auth="publickey", **kw,
    )  # fmt: skip


async def password_login(port: int, user: str, password: str, **kw: Any) -> None:
    async with (
        asyncssh.connect(
            "127.0.0.1", port, username=user, password=password, client_keys=None,
            known_hosts=None, preferred_auth="password", **kw,
        ) as conn,
        conn.start_sftp_client() as sftp,
    ):  # fmt: skip
        assert await sftp.realpath(".") == "/"


async def askpass_sftp(tmp_path: Path, port: int, user: str, password: str) -> tuple[int, str]:
    """OpenSSH sftp logging in with a password (typed by SSH_ASKPASS), commands on stdin."""
    askpass = tmp_path / "askpass.sh"
    askpass.write_text('#!/bin/sh\necho "$SFTPGATE_TEST_PASSWORD"\n')
    askpass.chmod(0o700)
    env = {
        **os.environ,
        "SSH_ASKPASS": str(askpass),
        "SSH_ASKPASS_REQUIRE": "force",
        "SFTPGATE_TEST_PASSWORD": password,
    }
    result = await run(
        need("sftp"), "-P", str(port), "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null", "-o", "PubkeyAuthentication=no",
        "-o", "PreferredAuthentications=password", "-o", "NumberOfPasswordPrompts=1",
        "-o", "LogLevel=ERROR", f"{user}@127.0.0.1",
        env=env, stdin=b"pwd\n",
    )  # fmt: skip
    return result.returncode, result.stdout + result.stderr


# -- host keys -------------------------------------------------------------------------------


async def fingerprints(port: int) -> dict[str, str]:
    """The host key the server proves for each algorithm the client insists on."""
    out = {}
    for alg in ("ssh-ed25519", "rsa-sha2-256", "rsa-sha2-512"):
        async with asyncssh.connect(
            "127.0.0.1", port, username="phone", password=PASSWORD, known_hosts=None,
            client_keys=None, server_host_key_algs=[alg],
        ) as conn:  # fmt: skip
            key = conn.get_server_host_key()
            assert key is not None
            out[alg] = key.get_fingerprint()
    return out


def known_hosts_line(port: int, keys_dir: Path) -> str:
    return "".join(
        f"[127.0.0.1]:{port} {(keys_dir / name).read_text().strip()}\n"
        for name in ("ssh_host_ed25519_key.pub", "ssh_host_rsa_key.pub")
    )


async def test_host_keys_ed25519_and_rsa_sha2_match_the_files(
    gate, host_keys_dir, client_key, tmp_path
):
    seen = await fingerprints(gate.sftp.port)
    ed = asyncssh.read_public_key(host_keys_dir / "ssh_host_ed25519_key.pub").get_fingerprint()
    rsa = asyncssh.read_public_key(host_keys_dir / "ssh_host_rsa_key.pub").get_fingerprint()
    assert seen == {"ssh-ed25519": ed, "rsa-sha2-256": rsa, "rsa-sha2-512": rsa}
    known = tmp_path / "known_hosts"
    known.write_text(known_hosts_line(gate.sftp.port, host_keys_dir))
    for alg in ("ssh-ed25519", "rsa-sha2-512", "rsa-sha2-256"):
        await sftp_batch(
            gate.sftp.port, client_key, "pwd\n", tmp_path,
            extra=("-o", f"HostKeyAlgorithms={alg}", "-o", "StrictHostKeyChecking=yes",
                   "-o", f"UserKnownHostsFile={known}"),
        )  # fmt: skip


async def test_host_keys_are_created_once_and_survive_restarts(tmp_path, standin, client_key):
    # The default is a relative folder, resolved beside the config file.
    cfg = gate_config(tmp_path, standin.url, Path("keys"), client_key)
    from sftpgate.config import load_config
    from sftpgate.server import Service

    config = load_config(cfg)
    first = Service(config)
    await first.start()
    try:
        before = await fingerprints(first.sftp.port)
    finally:
        await first.stop()
    keys_dir = tmp_path / "keys"
    files = {p.name: p.read_bytes() for p in keys_dir.iterdir()}
    assert sorted(files) == [
        "ssh_host_ed25519_key", "ssh_host_ed25519_key.pub", "ssh_host_rsa_key", "ssh_host_rsa_key.pub",
    ]  # fmt: skip
    assert (keys_dir / "ssh_host_rsa_key").stat().st_mode & 0o777 == 0o600
    second = Service(config)
    await second.start()
    try:
        assert await fingerprints(second.sftp.port) == before
        known = tmp_path / "known_hosts"
        known.write_text(known_hosts_line(second.sftp.port, keys_dir))
        # A client that remembered the key connects with strict checking: no "host key changed".
        await sftp_batch(
            second.sftp.port, client_key, "pwd\n", tmp_path,
            extra=("-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known}"),
        )  # fmt: skip
    finally:
        await second.stop()
    assert {p.name: p.read_bytes() for p in keys_dir.iterdir()} == files


# -- client keys and authorized_keys ---------------------------------------------------------


async def test_client_keys_ed25519_ecdsa_and_rsa_sha2(tmp_path, standin, host_keys_dir, client_key):
    keys = {
        "ecdsa": write_key(tmp_path / "id_ecdsa", "ecdsa-sha2-nistp256"),
        "ecdsa384": write_key(tmp_path / "id_ecdsa384", "ecdsa-sha2-nistp384"),
        "rsa": write_key(tmp_path / "id_rsa", "ssh-rsa", key_size=2048),
    }
    stranger = write_key(tmp_path / "id_stranger", "ssh-ed25519")
    users = [
        {
            "name": "phone",
            "authorized_keys": [client_key.with_suffix(".pub").read_text().strip()]
            + [pub(k) for k in keys.values()],
        }
    ]
    async with running_gate(tmp_path, standin, host_keys_dir, client_key, users=users) as gate:
        port = gate.sftp.port
        for path, algs in [
            (client_key, "ssh-ed25519"),
            (tmp_path / "id_ecdsa", "ecdsa-sha2-nistp256"),
            (tmp_path / "id_ecdsa384", "ecdsa-sha2-nistp384"),
            (tmp_path / "id_rsa", "rsa-sha2-512"),
            (tmp_path / "id_rsa", "rsa-sha2-256"),
        ]:
            await sftp_batch(
                port, path, "pwd\n", tmp_path, extra=("-o", f"PubkeyAcceptedAlgorithms={algs}")
            )
        refused = await sftp_batch(port, tmp_path / "id_stranger", "pwd\n", tmp_path, check=False)
        assert refused.returncode != 0 and "Permission denied" in refused.stderr
        with pytest.raises(asyncssh.PermissionDenied):
            await key_login(port, "phone", stranger)


async def test_authorized_keys_file_with_openssh_options(
    tmp_path, standin, host_keys_dir, client_key
):
    here = write_key(tmp_path / "k_here", "ssh-ed25519")
    elsewhere = write_key(tmp_path / "k_elsewhere", "ssh-ed25519")
    sftp_only = write_key(tmp_path / "k_sftp_only", "ecdsa-sha2-nistp256")
    forced = write_key(tmp_path / "k_forced", "ssh-ed25519")
    canary = tmp_path / "canary"
    authorized = tmp_path / "authorized_keys"
    authorized.write_text(
        "# the phone's keys\n\n"
        f'from="127.0.0.1,::1",no-port-forwarding,no-agent-forwarding,no-X11-forwarding,no-pty {pub(here)}\n'
        f'from="10.1.2.3" {pub(elsewhere)}\n'
        f'restrict,command="internal-sftp" {pub(sftp_only)}\n'
        f'command="/usr/bin/touch {canary}" {pub(forced)}\n'
    )
    users = [{"name": "phone", "authorized_keys": [str(authorized)]}]
    async with running_gate(tmp_path, standin, host_keys_dir, client_key, users=users) as gate:
        port = gate.sftp.port
        for key in (here, sftp_only):  # command="internal-sftp" means SFTP, as with OpenSSH
            async with await key_login(port, "phone", key) as conn, conn.start_sftp_client() as s:
                assert await s.realpath(".") == "/"
        with pytest.raises(asyncssh.PermissionDenied):  # from= names another address
            await key_login(port, "phone", elsewhere)
        # Any other forced command: logged in, but nothing runs and no session opens.
        async with await key_login(port, "phone", forced) as conn:
            with pytest.raises((asyncssh.ChannelOpenError, asyncssh.SFTPError, OSError)):
                await conn.start_sftp_client()
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.run("true")
        await sftp_batch(port, tmp_path / "k_here", "pwd\n", tmp_path)
    assert not canary.exists()


# -- passwords -------------------------------------------------------------------------------


async def hash_password_cli(password: str) -> str:
    result = await run(
        sys.executable, "-m", "sftpgate.main", "hash-password", stdin=f"{password}\n".encode(),
        cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


async def test_password_hashes_argon2id_scrypt_and_crypt_log_in(
    tmp_path, standin, host_keys_dir, client_key
):
    from sftpgate.sftp.passwords import _ab64_decode, hash_password

    argon, argon_again = await asyncio.gather(hash_password_cli("pw-a"), hash_password_cli("pw-a"))
    assert argon.startswith("$argon2id$") and argon != argon_again  # salted
    assert "pw-a" not in argon
    scrypt = hash_password("pw-s", "scrypt")
    # Checked by an independent computation: passlib's $scrypt$ format over hashlib.scrypt.
    _, _, params, salt, digest = scrypt.split("$")
    p = dict(kv.split("=") for kv in params.split(","))
    assert hashlib.scrypt(
        b"pw-s", salt=_ab64_decode(salt), n=1 << int(p["ln"]), r=int(p["r"]), p=int(p["p"]),
        maxmem=2**27, dklen=32,
    ) == _ab64_decode(digest)  # fmt: skip
    need("openssl")
    sha512 = (await run("openssl", "passwd", "-6", "pw-c")).stdout.strip()
    md5 = (await run("openssl", "passwd", "-1", "pw-m")).stdout.strip()
    users = [
        {"name": "argon", "password_hash": argon},
        {"name": "scrypt", "password_hash": scrypt},
        {"name": "sha512", "password_hash": sha512},
        {"name": "md5", "password_hash": md5},
        {"name": "phone", "password": PASSWORD},
    ]
    async with running_gate(
        tmp_path, standin, host_keys_dir, client_key, users=users,
        failed_login_delay_seconds=0.05, ban_after_failures=100,
    ) as gate:  # fmt: skip
        port = gate.sftp.port
        for user, right in [
            ("argon", "pw-a"),
            ("scrypt", "pw-s"),
            ("sha512", "pw-c"),
            ("md5", "pw-m"),
        ]:
            await password_login(port, user, right)
            with pytest.raises(asyncssh.PermissionDenied):
                await password_login(port, user, right + "x")
        code, out = await askpass_sftp(tmp_path, port, "argon", "pw-a")
        assert code == 0 and "Remote working directory: /" in out, out
        code, out = await askpass_sftp(tmp_path, port, "argon", "pw-b")
        assert code != 0 and "Permission denied" in out


def test_a_password_hash_sftpgate_cannot_verify_stops_start_up(tmp_path):
    from sftpgate.config import ConfigError, config_from_dict

    doc = {
        "immich": {"url": "http://immich:2283", "api_key": API_KEY},
        "sftp": {"users": [{"name": "phone", "password_hash": "hunter2"}]},
    }
    with pytest.raises(ConfigError) as err:
        config_from_dict(doc, base_dir=tmp_path, env={})
    assert any(p.startswith("sftp.users[0].password_hash:") for p in err.value.problems)


# -- unknown users, delays and bans ----------------------------------------------------------


async def timed_failure(port: int, user: str, password: str, **kw: Any) -> tuple[float, str]:
    started = time.monotonic()
    with pytest.raises(asyncssh.PermissionDenied) as err:
        await password_login(port, user, password, **kw)
    return time.monotonic() - started, str(err.value.reason)


async def test_unknown_and_known_users_get_the_same_answer_after_the_same_time(
    tmp_path, standin, host_keys_dir, client_key
):
    argon = await hash_password_cli("pw")
    users = [
        {"name": "phone", "password": PASSWORD},
        {"name": "hashed", "password_hash": argon},
        {
            "name": "keyonly",
            "authorized_keys": [client_key.with_suffix(".pub").read_text().strip()],
        },
    ]
    delay = 0.4
    async with running_gate(
        tmp_path, standin, host_keys_dir, client_key, users=users,
        failed_login_delay_seconds=delay, ban_after_failures=1000,
    ) as gate:  # fmt: skip
        port = gate.sftp.port
        times: dict[str, list[float]] = {}
        reasons = set()
        for _ in range(3):
            for user in ("phone", "hashed", "keyonly", "nobody"):
                took, reason = await timed_failure(port, user, "wrong password")
                times.setdefault(user, []).append(took)
                reasons.add(reason.replace(f"user {user} ", "user USER "))
        assert len(reasons) == 1, reasons
        means = {u: statistics.mean(t) for u, t in times.items()}
        assert all(m >= delay for m in means.values()), means
        assert max(means.values()) - min(means.values()) < 0.25, means
        # OpenSSH's words are the same too, but for the user name it echoes.
        stranger = tmp_path / "id_stranger"
        write_key(stranger, "ssh-ed25519")
        said = []
        for user in ("phone", "nobody"):
            r = await sftp_batch(port, stranger, "pwd\n", tmp_path, user=user, check=False)
            said.append(r.stderr.replace(user, "USER"))
        assert said[0] == said[1] and "Permission denied" in said[0]


async def test_failed_logins_are_delayed_and_a_repeating_address_is_banned_for_a_while(
    tmp_path, standin, host_keys_dir, client_key
):
    async with running_gate(
        tmp_path, standin, host_keys_dir, client_key,
        failed_login_delay_seconds=0.3, ban_after_failures=3, ban_seconds=3,
    ) as gate:  # fmt: skip
        port = gate.sftp.port
        for _ in range(3):
            took, _ = await timed_failure(port, "phone", "guess")
            assert took >= 0.3
        # Now even the right password from that address is turned away before any login...
        with pytest.raises((asyncssh.Error, OSError)):
            await password_login(port, "phone", PASSWORD)
        # ...while another address is served.
        await password_login(port, "phone", PASSWORD, local_addr=("127.0.0.2", 0))
        assert gate.metrics.sftp_auth_failures._value.get() == 3
        # Wrong keys count too (a client that gives up after its keys were refused).
        stranger = tmp_path / "id_stranger"
        write_key(stranger, "ssh-ed25519")
        for _ in range(3):
            r = await sftp_batch(
                port,
                stranger,
                "pwd\n",
                tmp_path,
                extra=("-o", "BindAddress=127.0.0.3"),
                check=False,
            )
            assert r.returncode != 0
        with pytest.raises((asyncssh.Error, OSError)):
            await password_login(port, "phone", PASSWORD, local_addr=("127.0.0.3", 0))

        async def allowed_again() -> bool:
            try:
                await password_login(port, "phone", PASSWORD)
            except (asyncssh.Error, OSError):
                return False
            return True

        started = time.monotonic()
        await eventually(allowed_again, timeout=10, what="the ban to end")
        assert time.monotonic() - started < 4


# -- atmoz/sftp users.conf -------------------------------------------------------------------


async def test_users_conf_from_atmoz_sftp_logs_in_and_creates_the_folders(
    tmp_path, standin, host_keys_dir, client_key
):
    need("openssl")
    sha512 = (await run("openssl", "passwd", "-6", "bob-pw")).stdout.strip()
    md5 = (await run("openssl", "passwd", "-1", "dave-pw")).stdout.strip()
    (tmp_path / "users.conf").write_text(
        "# moved over from atmoz/sftp\n"
        "alice:alice-pw:1001:100:upload\n"
        "\n"
        f"bob:{sha512}:e:1002:100:photos,docs/scans\n"
        "carol::1003:100:upload\n"
        f"dave:{md5}:e\n"
    )
    keys = tmp_path / "home" / "carol" / ".ssh" / "keys"
    keys.mkdir(parents=True)
    (keys / "phone.pub").write_text(client_key.with_suffix(".pub").read_text())
    async with running_gate(
        tmp_path, standin, host_keys_dir, client_key,
        users_conf="users.conf", users_conf_home="home",  # relative to the config file
        failed_login_delay_seconds=0.05,
    ) as gate:  # fmt: skip
        port = gate.sftp.port
        assert [u.name for u in gate.config.sftp.users] == [
            "phone",
            "alice",
            "bob",
            "carol",
            "dave",
        ]
        await password_login(port, "alice", "alice-pw")
        await password_login(port, "bob", "bob-pw")
        await password_login(port, "dave", "dave-pw")
        for user, wrong in [("bob", "alice-pw"), ("carol", ""), ("carol", "x"), ("dave", "x")]:
            with pytest.raises(asyncssh.PermissionDenied):
                await password_login(port, user, wrong)
        out = await sftp_batch(
            port, client_key, "ls\nput batch.txt upload/x.txt\n", tmp_path, user="carol"
        )
        assert "upload" in out.stdout
        async with (
            asyncssh.connect(
                "127.0.0.1", port, username="bob", password="bob-pw", known_hosts=None,
                client_keys=None,
            ) as conn,
            conn.start_sftp_client() as sftp,
        ):  # fmt: skip
            assert await sftp.isdir("photos") and await sftp.isdir("docs/scans")
        rows = await gate.db(lambda db: list(db.iter_all()))
        assert [(r.user, r.path) for r in rows] == [("carol", "upload/x.txt")]


def test_users_conf_problems_name_the_line(tmp_path):
    from sftpgate.config import ConfigError, config_from_dict

    (tmp_path / "users.conf").write_text(
        "phone:dup\n"  # 1: also in sftp.users
        "bad name:pw\n"  # 2
        "eve::1005\n"  # 3: key-only without keys
        "frank:not-a-hash:e\n"  # 4
        "gina:pw:abc:100\n"  # 5: uid not a number
        "ok:pw:1:1:../../etc\n"  # 6: folder escapes
        "fine:pw\n"  # 7
    )
    doc = {
        "immich": {"url": "http://immich:2283", "api_key": API_KEY},
        "sftp": {"users_conf": "users.conf", "users": [{"name": "phone", "password": "x"}]},
    }
    with pytest.raises(ConfigError) as err:
        config_from_dict(doc, base_dir=tmp_path, env={})
    lines = {p.split(":")[1].strip() for p in err.value.problems if p.startswith("sftp.users_conf")}
    assert lines == {f"line {n}" for n in range(1, 7)}, err.value.problems
    # The whole command line says the same and exits 2.
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(doc))
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "sftpgate.main", "--config", str(tmp_path / "config.yaml"), "check-config"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and "sftp.users_conf: line 4:" in result.stderr
