"""Configuration: one object, every setting with its default.

The YAML file is parsed, `${VAR}` / `${VAR:-default}` are replaced from the environment inside
string values (never in the raw text, so a password with `#` or `:` cannot break the YAML), and the
result is checked against the dataclasses below. Every problem is reported as one line that names
the dotted key, and start-up stops.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .accounts import UserConfig, folder_problem, known_hash_scheme, user_name_problem
from .networks import parse_network
from .users_conf import read_users_conf

ENV_TEMPLATE = Path(__file__).with_name("env_config.yaml")
DEFAULT_TEMP_PATTERNS = ("*.tmp", "*.part", "*.partial", "*.filepart", ".*", "*~")
# The SSH ciphers `sftp.ciphers` may name: asyncssh's defaults (no CBC or RC4 modes).
SSH_CIPHERS = (
    "chacha20-poly1305@openssh.com",
    "aes256-gcm@openssh.com",
    "aes128-gcm@openssh.com",
    "aes256-ctr",
    "aes192-ctr",
    "aes128-ctr",
)


class ConfigError(Exception):
    """The configuration is invalid; `problems` holds one line per problem, each naming its key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class SftpConfig:
    listen: str = "0.0.0.0:2222"
    host_keys_dir: str = "./keys"
    users: tuple[UserConfig, ...] = ()
    temp_patterns: tuple[str, ...] = DEFAULT_TEMP_PATTERNS
    remember_days: int = 365
    # Advertised in limits@openssh.com; OpenSSH's own value. Larger writes were slower
    # (measured with the OpenSSH and asyncssh clients on loopback).
    max_write_bytes: int = 261_120
    # SSH ciphers offered (empty: all of SSH_CIPHERS). The client's order picks among them, so
    # the only way to have OpenSSH clients use AES-GCM, which costs asyncssh a quarter less CPU
    # than chacha20-poly1305 (bench/README.md), is to offer neither chacha20 nor AES-CTR.
    ciphers: tuple[str, ...] = ()
    login_timeout_seconds: float = 60.0
    # atmoz/sftp users.conf (`user:pass[:e][:uid[:gid[:dir,...]]]`), added to `users`; its
    # key-only users read keys from `users_conf_home`/<user>/.ssh/{keys/*.pub,authorized_keys}.
    users_conf: str = ""
    users_conf_home: str = ""
    # Brute force: every failed login waits this long; an address with `ban_after_failures`
    # failures within the last `ban_seconds` is turned away until it has fewer.
    failed_login_delay_seconds: float = 1.0
    ban_after_failures: int = 10
    ban_seconds: float = 600.0
    # Resource limits: SSH connections in total (logged in or not), SFTP sessions of one user,
    # seconds without an SFTP request before a connection is closed, open handles per session.
    max_connections: int = 100
    max_sessions_per_user: int = 10
    idle_timeout_seconds: float = 600.0
    max_handles: int = 256
    # An upload cut off mid-way stays resumable (`reput`) this long; 0 discards it at once.
    resume_keep_seconds: float = 86400.0
    # Addresses (CIDRs) of TCP proxies that put a PROXY protocol header (v1 or v2) in front of
    # every connection: the client address it carries is the one bans, logs and metrics use.
    proxy_protocol: tuple[str, ...] = ()
    # Addresses (CIDRs) whose failed logins are logged and counted but never lead to a ban.
    ban_allowlist: tuple[str, ...] = ()
    # Processes that run the SSH connections (transport, SFTP, hashing, writes), each connection
    # on the least busy one; the service itself then only accepts, commits finished uploads and
    # runs the pipeline. 0: the connections run inside the service's own process. One Python
    # process serves all its connections on one core, so several phones at once need several.
    processes: int = 0


