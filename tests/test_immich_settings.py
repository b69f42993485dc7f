"""What Immich does with what sftpgate sends, through the whole service and the stand-in: the API
key's permissions checked up front, Immich's video transcoding and full-size settings read and
acted on, albums named after the folder a file is in (never the video half of a Live Photo), and
duplicates whose asset is in Immich's trash kept in undone/."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sftpgate.config import load_config
from sftpgate.immich.client import ImmichClient, PermanentImmichError
from sftpgate.immich.settings import inspect_immich
from sftpgate.immich.standin import StandinAsset
from sftpgate.ledger import Outcome, State
from sftpgate.pipeline import album_name
from sftpgate.status import collect_status, format_status

from .conftest import API_KEY, eventually, finished, gate_config, started_gate
from .test_cli import sftpgate_async
from .test_sftp_clients import connect

SPEC = Path(__file__).resolve().parents[2] / "shared" / "immich-openapi-specs.json"
UPLOAD_ONLY = frozenset({"asset.upload"})
ALBUMS = {"album.read", "album.create", "albumAsset.create"}


def logged(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [getattr(r, "fields", {}) for r in caplog.records if r.getMessage() == name]


async def upload(port: int, files: dict[str, bytes]) -> None:
    async with connect(port) as conn, conn.start_sftp_client() as sftp:
        for name, data in files.items():
            folder = name.rpartition("/")[0]
            if folder:
                await sftp.makedirs(folder, exist_ok=True)
            async with sftp.open(name, "wb") as f:
                await f.write(data)


# -- the stand-in answers as Immich does ------------------------------------------------------


def _schema(name: str) -> dict[str, Any]:
    return json.loads(SPEC.read_text())["components"]["schemas"][name]


async def test_the_standin_tells_a_key_its_permissions_and_guards_its_settings(standin):
    standin.state.add_user("upload-only", permissions=UPLOAD_ONLY)
    async with ImmichClient(standin.url) as immich:
        assert await immich.key_permissions(API_KEY) == {"all"}
        assert await immich.key_permissions("upload-only") == UPLOAD_ONLY
        with pytest.raises(PermanentImmichError, match="401"):
            await immich.key_permissions("no such key")
        with pytest.raises(PermanentImmichError, match=r"403.*systemConfig\.read"):
            await immich.system_config("upload-only")
        settings = await immich.system_config(API_KEY)
    # The sections served are complete and valid as the spec describes them.
    for section, schema in (("ffmpeg", "SystemConfigFFmpegDto"), ("image", "SystemConfigImageDto")):
        assert set(_schema(schema)["required"]) <= set(settings[section]), section
    codecs = set(_schema("VideoCodec")["enum"])
    assert set(settings["ffmpeg"]["acceptedVideoCodecs"]) <= codecs
    assert settings["ffmpeg"]["transcode"] in _schema("TranscodePolicy")["enum"]
    # The key's own answer carries every field the spec requires of it.
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{standin.url}/api/api-keys/me", headers={"x-api-key": API_KEY}) as r,
    ):
        body = await r.json()
    assert set(_schema("ApiKeyResponseDto")["required"]) <= set(body)


# -- reading Immich's settings ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("ffmpeg", "mode", "retranscodes"),
    [
        ({}, "hevc", True),  # Immich's defaults: target h264, accepted [h264], required
        ({"acceptedVideoCodecs": ["h264", "hevc"]}, "hevc", False),
        ({"acceptedVideoCodecs": ["h264", "hevc"]}, "av1", True),
        ({"acceptedVideoCodecs": ["h264", "hevc"], "transcode": "all"}, "hevc", True),
        ({"transcode": "disabled"}, "hevc", False),
        ({}, "keep", False),  # sftpgate converts no video
    ],
)
async def test_immich_re_encoding_is_read_from_its_settings(
    tmp_path, standin, host_keys_dir, client_key, ffmpeg, mode, retranscodes
):
    standin.state.system_config["ffmpeg"].update(ffmpeg)
    config = load_config(
        gate_config(
            tmp_path, standin.url, host_keys_dir, client_key, optimize={"video": {"mode": mode}}
        )
    )
    async with ImmichClient(standin.url) as immich:
        report = await inspect_immich(immich, config)
    assert report.retranscodes_video is retranscodes
    assert any("re-encodes every" in s for s in report.sentences()) is retranscodes
    assert report.fullsize_images is False
    assert any("1440 px" in s for s in report.sentences())


async def test_a_key_without_permissions_is_named_with_what_it_lacks(
    tmp_path, standin, host_keys_dir, client_key
):
    standin.state.permissions[API_KEY] = frozenset({"album.read"})
    config = load_config(
        gate_config(tmp_path, standin.url, host_keys_dir, client_key, immich={"album": "{parent}"})
    )
    async with ImmichClient(standin.url) as immich:
        report = await inspect_immich(immich, config)
    (key,) = report.keys
    assert key.users == ("phone",)
    assert key.missing == ("asset.upload", "album.create", "albumAsset.create", "stack.create")
    assert report.lacks_upload and report.missing_permissions == 4
    assert report.retranscodes_video is None  # may not read the settings: not guessed
    sentences = report.sentences()
    assert "lacks asset.upload, album.create, albumAsset.create, stack.create" in sentences[0]
    assert "systemConfig.read" in sentences[1]


# -- through the service ----------------------------------------------------------------------


async def metric(port: int | None, name: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_missing_permissions_are_told_at_start_and_fail_readyz(
    tmp_path, standin, host_keys_dir, client_key, caplog
):
    caplog.set_level(logging.INFO, logger="sftpgate")
    standin.state.permissions[API_KEY] = frozenset({"album.read", "album.create"})
    album = {"album": "{parent}"}
    async with started_gate(tmp_path, standin, host_keys_dir, client_key, immich=album) as gate:
        await eventually(lambda: gate.pipeline.immich_report, what="the first look at Immich")
        port = gate.metrics_port
        assert await metric(port, "sftpgate_immich_missing_permissions") == 3
        assert await metric(port, "sftpgate_immich_retranscodes_video") == -1
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/readyz") as r,
        ):
            assert r.status == 503
            assert "asset.upload" in await r.text()
        findings = [f["outcome"] for f in logged(caplog, "immich settings")]
        assert len(findings) == 2, findings  # one line each, logged once
        assert "lacks asset.upload, albumAsset.create, stack.create" in findings[0]
        assert API_KEY not in caplog.text
        status = await collect_status(gate.config)
        assert "lacks asset.upload, albumAsset.create, stack.create" in format_status(status)
    online = ("--config", str(tmp_path / "config.yaml"), "check-config", "--online")
    result = await sftpgate_async(*online)
    assert (
        result.returncode == 1
        and "lacks asset.upload, albumAsset.create, stack.create" in result.stdout
    )
    standin.state.permissions[API_KEY] = frozenset({"all"})
    result = await sftpgate_async(*online)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "re-encodes every HEVC video" in result.stdout and "lacks" not in result.stdout


@pytest.mark.parametrize("choice", ["keep", "convert"])
async def test_videos_immich_would_re_encode_are_kept_unless_configured(
    tmp_path, standin, host_keys_dir, client_key, corpus, choice, caplog
):
    video = (corpus / "video/android6-1080p-gps.mp4").read_bytes()  # H.264
    sections = {"optimize": {"video": {"when_immich_retranscodes": choice}}}
    async with started_gate(tmp_path, standin, host_keys_dir, client_key, **sections) as gate:
        await eventually(lambda: gate.pipeline.immich_report, what="the first look at Immich")
        assert await metric(gate.metrics_port, "sftpgate_immich_retranscodes_video") == 1
        await upload(gate.sftp.port, {"VID_0001.mp4": video})
        await gate.pipeline.wait_for(finished(1), timeout=120)
        await standin.state.conversions_finished()  # Immich's own job, after its answer
        (asset,) = standin.state.assets.values()
        if choice == "keep":
            (row,) = await gate.db(lambda db: list(db.iter_all()))
            assert asset.checksum == hashlib.sha1(video).hexdigest()  # sent as it was
            assert row.outcome == Outcome.KEPT and "when_immich_retranscodes: keep" in (
                row.reason or ""
            )
            assert asset.encoded_path is None  # Immich plays H.264 as it is: no copy
            assert await gate.pipeline.measure_immich_copies(settled_seconds=0) == 0
            assert "Immich's own" not in format_status(await collect_status(gate.config))
            return
        assert asset.encoded_path is not None
        copy = asset.encoded_path.stat().st_size
        # Not measured yet: status says so, and counts only sftpgate's own saving.
        status = await collect_status(gate.config)
        assert status["converted_videos_not_measured"] == 1
        assert "Immich's own copy not measured yet" in format_status(status)
        # A key that may not view assets measures nothing, and says so once.
        standin.state.permissions[API_KEY] = frozenset({"asset.upload", "stack.create"})
        assert await gate.pipeline.measure_immich_copies(settled_seconds=0) == 0
        assert await gate.pipeline.measure_immich_copies(settled_seconds=0) == 0
        refused = [r for r in caplog.records if r.getMessage() == "immich copy not measured"]
        assert len(refused) == 1 and "asset.view" in refused[0].fields["error"]
        standin.state.permissions[API_KEY] = frozenset({"all"})
        assert await gate.pipeline.measure_immich_copies(settled_seconds=0) == 1
        assert await gate.pipeline.measure_immich_copies(settled_seconds=0) == 0  # done once
        (row,) = await gate.db(lambda db: list(db.iter_all()))
        status = await collect_status(gate.config)
    assert row.outcome == Outcome.UPLOADED and asset.size < len(video)
    assert row.immich_copy_bytes == copy
    assert status["bytes_saved_after_immich_copies"] == len(video) - asset.size - copy
    assert status["converted_videos_not_measured"] == 0
    assert "Immich keeps an H.264 copy of 1 converted videos" in format_status(status)


# -- albums -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "path", "album"),
    [
        ("{parent}", "DCIM/Camera/x.jpg", "Camera"),
        ("{folder}", "DCIM/Camera/x.jpg", "DCIM"),
        ("Phone {parent}", "WhatsApp/Media/Images/x.jpg", "Phone Images"),
        ("{parent}", "x.jpg", None),  # no folder: no album, not one named ""
        ("Phone", "x.jpg", "Phone"),
        ("", "DCIM/x.jpg", None),
    ],
)
def test_album_names_follow_the_folder_a_file_is_in(template, path, album):
    assert album_name(template, path) == album


async def test_a_live_photo_goes_into_its_folder_album_without_its_video(
    tmp_path, standin, host_keys_dir, client_key, corpus
):
    files = {
        "DCIM/Camera/IMG_0001.JPG": (corpus / "jpeg/apple-iphone6s-livephoto.jpg").read_bytes(),
        "DCIM/Camera/IMG_0001.MOV": (corpus / "video/apple-iphone6s-livephoto.mov").read_bytes(),
    }
    album = {"album": "{parent}"}
    async with started_gate(tmp_path, standin, host_keys_dir, client_key, immich=album) as gate:
        await upload(gate.sftp.port, files)
        await gate.pipeline.wait_for(finished(2), timeout=120)
        # A converted photo is new bytes to Immich's own app: status says what to check.
        assert "the Immich app" in format_status(await collect_status(gate.config))
    by_name = {a.original_file_name: a.id for a in standin.state.assets.values()}
    assert set(by_name) == {"IMG_0001.jxl", "IMG_0001.MOV"}
    (camera,) = standin.state.albums.values()
    assert camera.name == "Camera"
    assert by_name["IMG_0001.MOV"] not in camera.asset_ids
    assert len(camera.asset_ids) == 1


# -- duplicates in Immich's trash ---------------------------------------------------------------


def _earlier_asset(owner: str, data: bytes, trashed: bool) -> StandinAsset:
    return StandinAsset(
        id="3f1b2c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d",
        owner_id=owner,
        checksum=hashlib.sha1(data).hexdigest(),
        filename="IMG_0001.HEIC",
        original_file_name="IMG_0001.HEIC",
        file_created_at="2024-01-01T00:00:00.000Z",
        file_modified_at="2024-01-01T00:00:00.000Z",
        size=len(data),
        path=None,
        trashed=trashed,
    )


@pytest.mark.parametrize(
    ("trashed", "setting", "kept"),
    [(True, "undone", True), (True, "delete", False), (False, "undone", False)],
)
async def test_a_duplicate_of_a_trashed_asset_is_kept_in_undone(
    tmp_path, standin, host_keys_dir, client_key, corpus, trashed, setting, kept
):
    photo = (corpus / "heic/apple-iphone8-tiny.heic").read_bytes()
    owner = standin.state.api_keys[API_KEY]
    standin.state.assets["earlier"] = _earlier_asset(owner, photo, trashed)
    immich = {"trashed_duplicates": setting}
    async with started_gate(tmp_path, standin, host_keys_dir, client_key, immich=immich) as gate:
        await upload(gate.sftp.port, {"IMG_0001.HEIC": photo})
        await gate.pipeline.wait_for(finished(1), timeout=60)
        (row,) = await gate.db(lambda db: list(db.iter_all()))
    undone = tmp_path / "data" / "watch" / "undone" / "phone" / "IMG_0001.HEIC"
    assert len(standin.state.assets) == 1  # never a second asset
    if kept:
        assert row.state == State.UNDONE and "already in Immich's trash" in (row.reason or "")
        assert undone.read_bytes() == photo
        sidecar = json.loads(undone.with_name("IMG_0001.HEIC.error.json").read_text())
        assert sidecar["stage"] == "upload"
    else:
        assert row.state == State.DONE and not undone.exists()
        assert not (tmp_path / "data" / "watch" / "phone" / "IMG_0001.HEIC").exists()
