"""atmoz/sftp's users.conf, read as it is, so an existing setup moves over unchanged.

One user per line: `user:pass[:e][:uid[:gid[:dir1[,dir2]...]]]`. `:e` marks `pass` as a crypt(3)
hash (what `openssl passwd -6` or atmoz's `makepasswd --crypt-md5` print); an empty pass means
key-only. Blank lines and lines starting with `#` are skipped, as atmoz's entrypoint does.

- The dirs are created in the user's root (atmoz created them in the home, writable, because its
  chroot root was not): a phone set up to upload into `upload/` keeps working.
- uid and gid are checked for being numbers and otherwise ignored: sftpgate writes every file as
  its own user, and files leave for Immich anyway.
- Keys: atmoz appends `/home/<user>/.ssh/keys/*.pub` to the user's authorized_keys. With
  `sftp.users_conf_home` pointing at the same tree (say `/home`), `<home>/<user>/.ssh/keys/*.pub`
  and `<home>/<user>/.ssh/authorized_keys` are read the same way.
"""

from __future__ import annotations

from pathlib import Path

from .accounts import UserConfig, folder_problem, known_hash_scheme, user_name_problem


def read_users_conf(
    path: Path,
    home: Path | None,
    taken: set[str],
    have_default_api_key: bool,
    problems: list[str],
) -> list[UserConfig]:
    """The valid users of `path`; every problem is appended as one line naming the file line."""
    key = "sftp.users_conf"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(f"{key}: cannot read {path}: {getattr(exc, 'strerror', None) or exc}")
        return []
    if not have_default_api_key:
        problems.append(f"{key}: its users upload with immich.api_key, which is not set")
        return []
    users: list[UserConfig] = []
    seen = set(taken)
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{key}: line {number}"
        fields = line.split(":")
        name, password = fields[0], fields[1] if len(fields) > 1 else ""
        encrypted = len(fields) > 2 and fields[2] == "e"
        rest = fields[3:] if encrypted else fields[2:]
        if len(rest) > 3:
            problems.append(f"{where}: too many fields (user:pass[:e][:uid[:gid[:dirs]]])")
            continue
        uid, gid, dirs = [*rest, "", "", ""][:3]
        if problem := user_name_problem(name):
            problems.append(f"{where}: {problem}")
            continue
        if name in seen:
            problems.append(f"{where}: user {name!r} is defined twice")
            continue
        if not (uid + gid).isdigit() and (uid or gid):
            problems.append(f"{where}: uid and gid must be numbers")
            continue
        folders = tuple(d.strip().strip("/") for d in dirs.split(",") if d.strip().strip("/"))
        bad = [problem for d in folders if (problem := folder_problem(d))]
        if bad:
            problems.append(f"{where}: {bad[0]}")
            continue
        keys = _read_keys(home / name) if home else ()
        if not password and not keys:
            hint = (
                f" under {home / name / '.ssh'}" if home else " (sftp.users_conf_home is not set)"
            )
            problems.append(f"{where}: {name!r} has no password and no public key{hint}")
            continue
        if encrypted and password and not known_hash_scheme(password):
            problems.append(
                f"{where}: the password of {name!r} is not a crypt hash sftpgate can verify"
                " ($1$, $5$, $6$, $y$, $2b$)"
            )
            continue
        seen.add(name)
        users.append(
            UserConfig(
                name=name,
                password="" if encrypted else password,
                password_hash=password if encrypted else "",
                authorized_keys=keys,
                folders=folders,
            )
        )
    return users


def _read_keys(user_home: Path) -> tuple[str, ...]:
    """Key lines from atmoz's places: .ssh/keys/*.pub (sorted) and .ssh/authorized_keys."""
    ssh = user_home / ".ssh"
    files = sorted((ssh / "keys").glob("*.pub")) if (ssh / "keys").is_dir() else []
    if (ssh / "authorized_keys").is_file():
        files.append(ssh / "authorized_keys")
    lines: list[str] = []
    for f in files:
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                lines.append(line.strip())
    return tuple(lines)
