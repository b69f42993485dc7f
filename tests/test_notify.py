"""Notifications through the whole service, to a real local HTTP receiver and a real local SMTP
server: undone files in batches, Immich down and back, a low disk, the daily digest, targets
that fail (retried, never slowing the pipeline), and `sftpgate status`."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, web
from aiosmtpd.controller import Controller

from sftpgate.config import ConfigError, config_from_dict, load_config
from sftpgate.notify import STATE_FILE, redact_url, webhook_format

from .conftest import API_KEY, PASSWORD, eventually, gate_config, started_gate
from .test_sftp_clients import connect

NOT_A_PHOTO = b"<html><body>not a photo</body></html>\n" * 20


@dataclass
class Receiver:
    """A webhook receiver: records every POST; answers `status`."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200
    port: int = 0
    runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def events(self, header: str | None = None) -> list[str]:
        if header:
            return [r["headers"].get(header, "") for r in self.requests]
        return [r["json"].get("event", "") for r in self.requests if r["json"]]


async def start_receiver(port: int = 0) -> Receiver:
    rec = Receiver()

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        rec.requests.append(
            {
                "path": request.path,
                "query": dict(request.query),
                "headers": dict(request.headers),
                "body": body.decode(),
                "json": doc,
            }
        )
        return web.Response(status=rec.status, text="ok")

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    rec.runner = web.AppRunner(app, access_log=None)
    await rec.runner.setup()
    site = web.TCPSite(rec.runner, "127.0.0.1", port)
    await site.start()
    rec.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return rec


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = await start_receiver()
    yield rec
    assert rec.runner is not None
    await rec.runner.cleanup()


