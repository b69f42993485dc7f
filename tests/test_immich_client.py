"""ImmichClient against the real stand-in (no mocks): forms per version, errors, albums."""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from xml.etree import ElementTree

import pytest

from sftpgate.immich import standin
from sftpgate.immich.client import (
    ImmichClient,
    PermanentImmichError,
    TransientImmichError,
    UploadOutcome,
)
from sftpgate.immich.standin import StandinServer, StandinState, start_standin

from .readers import sidecar_dates

KEY = "sk-alice-0123456789abcdef"
CREATED = datetime(2024, 5, 1, 10, 20, 30, tzinfo=timezone(timedelta(hours=2)))
MODIFIED = datetime(2024, 5, 2, 8, 0, 0, 123456, tzinfo=UTC)
RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"


@pytest.fixture(params=[3])
async def server(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StandinServer]:
    state = StandinState(major=request.param, storage_dir=tmp_path / "library")
    state.add_user(KEY, "alice")
    async with await start_standin(state) as srv:
        yield srv


@pytest.fixture
async def client(server: StandinServer) -> AsyncIterator[ImmichClient]:
    async with ImmichClient(server.url, timeout_seconds=30) as c:
        yield c


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "IMG_0001.jxl"
    path.write_bytes(b"\xff\x0a" + bytes(range(256)) * 40)
    return path


def sha1_of(path: Path) -> str:
    h = hashlib.sha1()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


async def send(client: ImmichClient, path: Path, *, key: str = KEY, **kw: object) -> UploadOutcome:
    args: dict[str, object] = {
        "api_key": key,
        "filename": path.name,
        "created_at": CREATED,
        "modified_at": MODIFIED,
        "checksum": sha1_of(path),
        **kw,
    }
    return await client.upload_asset(path, **args)  # type: ignore[arg-type]


# --- the upload form follows the server's major version ---


@pytest.mark.parametrize("server", [2, 3], indirect=True)
async def test_form_follows_server_version(
    server: StandinServer, client: ImmichClient, photo: Path
) -> None:
    assert await client.server_major() == server.state.major
    outcome = await send(client, photo, filename="IMG_0001.jxl")
    assert outcome.status == "created"
    asset = server.state.assets[outcome.asset_id]
    assert asset.path is not None and asset.path.read_bytes() == photo.read_bytes()
    assert asset.original_file_name == "IMG_0001.jxl" and asset.path.suffix == ".jxl"
    assert asset.fields["fileCreatedAt"] == "2024-05-01T10:20:30.000+02:00"
    assert asset.fields["fileModifiedAt"] == "2024-05-02T08:00:00.123Z"
    assert all(re.fullmatch(standin.DATE_PATTERN, asset.fields[k]) for k in ("fileCreatedAt",))
    if server.state.major == 2:
        size = photo.stat().st_size
        assert asset.fields["deviceAssetId"] == f"IMG_0001.jxl-{size}"
        assert asset.fields["deviceId"] == "sftpgate"
    else:
        assert "deviceAssetId" not in asset.fields and "deviceId" not in asset.fields


@pytest.mark.parametrize("server", [2, 3], indirect=True)
async def test_date_sidecar_goes_along_on_both_versions(
    server: StandinServer, client: ImmichClient, photo: Path
) -> None:
    outcome = await send(client, photo, created_at=CREATED, sidecar_date=CREATED)
    sidecar = server.state.assets[outcome.asset_id].sidecar
    assert sidecar is not None
    assert sidecar_dates(sidecar) == {
        "XMP:DateTimeOriginal": "2024:05:01 10:20:30.000+02:00",
        "XMP:CreateDate": "2024:05:01 10:20:30.000+02:00",
    }
    # A well-formed XMP packet: x:xmpmeta / rdf:RDF / rdf:Description.
    root = ElementTree.fromstring(sidecar)
    assert root.tag == "{adobe:ns:meta/}xmpmeta"
    assert root.find(f"{{{RDF}}}RDF/{{{RDF}}}Description") is not None


async def test_no_sidecar_unless_asked(
    server: StandinServer, client: ImmichClient, photo: Path
) -> None:
    outcome = await send(client, photo)
    assert server.state.assets[outcome.asset_id].sidecar is None


async def test_created_then_duplicate(
    server: StandinServer, client: ImmichClient, photo: Path
) -> None:
    first = await send(client, photo)
    again = await send(client, photo, filename="renamed.jxl")
    assert first.status == "created"
    assert again == UploadOutcome(first.asset_id, "duplicate")
    assert len(server.state.assets) == 1


async def test_naive_datetime_is_refused_before_sending(
    server: StandinServer, client: ImmichClient, photo: Path
) -> None:
    with pytest.raises(ValueError, match="naive"):
        await send(client, photo, created_at=datetime(2024, 5, 1, 10, 0))
    with pytest.raises(ValueError, match="naive"):
        await send(client, photo, modified_at=datetime(2024, 5, 1, 10, 0))
    assert server.state.uploads_received == 0


