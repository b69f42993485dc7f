"""A faithful stand-in for the Immich server's upload API (v3, or v2 on request).

Used by the test suite and by `sftpgate demo`. It accepts exactly what Immich's OpenAPI spec
(v3.0.3, `AssetMediaCreateDto`) accepts for `POST /api/assets` and rejects the rest the way
Immich does; the field sets and the date pattern below are checked against the spec by
`tests/test_immich_standin.py`.

Behaviour worth knowing (mirrors immich-app/immich server/src/middleware/*, asset-media.service):

- Order of checks on upload: auth (401/403) -> `x-immich-checksum` already owned by the user ->
  200 duplicate *before the body is read* (Immich's upload interceptor; the rest of the body is
  then drained, or the connection hung up with `hangup_on_duplicate`) -> multipart streamed; the
  asset's type is checked when its part starts, from the `filename` field if it came before the
  part, else the part's filename (multer) -> field validation (Zod in v3, class-validator in v2)
  -> "File is empty" -> checksum of the bytes -> duplicate (same user, same SHA-1) or created.
- A `sidecarData` part must be named `.xmp` (judged, like the asset, by the `filename` field when
  that came first); its bytes are kept on the created asset as `StandinAsset.sidecar`.
- Stand-in strictness beyond Immich: a malformed `x-immich-checksum`, or one that does not match
  the bytes, is a 400 (Immich would silently store it under the real checksum).
- v3 error bodies: `{"statusCode", "message", "errors"?}` plus an `X-Correlation-ID` header;
  v2 bodies: `{"message", "error", "statusCode", "correlationId"}` (message may be a list).

Fault switches (on `StandinState`, or over HTTP with `POST /_standin/faults`):
  fail_next               answer the next uploads with these statuses (body read first);
                          429 and 503 carry `Retry-After: <retry_after_seconds>`
  delay_seconds           every /api answer waits this long (ends early when the server closes)
  drop_next               the next N uploads: connection reset mid-body, no answer
  drop_after_commit_next  the next N uploads: asset stored, then connection reset, no answer
  hangup_on_duplicate     after an early "duplicate" answer, close the connection instead of
                          draining the unread body (the peer sees a reset, maybe before the answer)
  down                    every /api endpoint, ping included, answers 503 with a proxy's HTML page
                          (the /_standin/ control endpoints keep working)

Run as a process: `python -m sftpgate.immich.standin --port 2283 --storage DIR --api-key KEY`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import os
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any

from aiohttp import web

# --- The upload contract (checked against the OpenAPI spec by tests/test_immich_standin.py) ---

V3_REQUIRED_FIELDS = frozenset({"assetData", "fileCreatedAt", "fileModifiedAt"})
V3_ALLOWED_FIELDS = V3_REQUIRED_FIELDS | {
    "duration",
    "filename",
    "isFavorite",
    "livePhotoVideoId",
    "metadata",
    "sidecarData",
    "visibility",
}
V2_REQUIRED_FIELDS = V3_REQUIRED_FIELDS | {"deviceAssetId", "deviceId"}
V2_ALLOWED_FIELDS = V3_ALLOWED_FIELDS | {"deviceAssetId", "deviceId"}
FILE_FIELDS = frozenset({"assetData", "sidecarData"})

# AssetMediaCreateDto.fileCreatedAt.pattern: ISO-8601 with `Z` or `±hh:mm`, seconds optional.
DATE_PATTERN = (
    r"^(?:(?:\d\d[2468][048]|\d\d[13579][26]|\d\d0[48]|[02468][048]00|[13579][26]00)-02-29"
    r"|\d{4}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12]\d|3[01])|(?:0[469]|11)-(?:0[1-9]|[12]\d|30)"
    r"|(?:02)-(?:0[1-9]|1\d|2[0-8])))T(?:(?:[01]\d|2[0-3]):[0-5]\d(?::[0-5]\d(?:\.\d+)?)?"
    r"(?:Z|([+-](?:[01]\d|2[0-3]):[0-5]\d)))$"
)
UUID_PATTERN = (
    r"^([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-4[0-9a-fA-F]{3}-[89abAB][0-9a-fA-F]{3}-[0-9a-fA-F]{12})$"
)
VISIBILITIES = ("archive", "timeline", "hidden", "locked")
MAX_SAFE_INTEGER = 2**53 - 1

# GET /api/server/media-types (immich-app/immich server/src/utils/mime-types.ts).
# fmt: off
IMAGE_EXTENSIONS = [
    ".3fr", ".ari", ".arw", ".avif", ".bmp", ".cap", ".cin", ".cr2", ".cr3", ".crw", ".dcr",
    ".dng", ".erf", ".fff", ".gif", ".heic", ".heif", ".hif", ".iiq", ".insp", ".jpe", ".jpeg",
    ".jpg", ".jxl", ".k25", ".kdc", ".mrw", ".nef", ".nrw", ".orf", ".ori", ".pef", ".png",
    ".psd", ".raf", ".raw", ".rw2", ".rwl", ".sr2", ".srf", ".srw", ".svg", ".tif", ".tiff",
    ".webp", ".x3f",
]
VIDEO_EXTENSIONS = [
    ".3gp", ".3gpp", ".avi", ".flv", ".insv", ".m2ts", ".m4v", ".mkv", ".mov", ".mp4", ".mpe",
    ".mpeg", ".mpg", ".mts", ".vob", ".webm", ".wmv",
]
# fmt: on
SIDECAR_EXTENSIONS = [".xmp"]

CHUNK = 256 * 1024
MAX_TEXT_FIELD = 1024 * 1024
PROXY_DOWN_PAGE = (
    "<html><body><h1>503 Service Unavailable</h1>\n"
    "No server is available to handle this request.\n</body></html>\n"
)


@dataclass
class StandinAsset:
    id: str
    owner_id: str
    checksum: str  # SHA-1, lowercase hex
    filename: str  # the multipart part's filename
    original_file_name: str  # `filename` field, else the part's filename
    file_created_at: str
    file_modified_at: str
    size: int
    path: Path | None  # <storage_dir>/<id><ext>, None when storage_dir is None
    fields: dict[str, str] = field(default_factory=dict)  # every text field as received
    trashed: bool = False  # in the owner's trash: still a checksum duplicate
    sidecar: bytes | None = None  # the `sidecarData` part's bytes, None when there was none
    # The H.264 copy Immich's video-conversion job writes beside the original, if it made one.
    encoded_path: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "ownerId": self.owner_id,
            "checksum": self.checksum,
            "filename": self.filename,
            "originalFileName": self.original_file_name,
            "fileCreatedAt": self.file_created_at,
            "fileModifiedAt": self.file_modified_at,
            "size": self.size,
            "path": str(self.path) if self.path else None,
            "fields": self.fields,
            "isTrashed": self.trashed,
            "sidecar": base64.b64encode(self.sidecar).decode()
            if self.sidecar is not None
            else None,
        }


@dataclass
class StandinAlbum:
    id: str
    owner_id: str
    name: str
    asset_ids: list[str] = field(default_factory=list)
    created_at: str = field(default_factory=lambda: _now())

    def to_json(self, major: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "albumName": self.name,
            "description": "",
            "albumThumbnailAssetId": self.asset_ids[0] if self.asset_ids else None,
            "albumUsers": [],
            "assetCount": len(self.asset_ids),
            "createdAt": self.created_at,
            "updatedAt": self.created_at,
            "hasSharedLink": False,
            "isActivityEnabled": True,
            "shared": False,
        }
        if major < 3:
            body["ownerId"] = self.owner_id
        return body


@dataclass
class StandinState:
    major: int = 3
    minor: int = 0
    patch: int = 3
    api_keys: dict[str, str] = field(default_factory=dict)  # api key -> user id
    # api key -> granted permissions; a key without an entry has them all.
    permissions: dict[str, frozenset[str]] = field(default_factory=dict)
    storage_dir: Path | None = None
    assets: dict[str, StandinAsset] = field(default_factory=dict)
    albums: dict[str, StandinAlbum] = field(default_factory=dict)
    stacks: dict[str, list[str]] = field(default_factory=dict)  # stack id -> assets, primary first
    # What GET /api/system-config answers: Immich's defaults, for the sections sftpgate reads.
    system_config: dict[str, Any] = field(default_factory=lambda: default_system_config())
    # Fault switches.
    fail_next: list[int] = field(default_factory=list)
    retry_after_seconds: int = 2
    delay_seconds: float = 0.0
    drop_next: int = 0
    down: bool = False
    drop_after_commit_next: int = 0
    hangup_on_duplicate: bool = False
    # Counters.
    uploads_received: int = 0
    created: int = 0
    duplicates: int = 0
    _closing: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _conversions: set[asyncio.Task[None]] = field(default_factory=set, repr=False)

    async def conversions_finished(self) -> None:
        """Wait for the video-conversion jobs started so far (Immich runs them after answering)."""
        while self._conversions:
            await asyncio.gather(*self._conversions)

    def add_user(
        self,
        api_key: str,
        user_id: str | None = None,
        *,
        permissions: frozenset[str] | None = None,
    ) -> str:
        """Register an API key; returns the user id (a new uuid unless given)."""
        user_id = user_id or str(uuid.uuid4())
        self.api_keys[api_key] = user_id
        if permissions is not None:
            self.permissions[api_key] = permissions
        return user_id

    def find_by_checksum(self, owner_id: str, checksum_hex: str) -> StandinAsset | None:
        for asset in self.assets.values():
            if asset.owner_id == owner_id and asset.checksum == checksum_hex:
                return asset
        return None

    def faults(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in FAULT_NAMES}

    def counters(self) -> dict[str, int]:
        return {
            "uploads_received": self.uploads_received,
            "created": self.created,
            "duplicates": self.duplicates,
        }


FAULT_NAMES = (
    "fail_next",
    "retry_after_seconds",
    "delay_seconds",
    "drop_next",
    "down",
    "drop_after_commit_next",
    "hangup_on_duplicate",
)

STATE: web.AppKey[StandinState] = web.AppKey("standin_state", StandinState)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- Error answers in Immich's shapes ---


def _error(
    state: StandinState,
    status: int,
    message: str | list[str],
    *,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    correlation_id = uuid.uuid4().hex[:8]
    body: dict[str, Any]
    all_headers = dict(headers or {})
    if state.major >= 3:
        body = {"statusCode": status, "message": message}
        if errors is not None:
            body["errors"] = errors
        all_headers["X-Correlation-ID"] = correlation_id
    else:
        body = {
            "message": message,
            "error": HTTPStatus(status).phrase,
            "statusCode": status,
            "correlationId": correlation_id,
        }
    return web.json_response(body, status=status, headers=all_headers)


def _authenticate(request: web.Request, permission: str) -> tuple[str | None, web.Response | None]:
    """(user id, None) when the key is known and allowed, else (None, the error answer)."""
    state = request.app[STATE]
    key = request.headers.get("x-api-key")
    if not key:
        return None, _error(state, 401, "Authentication required")
    user_id = state.api_keys.get(key)
    if user_id is None:
        return None, _error(state, 401, "Invalid API key")
    granted = state.permissions.get(key)
    if granted is not None and permission not in granted and "all" not in granted:
        return None, _error(state, 403, f"Missing required permission: {permission}")
    return user_id, None


def checksum_to_hex(value: str) -> str | None:
    """Immich's `fromChecksum`: 40 hex digits or 28 base64 characters; None if neither."""
    if len(value) == 40 and re.fullmatch(r"[0-9a-fA-F]{40}", value):
        return value.lower()
    if len(value) == 28:
        with contextlib.suppress(binascii.Error, ValueError):
            raw = base64.b64decode(value, validate=True)
            if len(raw) == 20:
                return raw.hex()
    return None