class Mailbox:
    """aiosmtpd handler: keeps every message; refuses the next `refuse` recipients with 550."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.refuse = 0
        self.port = 0

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if self.refuse > 0:
            self.refuse -= 1
            return "550 5.7.1 relaying denied for now"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(
            {"from": envelope.mail_from, "to": envelope.rcpt_tos, "data": envelope.content.decode()}
        )
        return "250 Message accepted for delivery"


@pytest.fixture
def mailbox() -> Any:
    box = Mailbox()
    box.port = free_port()
    controller = Controller(box, hostname="127.0.0.1", port=box.port)
    controller.start()
    yield box
    controller.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def notifying_gate(
    tmp_path: Path, standin: Any, host_keys_dir: Path, client_key: Path, **notify: Any
) -> contextlib.AbstractAsyncContextManager[Any]:
    notify.setdefault("disk_free_below", "0")
    return started_gate(tmp_path, standin, host_keys_dir, client_key, notify=notify)


async def upload(port: int, files: dict[str, bytes]) -> None:
    async with connect(port) as conn, conn.start_sftp_client() as sftp:
        for name, data in files.items():
            async with sftp.open(name, "wb") as f:
                await f.write(data)


def counter(gate: Any, name: str, target: str) -> float:
    return getattr(gate.metrics, name).labels(target=target)._value.get()


async def test_undone_files_are_told_in_batches_by_webhook_and_mail(
    tmp_path, standin, host_keys_dir, client_key, receiver, mailbox, caplog
):
    caplog.set_level(logging.INFO, logger="sftpgate")
    mailbox.refuse = 2  # the mail server refuses the first two tries, then takes the message
    names = [f"bad{i}.jpg" for i in range(3)]
    async with notifying_gate(
        tmp_path, standin, host_keys_dir, client_key,
        webhook=receiver.url("/hook"), min_interval="1h",
        smtp={"host": "127.0.0.1", "port": mailbox.port, "security": "none",
              "sender": "gate@example.org", "to": ["me@example.org"]},
    ) as gate:  # fmt: skip
        await upload(gate.sftp.port, {names[0]: NOT_A_PHOTO + b"0"})
        await gate.pipeline.wait_for(lambda c: c.get("undone", 0) == 1, timeout=60)
        await upload(gate.sftp.port, {n: NOT_A_PHOTO + n.encode() for n in names[1:]})
        await gate.pipeline.wait_for(lambda c: c.get("undone", 0) == 3, timeout=60)
        await eventually(lambda: receiver.requests and mailbox.messages, what="the first message")
        assert receiver.events() == ["undone"]  # the rest waits for min_interval...
        assert counter(gate, "notification_failures", "mail") == 2
        assert counter(gate, "notifications_sent", "webhook") == 1
    # ...and goes out when the service stops, so nothing gathered is lost.
    assert receiver.events() == ["undone", "undone"]
    told = [f for r in receiver.requests for f in r["json"]["files"]]
    assert sorted(f["path"] for f in told) == names
    assert all(f["user"] == "phone" and f["reason"] for f in told)
    first = receiver.requests[0]["json"]
    assert first["title"].startswith("sftpgate: 1 file needs you") and names[0] in first["message"]
    assert "sftpgate retry" in first["message"]
    assert len(mailbox.messages) == 2
    assert mailbox.messages[0]["to"] == ["me@example.org"]
    assert "Subject: sftpgate: 1 file needs you" in mailbox.messages[0]["data"]
    assert all(n in "".join(m["data"] for m in mailbox.messages) for n in names)
    refused = [
        getattr(r, "fields", {}) for r in caplog.records if r.getMessage() == "notification failed"
    ]
    assert len(refused) == 2 and all("SMTPRecipientsRefused" in f["error"] for f in refused)


async def test_an_unreachable_webhook_never_slows_the_pipeline_and_is_retried_until_through(
    tmp_path, standin, host_keys_dir, client_key, corpus, caplog
):
    caplog.set_level(logging.INFO, logger="sftpgate")
    port = free_port()  # nothing listens here (yet)
    url = f"http://hook:s3cr3t-pw@127.0.0.1:{port}/hooks/T0KENPATH?token=s3cr3t-token"
    async with notifying_gate(
        tmp_path, standin, host_keys_dir, client_key, webhook=url, webhook_format="json"
    ) as gate:
        await upload(gate.sftp.port, {"bad.jpg": NOT_A_PHOTO})
        await gate.pipeline.wait_for(lambda c: c.get("undone", 0) == 1, timeout=60)
        started = time.monotonic()
        await upload(
            gate.sftp.port, {"IMG_0001.jpg": (corpus / "jpeg/htc-desire-gps.jpg").read_bytes()}
        )
        await gate.pipeline.wait_for(lambda c: c.get("done", 0) == 1, timeout=120)
        assert len(standin.state.assets) == 1, "the photo reached Immich while the hook was down"
        print(f"photo delivered in {time.monotonic() - started:.1f} s with the webhook down")
        await eventually(
            lambda: counter(gate, "notification_failures", "webhook") >= 3, what="retries"
        )
        assert counter(gate, "notifications_sent", "webhook") == 0
        receiver = await start_receiver(port)  # the target comes back
        try:
            await eventually(lambda: receiver.requests, what="the retried message")
            (request,) = receiver.requests
            assert (
                request["json"]["event"] == "undone" and request["query"]["token"] == "s3cr3t-token"
            )
            assert request["headers"]["Authorization"].startswith("Basic ")
            assert counter(gate, "notifications_sent", "webhook") == 1
        finally:
            assert receiver.runner is not None
            await receiver.runner.cleanup()
    failed = [
        getattr(r, "fields", {}) for r in caplog.records if r.getMessage() == "notification failed"
    ]
    assert failed and all(
        f["to"] == f"http://***@127.0.0.1:{port}/hooks/***?token=*** (json)" for f in failed
    )
    log = "\n".join(f"{r.getMessage()} {getattr(r, 'fields', {})}" for r in caplog.records)
    for secret in ("s3cr3t-pw", "s3cr3t-token", "T0KENPATH"):
        assert secret not in log


async def test_immich_down_then_back_and_refusing_uploads_are_told_once_each(
    tmp_path, standin, host_keys_dir, client_key, receiver, corpus
):
    async with notifying_gate(
        tmp_path, standin, host_keys_dir, client_key,
        webhook=receiver.url("/sftpgate-alerts"), webhook_format="ntfy", immich_down_after=0.5,
    ) as gate:  # fmt: skip
        standin.state.down = True
        await eventually(lambda: receiver.events("Tags") == ["immich_down"], what="down message")
        request = receiver.requests[0]
        assert request["path"] == "/sftpgate-alerts"
        assert request["headers"]["Title"] == "sftpgate: Immich is unreachable"
        assert request["headers"]["Priority"] == "4" and "Uploads are paused" in request["body"]
        standin.state.down = False
        await eventually(
            lambda: receiver.events("Tags") == ["immich_down", "immich_up"], what="up message"
        )
        assert "accepts uploads again" in receiver.requests[1]["body"]
        # Answering pings but refusing every upload (a key that lost asset.upload) is trouble too.
        standin.state.permissions[API_KEY] = frozenset()
        await upload(gate.sftp.port, {"x.jpg": (corpus / "jpeg/htc-desire-gps.jpg").read_bytes()})
        await eventually(
            lambda: "immich_down" in receiver.events("Tags")[2:], timeout=30, what="refusing"
        )
        titles = [r["headers"]["Title"] for r in receiver.requests]
        assert "sftpgate: Immich refuses uploads" in titles
        assert receiver.events("Tags").count("immich_down") == 2


async def test_low_disk_daily_digest_and_status(
    tmp_path, standin, host_keys_dir, client_key, receiver, corpus
):
    from sftpgate.status import collect_status, format_status

    hook = receiver.url("/message?token=gotify-app-token")  # Gotify, guessed from the URL
    settings = {"webhook": hook, "daily_digest": "00:00", "disk_free_below": "1000TiB"}
    async with notifying_gate(tmp_path, standin, host_keys_dir, client_key, **settings) as gate:
        await eventually(lambda: receiver.requests, what="the disk warning")
        (disk,) = receiver.requests
        assert disk["json"]["title"] == "sftpgate: data disk almost full"
        assert disk["json"]["priority"] == 8 and "left on the disk" in disk["json"]["message"]
        await upload(
            gate.sftp.port, {"IMG_0002.jpg": (corpus / "jpeg/htc-desire-gps.jpg").read_bytes()}
        )
        await gate.pipeline.wait_for(lambda c: c.get("done", 0) == 1, timeout=120)
    # The first start counted from then on; pretend that was yesterday.
    state_file = tmp_path / "data" / STATE_FILE
    state = json.loads(state_file.read_text())
    state["digest"]["at"] -= 25 * 3600
    state_file.write_text(json.dumps(state))
    async with notifying_gate(tmp_path, standin, host_keys_dir, client_key, **settings):
        await eventually(lambda: len(receiver.requests) >= 3, what="the digest")
        digests = [
            r["json"] for r in receiver.requests if r["json"]["title"] == "sftpgate: daily digest"
        ]
        assert len(digests) == 1
        assert "files delivered to Immich: 1 (1 converted" in digests[0]["message"]
        assert "In undone/ now: 0" in digests[0]["message"]
        report = await collect_status(load_config(tmp_path / "config.yaml"))
    text = format_status(report)
    (line,) = [ln for ln in text.splitlines() if ln.strip().startswith("webhook")]
    assert f"http://127.0.0.1:{receiver.port}/message?token=*** (gotify)" in line
    assert "last sent 20" in line and "(digest)" in line and "FAILED" not in line
    assert "daily digest at 00:00" in text and "gotify-app-token" not in text + json.dumps(report)


async def test_status_says_when_nothing_is_configured_and_when_the_last_try_failed(
    tmp_path, standin, host_keys_dir, client_key, receiver
):
    from sftpgate.status import collect_status, format_status

    config = gate_config(tmp_path, standin.url, host_keys_dir, client_key)
    assert "notifications: none configured" in format_status(
        await collect_status(load_config(config))
    )
    receiver.status = 500
    async with notifying_gate(
        tmp_path, standin, host_keys_dir, client_key, webhook=receiver.url("/notify/apprise-key")
    ) as gate:
        await upload(gate.sftp.port, {"bad.jpg": NOT_A_PHOTO})
        await eventually(
            lambda: counter(gate, "notification_failures", "webhook") >= 1, what="an attempt"
        )
        doc = receiver.requests[0]["json"]
        assert sorted(doc) == ["body", "title", "type"] and doc["type"] == "warning"
        assert doc["title"] == "sftpgate: 1 file needs you" and "bad.jpg" in doc["body"]
        report = await collect_status(load_config(tmp_path / "config.yaml"))
    text = format_status(report)
    assert "(apprise): nothing sent yet; last FAILED" in text and "HTTP 500" in text
    assert "apprise-key" not in text


# -- pure pieces -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "fmt", "shown"),
    [
        ("https://ntfy.sh/my-secret-topic", "ntfy", "https://ntfy.sh/***"),
        (
            "https://push.example/message?token=AbC",
            "gotify",
            "https://push.example/message?token=***",
        ),
        ("http://apprise:8000/notify/k3y", "apprise", "http://apprise:8000/notify/***"),
        (
            "https://u:p@hooks.example:8443/api/webhooks/1/xyz",
            "json",
            "https://***@hooks.example:8443/api/webhooks/***/***",
        ),
    ],
)
def test_webhook_format_is_guessed_and_urls_are_logged_without_secrets(url, fmt, shown):
    assert webhook_format(url, "auto") == fmt
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    ("notify", "expected"),
    [
        ({"webhook": "not a url"}, "notify.webhook: must be an http:// or https:// URL"),
        ({"webhook": "ftp://x/y"}, "notify.webhook: must be an http:// or https:// URL"),
        ({"webhook": "http://h:99999/x"}, "notify.webhook: must be an http:// or https:// URL"),
        ({"webhook_format": "slack"}, "notify.webhook_format: must be one of auto, json"),
        ({"smtp": {"host": "mail"}}, "notify.smtp.to: at least one address"),
        ({"disk_free_below": "lots"}, "notify.disk_free_below: expected a size"),
        ({"daily_digest": "25:00"}, "notify.daily_digest: expected HH:MM"),
    ],
)
def test_bad_notify_settings_stop_start_up_naming_the_key(tmp_path, notify, expected):
    doc = {
        "immich": {"url": "http://immich:2283", "api_key": "k"},
        "sftp": {"users": [{"name": "phone", "password": "p"}]},
        "notify": notify,
    }
    with pytest.raises(ConfigError) as err:
        config_from_dict(doc, base_dir=tmp_path, env={})
    assert any(p.startswith(expected) for p in err.value.problems), err.value.problems
    assert not any("99999" in p or "not a url" in p for p in err.value.problems)  # URLs not echoed


@pytest.mark.parametrize("key", ["proxy_protocol", "ban_allowlist"])
def test_a_bad_cidr_stops_start_up_naming_the_key(tmp_path, key):
    doc = {
        "immich": {"url": "http://immich:2283", "api_key": "k"},
        "sftp": {
            "users": [{"name": "phone", "password": "p"}],
            key: ["10.0.0.0/8", "10.0.0.300/8"],
        },
    }
    with pytest.raises(ConfigError) as err:
        config_from_dict(doc, base_dir=tmp_path, env={})
    assert err.value.problems == [
        f"sftp.{key}[1]: '10.0.0.300/8' is not an address or network (10.0.0.0/8, ::1)"
    ]


def test_notifications_and_proxies_by_environment_only(tmp_path):
    env = {
        "SFTPGATE_IMMICH_URL": "http://immich-server:2283",
        "SFTPGATE_IMMICH_API_KEY": "k3y",
        "SFTPGATE_SFTP_PASSWORD": PASSWORD,
        "SFTPGATE_NOTIFY_WEBHOOK": "https://ntfy.sh/topic",
        "SFTPGATE_NOTIFY_SMTP_HOST": "mail.example",
        "SFTPGATE_NOTIFY_SMTP_FROM": "gate@example.org",
        "SFTPGATE_NOTIFY_SMTP_TO": "me@example.org",
        "SFTPGATE_SFTP_PROXY_PROTOCOL": "172.16.0.0/12",
    }
    cfg = load_config(tmp_path / "absent.yaml", env=env)
    assert cfg.notify.webhook == "https://ntfy.sh/topic"
    assert (cfg.notify.smtp.host, cfg.notify.smtp.port, cfg.notify.smtp.to) == (
        "mail.example", 587, ("me@example.org",),
    )  # fmt: skip
    assert cfg.sftp.proxy_protocol == ("172.16.0.0/12",) and cfg.sftp.ban_allowlist == ()
    bare = load_config(tmp_path / "absent.yaml", env={k: env[k] for k in list(env)[:3]})
    assert (bare.notify.webhook, bare.notify.smtp.host, bare.notify.smtp.to) == ("", "", ())


# -- mail over TLS -----------------------------------------------------------------------------


def self_signed_certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that is its own CA: trusted only where SSL_CERT_FILE names it."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "smtp-cert.pem", tmp_path / "smtp-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


class Login:
    """aiosmtpd authenticator: accepts one user and password, and records every attempt."""

    def __init__(self, username: str, password: str) -> None:
        self.expected = (username.encode(), password.encode())
        self.attempts: list[tuple[bytes, bool]] = []

    def __call__(self, server: Any, session: Any, envelope: Any, mechanism: str, auth: Any) -> Any:
        from aiosmtpd.smtp import AuthResult

        ok = (auth.login, auth.password) == self.expected
        encrypted = server.transport.get_extra_info("ssl_object") is not None
        self.attempts.append((auth.login, encrypted))
        return AuthResult(success=ok)


@pytest.mark.parametrize("security", ["starttls", "tls"])
@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
async def test_mail_is_sent_over_tls_with_a_login_and_a_verified_certificate(
    tmp_path, monkeypatch, security
):
    import ssl

    from sftpgate.notify import MailTarget, Message

    cert_file, key_file = self_signed_certificate(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert_file, key_file)
    box, login = Mailbox(), Login("me@example.org", "s3cret-mail")
    box.port = free_port()
    tls_keys: dict[str, Any] = (
        {"tls_context": server_tls, "require_starttls": True}
        if security == "starttls"
        # aiosmtpd offers AUTH over implicit TLS only without auth_require_tls (it means
        # STARTTLS); the login attempt below still records whether the session was encrypted.
        else {"server_hostname": "127.0.0.1", "ssl_context": server_tls, "auth_require_tls": False}
    )
    # With STARTTLS, auth_require_tls (aiosmtpd's default) refuses a login sent in clear.
    controller = Controller(
        box, hostname="127.0.0.1", port=box.port, authenticator=login, auth_required=True,
        **tls_keys,
    )  # fmt: skip
    controller.start()
    try:
        doc = {
            "immich": {"url": "http://immich:2283", "api_key": "k"},
            "sftp": {"users": [{"name": "phone", "password": "p"}]},
            "notify": {
                "smtp": {
                    "host": "127.0.0.1", "port": box.port, "security": security,
                    "username": "me@example.org", "password": "s3cret-mail",
                    "sender": "gate@example.org", "to": ["me@example.org"],
                }
            },
        }  # fmt: skip
        target = MailTarget(config_from_dict(doc, base_dir=tmp_path, env={}).notify)
        message = Message("undone", "1 file needs you", "phone/IMG_0001.jpg: not a photo")
        async with ClientSession() as http:  # unused by mail; every target takes one
            # Not trusted yet: the certificate is checked, so the send fails before any login.
            with pytest.raises(ssl.SSLCertVerificationError):
                await target.send(message, http)
            assert login.attempts == [] and box.messages == []
            monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))
            await target.send(message, http)
    finally:
        controller.stop()
    assert login.attempts == [(b"me@example.org", True)]  # one login, inside TLS
    (mail,) = box.messages
    assert mail["from"] == "gate@example.org" and mail["to"] == ["me@example.org"]
    assert "Subject: 1 file needs you" in mail["data"]
    assert "phone/IMG_0001.jpg: not a photo" in mail["data"]