async def test_odd_utc_offsets_are_sent_in_utc(
    server: StandinServer, client: ImmichClient, photo: Path
) -> None:
    lmt = timezone(timedelta(minutes=53, seconds=28))  # e.g. zoneinfo's LMT before 1893
    outcome = await send(client, photo, created_at=datetime(1890, 1, 1, 12, 0, tzinfo=lmt))
    created = server.state.assets[outcome.asset_id].fields["fileCreatedAt"]
    assert created == "1890-01-01T11:06:32.000Z"


@pytest.mark.parametrize("hangup", [False, True])
async def test_large_file_streams_and_duplicate_answer_arrives_early(
    server: StandinServer, client: ImmichClient, tmp_path: Path, hangup: bool
) -> None:
    video = tmp_path / "VID_0001.mp4"
    with video.open("wb") as f:  # 50 MB, sparse but for a few marks
        f.truncate(50 * 1024 * 1024)
        for offset in (0, 17 * 1024 * 1024, 50 * 1024 * 1024 - 5):
            f.seek(offset)
            f.write(b"mark!")
    first = await send(client, video)
    stored = server.state.assets[first.asset_id]
    assert stored.size == video.stat().st_size
    assert stored.path is not None and sha1_of(stored.path) == sha1_of(video)
    # Immich answers "duplicate" before reading the 50 MB.
    server.state.hangup_on_duplicate = hangup
    for _ in range(5):
        try:
            outcome = await send(client, video)
        except TransientImmichError as e:
            # Only when it also hangs up, and the reset beats the answer: then the retry is
            # settled by a checksum check, without sending the file again.
            assert hangup and e.status is None
            sent = server.state.uploads_received
            outcome = await send(client, video)
            assert server.state.uploads_received == sent
        assert outcome == UploadOutcome(first.asset_id, "duplicate")
    assert len(server.state.assets) == 1


# --- errors ---


@pytest.mark.parametrize(
    ("status", "retry_after"), [(500, None), (502, None), (503, 2.0), (429, 2.0)]
)
async def test_server_errors_are_transient(
    server: StandinServer, client: ImmichClient, photo: Path, status: int, retry_after: float | None
) -> None:
    server.state.fail_next = [status]
    with pytest.raises(TransientImmichError) as err:
        await send(client, photo)
    assert err.value.status == status
    assert err.value.retry_after == retry_after
    assert str(status) in str(err.value)
    assert (await send(client, photo)).status == "created"  # and the retry goes through


async def test_drop_mid_body_is_transient(
    server: StandinServer, client: ImmichClient, tmp_path: Path
) -> None:
    big = tmp_path / "VID_0002.mov"
    big.write_bytes(b"x" * (4 * 1024 * 1024))
    server.state.drop_next = 1
    with pytest.raises(TransientImmichError) as err:
        await send(client, big)
    assert err.value.status is None
    assert server.state.assets == {}
    assert (await send(client, big)).status == "created"


async def test_drop_after_commit_then_retry_is_duplicate_with_same_id(
    server: StandinServer, client: ImmichClient, photo: Path
) -> None:
    server.state.drop_after_commit_next = 1
    with pytest.raises(TransientImmichError):
        await send(client, photo)
    (stored_id,) = server.state.assets
    sent = server.state.uploads_received
    assert await send(client, photo) == UploadOutcome(stored_id, "duplicate")
    assert server.state.uploads_received == sent  # settled by the checksum check
    assert len(server.state.assets) == 1
    # A client that does not remember the lost answer sends again and hears "duplicate".
    async with ImmichClient(server.url) as fresh:
        assert await send(fresh, photo) == UploadOutcome(stored_id, "duplicate")


async def test_down_is_transient_and_ping_fails(
    server: StandinServer, client: ImmichClient, photo: Path
) -> None:
    assert await client.ping() is True
    server.state.down = True
    assert await client.ping() is False
    with pytest.raises(TransientImmichError) as err:
        await send(client, photo)
    assert err.value.status == 503 and "Service Unavailable" in str(err.value)
    server.state.down = False
    assert await client.ping() is True
    assert (await send(client, photo)).status == "created"


async def test_connection_refused_is_transient(tmp_path: Path, photo: Path) -> None:
    state = StandinState()
    state.add_user(KEY)
    srv = await start_standin(state)
    url = srv.url
    await srv.close()
    async with ImmichClient(url) as client:
        assert await client.ping() is False
        with pytest.raises(TransientImmichError) as err:
            await send(client, photo)
    assert err.value.status is None and url in str(err.value)


