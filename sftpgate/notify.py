"""Notifications: tell a person when something needs them.

The pipeline reports facts through three calls that never wait (`file_undone`, `immich_ping`,
`immich_upload`); everything else happens in the notifier's own tasks. Messages: files that went
to undone/ (gathered, at most one message per `notify.min_interval`), Immich unreachable or
refusing uploads for longer than `notify.immich_down_after` and its return, the data disk below
`notify.disk_free_below`, and an optional daily digest. Each target (webhook, mail) has its own
queue and sender, retried with back-off, so one that fails neither blocks the other nor the
pipeline. The last success and failure per target are kept in `notifications.json` in data_dir
for `sftpgate status`. URLs are only ever logged redacted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import smtplib
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit
from zoneinfo import ZoneInfo

import aiohttp

from .config import Config, NotifyConfig, parse_size
from .logs import event

if TYPE_CHECKING:
    from .metrics import Metrics

TARGETS = ("webhook", "mail")
STATE_FILE = "notifications.json"
SEND_TIMEOUT_SECONDS = 15.0
DISK_CHECK_SECONDS = 60.0
UNDONE_LISTED = 30  # files named in one message; the rest are counted
QUEUE_LIMIT = 100  # messages waiting per target while it fails; older ones are dropped
STOP_GRACE_SECONDS = 3.0
# Path segments kept when a webhook URL is logged; every other one may be a topic or a token.
_PLAIN_SEGMENTS = frozenset({"", "api", "message", "notify", "hooks", "webhook", "webhooks"})

Totals = dict[str, int]


@dataclass(frozen=True)
class Message:
    event: str  # undone | immich_down | immich_up | disk_low | digest
    title: str
    body: str
    priority: str = "default"  # low | default | high
    facts: dict[str, Any] = field(default_factory=dict)


# -- targets ---------------------------------------------------------------------------------


def redact_url(url: str) -> str:
    """The URL with its user info, query values and every path segment that may be a topic or a
    token replaced by ***, for logs and `sftpgate status`."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = ("***@" if "@" in parts.netloc else "") + host
        if parts.port is not None:
            netloc += f":{parts.port}"
    except ValueError:
        return "<invalid URL>"
    path = "/".join(s if s.lower() in _PLAIN_SEGMENTS else "***" for s in parts.path.split("/"))
    query = "&".join(f"{quote(k)}=***" for k, _ in parse_qsl(parts.query, keep_blank_values=True))
    return urlunsplit((parts.scheme, netloc, path, query, ""))


def webhook_format(url: str, setting: str) -> str:
    if setting != "auto":
        return setting
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    if "ntfy" in (parts.hostname or ""):
        return "ntfy"
    if path.endswith("/message") and "token=" in parts.query:
        return "gotify"
    if "/notify" in path:
        return "apprise"
    return "json"


_NTFY_PRIORITY = {"low": "2", "default": "3", "high": "4"}
_GOTIFY_PRIORITY = {"low": 2, "default": 5, "high": 8}
_APPRISE_TYPE = {"low": "info", "default": "info", "high": "warning"}


class WebhookTarget:
    name = "webhook"

    def __init__(self, url: str, fmt: str) -> None:
        self.url = url
        self.format = webhook_format(url, fmt)
        self.description = f"{redact_url(url)} ({self.format})"
        parts = urlsplit(url)
        # Pieces of the URL that must not appear in a logged error either.
        self.secrets = [url, parts.password or "", parts.query, parts.path]

    def _request(self, msg: Message) -> dict[str, Any]:
        if self.format == "ntfy":
            # Headers carry only our own ASCII titles; file names go in the UTF-8 body.
            headers = {
                "Title": msg.title,
                "Priority": _NTFY_PRIORITY[msg.priority],
                "Tags": msg.event,
            }
            return {"data": msg.body.encode(), "headers": headers}
        if self.format == "gotify":
            doc: dict[str, Any] = {
                "title": msg.title,
                "message": msg.body,
                "priority": _GOTIFY_PRIORITY[msg.priority],
            }
        elif self.format == "apprise":
            doc = {"title": msg.title, "body": msg.body, "type": _APPRISE_TYPE[msg.priority]}
        else:
            doc = {
                "event": msg.event,
                "title": msg.title,
                "message": msg.body,
                "priority": msg.priority,
                **msg.facts,
            }
        return {"json": doc}

    async def send(self, msg: Message, http: aiohttp.ClientSession) -> None:
        async with http.post(self.url, allow_redirects=False, **self._request(msg)) as resp:
            if not 200 <= resp.status < 300:
                raise RuntimeError(f"HTTP {resp.status} {resp.reason or ''}".strip())


