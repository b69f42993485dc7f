"""What Immich will do with what sftpgate sends, read from Immich itself.

Three things decide whether what sftpgate sends is what the user keeps: the API key's
permissions (a missing one fails every upload, or every album entry), Immich's video transcoding
(with its defaults, target H.264 and accepted codecs [h264], every HEVC or AV1 video gets an
extra H.264 copy in Immich's encoded-video folder), and its full-size image setting (without
`image.fullsize.enabled`, browsers that Immich does not count as JPEG XL-capable are shown the
1440-px preview of a converted photo, not the photo).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..config import Config
from .client import ImmichClient, ImmichError

SYSTEM_CONFIG_READ = "systemConfig.read"


def needed_permissions(config: Config) -> tuple[str, ...]:
    """The permissions every user's key must have for this configuration."""
    needed = ["asset.upload"]
    if config.immich.album:
        needed += ["album.read", "album.create", "albumAsset.create"]
    if config.immich.stacks:
        needed.append("stack.create")
    return tuple(needed)


@dataclass(frozen=True)
class KeyReport:
    users: tuple[str, ...]  # the SFTP users whose uploads go with this key
    missing: tuple[str, ...] = ()  # needed by the configuration, not granted to the key
    reads_system_config: bool = False
    problem: str | None = None  # the key could not be checked, and why

    def sentences(self) -> list[str]:
        who = ", ".join(self.users)
        out = []
        if self.problem:
            out.append(f"the Immich API key of {who} could not be checked: {self.problem}")
        if self.missing:
            out.append(
                f"the Immich API key of {who} lacks {', '.join(self.missing)}: add "
                "it in Immich (Account Settings > API Keys > edit)"
            )
        return out


@dataclass(frozen=True)
class ImmichReport:
    keys: tuple[KeyReport, ...]
    video_target: str | None  # the codec sftpgate converts videos to; None when it does not
    # From Immich's system configuration; None when no key may read it.
    accepted_video_codecs: tuple[str, ...] | None = None
    transcode_policy: str | None = None
    fullsize_images: bool | None = None

    @property
    def settings_known(self) -> bool:
        return self.transcode_policy is not None

    @property
    def retranscodes_video(self) -> bool | None:
        """Whether Immich makes its own copy of a video sftpgate converted (None: unknown)."""
        if self.transcode_policy is None or self.accepted_video_codecs is None:
            return None
        if self.video_target is None or self.transcode_policy == "disabled":
            return False
        return self.transcode_policy == "all" or self.video_target not in self.accepted_video_codecs

    @property
    def lacks_upload(self) -> bool:
        return any("asset.upload" in k.missing for k in self.keys)

    @property
    def missing_permissions(self) -> int:
        return sum(len(k.missing) for k in self.keys)

    def sentences(self) -> list[str]:
        """What the user should know, one sentence each (a log line, a line of `status`)."""
        out = [s for k in self.keys for s in k.sentences()]
        if not self.settings_known:
            if any(k.problem is None for k in self.keys):
                out.append(
                    f"no key may read Immich's settings ({SYSTEM_CONFIG_READ}): whether Immich "
                    "re-encodes converted videos or shows JPEG XL at full size is not checked"
                )
            return out
        if self.retranscodes_video:
            codec = (self.video_target or "").upper()
            out.append(
                f"Immich re-encodes every {codec} video sftpgate sends (ffmpeg.transcode "
                f"{self.transcode_policy}, accepted codecs {list(self.accepted_video_codecs or [])})"
                f": add {self.video_target} to Video Transcoding > Accepted video codecs in Immich's "
                "settings, or set optimize.video.when_immich_retranscodes: keep"
            )
        if self.fullsize_images is False:
            out.append(
                "Immich shows converted JPEG XL photos at 1440 px in browsers without JPEG XL "
                "support (image.fullsize.enabled is off); Safari 17+ shows them at full size"
            )
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "missing_permissions": {", ".join(k.users): list(k.missing) for k in self.keys},
            "retranscodes_video": self.retranscodes_video,
            "fullsize_images": self.fullsize_images,
            "findings": self.sentences(),
        }


def video_target(config: Config) -> str | None:
    mode = config.optimize.video.mode
    return None if mode == "keep" else mode


async def inspect_immich(immich: ImmichClient, config: Config) -> ImmichReport:
    """Ask Immich, with each configured key, what it will do with sftpgate's uploads."""
    needed = needed_permissions(config)
    keys: list[KeyReport] = []
    settings: dict[str, Any] | None = None
    for api_key, users in _keys_and_users(config):
        try:
            granted = await immich.key_permissions(api_key)
        except ImmichError as exc:
            keys.append(KeyReport(users, problem=str(exc)))
            continue
        allowed = "all" in granted
        missing = tuple(p for p in needed if not allowed and p not in granted)
        reads = allowed or SYSTEM_CONFIG_READ in granted
        keys.append(KeyReport(users, missing, reads))
        if reads and settings is None:
            try:
                settings = await immich.system_config(api_key)
            except ImmichError as exc:
                keys[-1] = KeyReport(users, missing, reads, problem=f"reading settings: {exc}")
    target = video_target(config)
    if settings is None:
        return ImmichReport(tuple(keys), target)
    ffmpeg = _section(settings, "ffmpeg")
    fullsize = _section(_section(settings, "image"), "fullsize")
    return ImmichReport(
        tuple(keys),
        target,
        accepted_video_codecs=tuple(str(c) for c in ffmpeg.get("acceptedVideoCodecs") or ()),
        transcode_policy=str(ffmpeg.get("transcode") or "required"),
        fullsize_images=bool(fullsize.get("enabled")),
    )


def _section(settings: dict[str, Any], name: str) -> dict[str, Any]:
    value = settings.get(name)
    return value if isinstance(value, dict) else {}


def _keys_and_users(config: Config) -> Iterable[tuple[str, tuple[str, ...]]]:
    by_key: dict[str, list[str]] = {}
    for user in config.sftp.users:
        by_key.setdefault(config.api_key_for(user.name), []).append(user.name)
    return [(key, tuple(users)) for key, users in by_key.items()]