async def test_slow_answer_times_out_as_transient(server: StandinServer, photo: Path) -> None:
    async with ImmichClient(server.url, timeout_seconds=0.3) as client:
        assert await client.server_major() == 3
        server.state.delay_seconds = 30  # ends when the stand-in closes
        with pytest.raises(TransientImmichError, match="in time"):
            await send(client, photo)
    (stored_id,) = server.state.assets  # Immich stored it, the answer came too late
    server.state.delay_seconds = 0
    async with ImmichClient(server.url, timeout_seconds=0.3) as client:
        assert await send(client, photo) == UploadOutcome(stored_id, "duplicate")


async def test_version_is_read_again_after_a_connection_failure(
    server: StandinServer, client: ImmichClient, photo: Path
) -> None:
    assert await client.server_major() == 3
    server.state.major = 2  # e.g. a downgrade behind the same address
    assert await client.server_major() == 3  # cached
    server.state.drop_next = 1
    with pytest.raises(TransientImmichError):
        await send(client, photo)
    assert await client.server_major() == 2
    outcome = await send(client, photo)
    assert "deviceAssetId" in server.state.assets[outcome.asset_id].fields


async def test_unsupported_file_type_is_permanent(
    server: StandinServer, client: ImmichClient, tmp_path: Path
) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(PermanentImmichError) as err:
        await send(client, notes)
    assert err.value.status == 400
    assert "Unsupported file type notes.txt" in str(err.value)


@pytest.mark.parametrize(
    ("key", "status", "message"),
    [
        ("sk-wrong-0123456789", 401, "Invalid API key"),
        ("sk-readonly-0123456789", 403, "Missing required permission: asset.upload"),
    ],
)
async def test_auth_errors_are_permanent_and_hide_the_key(
    server: StandinServer,
    client: ImmichClient,
    photo: Path,
    key: str,
    status: int,
    message: str,
) -> None:
    server.state.add_user("sk-readonly-0123456789", permissions=frozenset({"album.read"}))
    with pytest.raises(PermanentImmichError) as err:
        await send(client, photo, key=key)
    assert err.value.status == status
    assert message in str(err.value)
    assert key not in str(err.value) and key not in repr(err.value)
    assert KEY not in str(err.value)


async def test_validation_error_names_the_fields(
    server: StandinServer, client: ImmichClient, photo: Path
) -> None:
    assert await client.server_major() == 3
    server.state.major = 2  # the client still believes v3 and sends no device fields
    with pytest.raises(PermanentImmichError) as err:
        await send(client, photo)
    assert err.value.status == 400 and "deviceAssetId should not be empty" in str(err.value)
    assert (await send(client, photo)).status == "created"  # a 400 makes it re-read the version


async def test_url_with_api_suffix_and_media_extensions(server: StandinServer) -> None:
    async with ImmichClient(server.url + "/api/") as client:
        assert await client.ping() is True
        extensions = await client.media_extensions()
    assert {".jxl", ".jpg", ".heic", ".mp4", ".mkv"} <= extensions
    assert ".xmp" not in extensions and ".txt" not in extensions


# --- albums ---


@pytest.mark.parametrize("server", [2, 3], indirect=True)
async def test_albums_found_by_exact_name_and_created_once(
    server: StandinServer, client: ImmichClient, photo: Path
) -> None:
    phone2 = await client.find_or_create_album(KEY, "Phone 2")
    phone = await client.find_or_create_album(KEY, "Phone")
    assert phone != phone2
    assert await client.find_or_create_album(KEY, "Phone") == phone
    async with ImmichClient(server.url) as fresh:  # no cache: found on the server
        assert await fresh.find_or_create_album(KEY, "Phone") == phone
        assert await fresh.find_or_create_album(KEY, "Phone 2") == phone2
    assert sorted(a.name for a in server.state.albums.values()) == ["Phone", "Phone 2"]

    outcome = await send(client, photo)
    await client.add_to_album(KEY, phone, [outcome.asset_id])
    await client.add_to_album(KEY, phone, [outcome.asset_id])  # already there: fine
    assert server.state.albums[phone].asset_ids == [outcome.asset_id]
    with pytest.raises(PermanentImmichError, match="did not add 1 asset"):
        await client.add_to_album(KEY, phone, ["00000000-0000-4000-8000-000000000000"])


async def test_albums_are_per_user(server: StandinServer, client: ImmichClient) -> None:
    server.state.add_user("sk-bob-0123456789", "bob")
    alice = await client.find_or_create_album(KEY, "Phone")
    bob = await client.find_or_create_album("sk-bob-0123456789", "Phone")
    assert alice != bob


async def test_deleted_album_is_created_again(
    server: StandinServer, client: ImmichClient, photo: Path
) -> None:
    album = await client.find_or_create_album(KEY, "Phone")
    del server.state.albums[album]  # deleted in Immich's web UI
    outcome = await send(client, photo)
    with pytest.raises(PermanentImmichError):
        await client.add_to_album(KEY, album, [outcome.asset_id])
    again = await client.find_or_create_album(KEY, "Phone")
    assert again != album
    await client.add_to_album(KEY, again, [outcome.asset_id])