class MailTarget:
    name = "mail"

    def __init__(self, config: NotifyConfig) -> None:
        self.smtp = config.smtp
        self.description = f"{self.smtp.host}:{self.smtp.port} to {', '.join(self.smtp.to)}"
        self.secrets = [self.smtp.password]

    async def send(self, msg: Message, http: aiohttp.ClientSession) -> None:
        await asyncio.to_thread(self._send, msg)  # smtplib blocks; the loop must not

    def _send(self, msg: Message) -> None:
        s = self.smtp
        mail = EmailMessage()
        mail["Subject"] = msg.title
        mail["From"] = s.sender
        mail["To"] = ", ".join(s.to)
        mail["Date"] = formatdate(localtime=True)
        mail["Message-ID"] = make_msgid(domain=s.sender.rpartition("@")[2] or None)
        mail.set_content(msg.body)
        context = ssl.create_default_context()
        client: smtplib.SMTP
        if s.security == "tls":
            client = smtplib.SMTP_SSL(s.host, s.port, timeout=SEND_TIMEOUT_SECONDS, context=context)
        else:
            client = smtplib.SMTP(s.host, s.port, timeout=SEND_TIMEOUT_SECONDS)
        with client:
            if s.security == "starttls":
                client.starttls(context=context)
            if s.username:
                client.login(s.username, s.password)
            client.send_message(mail)


Target = WebhookTarget | MailTarget


def targets_of(config: NotifyConfig) -> list[Target]:
    found: list[Target] = []
    if config.webhook:
        found.append(WebhookTarget(config.webhook, config.webhook_format))
    if config.smtp.host:
        found.append(MailTarget(config))
    return found