def _is_media(filename: str) -> bool:
    return Path(filename).suffix.lower() in (*IMAGE_EXTENSIONS, *VIDEO_EXTENSIONS)


def _drop_connection(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()  # RST: the client sees a reset and no answer


async def _drain(request: web.Request) -> None:
    while await request.content.readany():
        pass


# --- Validation of the text fields (Zod issues in v3, class-validator messages in v2) ---


def _v3_issues(fields: dict[str, str], files: set[str]) -> list[dict[str, Any]]:
    issues: list[dict[str, Any]] = []
    present = (set(fields) - FILE_FIELDS) | files  # a file field sent as text is missing
    for name in sorted(V3_REQUIRED_FIELDS - present):
        expected = "file" if name in FILE_FIELDS else "string"
        issues.append(
            {
                "expected": expected,
                "code": "invalid_type",
                "path": [name],
                "message": f"Invalid input: expected {expected}, received undefined",
            }
        )
    for name in ("fileCreatedAt", "fileModifiedAt"):
        if name in fields and not re.fullmatch(DATE_PATTERN, fields[name]):
            issues.append(
                {
                    "origin": "string",
                    "code": "invalid_format",
                    "format": "datetime",
                    "pattern": DATE_PATTERN,
                    "path": [name],
                    "message": "Invalid ISO datetime",
                }
            )
    if "duration" in fields:
        text = fields["duration"].strip()
        if not re.fullmatch(r"-?\d+", text):
            issues.append(
                {
                    "expected": "number",
                    "code": "invalid_type",
                    "received": "NaN",
                    "path": ["duration"],
                    "message": "Invalid input: expected number, received NaN",
                }
            )
        elif not 0 <= int(text) <= MAX_SAFE_INTEGER:
            issues.append(
                {
                    "origin": "number",
                    "code": "too_small" if int(text) < 0 else "too_big",
                    "path": ["duration"],
                    "message": "Number out of range",
                }
            )
    if "isFavorite" in fields and fields["isFavorite"] not in ("true", "false"):
        issues.append(
            {
                "code": "invalid_value",
                "values": ["true", "false"],
                "path": ["isFavorite"],
                "message": 'Invalid option: expected one of "true"|"false"',
            }
        )
    if "visibility" in fields and fields["visibility"] not in VISIBILITIES:
        issues.append(
            {
                "code": "invalid_value",
                "values": list(VISIBILITIES),
                "path": ["visibility"],
                "message": "Invalid option: expected one of "
                + "|".join(f'"{v}"' for v in VISIBILITIES),
            }
        )
    if "livePhotoVideoId" in fields and not re.fullmatch(UUID_PATTERN, fields["livePhotoVideoId"]):
        issues.append(
            {
                "origin": "string",
                "code": "invalid_format",
                "format": "uuid",
                "path": ["livePhotoVideoId"],
                "message": "Invalid UUID",
            }
        )
    if "metadata" in fields and not _valid_metadata(fields["metadata"]):
        issues.append(
            {
                "expected": "array",
                "code": "invalid_type",
                "path": ["metadata"],
                "message": "Invalid input: expected array of {key, value}",
            }
        )
    unknown = sorted(present - V3_ALLOWED_FIELDS)
    if unknown:
        issues.append(
            {
                "code": "unrecognized_keys",
                "keys": unknown,
                "path": [],
                "message": "Unrecognized keys: " + ", ".join(f'"{k}"' for k in unknown),
            }
        )
    return issues


def _valid_metadata(text: str) -> bool:
    try:
        items = json.loads(text)
    except ValueError:
        return False
    return isinstance(items, list) and all(
        isinstance(i, dict) and isinstance(i.get("key"), str) and isinstance(i.get("value"), dict)
        for i in items
    )


def _v2_messages(fields: dict[str, str], files: set[str]) -> list[str]:
    """class-validator with `whitelist: true`: unknown fields are dropped, not refused."""
    messages: list[str] = []
    for name in ("deviceAssetId", "deviceId"):
        if not fields.get(name):
            messages += [f"{name} must be a string", f"{name} should not be empty"]
    for name in ("fileCreatedAt", "fileModifiedAt"):
        try:
            datetime.fromisoformat(fields[name])
        except (KeyError, ValueError):
            messages.append(f"{name} must be a Date instance")
    if "assetData" not in files:
        messages.append("assetData should not be empty")
    return messages


# --- Handlers ---


async def ping(request: web.Request) -> web.Response:
    return web.json_response({"res": "pong"})


async def version(request: web.Request) -> web.Response:
    s = request.app[STATE]
    return web.json_response(
        {"major": s.major, "minor": s.minor, "patch": s.patch, "prerelease": None}
    )


async def media_types(request: web.Request) -> web.Response:
    return web.json_response(
        {"image": IMAGE_EXTENSIONS, "video": VIDEO_EXTENSIONS, "sidecar": SIDECAR_EXTENSIONS}
    )


async def users_me(request: web.Request) -> web.Response:
    user_id, denied = _authenticate(request, "user.read")
    if denied:
        return denied
    return web.json_response(
        {
            "id": user_id,
            "email": f"{user_id}@standin.invalid",
            "name": f"user {user_id[:8]}",
            "isAdmin": False,
            "status": "active",
        }
    )


async def my_api_key(request: web.Request) -> web.Response:
    """The calling key with its permissions; it needs no permission itself."""
    state = request.app[STATE]
    key = request.headers.get("x-api-key")
    if not key:
        return _error(state, 401, "Authentication required")
    if key not in state.api_keys:
        return _error(state, 401, "Invalid API key")
    granted = state.permissions.get(key)
    created = "2026-01-01T00:00:00.000Z"
    return web.json_response(
        {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"standin-api-key:{key}")),
            "name": "sftpgate",
            "createdAt": created,
            "updatedAt": created,
            "permissions": ["all"] if granted is None else sorted(granted),
        }
    )


