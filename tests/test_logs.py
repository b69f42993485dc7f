"""Log lines: one per event, text or JSON, every line about a file names path, stage, outcome."""

from __future__ import annotations

import json
import logging

from sftpgate.logs import JsonFormatter, TextFormatter, file_event


def test_file_events_in_both_formats(caplog):
    with caplog.at_level(logging.INFO, logger="sftpgate"):
        file_event(
            "undone",
            user="phone",
            path="DCIM/My photo.jpg",
            stage="optimize",
            outcome="undone",
            reason='bad "SOF"',
        )
    (record,) = caplog.records
    doc = json.loads(JsonFormatter().format(record))
    assert doc["event"] == "undone" and doc["level"] == "info"
    assert {k: doc[k] for k in ("user", "path", "stage", "outcome")} == {
        "user": "phone", "path": "DCIM/My photo.jpg", "stage": "optimize", "outcome": "undone",
    }  # fmt: skip
    assert doc["time"][-5] in "+-"  # local time with its offset
    line = TextFormatter().format(record)
    assert "\n" not in line
    assert (
        'path="DCIM/My photo.jpg"' in line and "stage=optimize" in line and "outcome=undone" in line
    )
    assert 'reason="bad \\"SOF\\""' in line


async def test_a_service_run_logs_each_file_with_stage_and_outcome(gate, corpus, caplog):
    import asyncssh

    from .conftest import API_KEY, PASSWORD, finished

    with caplog.at_level(logging.INFO, logger="sftpgate"):
        async with (
            asyncssh.connect(
                "127.0.0.1", gate.sftp.port, username="phone", password=PASSWORD, known_hosts=None
            ) as conn,
            conn.start_sftp_client() as sftp,
        ):
            await sftp.put(str(corpus / "jpeg/htc-desire-gps.jpg"), "IMG_1.jpg")
            await sftp.put(str(corpus / "bad/zero-byte.jpg"), "IMG_2.jpg")
        await gate.pipeline.wait_for(finished(2), timeout=60)
    about_files = [r for r in caplog.records if getattr(r, "fields", {}).get("path")]
    assert {r.getMessage() for r in about_files} >= {"queued", "optimized", "delivered", "undone"}
    for r in about_files:
        assert {"user", "path", "stage", "outcome"} <= set(r.fields), r.getMessage()
    text = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    assert API_KEY not in text and PASSWORD not in text


async def test_a_served_file_gives_only_event_lines_not_the_watchers_chatter(
    tmp_path, standin, host_keys_dir, client_key, corpus
):
    """`sftpgate serve` at the info level; a photo arrives the way a share delivers it (a copy
    into watch/), so the folder watcher sees it. Its own "N changes detected" lines stay out of
    the log, which holds one line per event."""
    import re
    import shutil

    from .conftest import eventually, gate_config
    from .test_sftp_clients import ServerProcess

    config = gate_config(tmp_path, standin.url, host_keys_dir, client_key)
    async with ServerProcess(config) as server:
        watch = tmp_path / "data" / "watch" / "phone"
        shutil.copy(corpus / "jpeg/htc-desire-gps.jpg", tmp_path / "IMG_7.jpg")
        (tmp_path / "IMG_7.jpg").rename(watch / "IMG_7.jpg")  # whole at once, as a share does

        def delivered() -> bool:
            return any(" delivered " in line and "path=IMG_7.jpg" in line for line in server.lines)

        await eventually(delivered, timeout=60, what="IMG_7.jpg delivered")
    chatter = [line for line in server.lines if re.search(r"\bchanges? detected", line)]
    assert not chatter, chatter