def _error_text(exc: BaseException, secrets: list[str]) -> str:
    """One line about a failed send, without any secret the exception may quote."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    return text.replace("\n", " ")[:300]


# -- the state file --------------------------------------------------------------------------


def _read_state(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _write_state(path: Path, doc: dict[str, Any]) -> None:
    # Atomic for `sftpgate status` reading beside the service; not fsynced: losing the last
    # minutes of it in a power cut costs one repeated digest at most.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment).astimezone().isoformat(timespec="seconds")


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} days {seconds % 86400 // 3600} h"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


# -- the notifier ----------------------------------------------------------------------------


class _Sender:
    """One target's queue and its sending task: in order, each message retried with back-off
    until it is through."""

    def __init__(self, target: Target, notifier: Notifier) -> None:
        self.target = target
        self.notifier = notifier
        self.queue: deque[Message] = deque()
        self.wake = asyncio.Event()

    def put(self, msg: Message) -> None:
        if len(self.queue) >= QUEUE_LIMIT:
            dropped = self.queue.popleft()
            event(
                "notification dropped",
                level=30,
                target=self.target.name,
                notification=dropped.event,
                reason=f"{QUEUE_LIMIT} messages already wait for this target",
            )
        self.queue.append(msg)
        self.wake.set()

    async def run(self, http: aiohttp.ClientSession) -> None:
        n = self.notifier
        attempt = 0
        while True:
            if not self.queue:
                self.wake.clear()
                await self.wake.wait()
                continue
            msg = self.queue[0]
            try:
                async with asyncio.timeout(SEND_TIMEOUT_SECONDS + 5):
                    await self.target.send(msg, http)
            except Exception as exc:  # any failure of the target: retry, never give up the task
                attempt += 1
                error = _error_text(exc, self.target.secrets)
                delay = min(n.max_delay, n.first_delay * 2 ** (attempt - 1))
                n.failed(self.target, msg, error)
                event(
                    "notification failed",
                    level=30,
                    target=self.target.name,
                    to=self.target.description,
                    notification=msg.event,
                    error=error,
                    attempt=attempt,
                    retry_in_seconds=round(delay, 1),
                )
                await asyncio.sleep(delay)  # back-off between attempts
                continue
            attempt = 0
            self.queue.popleft()
            n.sent(self.target, msg)
            event(
                "notification sent",
                target=self.target.name,
                to=self.target.description,
                notification=msg.event,
            )


class Notifier:
    def __init__(
        self,
        config: Config,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        n = self.settings = config.notify
        self.metrics = metrics
        self.clock = clock
        self.data_dir = config.data_path
        self.state_path = self.data_dir / STATE_FILE
        self.tz = ZoneInfo(config.timezone) if config.timezone else None
        self.first_delay = config.retry.first_delay_seconds
        self.max_delay = config.retry.max_delay_seconds
        self.disk_free_below = parse_size(n.disk_free_below)
        self._senders = [_Sender(t, self) for t in targets_of(n)]
        self._state: dict[str, Any] = {}
        self._undone: list[tuple[str, str, str]] = []
        self._undone_sent_at = 0.0
        self._wake = asyncio.Event()
        self._trouble_since: float | None = None
        self._trouble_told = False
        self._ping_down = False
        self._uploads_refused = False
        self._disk_low = False
        self._tasks: list[asyncio.Task[None]] = []
        self._http: aiohttp.ClientSession | None = None

    @property
    def enabled(self) -> bool:
        return bool(self._senders)

    # -- facts from the pipeline: cheap, never wait -------------------------------------------

    def file_undone(self, user: str, path: str, reason: str) -> None:
        if self.enabled:
            self._undone.append((user, path, reason))
            self._wake.set()

    def immich_ping(self, up: bool) -> None:
        """Each ping's answer."""
        self._ping_down = not up
        self._immich_changed()

    def immich_upload(self, refused: bool) -> None:
        """Each upload's end: `refused` when Immich itself failed it (no answer, 5xx, 429,
        401/403), not when it cannot take that one file (that file goes to undone/)."""
        self._uploads_refused = refused
        self._immich_changed()

    def _immich_changed(self) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if self._ping_down or self._uploads_refused:
            if self._trouble_since is None:
                self._trouble_since = now
            elif (
                not self._trouble_told
                and now - self._trouble_since >= self.settings.immich_down_after
            ):
                self._trouble_told = True
                since = datetime.fromtimestamp(self._trouble_since, self.tz).strftime("%H:%M")
                took = _duration(now - self._trouble_since)
                if self._ping_down:
                    title, body = (
                        "sftpgate: Immich is unreachable",
                        f"Immich has not answered since {since} ({took}). Uploads are paused and"
                        " resume by themselves; the files wait in watch/.",
                    )
                else:
                    title, body = (
                        "sftpgate: Immich refuses uploads",
                        f"Immich has refused uploads since {since} ({took}). The files wait in"
                        " watch/ and are retried; check Immich's logs, its disk and the API key's"
                        " permissions.",
                    )
                self._post(
                    Message(
                        "immich_down", title, body, "high", {"since": _iso(self._trouble_since)}
                    )
                )
        else:
            if self._trouble_told and self._trouble_since is not None:
                took = _duration(now - self._trouble_since)
                self._post(
                    Message(
                        "immich_up",
                        "sftpgate: Immich is back",
                        f"Immich accepts uploads again after {took}; the waiting files go on.",
                        facts={"down_seconds": round(now - self._trouble_since)},
                    )
                )
            self._trouble_since, self._trouble_told = None, False

    # -- running -------------------------------------------------------------------------------

    def start(self, totals: Callable[[], Awaitable[Totals]] | None = None) -> None:
        """Start the senders and the periodic checks; `totals` reads the ledger's running totals
        (outcomes, bytes, undone) for the digest."""
        if not self.enabled:
            return
        self._state = _read_state(self.state_path)
        self._state.setdefault("targets", {})
        self._save()  # the configured targets show in `sftpgate status` from the start
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=SEND_TIMEOUT_SECONDS),
            headers={"User-Agent": "sftpgate"},
        )
        self._tasks = [asyncio.create_task(s.run(self._http)) for s in self._senders]
        self._tasks.append(asyncio.create_task(self._watch(totals)))

    async def stop(self) -> None:
        """Send what is gathered, give the senders a moment, then stop."""
        if not self._tasks:
            return
        self._flush_undone()
        deadline = asyncio.get_running_loop().time() + STOP_GRACE_SECONDS
        while any(s.queue for s in self._senders) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)  # bounded wait for the last messages to go out
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._http is not None:
            await self._http.close()

    async def _watch(self, totals: Callable[[], Awaitable[Totals]] | None) -> None:
        next_disk = 0.0
        while True:
            now = self.clock()
            if now >= next_disk:
                self._check_disk()
                next_disk = now + DISK_CHECK_SECONDS
            if self._undone and now >= self._undone_sent_at + self.settings.min_interval:
                self._flush_undone()
            if totals is not None and self.settings.daily_digest:
                with contextlib.suppress(Exception):  # a busy ledger: the next round tries again
                    await self._maybe_digest(totals)
            wait = next_disk - now
            if self._undone:
                wait = min(wait, self._undone_sent_at + self.settings.min_interval - now)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.05, min(wait, 60.0))):
                    await self._wake.wait()

    def _flush_undone(self) -> None:
        if not self._undone:
            return
        files, self._undone = self._undone, []
        self._undone_sent_at = self.clock()
        lines = [f"- {user}/{path}: {reason}" for user, path, reason in files[:UNDONE_LISTED]]
        if len(files) > UNDONE_LISTED:
            lines.append(f"… and {len(files) - UNDONE_LISTED} more (see `sftpgate status`)")
        noun, verb = ("file", "needs") if len(files) == 1 else ("files", "need")
        body = (
            f"{len(files)} {noun} went to watch/undone/ and {verb} you:\n"
            + "\n".join(lines)
            + "\nFix the cause, then run `sftpgate retry`."
        )
        facts = {"files": [{"user": u, "path": p, "reason": r} for u, p, r in files]}
        self._post(
            Message("undone", f"sftpgate: {len(files)} {noun} {verb} you", body, "high", facts)
        )

    def _check_disk(self) -> None:
        try:
            free = shutil.disk_usage(self.data_dir).free
        except OSError as exc:
            event("disk check failed", level=30, error=str(exc))
            return
        low = free < self.disk_free_below
        if low and not self._disk_low:
            self._post(
                Message(
                    "disk_low",
                    "sftpgate: data disk almost full",
                    f"Only {_size(free)} left on the disk of {self.data_dir} (the warning is"
                    f" below {_size(self.disk_free_below)}). Uploads fail once it is full.",
                    "high",
                    {"free_bytes": free},
                )
            )
        self._disk_low = low

    async def _maybe_digest(self, totals: Callable[[], Awaitable[Totals]]) -> None:
        now = self.clock()
        digest = self._state.get("digest")
        hour, minute = (int(x) for x in self.settings.daily_digest.split(":"))
        local = datetime.fromtimestamp(now, self.tz)
        due = local.replace(hour=hour, minute=minute, second=0, microsecond=0)
        if due > local:
            due -= timedelta(days=1)
        if digest is not None and digest.get("at", 0) >= due.timestamp():
            return
        current = await totals()
        if digest is None:  # the first start: the first digest counts from now
            self._state["digest"] = {"at": now, "totals": current}
            self._save()
            return
        before: Totals = digest.get("totals", {})

        def grown(key: str) -> int:
            return max(0, current.get(key, 0) - before.get(key, 0))

        delivered = grown("uploaded") + grown("kept")
        saved = grown("bytes_original") - grown("bytes_sent")
        body = (
            f"Since {datetime.fromtimestamp(digest['at'], self.tz):%Y-%m-%d %H:%M}:"
            f" files delivered to Immich: {delivered} ({grown('uploaded')} converted,"
            f" {grown('kept')} as they were), {grown('duplicate')} duplicates skipped,"
            f" {_size(max(0, saved))} saved. In undone/ now: {current.get('undone_now', 0)}."
        )
        facts = {
            "delivered": delivered,
            "bytes_saved": max(0, saved),
            "undone": current.get("undone_now", 0),
        }
        self._post(Message("digest", "sftpgate: daily digest", body, "low", facts))
        self._state["digest"] = {"at": now, "totals": current}
        self._save()

    # -- bookkeeping ---------------------------------------------------------------------------

    def _post(self, msg: Message) -> None:
        for sender in self._senders:
            sender.put(msg)

    def _target_state(self, target: Target) -> dict[str, Any]:
        entry = self._state["targets"].setdefault(target.name, {})
        entry["description"] = target.description
        return entry

    def sent(self, target: Target, msg: Message) -> None:
        entry = self._target_state(target)
        entry.update(last_sent=_iso(self.clock()), last_sent_event=msg.event)
        if self.metrics is not None:
            self.metrics.notifications_sent.labels(target=target.name).inc()
        self._save()

    def failed(self, target: Target, msg: Message, error: str) -> None:
        entry = self._target_state(target)
        entry.update(last_failed=_iso(self.clock()), last_failed_event=msg.event, last_error=error)
        if self.metrics is not None:
            self.metrics.notification_failures.labels(target=target.name).inc()
        self._save()

    def _save(self) -> None:
        for sender in self._senders:
            self._target_state(sender.target)
        # Targets no longer configured are not shown as if they were.
        names = {s.target.name for s in self._senders}
        self._state["targets"] = {k: v for k, v in self._state["targets"].items() if k in names}
        try:
            _write_state(self.state_path, self._state)
        except OSError as exc:
            event("notification state not saved", level=30, error=str(exc))


