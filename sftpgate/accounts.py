"""What makes a valid account, checked in one place: a user's settings, user names, the folders
created in a user's root, and the password-hash formats sftpgate can verify. The configuration
(config.py, users_conf.py) and the SFTP layer both use these; this module depends on nothing of
sftpgate's, so the configuration stays the bottom layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

USER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
# watch/undone/ holds what failed, beside the users' roots in watch/: no user may be called so.
UNDONE_FOLDER = "undone"
RESERVED_USER_NAMES = frozenset({UNDONE_FOLDER})
CRYPT_HASH = re.compile(r"^\$(1|5|6|y|gy|7|2[abxy])\$[./0-9A-Za-z$,=]+$")
SCRYPT_HASH = re.compile(
    r"^\$scrypt\$ln=(\d+),r=(\d+),p=(\d+)\$([./A-Za-z0-9]+)\$([./A-Za-z0-9]+)$"
)


@dataclass(frozen=True)
class UserConfig:
    """One `sftp.users` entry (or a users.conf line)."""

    name: str
    password: str = ""
    password_hash: str = ""  # from `sftpgate hash-password`
    # Public key lines, or one path to an authorized_keys file.
    authorized_keys: tuple[str, ...] = ()
    immich_api_key: str = ""  # default: immich.api_key
    # Folders created in the user's root at start (atmoz/sftp's users.conf dir list), so a client
    # set up to upload into e.g. "upload/" finds it.
    folders: tuple[str, ...] = ()


def user_name_problem(name: str) -> str | None:
    """Why `name` cannot be a user's name, or None when it can."""
    if not USER_NAME.fullmatch(name):
        return f"{name!r} is not a valid user name (letters, digits, _ . -)"
    if name in RESERVED_USER_NAMES:
        return f"{name!r} is reserved for the {name}/ folder"
    return None


def folder_problem(folder: str) -> str | None:
    """Why `folder` cannot be created in a user's root, or None when it can."""
    if folder.startswith("/") or ".." in folder.split("/") or "\0" in folder:
        return f"folder {folder!r} must be a relative path inside the user's root"
    return None


def known_hash_scheme(hashed: str) -> str | None:
    """ "argon2", "scrypt" or "crypt" when sftpgate can verify `hashed`, else None."""
    if hashed.startswith(("$argon2id$", "$argon2i$", "$argon2d$")):
        return "argon2"
    if SCRYPT_HASH.match(hashed):
        return "scrypt"
    if CRYPT_HASH.match(hashed):
        return "crypt"
    return None
