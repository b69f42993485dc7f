"""The Immich stand-in: conformance to the real OpenAPI spec, and the upload contract over HTTP."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import sys
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sftpgate.immich import standin
from sftpgate.immich.standin import StandinServer, StandinState, start_standin

SPEC_PATH = Path(__file__).resolve().parents[2] / "shared" / "immich-openapi-specs.json"
REPO = Path(__file__).resolve().parents[1]
KEY = "key-alice"
DATE = "2024-05-01T10:20:30.000+02:00"
PHOTO = b"\xff\xd8\xff\xe0 not really a jpeg, but bytes are bytes \xff\xd9"


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    if not SPEC_PATH.is_file():
        pytest.skip(
            f"Immich OpenAPI spec not found at {SPEC_PATH} (expected ../shared/ beside repo)"
        )
    return json.loads(SPEC_PATH.read_text())


def schema(spec: dict[str, Any], name: str) -> dict[str, Any]:
    return spec["components"]["schemas"][name]


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[StandinServer]:
    state = StandinState(storage_dir=tmp_path / "library")
    state.add_user(KEY, "alice")
    async with await start_standin(state) as srv:
        yield srv


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def form(
    data: bytes = PHOTO,
    part_filename: str = "IMG_0001.jpg",
    **fields: str,
) -> aiohttp.FormData:
    """A v3 upload form; `fields` are added (or, given as "", removed) before the file part."""
    values = {"fileCreatedAt": DATE, "fileModifiedAt": DATE, "filename": part_filename, **fields}
    f = aiohttp.FormData()
    for name, value in values.items():
        if value != "":
            f.add_field(name, value)
    f.add_field("assetData", data, filename=part_filename, content_type="application/octet-stream")
    return f


async def upload(
    http: aiohttp.ClientSession,
    server: StandinServer,
    data: aiohttp.FormData,
    *,
    key: str | None = KEY,
    checksum: str | None = None,
) -> tuple[int, dict[str, Any], Mapping[str, str]]:
    headers = {}
    if key is not None:
        headers["x-api-key"] = key
    if checksum is not None:
        headers["x-immich-checksum"] = checksum
    async with http.post(f"{server.url}/api/assets", data=data, headers=headers) as resp:
        return resp.status, await resp.json(), resp.headers


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


# --- Conformance with the real Immich OpenAPI spec ---


def test_v3_upload_fields_match_the_spec(spec: dict[str, Any]) -> None:
    dto = schema(spec, "AssetMediaCreateDto")
    assert set(dto["required"]) == standin.V3_REQUIRED_FIELDS
    assert set(dto["properties"]) == standin.V3_ALLOWED_FIELDS
    assert {n for n, p in dto["properties"].items() if p.get("format") == "binary"} == (
        standin.FILE_FIELDS
    )
    assert dto["properties"]["duration"]["type"] == "integer"
    assert dto["properties"]["duration"]["maximum"] == standin.MAX_SAFE_INTEGER
    assert dto["properties"]["livePhotoVideoId"]["pattern"] == standin.UUID_PATTERN
    assert tuple(schema(spec, "AssetVisibility")["enum"]) == standin.VISIBILITIES
    assert "deviceAssetId" not in dto["properties"] and "deviceId" not in dto["properties"]


def test_date_pattern_is_the_spec_pattern(spec: dict[str, Any]) -> None:
    props = schema(spec, "AssetMediaCreateDto")["properties"]
    assert props["fileCreatedAt"]["pattern"] == standin.DATE_PATTERN
    assert props["fileModifiedAt"]["pattern"] == standin.DATE_PATTERN


def test_upload_statuses_and_checksum_header_match_the_spec(spec: dict[str, Any]) -> None:
    assert set(schema(spec, "AssetMediaStatus")["enum"]) == {"created", "duplicate"}
    post = spec["paths"]["/assets"]["post"]
    assert set(post["responses"]) == {"200", "201"}
    assert "x-immich-checksum" in {p["name"] for p in post["parameters"] if p["in"] == "header"}
    assert "duplicate" in schema(spec, "BulkIdErrorReason")["enum"]
    assert spec["components"]["securitySchemes"]["api_key"]["name"] == "x-api-key"


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("2024-01-01T00:00:00.000Z", True),
        ("2024-01-01T00:00:00+02:00", True),
        ("2024-01-01T00:00-05:30", True),
        ("2024-02-29T12:00:00Z", True),
        ("2024-01-01T00:00:00", False),  # naive
        ("2024-01-01T00:00:00.000", False),  # naive
        ("2023-02-29T12:00:00Z", False),  # not a leap year
        ("2024-01-01 00:00:00Z", False),
        ("2024-01-01T00:00:00+0200", False),
        ("2024-01-01T00:00:00+02:00:30", False),
    ],
)
def test_date_pattern(value: str, ok: bool) -> None:
    assert bool(re.fullmatch(standin.DATE_PATTERN, value)) is ok


async def test_answers_have_the_spec_required_fields(
    spec: dict[str, Any], server: StandinServer, http: aiohttp.ClientSession
) -> None:
    def required(name: str) -> set[str]:
        return set(schema(spec, name)["required"])

    async def get(path: str) -> Any:
        async with http.get(f"{server.url}/api{path}", headers={"x-api-key": KEY}) as r:
            assert r.status == 200
            return await r.json()

    assert required("ServerPingResponse") <= set(await get("/server/ping"))
    assert required("ServerVersionResponseDto") <= set(await get("/server/version"))
    media = await get("/server/media-types")
    assert required("ServerMediaTypesResponseDto") == set(media)
    assert ".jxl" in media["image"] and ".mp4" in media["video"] and media["sidecar"] == [".xmp"]
    assert all(e == e.lower() and e.startswith(".") for k in media for e in media[k])

    status, body, _ = await upload(http, server, form())
    assert status == 201 and required("AssetMediaResponseDto") <= set(body)
    assert re.fullmatch(standin.UUID_PATTERN, body["id"])

    async with http.post(
        f"{server.url}/api/albums", json={"albumName": "Phone"}, headers={"x-api-key": KEY}
    ) as r:
        assert r.status == 201
        album = await r.json()
    assert required("AlbumResponseDto") <= set(album)
    async with http.put(
        f"{server.url}/api/albums/{album['id']}/assets",
        json={"ids": [body["id"]]},
        headers={"x-api-key": KEY},
    ) as r:
        results = await r.json()
    assert all(required("BulkIdResponseDto") <= set(item) for item in results)
    async with http.post(
        f"{server.url}/api/assets/bulk-upload-check",
        json={"assets": [{"id": "a", "checksum": sha1(PHOTO)}, {"id": "b", "checksum": "0" * 40}]},
        headers={"x-api-key": KEY},
    ) as r:
        check = await r.json()
    assert required("AssetBulkUploadCheckResponseDto") <= set(check)
    a, b = check["results"]
    assert required("AssetBulkUploadCheckResult") <= set(a)
    assert (a["action"], a["reason"], a["assetId"]) == ("reject", "duplicate", body["id"])
    assert b["action"] == "accept"


# --- v3 upload contract ---


async def test_upload_created_then_duplicate_with_and_without_checksum(
    server: StandinServer, http: aiohttp.ClientSession
) -> None:
    status, body, _ = await upload(http, server, form(), checksum=sha1(PHOTO))
    assert (status, body["status"]) == (201, "created")
    asset = server.state.assets[body["id"]]
    assert asset.path is not None and asset.path.read_bytes() == PHOTO
    assert asset.path.name == f"{body['id']}.jpg"
    assert asset.checksum == sha1(PHOTO) and asset.size == len(PHOTO)
    assert (asset.original_file_name, asset.file_created_at) == ("IMG_0001.jpg", DATE)
    assert asset.path.stat().st_mtime == datetime.fromisoformat(DATE).timestamp()

    status, again, _ = await upload(http, server, form(), checksum=sha1(PHOTO))
    assert (status, again) == (200, {"id": body["id"], "status": "duplicate"})
    status, again, _ = await upload(http, server, form(part_filename="other.jpg"))
    assert (status, again) == (200, {"id": body["id"], "status": "duplicate"})
    b64 = base64.b64encode(hashlib.sha1(PHOTO).digest()).decode()
    status, again, _ = await upload(http, server, form(), checksum=b64)
    assert (status, again["status"]) == (200, "duplicate")

    assert len(server.state.assets) == 1
    assert server.state.counters() == {"uploads_received": 4, "created": 1, "duplicates": 3}
    assert [p.name for p in (server.state.storage_dir or Path()).iterdir()] == [asset.path.name]


async def test_known_checksum_is_answered_before_the_body_is_read(
    server: StandinServer, http: aiohttp.ClientSession
) -> None:
    _, first, _ = await upload(http, server, form())
    # Neither the (invalid) fields nor the (other) bytes are looked at: Immich's interceptor.
    bogus = form(data=b"other bytes", part_filename="x.txt", deviceId="x", fileCreatedAt="")
    status, body, _ = await upload(http, server, bogus, checksum=sha1(PHOTO))
    assert (status, body) == (200, {"id": first["id"], "status": "duplicate"})


async def test_duplicates_are_per_user(server: StandinServer, http: aiohttp.ClientSession) -> None:
    server.state.add_user("key-bob", "bob")
    _, first, _ = await upload(http, server, form())
    status, second, _ = await upload(http, server, form(), key="key-bob", checksum=sha1(PHOTO))
    assert status == 201 and second["id"] != first["id"]


@pytest.mark.parametrize("extra", ["deviceAssetId", "deviceId", "isArchived"])
async def test_unknown_field_is_a_validation_error(
    server: StandinServer, http: aiohttp.ClientSession, extra: str
) -> None:
    status, body, headers = await upload(http, server, form(**{extra: "x"}))
    assert status == 400
    assert body["statusCode"] == 400 and body["message"] == "Validation failed"
    assert {"code": "unrecognized_keys", "keys": [extra]}.items() <= body["errors"][0].items()
    assert headers["X-Correlation-ID"]
    assert server.state.assets == {}
    assert list((server.state.storage_dir or Path()).iterdir()) == []


@pytest.mark.parametrize(
    ("fields", "path"),
    [
        ({"fileCreatedAt": "2024-05-01T10:20:30"}, "fileCreatedAt"),
        ({"fileModifiedAt": "2024-05-01T10:20:30.123"}, "fileModifiedAt"),
        ({"fileModifiedAt": ""}, "fileModifiedAt"),
        ({"duration": "0:00:00.000000"}, "duration"),
        ({"duration": "-1"}, "duration"),
        ({"visibility": "public"}, "visibility"),
        ({"livePhotoVideoId": "not-a-uuid"}, "livePhotoVideoId"),
        ({"metadata": "{}"}, "metadata"),
    ],
)
async def test_invalid_fields_are_refused(
    server: StandinServer, http: aiohttp.ClientSession, fields: dict[str, str], path: str
) -> None:
    status, body, _ = await upload(http, server, form(**fields))
    assert status == 400 and body["message"] == "Validation failed"
    assert [e["path"] for e in body["errors"]] == [[path]]
    assert server.state.assets == {}


async def test_optional_fields_are_accepted(
    server: StandinServer, http: aiohttp.ClientSession
) -> None:
    fields = {
        "duration": "1500",
        "isFavorite": "true",
        "visibility": "archive",
        "metadata": json.dumps([{"key": "mobile-app", "value": {"x": 1}}]),
    }
    status, body, _ = await upload(http, server, form(**fields))
    assert status == 201
    assert server.state.assets[body["id"]].fields["duration"] == "1500"


async def test_missing_asset_data_is_refused(
    server: StandinServer, http: aiohttp.ClientSession
) -> None:
    f = aiohttp.FormData({"fileCreatedAt": DATE, "fileModifiedAt": DATE})
    f.add_field("unused", "x")  # keeps it multipart
    async with http.post(f"{server.url}/api/assets", data=f, headers={"x-api-key": KEY}) as resp:
        body = await resp.json()
    assert resp.status == 400
    assert ["assetData"] in [e["path"] for e in body["errors"]]


@pytest.mark.parametrize(
    ("part_filename", "filename_field", "refused_name"),
    [
        ("notes.txt", None, "notes.txt"),
        ("IMG_0001.jpg", "IMG_0001.txt", "IMG_0001.txt"),  # the field decides...
        ("IMG_0001.txt", "IMG_0001.JXL", None),  # ...in any case
        ("IMG_0001.xmp", None, "IMG_0001.xmp"),  # a sidecar is not an asset
    ],
)
async def test_file_type_is_decided_by_extension(
    server: StandinServer,
    http: aiohttp.ClientSession,
    part_filename: str,
    filename_field: str | None,
    refused_name: str | None,
) -> None:
    f = aiohttp.FormData({"fileCreatedAt": DATE, "fileModifiedAt": DATE})
    if filename_field:
        f.add_field("filename", filename_field)
    f.add_field("assetData", PHOTO, filename=part_filename)
    async with http.post(f"{server.url}/api/assets", data=f, headers={"x-api-key": KEY}) as r:
        status, body = r.status, await r.json()
    if refused_name:
        assert (status, body["message"]) == (400, f"Unsupported file type {refused_name}")
        assert server.state.assets == {}
    else:
        assert status == 201
        assert server.state.assets[body["id"]].path.suffix == ".JXL"  # type: ignore[union-attr]


async def test_filename_field_after_the_file_is_too_late(
    server: StandinServer, http: aiohttp.ClientSession
) -> None:
    """Like multer: the type is checked when the file part starts."""
    f = aiohttp.FormData({"fileCreatedAt": DATE, "fileModifiedAt": DATE})
    f.add_field("assetData", PHOTO, filename="upload.bin")
    f.add_field("filename", "IMG_0001.jpg")
    async with http.post(f"{server.url}/api/assets", data=f, headers={"x-api-key": KEY}) as r:
        assert (r.status, (await r.json())["message"]) == (400, "Unsupported file type upload.bin")


SIDECAR = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"/>\n'


def sidecar_form(sidecar_name: str, *, sidecar_first: bool = True) -> aiohttp.FormData:
    """A v3 upload with a `sidecarData` part before (or after) the `filename` field."""
    f = aiohttp.FormData({"fileCreatedAt": DATE, "fileModifiedAt": DATE})
    if sidecar_first:
        f.add_field("sidecarData", SIDECAR, filename=sidecar_name, content_type="application/xml")
    f.add_field("filename", "IMG_0001.jxl")
    if not sidecar_first:
        f.add_field("sidecarData", SIDECAR, filename=sidecar_name, content_type="application/xml")
    f.add_field("assetData", PHOTO, filename="IMG_0001.jxl")
    return f


@pytest.mark.parametrize("major", [3, 2])
async def test_sidecar_is_kept_on_the_asset(
    server: StandinServer, http: aiohttp.ClientSession, major: int
) -> None:
    server.state.major = major
    device = {"deviceAssetId": "IMG_0001.jxl-1", "deviceId": "sftpgate"} if major == 2 else {}
    f = sidecar_form("IMG_0001.jxl.xmp")
    for name, value in device.items():
        f.add_field(name, value)
    status, body, _ = await upload(http, server, f)
    assert (status, body["status"]) == (201, "created")
    assert server.state.assets[body["id"]].sidecar == SIDECAR
    async with http.get(f"{server.url}/_standin/assets") as r:
        (listed,) = await r.json()
    assert base64.b64decode(listed["sidecar"]) == SIDECAR

    _, plain, _ = await upload(http, server, form(data=b"other bytes", **device))
    assert server.state.assets[plain["id"]].sidecar is None


@pytest.mark.parametrize(
    ("sidecar_name", "sidecar_first", "refused_name"),
    [
        ("IMG_0001.jxl.txt", True, "IMG_0001.jxl.txt"),
        ("IMG_0001.XMP", True, None),
        # Immich judges every file part by the `filename` field when that came first.
        ("IMG_0001.jxl.xmp", False, "IMG_0001.jxl"),
    ],
)
async def test_sidecar_must_be_xmp_by_the_name_immich_checks(
    server: StandinServer,
    http: aiohttp.ClientSession,
    sidecar_name: str,
    sidecar_first: bool,
    refused_name: str | None,
) -> None:
    status, body, _ = await upload(
        http, server, sidecar_form(sidecar_name, sidecar_first=sidecar_first)
    )
    if refused_name:
        assert (status, body["message"]) == (400, f"Unsupported file type {refused_name}")
        assert server.state.assets == {}
    else:
        assert status == 201 and server.state.assets[body["id"]].sidecar == SIDECAR


async def test_unknown_file_part_is_a_validation_error_on_v3(
    server: StandinServer, http: aiohttp.ClientSession
) -> None:
    f = form()
    f.add_field("livePhotoData", PHOTO, filename="IMG_0001.mov")
    status, body, _ = await upload(http, server, f)
    assert status == 400 and body["message"] == "Validation failed"
    assert body["errors"][0]["keys"] == ["livePhotoData"]
    assert server.state.assets == {}


@pytest.mark.parametrize(
    ("key", "status", "message"),
    [
        (None, 401, "Authentication required"),
        ("wrong-key", 401, "Invalid API key"),
        ("key-readonly", 403, "Missing required permission: asset.upload"),
    ],
)
async def test_auth_is_required(
    server: StandinServer, http: aiohttp.ClientSession, key: str | None, status: int, message: str
) -> None:
    server.state.add_user("key-readonly", permissions=frozenset({"album.read"}))
    got, body, headers = await upload(http, server, form(), key=key)
    assert (got, body["message"], body["statusCode"]) == (status, message, status)
    assert headers["X-Correlation-ID"]
    assert server.state.assets == {}


async def test_checksum_header_must_match_the_bytes(
    server: StandinServer, http: aiohttp.ClientSession
) -> None:
    status, body, _ = await upload(http, server, form(), checksum=sha1(b"other bytes"))
    assert status == 400 and "does not match" in body["message"]
    status, body, _ = await upload(http, server, form(), checksum="not-a-checksum")
    assert status == 400 and "x-immich-checksum" in body["message"]
    status, body, _ = await upload(http, server, form(data=b""))
    assert (status, body["message"]) == (400, "File is empty")
    assert server.state.assets == {}


# --- v2 ---


async def test_v2_requires_device_fields(
    server: StandinServer, http: aiohttp.ClientSession
) -> None:
    server.state.major = 2
    status, body, headers = await upload(http, server, form())
    assert status == 400
    assert "deviceAssetId should not be empty" in body["message"]
    assert "deviceId should not be empty" in body["message"]
    assert body["error"] == "Bad Request" and body["correlationId"]
    assert "X-Correlation-ID" not in headers

    fields = {"deviceAssetId": f"IMG_0001.jpg-{len(PHOTO)}", "deviceId": "sftpgate"}
    status, body, _ = await upload(
        http, server, form(fileCreatedAt="2024-05-01T10:20:30", isArchived="false", **fields)
    )
    assert (status, body["status"]) == (201, "created")  # v2: naive dates, unknown fields pass


# --- albums ---


async def test_album_name_filter_is_exact_on_v3_and_absent_on_v2(
    server: StandinServer, http: aiohttp.ClientSession
) -> None:
    for name in ("Phone", "Phone 2"):
        async with http.post(
            f"{server.url}/api/albums", json={"albumName": name}, headers={"x-api-key": KEY}
        ) as r:
            assert r.status == 201

    async def names(query: str) -> list[str]:
        async with http.get(f"{server.url}/api/albums{query}", headers={"x-api-key": KEY}) as r:
            return sorted(a["albumName"] for a in await r.json())

    assert await names("?name=Phone") == ["Phone"]
    assert await names("?name=Phon") == []
    server.state.major = 2
    assert await names("?name=Phone") == ["Phone", "Phone 2"]


# --- faults and control over HTTP ---


async def test_faults_over_http(server: StandinServer, http: aiohttp.ClientSession) -> None:
    async with http.post(
        f"{server.url}/_standin/faults", json={"fail_next": [503, 429], "retry_after_seconds": 7}
    ) as r:
        assert r.status == 200 and (await r.json())["fail_next"] == [503, 429]
    for expected in (503, 429):
        status, _, headers = await upload(http, server, form())
        assert (status, headers["Retry-After"]) == (expected, "7")
    status, body, _ = await upload(http, server, form())
    assert status == 201

    async with http.post(f"{server.url}/_standin/faults", json={"drop_next": "yes"}) as r:
        assert r.status == 400
    async with http.post(f"{server.url}/_standin/faults", json={"bogus": 1}) as r:
        assert r.status == 400

    async with http.get(f"{server.url}/_standin/assets") as r:
        assets = await r.json()
    assert [(a["id"], a["checksum"]) for a in assets] == [(body["id"], sha1(PHOTO))]
    async with http.get(f"{server.url}/_standin/state") as r:
        assert (await r.json())["counters"] == {
            "uploads_received": 3,
            "created": 1,
            "duplicates": 0,
        }


async def test_down_answers_503_everywhere_but_control(
    server: StandinServer, http: aiohttp.ClientSession
) -> None:
    async with http.post(f"{server.url}/_standin/faults", json={"down": True}) as r:
        assert r.status == 200
    for path in ("/api/server/ping", "/api/server/version", "/api/albums"):
        async with http.get(f"{server.url}{path}") as r:
            assert r.status == 503
    async with http.post(f"{server.url}/_standin/faults", json={"down": False}) as r:
        assert r.status == 200
    async with http.get(f"{server.url}/api/server/ping") as r:
        assert (r.status, await r.json()) == (200, {"res": "pong"})


async def test_drop_next_resets_the_connection_without_answer(
    server: StandinServer, http: aiohttp.ClientSession
) -> None:
    server.state.drop_next = 1
    with pytest.raises(aiohttp.ClientError):
        await upload(http, server, form(data=PHOTO * 20000))
    assert server.state.assets == {} and server.state.drop_next == 0
    status, _, _ = await upload(http, server, form(data=PHOTO * 20000))
    assert status == 201


async def test_drop_after_commit_stores_but_does_not_answer(
    server: StandinServer, http: aiohttp.ClientSession
) -> None:
    server.state.drop_after_commit_next = 1
    with pytest.raises(aiohttp.ClientError):
        await upload(http, server, form())
    assert len(server.state.assets) == 1
    status, body, _ = await upload(http, server, form(), checksum=sha1(PHOTO))
    assert (status, body["id"]) == (200, next(iter(server.state.assets)))


async def test_standin_runs_as_a_process(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sftpgate.immich.standin",
        "--port",
        "0",
        "--storage",
        str(tmp_path / "lib"),
        "--major",
        "2",
        "--api-key",
        "proc-key:carol",
        stdout=asyncio.subprocess.PIPE,
        env=env,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
        url = re.search(r"http://\S+", line)
        assert url, line
        base = url.group(0)
        async with http.get(f"{base}/api/server/version") as r:
            assert (await r.json())["major"] == 2
        fields = {"deviceAssetId": "a.jpg-1", "deviceId": "x"}
        async with http.post(
            f"{base}/api/assets", data=form(**fields), headers={"x-api-key": "proc-key"}
        ) as r:
            assert r.status == 201
        async with http.get(f"{base}/_standin/assets") as r:
            (asset,) = await r.json()
        assert asset["ownerId"] == "carol"
        assert Path(asset["path"]).read_bytes() == PHOTO
    finally:
        proc.terminate()
        await proc.wait()


async def test_a_video_is_played_from_immichs_copy_once_its_job_made_one(
    server: StandinServer, http: aiohttp.ClientSession, spec: dict[str, Any], corpus: Path
) -> None:
    """An HEVC video gets Immich's H.264 copy at the default settings, and playback serves it
    in byte ranges (what the spec says of the endpoint); an H.264 video is played as it is."""
    operation = spec["paths"]["/assets/{id}/video/playback"]["get"]
    assert operation["x-immich-permission"] == "asset.view"
    assert "byte range" in operation["description"]
    played = {}
    for name in ("samsung-s22-hevc-rot90-gps.mp4", "android6-1080p-gps.mp4"):
        data = (corpus / "video" / name).read_bytes()
        status, body, _ = await upload(http, server, form(data=data, part_filename=name))
        assert status == 201
        await server.state.conversions_finished()
        url = f"{server.url}/api/assets/{body['id']}/video/playback"
        async with http.get(url, headers={"x-api-key": KEY, "Range": "bytes=0-0"}) as r:
            assert r.status == 206 and len(await r.read()) == 1
            played[name] = (len(data), int(r.headers["Content-Range"].rpartition("/")[2]))
    asset = next(a for a in server.state.assets.values() if a.filename.startswith("samsung"))
    assert asset.encoded_path is not None
    assert played["samsung-s22-hevc-rot90-gps.mp4"][1] == asset.encoded_path.stat().st_size
    original, size = played["android6-1080p-gps.mp4"]
    assert size == original  # H.264 is accepted: no copy, the original is played

    _, photo, _ = await upload(http, server, form())
    for asset_id, key, status in (
        (photo["id"], KEY, 404),  # not a video
        ("not-a-uuid", KEY, 400),
        (asset.id, None, 401),
    ):
        headers = {"x-api-key": key} if key else {}
        async with http.get(
            f"{server.url}/api/assets/{asset_id}/video/playback", headers=headers
        ) as r:
            assert r.status == status, (asset_id, await r.text())
    server.state.permissions[KEY] = frozenset({"asset.upload"})
    async with http.get(
        f"{server.url}/api/assets/{asset.id}/video/playback", headers={"x-api-key": KEY}
    ) as r:
        assert r.status == 403 and "asset.view" in await r.text()


def test_immichs_job_encodes_an_accepted_codec_again_when_its_chroma_is_not_420(
    tmp_path: Path,
) -> None:
    import av

    clip = tmp_path / "422.mp4"
    with av.open(str(clip), "w") as out:
        stream = out.add_stream("libx264", rate=15, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = 176, 144, "yuv422p"
        for index in range(15):
            frame = av.VideoFrame(176, 144, "rgb24")
            frame.planes[0].update(bytes((x + index * 9) % 256 for x in range(176 * 144 * 3)))
            frame = frame.reformat(format="yuv422p")
            frame.pts = index
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    ffmpeg = standin.default_system_config()["ffmpeg"]  # accepts h264
    assert standin.encode_like_immich(clip, tmp_path / "copy.mp4", ffmpeg)
    with av.open(str(tmp_path / "copy.mp4")) as copy:
        assert copy.streams.video[0].codec_context.pix_fmt == "yuv420p"
    disabled = {**ffmpeg, "transcode": "disabled"}
    assert not standin.encode_like_immich(clip, tmp_path / "none.mp4", disabled)