# -- for `sftpgate status` -------------------------------------------------------------------


def notification_status(config: Config) -> dict[str, Any]:
    """What is configured, and per target when the last message went out or failed."""
    n = config.notify
    saved = _read_state(config.data_path / STATE_FILE).get("targets", {})
    targets = []
    for target in targets_of(n):
        entry = saved.get(target.name, {})
        targets.append(
            {
                "target": target.name,
                "to": target.description,
                **{k: v for k, v in entry.items() if k != "description"},
            }
        )
    events = []
    if targets:
        events = [
            f"undone files (at most one message per {_duration(n.min_interval)})",
            f"Immich down or refusing for {_duration(n.immich_down_after)}, and back",
        ]
        if parse_size(n.disk_free_below):
            events.append(f"data disk below {n.disk_free_below}")
        if n.daily_digest:
            events.append(f"daily digest at {n.daily_digest}")
    return {"targets": targets, "events": events}


def format_notification_status(s: dict[str, Any]) -> list[str]:
    if not s["targets"]:
        return ["notifications: none configured (notify: in config.yaml)"]
    lines = [f"notifications: {'; '.join(s['events'])}"]
    for t in s["targets"]:
        sent = (
            f"last sent {t['last_sent']} ({t['last_sent_event']})"
            if t.get("last_sent")
            else "nothing sent yet"
        )
        failed = (
            f"; last FAILED {t['last_failed']} ({t['last_failed_event']}): {t['last_error']}"
            if t.get("last_failed")
            else ""
        )
        lines.append(f"  {t['target']:<8} {t['to']}: {sent}{failed}")
    return lines