async def system_config(request: web.Request) -> web.Response:
    state = request.app[STATE]
    _, denied = _authenticate(request, "systemConfig.read")
    if denied:
        return denied
    return web.json_response(state.system_config)


def default_system_config() -> dict[str, Any]:
    """The `ffmpeg` and `image` sections of Immich's default system configuration
    (server/src/config.ts); the other sections are not served, since nothing here reads them."""
    return {
        "ffmpeg": {
            "crf": 23, "threads": 0, "preset": "ultrafast", "targetVideoCodec": "h264",
            "acceptedVideoCodecs": ["h264"], "targetAudioCodec": "aac",
            "acceptedAudioCodecs": ["aac", "mp3", "libopus"],
            "acceptedContainers": ["mov", "ogg", "webm"], "targetResolution": "720",
            "maxBitrate": "0", "bframes": -1, "refs": 0, "gopSize": 0, "temporalAQ": False,
            "cqMode": "auto", "twoPass": False, "preferredHwDevice": "auto",
            "transcode": "required", "tonemap": "hable", "accel": "disabled",
            "accelDecode": False,
            "realtime": {"enabled": False, "resolutions": [], "videoCodecs": ["h264"]},
        },
        "image": {
            "thumbnail": {"format": "webp", "size": 250, "quality": 80},
            "preview": {"format": "jpeg", "size": 1440, "quality": 80},
            "fullsize": {"enabled": False, "format": "jpeg", "quality": 80},
            "colorspace": "p3",
            "extractEmbedded": False,
        },
    }  # fmt: skip


