"""Every row of docs/ledger.md's crash table, as a test: a real `sftpgate serve` is SIGKILLed at
that exact step (SFTPGATE_KILL_AT names it, killpoints.py), restarted, and what the file, the
ledger row, the Immich stand-in and the metrics say afterwards is checked.

Each scenario is what a phone does: a photo (its CLOSE may be the step that is killed, and then
the client sends it again, as a sync app does), a photo under a temporary name renamed once
complete (and sent so again after it was delivered), a corrupt photo (undone in the optimize stage), and a photo Immich refuses for good
(undone in the upload stage), and `sftpgate retry` of that refused photo.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncssh
import pytest

from sftpgate.ledger import Ledger, Original, Outcome, State

from .conftest import API_KEY, PASSWORD, eventually
from .test_cli import sftpgate_async
from .test_crash import ServiceProcess, service_process

PHOTO = "jpeg/htc-desire-gps.jpg"
CORRUPT = "bad/corrupt-entropy.jpg"
RAW = "raw/canon-350d-stub.dng"


@dataclass(frozen=True)
class Case:
    kill_at: str
    # photo | temporary | resent | removed | transient | corrupt | refused | retry | stack
    scenario: str


CASES = [
    Case("upload_write:after", "photo"),  # bytes arriving in .staging/
    Case("move_into_watch:before", "photo"),  # CLOSE: fsynced part, not yet in watch/
    Case("record_queued:before", "photo"),  # in watch/, no row yet
    Case("record_queued:after", "photo"),
    Case("record_received:after", "temporary"),
    Case("remove_waiting:before", "removed"),  # the client removed its temporary upload
    Case("remove_waiting:after", "removed"),
    Case("rename_to_final:before", "temporary"),
    Case("rename_to_final:after", "temporary"),
    Case("rename_to_duplicate:before", "resent"),  # the copy deleted under its temporary name
    Case("rename_to_duplicate:after", "resent"),
    Case("start_optimizing:before", "photo"),
    Case("start_optimizing:after", "photo"),
    Case("fix_bytes:before", "photo"),  # converted into .work/, bytes not fixed
    Case("fix_bytes:after", "photo"),
    Case("confirm_asset:before", "photo"),  # Immich has the asset, the ledger not its id
    Case("confirm_asset:after", "photo"),
    Case("delete_original:after", "photo"),
    Case("finish:before", "photo"),
    Case("finish:after", "photo"),
    Case("retry_later:after", "transient"),  # Immich answered 503 once
    Case("choose_undone_path:before", "corrupt"),
    Case("choose_undone_path:after", "corrupt"),
    Case("undone_sidecar:after", "corrupt"),
    Case("mark_undone:before", "corrupt"),
    Case("mark_undone:after", "corrupt"),
    Case("choose_undone_path:after", "refused"),  # the upload-stage move to undone/
    Case("undone_sidecar:after", "refused"),
    Case("mark_undone:before", "refused"),
    Case("retry_move:after", "retry"),
    Case("requeue_undone:after", "retry"),
    Case("record_stack:before", "stack"),  # Immich made the stack; the ledger has no record
    Case("record_stack:after", "stack"),
]


def rows(ledger_path: Path) -> list[Original]:
    ledger = Ledger(ledger_path, readonly=True)
    try:
        return list(ledger.iter_all())
    finally:
        ledger.close()


async def metric(port: int, name: str) -> float:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/metrics") as r,
    ):
        text = await r.text()
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


async def put(
    port: int, data: bytes, name: str, rename_to: str | None = None, remove: bool = False
) -> None:
    async with (
        asyncssh.connect(
            "127.0.0.1", port, username="phone", password=PASSWORD, known_hosts=None,
            connect_timeout=5,
        ) as conn,
        conn.start_sftp_client() as sftp,
    ):  # fmt: skip
        async with sftp.open(name, "wb") as f:
            await f.write(data)
        if rename_to:
            await sftp.posix_rename(name, rename_to)
        if remove:
            await sftp.remove(name)


async def send_until_acknowledged(
    service: ServiceProcess, port: int, data: bytes, name: str, rename_to: str | None = None
) -> None:
    """A sync app: when the connection breaks, send the whole file again once it is back."""
    while True:
        try:
            await put(port, data, name, rename_to)
            return
        except (OSError, asyncssh.Error):
            await eventually(
                lambda: service.proc is not None and service.proc.returncode is None,
                timeout=60, what="the service to be restarted",
            )  # fmt: skip


async def killed_at_its_point(service: ServiceProcess, case: Case) -> None:
    assert service.proc is not None
    try:
        code = await asyncio.wait_for(service.proc.wait(), 60)
    except TimeoutError:
        raise AssertionError(f"the service never reached {case.kill_at}") from None
    assert code == -signal.SIGKILL, f"exit {code}, not SIGKILL at {case.kill_at}"


def all_finished(ledger_path: Path) -> bool:
    return not any(r.state not in (State.DONE, State.UNDONE) for r in rows(ledger_path))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.scenario}-{c.kill_at}")
async def test_a_kill_at_each_step_loses_nothing_and_sends_nothing_twice(
    case: Case, tmp_path, standin, corpus, host_keys_dir, client_key
):
    service, port = service_process(tmp_path, standin, host_keys_dir, client_key)
    data_dir = tmp_path / "data"
    ledger_path = data_dir / "sftpgate.db"
    photo = (corpus / PHOTO).read_bytes()
    kill = {"SFTPGATE_KILL_AT": case.kill_at}
    refused = case.scenario in ("refused", "retry")
    if refused:
        standin.state.permissions[API_KEY] = frozenset()  # 403 on upload: permanent
    if case.scenario == "transient":
        standin.state.fail_next = [503]
    try:
        if case.scenario in ("retry", "resent"):
            # First undone (retry) or delivered (resent) with no kill point.
            await service.start()
            await put(port, photo, "IMG_0001.jpg.tmp", "IMG_0001.jpg")
            await eventually(lambda: all_finished(ledger_path), what="the photo to be handled")
            await service.terminate()
        if case.scenario == "retry":  # the person fixes the key and retries
            del standin.state.permissions[API_KEY]
            refused = False
        await service.start(env=kill)
        client: asyncio.Task[Any] | None = None
        if case.scenario == "retry":
            await sftpgate_async("--config", str(service.config), "retry")
        elif case.scenario in ("temporary", "resent"):
            client = asyncio.create_task(
                send_until_acknowledged(service, port, photo, "IMG_0001.jpg.tmp", "IMG_0001.jpg")
            )
        elif case.scenario == "removed":
            client = asyncio.create_task(put(port, photo, "IMG_0001.jpg.tmp", remove=True))
        elif case.scenario == "corrupt":
            await put(port, (corpus / CORRUPT).read_bytes(), "IMG_0001.jpg")
        elif case.scenario == "stack":  # a RAW and its JPEG: stacked once both are delivered
            await put(port, (corpus / RAW).read_bytes(), "IMG_0001.dng")
            await put(port, photo, "IMG_0001.jpg")
        else:
            client = asyncio.create_task(
                send_until_acknowledged(service, port, photo, "IMG_0001.jpg")
            )
        await killed_at_its_point(service, case)
        await service.start()
        if case.scenario == "removed":  # its REMOVE may have been the request killed
            with contextlib.suppress(OSError, asyncssh.Error):
                await asyncio.wait_for(client, 60)
        elif client is not None:
            await asyncio.wait_for(client, 60)
        await eventually(lambda: all_finished(ledger_path), timeout=60, what="the queue to drain")

        async def queue_gauge_drained() -> bool:  # set just after the ledger's last commit
            return await metric(service.metrics_port, "sftpgate_queue_files") == 0

        await eventually(queue_gauge_drained, timeout=10, what="sftpgate_queue_files to be 0")
        undone_gauge = await metric(service.metrics_port, "sftpgate_undone_files")
        assert await service.terminate() == 0
    finally:
        await service.kill_if_running()

    assets = list(standin.state.assets.values())
    final = [r for r in rows(ledger_path) if r.path == "IMG_0001.jpg"]
    in_watch = [p for p in (data_dir / "watch" / "phone").rglob("*") if p.is_file()]
    undone_dir = data_dir / "watch" / "undone" / "phone"
    kept = sorted(p.name for p in undone_dir.glob("*")) if undone_dir.is_dir() else []
    assert not list((data_dir / ".work").iterdir()), "optimized files left behind"
    assert in_watch == [], f"left in watch/: {in_watch}"
    if case.scenario == "stack":
        # Both in Immich once, in one stack with the JPEG on top, recorded in the ledger.
        by_name = {a.original_file_name: a.id for a in assets}
        assert sorted(by_name) == ["IMG_0001.dng", "IMG_0001.jxl"]
        assert list(standin.state.stacks.values()) == [
            [by_name["IMG_0001.jxl"], by_name["IMG_0001.dng"]]
        ]
        recorded = Ledger(ledger_path, readonly=True)
        try:
            assert recorded.stack_assets("phone", "", "img_0001") == [
                by_name["IMG_0001.jxl"], by_name["IMG_0001.dng"],
            ]  # fmt: skip
        finally:
            recorded.close()
    elif case.scenario == "removed":
        # Removed before delivery: nothing reached Immich, and no row or file is left of it.
        assert assets == [] and final == [] and kept == [] and undone_gauge == 0
        assert not any(r.state in (State.RECEIVED, State.QUEUED) for r in rows(ledger_path))
    elif case.scenario == "corrupt" or refused:
        # Kept for a person, with its reason, and nothing reached Immich.
        assert assets == []
        assert [r.state for r in final] == [State.UNDONE]
        assert kept == ["IMG_0001.jpg", "IMG_0001.jpg.error.json"]
        expected = (corpus / CORRUPT).read_bytes() if case.scenario == "corrupt" else photo
        assert (undone_dir / "IMG_0001.jpg").read_bytes() == expected
        assert final[0].undone_path == str(undone_dir / "IMG_0001.jpg")
        sidecar = json.loads((undone_dir / "IMG_0001.jpg.error.json").read_text())
        assert sidecar["stage"] == ("upload" if refused else "optimize"), sidecar
        assert sidecar["reason"] == final[0].reason
        assert undone_gauge == 1
    else:
        # In Immich exactly once, and the original is gone from the data folder.
        assert [a.original_file_name for a in assets] == ["IMG_0001.jxl"]
        # A photo re-sent by the client after its CLOSE was cut off is a duplicate row.
        assert {r.state for r in final} == {State.DONE}
        assert [r.asset_id for r in final if r.outcome == Outcome.UPLOADED] == [assets[0].id]
        assert kept == []
        assert undone_gauge == 0
