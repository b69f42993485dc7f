"""The Immich client: upload one asset (v3 or v2 form, by the server's major version), albums.

Errors are split by what the caller should do: `TransientImmichError` (retry later: connection
refused or reset, time-outs, 5xx, 408/425/429, an unreadable success answer) and
`PermanentImmichError` (the request itself is refused: 400, 401, 403, other 4xx, redirects).
No message ever contains the API key.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any, Literal

import aiohttp

CONNECT_TIMEOUT = 10.0
JSON_TIMEOUT = 60.0  # small JSON calls; uploads use `timeout_seconds`
# A stalled upload (the server stops reading) still ends: allow this slow a link, at worst.
MIN_UPLOAD_BYTES_PER_SECOND = 256 * 1024
DEVICE_ID = "sftpgate"
TRANSIENT_STATUSES = frozenset({408, 425, 429})


@dataclass(frozen=True)
class UploadOutcome:
    asset_id: str
    status: Literal["created", "duplicate"]


class ImmichError(Exception):
    """An Immich call failed; `status` is the HTTP status, None when there was no answer."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class TransientImmichError(ImmichError):
    """Worth retrying later; `retry_after` is the server's Retry-After in seconds, if any."""

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


class PermanentImmichError(ImmichError):
    """Immich refused the request; retrying the same request will not help."""


