"""One log line per event: `event key=value ...` as text, or one JSON object per line.

Every line about a file carries its user, path, stage and outcome; secrets are never passed in.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

log = logging.getLogger("sftpgate")


def event(name: str, level: int = logging.INFO, **fields: Any) -> None:
    log.log(level, name, extra={"fields": {k: v for k, v in fields.items() if v is not None}})


def file_event(
    name: str,
    *,
    user: str,
    path: str,
    stage: str,
    outcome: str,
    level: int = logging.INFO,
    **fields: Any,
) -> None:
    """A line about one file: always its user, path, stage (receive, optimize, upload) and outcome."""
    event(name, level, user=user, path=path, stage=stage, outcome=outcome, **fields)


def _quote(value: Any) -> str:
    text = str(value)
    return (
        json.dumps(text, ensure_ascii=False)
        if (not text or any(c in text for c in ' "=\n'))
        else text
    )


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        parts = [stamp, record.levelname.lower(), record.getMessage()]
        parts += [f"{k}={_quote(v)}" for k, v in fields.items()]
        if record.exc_info:
            parts.append("error=" + _quote(self.formatException(record.exc_info).splitlines()[-1]))
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(record.created)),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            doc["error"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(doc, ensure_ascii=False, default=str)


def setup_logging(fmt: str = "text", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # asyncssh logs every packet at debug and every connection at info: keep it to warnings.
    logging.getLogger("asyncssh").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # watchfiles says "N changes detected" at info for every batch of inotify events: a line
    # with no file, no stage and no outcome, dozens a second while a phone uploads.
    logging.getLogger("watchfiles").setLevel(max(logging.WARNING, root.level))