async def upload_asset(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    state.uploads_received += 1

    if state.fail_next:
        status = state.fail_next.pop(0)
        await _drain(request)
        headers = {}
        if status in (429, 503):
            headers["Retry-After"] = str(state.retry_after_seconds)
        return _error(state, status, HTTPStatus(status).phrase, headers=headers)

    user_id, denied = _authenticate(request, "asset.upload")
    if denied:
        return denied

    checksum_header = request.headers.get("x-immich-checksum")
    expected_hex = None
    if checksum_header is not None:
        expected_hex = checksum_to_hex(checksum_header)
        if expected_hex is None:
            await _drain(request)
            return _error(state, 400, "Invalid x-immich-checksum: expected 40 hex or 28 base64")
        existing = state.find_by_checksum(user_id, expected_hex)
        if existing is not None:
            # Immich's AssetUploadInterceptor: answer before the body is read.
            state.duplicates += 1
            response = web.json_response({"id": existing.id, "status": "duplicate"})
            if state.hangup_on_duplicate:
                response.force_close()
                await response.prepare(request)
                await response.write_eof()
                if request.transport is not None:
                    request.transport.close()  # unread body: the kernel sends a reset
            return response  # aiohttp then drains the unread body, as Node does

    if state.drop_next > 0:
        state.drop_next -= 1
        await request.content.readany()  # the upload has begun...
        _drop_connection(request)  # ...and the connection dies mid-body
        return web.Response(status=500)  # never reaches the client

    return await _receive_asset(request, state, user_id, expected_hex)


async def _receive_asset(
    request: web.Request, state: StandinState, user_id: str, expected_hex: str | None
) -> web.StreamResponse:
    fields: dict[str, str] = {}
    files: set[str] = set()
    part_filename = ""
    sidecar: bytes | None = None
    sha1 = hashlib.sha1()
    size = 0
    temp: Path | None = None
    try:
        if request.content_type.startswith("multipart/"):
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                name = part.name or ""
                if part.filename is None:  # a text field
                    text = await part.text()
                    if len(text) > MAX_TEXT_FIELD:
                        await _drain(request)
                        return _error(state, 413, "Field too large")
                    fields[name] = text
                    continue
                files.add(name)
                # multer's fileFilter: decided when the part starts, from what came before it.
                checked_name = fields.get("filename") or part.filename
                if name == "assetData" and not _is_media(checked_name):
                    await _drain(request)
                    return _error(state, 400, f"Unsupported file type {checked_name}")
                if name == "sidecarData" and Path(checked_name).suffix.lower() != ".xmp":
                    await _drain(request)
                    return _error(state, 400, f"Unsupported file type {checked_name}")
                if name == "sidecarData":
                    sidecar = bytes(await part.read(decode=False))
                    if len(sidecar) > MAX_TEXT_FIELD:
                        await _drain(request)
                        return _error(state, 413, "Field too large")
                    continue
                if name != "assetData":  # v3's validation refuses it below, v2's ignores it
                    while await part.read_chunk(CHUNK):
                        pass
                    continue
                part_filename = part.filename
                if state.storage_dir is not None:
                    state.storage_dir.mkdir(parents=True, exist_ok=True)
                    temp = state.storage_dir / f".upload-{uuid.uuid4()}.part"
                with open(temp or os.devnull, "wb") as out:
                    while chunk := await part.read_chunk(CHUNK):
                        sha1.update(chunk)
                        size += len(chunk)
                        out.write(chunk)  # page-cache writes; fast enough for a stand-in
        else:
            await _drain(request)

        if state.major >= 3:
            issues = _v3_issues(fields, files)
            if issues:
                return _error(state, 400, "Validation failed", errors=issues)
        else:
            messages = _v2_messages(fields, files)
            if messages:
                return _error(state, 400, messages)
        if size == 0:
            return _error(state, 400, "File is empty")
        actual_hex = sha1.hexdigest()
        if expected_hex is not None and expected_hex != actual_hex:
            return _error(
                state, 400, f"x-immich-checksum {expected_hex} does not match the bytes received"
            )

        existing = state.find_by_checksum(user_id, actual_hex)
        if existing is not None:  # Immich: the unique (owner, checksum) constraint fires
            state.duplicates += 1
            return web.json_response({"id": existing.id, "status": "duplicate"}, status=200)

        asset_id = str(uuid.uuid4())
        original = fields.get("filename") or part_filename
        path = None
        if temp is not None and state.storage_dir is not None:
            path = state.storage_dir / f"{asset_id}{Path(original).suffix}"
            temp.rename(path)
            temp = None
            mtime = _parse_date(fields["fileModifiedAt"])
            if mtime is not None:
                os.utime(path, (mtime.timestamp(), mtime.timestamp()))
        state.assets[asset_id] = StandinAsset(
            id=asset_id,
            owner_id=user_id,
            checksum=actual_hex,
            filename=part_filename,
            original_file_name=original,
            file_created_at=fields["fileCreatedAt"],
            file_modified_at=fields["fileModifiedAt"],
            size=size,
            path=path,
            fields=fields,
            sidecar=sidecar,
        )
        state.created += 1
        if path is not None and path.suffix.lower() in VIDEO_EXTENSIONS:
            _start_video_conversion(state, state.assets[asset_id])
        if state.drop_after_commit_next > 0:
            state.drop_after_commit_next -= 1
            _drop_connection(request)  # stored, but the answer is lost
        return web.json_response({"id": asset_id, "status": "created"}, status=201)
    finally:
        if temp is not None:
            temp.unlink(missing_ok=True)


def _start_video_conversion(state: StandinState, asset: StandinAsset) -> None:
    """Immich queues a video-conversion job for every new video; it runs after the answer."""

    async def convert() -> None:
        assert asset.path is not None
        target = asset.path.with_name(f"{asset.id}.encoded.mp4")
        loop = asyncio.get_running_loop()
        ffmpeg = state.system_config["ffmpeg"]
        try:
            if await loop.run_in_executor(None, encode_like_immich, asset.path, target, ffmpeg):
                asset.encoded_path = target
        except Exception:  # Immich logs a failed conversion; the asset stays, played as it is
            target.unlink(missing_ok=True)

    task = asyncio.create_task(convert())
    state._conversions.add(task)
    task.add_done_callback(state._conversions.discard)


def encode_like_immich(src: Path, target: Path, ffmpeg: dict[str, Any]) -> bool:
    """What Immich's video-conversion job does at these `ffmpeg` settings, for the size of what
    it stores: with policy "required" a video whose codec is not accepted, or whose chroma is
    not 4:2:0, is encoded again (to H.264 at `crf`/`preset`, its short side scaled to
    `targetResolution`, audio to AAC) into a copy beside the original; "all" encodes every
    video, "disabled" none. True if it wrote one. Other policies and the audio and container
    rules are not modelled."""
    import av  # PyAV, only for this job

    with av.open(str(src)) as container:
        video = container.streams.video[0]
        policy = ffmpeg.get("transcode", "required")
        accepted = video.codec_context.name in ffmpeg.get("acceptedVideoCodecs", []) and str(
            video.codec_context.pix_fmt
        ).endswith("420p")
        if policy == "disabled" or (policy == "required" and accepted):
            return False
        short_side = int(ffmpeg.get("targetResolution", "720"))
        scale = min(1.0, short_side / min(video.width, video.height))
        width, height = (round(video.width * scale / 2) * 2, round(video.height * scale / 2) * 2)
        audio = container.streams.audio[0] if container.streams.audio else None
        with av.open(str(target), "w", format="mp4") as out:
            vout = out.add_stream(
                "libx264",
                rate=video.average_rate or 30,
                options={
                    "crf": str(ffmpeg.get("crf", 23)),
                    "preset": ffmpeg.get("preset", "ultrafast"),
                },
            )
            vout.width, vout.height, vout.pix_fmt = width, height, "yuv420p"
            vout.time_base = video.time_base
            aout = out.add_stream("aac", rate=audio.rate) if audio is not None else None
            resampler = (
                av.AudioResampler(format="fltp", layout="stereo", rate=audio.rate)
                if audio
                else None
            )
            streams = [video, audio] if audio is not None else [video]
            for packet in container.demux(*streams):
                for frame in packet.decode():
                    if isinstance(frame, av.VideoFrame):
                        scaled = frame.reformat(width=width, height=height, format="yuv420p")
                        scaled.pts, scaled.time_base = frame.pts, frame.time_base
                        out.mux(vout.encode(scaled))
                    elif aout is not None and resampler is not None:
                        for resampled in resampler.resample(frame):
                            resampled.pts = None
                            out.mux(aout.encode(resampled))
            out.mux(vout.encode())
            if aout is not None:
                out.mux(aout.encode())
    return True


async def play_video(request: web.Request) -> web.StreamResponse:
    """GET /api/assets/{id}/video/playback: Immich's encoded copy if it made one, else the
    original; byte ranges are answered with 206 and Content-Range."""
    state = request.app[STATE]
    user_id, denied = _authenticate(request, "asset.view")
    if denied:
        return denied
    if not UUID.fullmatch(request.match_info["id"]):
        issue = {"code": "invalid_format", "format": "uuid", "path": ["id"]}
        return _error(state, 400, "Validation failed", errors=[issue])
    asset = state.assets.get(request.match_info["id"])
    if asset is None or asset.owner_id != user_id:
        return _error(state, 400, "Not found or no asset.read access")
    if asset.path is None or asset.path.suffix.lower() not in VIDEO_EXTENSIONS:
        return _error(state, 404, "Asset not found or asset is not a video")
    return web.FileResponse(asset.encoded_path or asset.path)


def _parse_date(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


async def bulk_upload_check(request: web.Request) -> web.Response:
    state = request.app[STATE]
    user_id, denied = _authenticate(request, "asset.upload")
    if denied:
        return denied
    body = await request.json()
    results = []
    for item in body.get("assets", []):
        checksum_hex = checksum_to_hex(str(item.get("checksum", "")))
        existing = state.find_by_checksum(user_id, checksum_hex) if checksum_hex else None
        if existing is None:
            results.append({"id": item.get("id"), "action": "accept"})
        else:
            results.append(
                {
                    "id": item.get("id"),
                    "action": "reject",
                    "reason": "duplicate",
                    "assetId": existing.id,
                    "isTrashed": existing.trashed,
                }
            )
    return web.json_response({"results": results})


async def list_albums(request: web.Request) -> web.Response:
    state = request.app[STATE]
    user_id, denied = _authenticate(request, "album.read")
    if denied:
        return denied
    albums = [a for a in state.albums.values() if a.owner_id == user_id]
    name = request.query.get("name")
    if name is not None and state.major >= 3:  # the `name` filter is new in v3; v2 ignores it
        albums = [a for a in albums if a.name == name]
    return web.json_response([a.to_json(state.major) for a in albums])


async def create_album(request: web.Request) -> web.Response:
    state = request.app[STATE]
    user_id, denied = _authenticate(request, "album.create")
    if denied:
        return denied
    body = await request.json()
    name = body.get("albumName")
    if not isinstance(name, str):
        issue = {"expected": "string", "code": "invalid_type", "path": ["albumName"]}
        return _error(state, 400, "Validation failed", errors=[issue])
    album = StandinAlbum(id=str(uuid.uuid4()), owner_id=user_id, name=name)
    for asset_id in body.get("assetIds") or []:
        if asset_id in state.assets and state.assets[asset_id].owner_id == user_id:
            album.asset_ids.append(asset_id)
    state.albums[album.id] = album
    return web.json_response(album.to_json(state.major), status=201)


async def add_album_assets(request: web.Request) -> web.Response:
    state = request.app[STATE]
    user_id, denied = _authenticate(request, "albumAsset.create")
    if denied:
        return denied
    album = state.albums.get(request.match_info["id"])
    if album is None or album.owner_id != user_id:
        return _error(state, 400, "Not found or no album.update access")
    body = await request.json()
    results = []
    for asset_id in body.get("ids", []):
        asset = state.assets.get(asset_id)
        if asset is None or asset.owner_id != user_id:
            results.append({"id": asset_id, "success": False, "error": "no_permission"})
        elif asset_id in album.asset_ids:
            results.append({"id": asset_id, "success": False, "error": "duplicate"})
        else:
            album.asset_ids.append(asset_id)
            results.append({"id": asset_id, "success": True})
    return web.json_response(results)


UUID = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-4[0-9a-fA-F]{3}-[89abAB][0-9a-fA-F]{3}-[0-9a-fA-F]{12}"
)


async def create_stack(request: web.Request) -> web.Response:
    """POST /api/stacks: a stack whose primary is among the new assets is merged into the new
    one, and an asset leaves any other stack (an asset is in one stack at most)."""
    state = request.app[STATE]
    user_id, denied = _authenticate(request, "stack.create")
    if denied:
        return denied
    body = await request.json()
    ids = body.get("assetIds") if isinstance(body, dict) else None
    if not isinstance(ids, list) or len(ids) < 2:
        issue = {"code": "too_small", "minimum": 2, "path": ["assetIds"]}
        return _error(state, 400, "Validation failed", errors=[issue])
    if not all(isinstance(i, str) and UUID.fullmatch(i) for i in ids):
        issue = {"code": "invalid_format", "format": "uuid", "path": ["assetIds"]}
        return _error(state, 400, "Validation failed", errors=[issue])
    if any(i not in state.assets or state.assets[i].owner_id != user_id for i in ids):
        return _error(state, 400, "Not found or no asset.update access")
    merged = list(ids)
    for stack_id, members in list(state.stacks.items()):
        if members[0] in ids:
            merged += [m for m in members if m not in merged]
            del state.stacks[stack_id]
        else:
            left = [m for m in members if m not in ids]
            if len(left) < 2:
                del state.stacks[stack_id]
            else:
                state.stacks[stack_id] = left
    stack_id = str(uuid.uuid4())
    state.stacks[stack_id] = merged
    assets = [{"id": i, "originalFileName": state.assets[i].original_file_name} for i in merged]
    return web.json_response(
        {"id": stack_id, "primaryAssetId": merged[0], "assets": assets}, status=201
    )


# --- Control endpoints for tests in another process (not part of Immich) ---


async def control_state(request: web.Request) -> web.Response:
    s = request.app[STATE]
    return web.json_response(
        {
            "version": {"major": s.major, "minor": s.minor, "patch": s.patch},
            "faults": s.faults(),
            "counters": s.counters(),
        }
    )


async def control_faults(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await request.json()
    if not isinstance(body, dict):
        return web.json_response({"message": "expected a JSON object"}, status=400)
    for name, value in body.items():
        if not _valid_fault(name, value):
            return web.json_response({"message": f"bad fault {name}={value!r}"}, status=400)
    for name, value in body.items():
        setattr(state, name, list(value) if isinstance(value, list) else value)
    return web.json_response(state.faults())


def _valid_fault(name: str, value: object) -> bool:
    if name == "fail_next":
        return isinstance(value, list) and all(type(v) is int and v >= 400 for v in value)
    if name in ("down", "hangup_on_duplicate"):
        return isinstance(value, bool)
    if name == "delay_seconds":
        return type(value) in (int, float) and value >= 0  # type: ignore[operator]
    return name in FAULT_NAMES and type(value) is int and value >= 0


async def control_version(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await request.json()
    for name in ("major", "minor", "patch"):
        if name in body:
            setattr(state, name, int(body[name]))
    return await version(request)


async def control_users(request: web.Request) -> web.Response:
    body = await request.json()
    user_id = request.app[STATE].add_user(str(body["api_key"]), body.get("user_id"))
    return web.json_response({"user_id": user_id})


async def control_assets(request: web.Request) -> web.Response:
    return web.json_response([a.to_json() for a in request.app[STATE].assets.values()])


async def control_albums(request: web.Request) -> web.Response:
    albums = request.app[STATE].albums.values()
    return web.json_response(
        [
            {"id": a.id, "ownerId": a.owner_id, "name": a.name, "assetIds": a.asset_ids}
            for a in albums
        ]
    )


@web.middleware
async def _faults_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    state = request.app[STATE]
    if not request.path.startswith("/api/"):
        return await handler(request)
    if state.down:
        return web.Response(status=503, text=PROXY_DOWN_PAGE, content_type="text/html")
    response = await handler(request)
    if state.delay_seconds > 0 and not response.prepared:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state._closing.wait(), state.delay_seconds)
    return response


def make_app(state: StandinState) -> web.Application:
    app = web.Application(middlewares=[_faults_middleware], client_max_size=1024**2)
    app[STATE] = state
    app.router.add_get("/api/server/ping", ping)
    app.router.add_get("/api/server/version", version)
    app.router.add_get("/api/server/media-types", media_types)
    app.router.add_get("/api/users/me", users_me)
    app.router.add_get("/api/api-keys/me", my_api_key)
    app.router.add_get("/api/system-config", system_config)
    app.router.add_post("/api/assets", upload_asset)
    app.router.add_post("/api/assets/bulk-upload-check", bulk_upload_check)
    app.router.add_get("/api/albums", list_albums)
    app.router.add_post("/api/albums", create_album)
    app.router.add_put("/api/albums/{id}/assets", add_album_assets)
    app.router.add_post("/api/stacks", create_stack)
    app.router.add_get("/api/assets/{id}/video/playback", play_video)
    app.router.add_get("/_standin/state", control_state)
    app.router.add_post("/_standin/faults", control_faults)
    app.router.add_post("/_standin/version", control_version)
    app.router.add_post("/_standin/users", control_users)
    app.router.add_get("/_standin/assets", control_assets)
    app.router.add_get("/_standin/albums", control_albums)
    return app


class StandinServer:
    """A running stand-in. `url` is the base (http://host:port); the API lives under /api."""

    def __init__(self, state: StandinState, runner: web.AppRunner, url: str) -> None:
        self.state = state
        self.url = url
        self._runner = runner

    async def close(self) -> None:
        self.state._closing.set()  # ends pending delays
        await self._runner.cleanup()
        await self.state.conversions_finished()

    async def __aenter__(self) -> StandinServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def start_standin(
    state: StandinState, host: str = "127.0.0.1", port: int = 0
) -> StandinServer:
    state._closing.clear()
    runner = web.AppRunner(make_app(state), shutdown_timeout=1.0, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_port = runner.addresses[0][1]
    return StandinServer(state, runner, f"http://{host}:{bound_port}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the Immich stand-in.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2283)
    parser.add_argument("--storage", type=Path, default=None, help="keep uploaded files here")
    parser.add_argument("--major", type=int, default=3, choices=(2, 3))
    parser.add_argument(
        "--api-key", action="append", default=[], help="KEY or KEY:USER_ID (repeatable)"
    )
    args = parser.parse_args(argv)
    state = StandinState(major=args.major, storage_dir=args.storage)
    if args.major < 3:
        state.minor, state.patch = 7, 5
    for spec in args.api_key:
        key, _, user_id = spec.partition(":")
        state.add_user(key, user_id or None)

    async def serve() -> None:
        server = await start_standin(state, args.host, args.port)
        print(f"Immich stand-in v{state.major} listening on {server.url}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await server.close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