@dataclass(frozen=True)
class ImmichConfig:
    url: str
    api_key: str = ""
    # "" none, a fixed name, "{parent}" for the folder a file is in, "{folder}" for the first
    # folder of its path (DCIM/Camera/x.jpg: "Camera", "DCIM")
    album: str = ""
    timeout_seconds: float = 600.0  # Immich flushes the file before it answers
    # Immich answers "duplicate" for bytes whose asset is in its trash, and empties the trash
    # later: keep the original in undone/ (the default), or delete it as delivered.
    trashed_duplicates: str = "undone"  # undone | delete
    # A RAW and the JPEG or HEIC of the same shot (same folder and name) become one Immich
    # stack, the JPEG on top (permission stack.create); so do the frames of a burst.
    stacks: bool = True


@dataclass(frozen=True)
class JpegConfig:
    mode: str = "lossless"  # lossless | lossy | keep
    quality: int = 90  # lossy mode only (JPEG XL quality, 90 = distance 1.0)
    effort: int = 7


@dataclass(frozen=True)
class PngConfig:
    mode: str = "lossless"  # lossless | keep
    effort: int = 7


@dataclass(frozen=True)
class VideoConfig:
    mode: str = "hevc"  # hevc | av1 | keep
    crf: int = 28
    preset: str = "medium"
    av1_crf: int = 35
    av1_preset: int = 8
    # Video that is already HEVC/AV1 under this many bits per pixel per frame passes through.
    efficient_bits_per_pixel: float = 0.1
    # When Immich's settings make it re-encode the converted video (its defaults accept only
    # H.264): keep the videos whose video stream Immich plays as it is (accepted codec, 4:2:0
    # chroma) as they are, and convert the rest (measured on the corpus at
    # Immich's defaults: 1 % more bytes in total, against 68 % more when converting them),
    # or convert anyway.
    when_immich_retranscodes: str = "keep"  # keep | convert


@dataclass(frozen=True)
class OptimizeConfig:
    workers: int = 0  # 0 = one per CPU
    min_savings: float = 0.05
    on_error: str = "undone"  # undone | upload-original
    time_limit_seconds: float = 3600.0
    max_pixels: int = 250_000_000
    jpeg: JpegConfig = field(default_factory=JpegConfig)
    png: PngConfig = field(default_factory=PngConfig)
    video: VideoConfig = field(default_factory=VideoConfig)


@dataclass(frozen=True)
class RetryConfig:
    first_delay_seconds: float = 10.0
    max_delay_seconds: float = 900.0
    give_up_after: float = 7 * 86400.0  # seconds; "7d", "12h", "30m" are accepted too
    upload_concurrency: int = 2
    ping_interval_seconds: float = 5.0  # how often Immich is pinged (uploads pause while it fails)


@dataclass(frozen=True)
class WatchConfig:
    settle_seconds: float = 10.0
    scan_interval_seconds: float = 5.0


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = "0.0.0.0:9090"  # "" disables the metrics and health endpoint


@dataclass(frozen=True)
class SmtpConfig:
    host: str = ""  # "" sends no mail
    port: int = 587
    security: str = "starttls"  # starttls | tls (SMTPS, port 465) | none (a local relay)
    username: str = ""
    password: str = ""
    sender: str = ""
    to: tuple[str, ...] = ()


@dataclass(frozen=True)
class NotifyConfig:
    webhook: str = ""  # URL; "" sends none
    webhook_format: str = "auto"  # auto | json | ntfy | gotify | apprise
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    # Files that went to undone/ are told in one message at most this often.
    min_interval: float = 600.0
    # Immich not answering, or refusing uploads, for this long is told (and its return).
    immich_down_after: float = 3600.0
    # Less free space than this on the data disk is told ("0" never); 5GiB, 500MB, ... accepted.
    disk_free_below: str = "5GiB"
    # "HH:MM" (local time, or `timezone`) for a daily digest; "" sends none.
    daily_digest: str = ""


@dataclass(frozen=True)
class LogConfig:
    format: str = "text"  # text | json
    level: str = "info"


