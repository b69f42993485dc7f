"""Prometheus metrics and the health endpoints.

No label ever carries a file name, a user name, a key or a password: labels are fixed vocabularies
(outcome, stage), so the series count is bounded and nothing private leaves through /metrics.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from . import __version__
from .ledger import Outcome
from .notify import TARGETS

STAGES = ("optimize", "upload")
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)


class Metrics:
    """Every instrument of one service instance, in its own registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.sftp_sessions = Gauge("sftpgate_sftp_sessions", "Open SFTP sessions.", registry=r)
        self.sftp_auth_failures = Counter(
            "sftpgate_sftp_auth_failures", "Failed SFTP login attempts.", registry=r
        )
        self.received_files = Counter(
            "sftpgate_received_files", "Uploads completed and placed in watch/.", registry=r
        )
        self.received_bytes = Counter(
            "sftpgate_received_bytes", "Bytes of completed uploads.", registry=r
        )
        self.processed_files = Counter(
            "sftpgate_processed_files",
            "Originals finished, by outcome: uploaded (converted and sent), kept (sent unchanged),"
            " duplicate (already delivered, not sent), undone (moved to undone/).",
            ["outcome"],
            registry=r,
        )
        self.original_bytes = Counter(
            "sftpgate_original_bytes", "Bytes of originals that reached Immich.", registry=r
        )
        self.stored_bytes = Counter(
            "sftpgate_stored_bytes", "Bytes sent to Immich (after optimizing).", registry=r
        )
        self.stage_duration = Histogram(
            "sftpgate_stage_duration_seconds",
            "Time spent per stage and file.",
            ["stage"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.queue_files = Gauge(
            "sftpgate_queue_files", "Originals waiting or in progress.", registry=r
        )
        self.undone_files = Gauge("sftpgate_undone_files", "Originals in undone/.", registry=r)
        self.immich_up = Gauge(
            "sftpgate_immich_up", "1 when Immich answered its last ping, else 0.", registry=r
        )
        self.immich_retranscodes_video = Gauge(
            "sftpgate_immich_retranscodes_video",
            "1 when Immich's settings make it re-encode the videos sftpgate converts, 0 when not,"
            " -1 when no API key may read them (systemConfig.read).",
            registry=r,
        )
        self.immich_retranscodes_video.set(-1)
        self.immich_missing_permissions = Gauge(
            "sftpgate_immich_missing_permissions",
            "Permissions the configuration needs that an API key lacks (summed over keys).",
            registry=r,
        )
        self.retries = Counter(
            "sftpgate_retries", "Attempts that failed transiently and were retried.", registry=r
        )
        self.notifications_sent = Counter(
            "sftpgate_notifications_sent",
            "Notifications delivered, by target (webhook, mail).",
            ["target"],
            registry=r,
        )
        self.notification_failures = Counter(
            "sftpgate_notification_failures",
            "Notification attempts that failed (each is retried with back-off), by target.",
            ["target"],
            registry=r,
        )
        self.build_info = Gauge(
            "sftpgate_build_info", "Build information.", ["version"], registry=r
        )
        self.build_info.labels(version=__version__).set(1)
        # Labelled series start at 0 so dashboards and rate() see them before the first event.
        for outcome in Outcome:
            self.processed_files.labels(outcome=outcome)
        for stage in STAGES:
            self.stage_duration.labels(stage=stage)
        for target in TARGETS:
            self.notifications_sent.labels(target=target)
            self.notification_failures.labels(target=target)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def health_app(
    metrics: Metrics, ready: Callable[[], Awaitable[tuple[bool, str]]]
) -> web.Application:
    """/metrics, /healthz (the process answers) and /readyz (ledger writable, Immich answering,
    every API key may upload)."""

    async def get_metrics(_: web.Request) -> web.Response:
        resp = web.Response(body=metrics.render())
        resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        resp.charset = "utf-8"
        return resp

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ok, why = await ready()
        return web.json_response(
            {"status": "ok" if ok else "not ready", "reason": why}, status=200 if ok else 503
        )

    app = web.Application()
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