class ImmichClient:
    def __init__(self, url: str, *, timeout_seconds: float = 600.0) -> None:
        base = url.rstrip("/")
        self.base_url = base.removesuffix("/api")
        self.api_url = f"{self.base_url}/api"
        self.timeout_seconds = timeout_seconds
        self._session: aiohttp.ClientSession | None = None
        self._major: int | None = None
        self._albums: dict[tuple[str, str], str] = {}
        self._album_lock = asyncio.Lock()
        self._unanswered: set[str] = set()  # checksums whose last upload got no answer

    async def __aenter__(self) -> ImmichClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    # --- server ---

    async def ping(self) -> bool:
        """True when `GET /api/server/ping` answers pong; never raises."""
        try:
            body = await self._json("GET", "/server/ping", timeout=min(10.0, JSON_TIMEOUT))
        except ImmichError:
            return False
        return isinstance(body, dict) and body.get("res") == "pong"

    async def server_major(self) -> int:
        """The server's major version (cached; read again after a connection failure)."""
        if self._major is None:
            body = await self._json("GET", "/server/version")
            try:
                self._major = int(body["major"])
            except (TypeError, KeyError, ValueError) as e:
                raise TransientImmichError(
                    f"Immich at {self.base_url} answered /api/server/version without a version."
                ) from e
        return self._major

    async def media_extensions(self) -> frozenset[str]:
        """Lowercase extensions (".jxl", ".mp4", ...) Immich accepts as images or videos."""
        body = await self._json("GET", "/server/media-types")
        if not isinstance(body, dict):
            raise TransientImmichError(f"Immich at {self.base_url} sent no media types.")
        return frozenset(e.lower() for kind in ("image", "video") for e in body.get(kind, []))

    # --- upload ---

    async def upload_asset(
        self,
        path: Path,
        *,
        api_key: str,
        filename: str,
        created_at: datetime,
        modified_at: datetime,
        checksum: str,
        sidecar_date: datetime | None = None,
    ) -> UploadOutcome:
        """Stream `path` to Immich as `filename`; `checksum` is the 40-hex SHA-1 of its bytes.

        `sidecar_date`, when given, goes along as an XMP sidecar (`date_sidecar`). Immich sets
        an asset's date from the stored file's metadata after the upload, a sidecar's date
        before the file's own: give one only for a file without an embedded date.

        When the last upload of these bytes got no answer (connection lost, time-out), Immich
        is asked first whether it has them, so a lost answer does not cost a second transfer.
        Raises ValueError for a naive datetime, OSError when `path` cannot be opened, and
        TransientImmichError / PermanentImmichError when Immich does not take it.
        """
        created, modified = _iso(created_at), _iso(modified_at)
        sidecar = None if sidecar_date is None else date_sidecar(sidecar_date)
        if checksum in self._unanswered:
            known = await self._known_asset_id(api_key, checksum)
            if known is not None:
                self._unanswered.discard(checksum)
                return UploadOutcome(asset_id=known, status="duplicate")
        major = await self.server_major()
        size = path.stat().st_size
        with path.open("rb") as f:
            form = aiohttp.FormData()
            if major < 3:
                form.add_field("deviceAssetId", f"{Path(filename).name}-{size}")
                form.add_field("deviceId", DEVICE_ID)
            form.add_field("fileCreatedAt", created)
            form.add_field("fileModifiedAt", modified)
            if sidecar is not None:
                # Before `filename`: Immich checks a file part's type by the `filename` field
                # when that came first (and "IMG_0001.jxl" is no sidecar), else by its own name.
                form.add_field(
                    "sidecarData",
                    sidecar,
                    filename=f"{filename}.xmp",
                    content_type="application/xml",
                )
            form.add_field("filename", filename)  # before the file: Immich checks the type early
            form.add_field(
                "assetData", f, filename=filename, content_type="application/octet-stream"
            )
            timeout = aiohttp.ClientTimeout(
                total=self.timeout_seconds + size / MIN_UPLOAD_BYTES_PER_SECOND,
                sock_connect=CONNECT_TIMEOUT,
                sock_read=self.timeout_seconds,  # starts once the body is sent
            )
            try:
                status, headers, text = await self._send(
                    "POST",
                    "/assets",
                    api_key=api_key,
                    data=form,
                    headers={"x-immich-checksum": checksum},
                    timeout=timeout,
                )
            except TransientImmichError:
                self._unanswered.add(checksum)  # Immich may have stored it all the same
                raise
        self._unanswered.discard(checksum)
        if status in (200, 201):
            try:
                body = json.loads(text)
                outcome_status = body["status"]
                if outcome_status not in ("created", "duplicate"):
                    raise ValueError(outcome_status)
                return UploadOutcome(asset_id=str(body["id"]), status=outcome_status)
            except (ValueError, KeyError, TypeError) as e:
                # Retrying is safe: the same checksum comes back as "duplicate".
                raise TransientImmichError(
                    f"Immich accepted {filename} but its answer is unreadable: {text[:200]!r}.",
                    status=status,
                ) from e
        raise self._status_error(status, headers, text, f"upload of {filename}", api_key)

    async def _known_asset_id(self, api_key: str, checksum: str) -> str | None:
        """The id of this user's asset with these bytes, if Immich has one."""
        return (await self.existing_asset(api_key, checksum))[0]

    async def existing_asset(self, api_key: str, checksum: str) -> tuple[str | None, bool]:
        """This user's asset with these bytes (its id, or None) and whether it is in the trash:
        a trashed asset still makes an upload of the same bytes a duplicate."""
        body = await self._json(
            "POST",
            "/assets/bulk-upload-check",
            api_key=api_key,
            json_body={"assets": [{"id": checksum, "checksum": checksum}]},
        )
        for result in body.get("results", []):
            if result.get("reason") == "duplicate" and result.get("assetId"):
                return str(result["assetId"]), bool(result.get("isTrashed"))
        return None, False

    # --- what the server will do with an upload ---

    async def key_permissions(self, api_key: str) -> frozenset[str]:
        """The calling key's permissions ("all" grants every one); needs no permission."""
        body = await self._json("GET", "/api-keys/me", api_key=api_key)
        permissions = body.get("permissions") if isinstance(body, dict) else None
        return frozenset(str(p) for p in permissions or ())

    async def system_config(self, api_key: str) -> dict[str, Any]:
        """Immich's system configuration (permission systemConfig.read)."""
        body = await self._json("GET", "/system-config", api_key=api_key)
        return body if isinstance(body, dict) else {}

    async def video_playback_bytes(self, api_key: str, asset_id: str) -> int:
        """The size of the file Immich plays for a video (permission asset.view): its own
        encoded copy once its conversion job made one, else the stored original. Asks for one
        byte; the size is in the Content-Range of Immich's partial answer."""
        what = f"GET /api/assets/{asset_id}/video/playback"
        status, headers, text = await self._send(
            "GET",
            f"/assets/{asset_id}/video/playback",
            api_key=api_key,
            headers={"Range": "bytes=0-0", "Accept": "*/*"},
            timeout=aiohttp.ClientTimeout(
                total=min(JSON_TIMEOUT, self.timeout_seconds), sock_connect=CONNECT_TIMEOUT
            ),
        )
        if not 200 <= status < 300:
            raise self._status_error(status, headers, text, what, api_key)
        lower = {name.lower(): value for name, value in headers.items()}
        total = lower.get("content-range", "").rpartition("/")[2]
        size = total if status == 206 else lower.get("content-length", "")
        if not size.isdigit():
            raise TransientImmichError(f"Immich answered {what} without a size.", status=status)
        return int(size)

    # --- albums ---

    async def find_or_create_album(self, api_key: str, name: str) -> str:
        """The id of this user's album called exactly `name`, created when missing."""
        async with self._album_lock:
            cached = self._albums.get((api_key, name))
            if cached is not None:
                return cached
            if await self.server_major() >= 3:
                albums = await self._json("GET", "/albums", api_key=api_key, params={"name": name})
            else:  # v2 has no name filter
                albums = await self._json("GET", "/albums", api_key=api_key)
            matches = [a["id"] for a in albums if a.get("albumName") == name]
            if matches:
                album_id = str(matches[0])
            else:
                created = await self._json(
                    "POST", "/albums", api_key=api_key, json_body={"albumName": name}
                )
                album_id = str(created["id"])
            self._albums[(api_key, name)] = album_id
            return album_id

    async def add_to_album(self, api_key: str, album_id: str, asset_ids: list[str]) -> None:
        """Add assets to an album; assets already in it count as added."""
        if not asset_ids:
            return
        try:
            results = await self._json(
                "PUT", f"/albums/{album_id}/assets", api_key=api_key, json_body={"ids": asset_ids}
            )
        except PermanentImmichError:
            self._forget_album(album_id)  # deleted in Immich? find_or_create makes it again
            raise
        failed = [
            f"{r.get('id')}: {r.get('errorMessage') or r.get('error', 'unknown')}"
            for r in results
            if not r.get("success") and r.get("error") != "duplicate"
        ]
        if failed:
            raise PermanentImmichError(
                f"Immich did not add {len(failed)} asset(s) to album {album_id}: "
                + "; ".join(failed)
                + "."
            )

    # --- stacks ---

    async def create_stack(self, api_key: str, asset_ids: list[str]) -> str:
        """One stack of these assets, the first its primary; a stack whose primary is among them
        is merged into it by Immich, so asking again for the same assets makes no second one."""
        body = await self._json(
            "POST", "/stacks", api_key=api_key, json_body={"assetIds": asset_ids}
        )
        return str(body["id"])

    def _forget_album(self, album_id: str) -> None:
        self._albums = {k: v for k, v in self._albums.items() if v != album_id}

    # --- plumbing ---

    async def _json(
        self,
        method: str,
        path: str,
        *,
        api_key: str | None = None,
        params: dict[str, str] | None = None,
        json_body: Any = None,
        timeout: float = JSON_TIMEOUT,
    ) -> Any:
        status, headers, text = await self._send(
            method,
            path,
            api_key=api_key,
            params=params,
            json=json_body,
            timeout=aiohttp.ClientTimeout(
                total=min(timeout, self.timeout_seconds), sock_connect=CONNECT_TIMEOUT
            ),
        )
        if not 200 <= status < 300:
            raise self._status_error(status, headers, text, f"{method} /api{path}", api_key)
        try:
            return json.loads(text)
        except ValueError as e:
            raise TransientImmichError(
                f"Immich answered {method} /api{path} with something that is not JSON: "
                f"{text[:200]!r}.",
                status=status,
            ) from e

    async def _send(
        self,
        method: str,
        path: str,
        *,
        api_key: str | None,
        timeout: aiohttp.ClientTimeout,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> tuple[int, dict[str, str], str]:
        """One request; returns (status, headers, body text) or raises TransientImmichError."""
        all_headers = {"Accept": "application/json", **(headers or {})}
        if api_key is not None:
            all_headers["x-api-key"] = api_key
        url = f"{self.api_url}{path}"
        try:
            async with self._http().request(
                method,
                url,
                headers=all_headers,
                timeout=timeout,
                allow_redirects=False,
                **kwargs,
            ) as resp:
                # A response read here is used even if writing the body failed afterwards
                # (Immich answers "duplicate" early and closes the connection).
                text = await resp.text(errors="replace")
                return resp.status, dict(resp.headers), text
        except TimeoutError as e:
            self._major = None
            raise TransientImmichError(
                f"Immich at {self.base_url} did not answer {method} /api{path} in time."
            ) from e
        except (aiohttp.ClientError, OSError) as e:
            self._major = None  # maybe restarted, maybe upgraded: read the version again
            reason = _redact(str(e) or type(e).__name__, api_key)
            raise TransientImmichError(
                f"Immich at {self.base_url} could not be reached for {method} /api{path} "
                f"({reason})."
            ) from e

    def _status_error(
        self, status: int, headers: dict[str, str], text: str, what: str, api_key: str | None
    ) -> ImmichError:
        phrase = _phrase(status)
        message = _redact(_immich_message(text), api_key)
        sentence = f"Immich refused {what}: {status} {phrase}" + (f": {message}" if message else "")
        sentence = sentence.rstrip(".") + "."
        if status >= 500 or status in TRANSIENT_STATUSES:
            return TransientImmichError(
                sentence, status=status, retry_after=_retry_after(headers.get("Retry-After"))
            )
        if status == 400:
            self._major = None  # a form the server no longer takes? read the version again
        if 300 <= status < 400:
            sentence = (
                f"Immich answered {what} with a redirect ({status} to "
                f"{headers.get('Location', '?')}); set immich.url to the final address."
            )
        return PermanentImmichError(sentence, status=status)


# An XMP packet with the capture date. exif:DateTimeOriginal is the first date Immich looks for
# (and in a sidecar it overrides the file's own); xmp:CreateDate is where other catalogues
# (digiKam, darktable, Lightroom) look in XMP.
_XMP_DATE_PACKET = """<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:exif="http://ns.adobe.com/exif/1.0/"
    xmlns:xmp="http://ns.adobe.com/xap/1.0/">
   <exif:DateTimeOriginal>{date}</exif:DateTimeOriginal>
   <xmp:CreateDate>{date}</xmp:CreateDate>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
<?xpacket end="w"?>
"""


def date_sidecar(moment: datetime) -> bytes:
    """An XMP sidecar whose capture date is `moment` (aware), with its UTC offset."""
    return _XMP_DATE_PACKET.format(date=_iso(moment)).encode()


def _iso(moment: datetime) -> str:
    """ISO-8601 with a UTC offset, as Immich v3 requires; naive datetimes are refused."""
    offset = moment.utcoffset()
    if offset is None:
        raise ValueError(f"naive datetime {moment.isoformat()}: pass one with a UTC offset")
    if offset.seconds % 60 or offset.microseconds:  # "+05:53:28" is not allowed: use UTC
        moment = moment.astimezone(UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _immich_message(text: str) -> str:
    """Immich's error message (v3 Zod issues, v2 message lists), else the start of the body."""
    try:
        body = json.loads(text)
    except ValueError:
        return " ".join(text.split())[:200]
    if not isinstance(body, dict):
        return str(body)[:200]
    message = body.get("message", "")
    if isinstance(message, list):
        message = "; ".join(str(m) for m in message)
    details = []
    for issue in body.get("errors") or []:
        if isinstance(issue, dict):
            where = ".".join(str(p) for p in issue.get("path", [])) or "form"
            details.append(f"{where}: {issue.get('message', issue.get('code', '?'))}")
    if details:
        message = f"{message} ({'; '.join(details)})"
    return str(message)[:500]


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _redact(text: str, api_key: str | None) -> str:
    return text.replace(api_key, "<api key>") if api_key else text