@dataclass(frozen=True)
class Config:
    immich: ImmichConfig
    data_dir: str = "./data"
    # IANA name for EXIF dates without offset and dates in file names; "" = the server's zone
    timezone: str = ""
    # SIGTERM: SFTP connections close at once (cut-off uploads stay resumable); uploads to Immich
    # get this long before they are parked. Below the container's stop timeout (compose: 30 s).
    shutdown_grace_seconds: float = 10.0
    sftp: SftpConfig = field(default_factory=SftpConfig)
    optimize: OptimizeConfig = field(default_factory=OptimizeConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # Directory of the config file; relative paths in the file are relative to it.
    base_dir: str = field(default=".", metadata={"internal": True})

    def path(self, value: str) -> Path:
        """Resolve a path from the config file relative to the file's own folder."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else (Path(self.base_dir) / p).resolve()

    @property
    def data_path(self) -> Path:
        return self.path(self.data_dir)

    def api_key_for(self, user: str) -> str:
        for u in self.sftp.users:
            if u.name == user and u.immich_api_key:
                return u.immich_api_key
        return self.immich.api_key


CHOICES: dict[str, tuple[str, ...]] = {
    "immich.trashed_duplicates": ("undone", "delete"),
    "optimize.jpeg.mode": ("lossless", "lossy", "keep"),
    "optimize.png.mode": ("lossless", "keep"),
    "optimize.video.mode": ("hevc", "av1", "keep"),
    "optimize.video.when_immich_retranscodes": ("keep", "convert"),
    "optimize.on_error": ("undone", "upload-original"),
    "notify.webhook_format": ("auto", "json", "ntfy", "gotify", "apprise"),
    "notify.smtp.security": ("starttls", "tls", "none"),
    "log.format": ("text", "json"),
    "log.level": ("debug", "info", "warning", "error"),
}

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


def _interpolate(value: str, key: str, problems: list[str], env: typing.Mapping[str, str]) -> str:
    def replace(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in env and (env[name] or default is None):
            return env[name]
        if default is not None:
            return default
        problems.append(f"{key}: environment variable {name} is not set")
        return ""

    return _VAR.sub(replace, value)


def _convert(
    value: Any, tp: Any, key: str, problems: list[str], env: typing.Mapping[str, str]
) -> Any:
    """Check and convert one YAML value to the annotated type; report problems by key."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{key or 'config'}: expected a mapping, got {type(value).__name__}")
            return None
        return _build(tp, value, key, problems, env)
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if isinstance(value, str) and item_tp is str:
            # One string is a list of one; an empty one (an unset `${VAR:-}`) a list of none.
            text = _interpolate(value, key, problems, env)
            return (text,) if text else ()
        if not isinstance(value, list):
            problems.append(f"{key}: expected a list, got {type(value).__name__}")
            return ()
        return tuple(
            _convert(v, item_tp, f"{key}[{i}]", problems, env) for i, v in enumerate(value)
        )
    if origin in (types.UnionType, typing.Union):  # pragma: no cover - no unions today
        raise TypeError(tp)
    if isinstance(value, str):
        value = _interpolate(value, key, problems, env)
    if tp is str:
        if isinstance(value, bool) or value is None or isinstance(value, (dict, list)):
            problems.append(f"{key}: expected a string, got {type(value).__name__}")
            return ""
        return str(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        problems.append(f"{key}: expected true or false, got {value!r}")
        return False
    if tp in (int, float):
        if isinstance(value, bool):
            problems.append(f"{key}: expected a number, got {value!r}")
            return tp(0)
        if isinstance(value, (int, float)) and (tp is float or float(value).is_integer()):
            return tp(value)
        if isinstance(value, str):
            m = _DURATION.match(value)
            if m and (tp is float or m.group(2) == ""):
                number = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
                if tp is float or number.is_integer():
                    return tp(number)
        what = "a number or a duration like 30s, 10m, 12h, 7d" if tp is float else "a whole number"
        problems.append(f"{key}: expected {what}, got {value!r}")
        return tp(0)
    raise TypeError(f"unsupported config type {tp} at {key}")  # pragma: no cover


def _build(
    cls: type, data: dict[str, Any], prefix: str, problems: list[str], env: typing.Mapping[str, str]
) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            problems.append(f"{key}: unknown key")
            continue
        if value is None:
            problems.append(f"{key}: has no value")
            continue
        kwargs[name] = _convert(value, hints[name], key, problems, env)
    for name, f in fields.items():
        if (
            name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ):
            key = f"{prefix}.{name}" if prefix else name
            if name not in data:
                problems.append(f"{key}: required but missing")
            kwargs[name] = "" if hints[name] is str else None
    try:
        return cls(**kwargs)
    except TypeError as exc:  # only reached when a nested mapping was already reported
        problems.append(f"{prefix or 'config'}: {exc}")
        return None


def _check(cfg: Config, problems: list[str]) -> None:
    """Rules that span keys or values."""
    for key, allowed in CHOICES.items():
        obj: Any = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        if obj not in allowed:
            problems.append(f"{key}: must be one of {', '.join(allowed)}, got {obj!r}")
    if not cfg.immich.url.startswith(("http://", "https://")):
        problems.append(f"immich.url: must start with http:// or https://, got {cfg.immich.url!r}")
    for key in ("sftp.listen", "metrics.listen"):
        value = cfg.sftp.listen if key == "sftp.listen" else cfg.metrics.listen
        if key == "metrics.listen" and value == "":
            continue
        try:
            parse_listen(value)
        except ValueError as exc:
            problems.append(f"{key}: {exc}")
    _check_sftp(cfg, problems)
    _check_notify(cfg.notify, problems)
    if not cfg.sftp.users:
        problems.append("sftp.users: at least one user is required")
    seen: set[str] = set()
    for i, u in enumerate(cfg.sftp.users):
        key = f"sftp.users[{i}]"
        if problem := user_name_problem(u.name):
            problems.append(f"{key}.name: {problem}")
        if u.name in seen:
            problems.append(f"{key}.name: duplicate user {u.name!r}")
        seen.add(u.name)
        if not (u.password or u.password_hash or u.authorized_keys):
            problems.append(f"{key}: needs password, password_hash or authorized_keys")
        if not (u.immich_api_key or cfg.immich.api_key):
            problems.append(f"{key}.immich_api_key: missing, and immich.api_key is not set either")
    if not 0 <= cfg.optimize.min_savings < 1:
        problems.append("optimize.min_savings: must be between 0 and 1 (0.05 = 5%)")
    if cfg.optimize.workers < 0:
        problems.append("optimize.workers: must be 0 (one per CPU) or more")
    if cfg.timezone:
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(cfg.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            problems.append(f"timezone: unknown time zone {cfg.timezone!r}")


def _check_sftp(cfg: Config, problems: list[str]) -> None:
    """The SFTP keys' own rules."""
    s = cfg.sftp
    for name in ("ban_after_failures", "max_connections", "max_sessions_per_user", "max_handles"):
        if getattr(s, name) < 1:
            problems.append(f"sftp.{name}: must be 1 or more")
    for name in (
        "failed_login_delay_seconds",
        "ban_seconds",
        "idle_timeout_seconds",
        "resume_keep_seconds",
        "processes",
    ):
        if getattr(s, name) < 0:
            problems.append(f"sftp.{name}: must not be negative")
    for i, cipher in enumerate(s.ciphers):
        if cipher not in SSH_CIPHERS:
            problems.append(
                f"sftp.ciphers[{i}]: unknown cipher {cipher!r} (one of {', '.join(SSH_CIPHERS)})"
            )
    for name in ("proxy_protocol", "ban_allowlist"):
        for i, value in enumerate(getattr(s, name)):
            try:
                parse_network(value)
            except ValueError:
                problems.append(
                    f"sftp.{name}[{i}]: {value!r} is not an address or network (10.0.0.0/8, ::1)"
                )
    for i, u in enumerate(s.users):
        if u.password_hash and not known_hash_scheme(u.password_hash):
            problems.append(
                f"sftp.users[{i}].password_hash: not a hash sftpgate can verify "
                "(use `sftpgate hash-password`; argon2, scrypt and crypt(3) $1$/$5$/$6$/$y$/$2b$ work)"
            )
        for folder in u.folders:
            if problem := folder_problem(folder):
                problems.append(f"sftp.users[{i}].folders: {problem}")


def _check_notify(n: NotifyConfig, problems: list[str]) -> None:
    """The notification keys' own rules."""
    from urllib.parse import urlsplit

    if n.webhook:
        try:
            url = urlsplit(n.webhook)
            valid = url.scheme in ("http", "https") and bool(url.hostname) and url.port != 0
        except ValueError:  # a port that is not a number, a broken IPv6 literal
            valid = False
        if not valid:
            # Never echo the URL: it usually carries a token.
            problems.append("notify.webhook: must be an http:// or https:// URL with a host")
    smtp = n.smtp
    if smtp.host:
        if not smtp.to:
            problems.append("notify.smtp.to: at least one address is needed with notify.smtp.host")
        if not smtp.sender:
            problems.append("notify.smtp.sender: required with notify.smtp.host")
        if not 0 < smtp.port <= 65535:
            problems.append("notify.smtp.port: must be 1 to 65535")
    for name in ("min_interval", "immich_down_after"):
        if getattr(n, name) < 0:
            problems.append(f"notify.{name}: must not be negative")
    try:
        parse_size(n.disk_free_below)
    except ValueError:
        problems.append(
            f"notify.disk_free_below: expected a size like 5GiB or 500MB, got {n.disk_free_below!r}"
        )
    if n.daily_digest and not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", n.daily_digest):
        problems.append(f"notify.daily_digest: expected HH:MM or empty, got {n.daily_digest!r}")


def parse_size(value: str) -> int:
    """Bytes in "5GiB", "500MB", "1.5G", "1048576" (KB, MB ... are powers of 1000, KiB ... of 1024)."""
    m = _SIZE.match(value)
    if not m:
        raise ValueError(value)
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


def _with_users_conf(cfg: Config, problems: list[str]) -> Config:
    """Add the users of an atmoz/sftp `sftp.users_conf` file to `sftp.users` (its path is
    relative to the config file, so this runs once base_dir is known)."""
    s = cfg.sftp
    if not s.users_conf:
        return cfg
    extra = read_users_conf(
        cfg.path(s.users_conf),
        cfg.path(s.users_conf_home) if s.users_conf_home else None,
        {u.name for u in s.users},
        bool(cfg.immich.api_key),
        problems,
    )
    return dataclasses.replace(cfg, sftp=dataclasses.replace(s, users=s.users + tuple(extra)))


def parse_listen(value: str) -> tuple[str, int]:
    """Parse HOST:PORT (IPv6 as [::1]:2222)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def load_config(path: str | Path, env: typing.Mapping[str, str] | None = None) -> Config:
    """Read, interpolate and check the config file; raise ConfigError listing every problem."""
    path = Path(path)
    env = os.environ if env is None else env
    base_dir = path.resolve().parent
    if not path.exists() and any(k.startswith("SFTPGATE_") for k in env):
        # Configuration by environment only: the file's absence plus SFTPGATE_* variables.
        path, base_dir = ENV_TEMPLATE, Path.cwd()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([f"config: cannot read {path}: {exc.strerror}"]) from exc
    except yaml.YAMLError as exc:
        raise ConfigError([f"config: {path} is not valid YAML: {exc}".replace("\n", " ")]) from exc
    if not isinstance(data, dict):
        raise ConfigError([f"config: {path} must hold a mapping of keys"])
    return config_from_dict(data, base_dir=base_dir, env=env)


def config_from_dict(
    data: dict[str, Any], base_dir: Path, env: typing.Mapping[str, str] | None = None
) -> Config:
    problems: list[str] = []
    env = os.environ if env is None else env
    cfg = _build(Config, data, "", problems, env)
    if cfg is not None and not problems:
        cfg = _with_users_conf(dataclasses.replace(cfg, base_dir=str(base_dir)), problems)
        _check(cfg, problems)
    if problems:
        raise ConfigError(problems)
    return cfg
