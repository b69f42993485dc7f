"""Password checks: plain (from the environment), argon2id (`sftpgate hash-password`), scrypt, and
crypt(3) hashes (atmoz/sftp's users.conf `:e`).

Unknown users, key-only users and users whose hash is not argon2 are verified against a dummy
argon2 hash too, so every password check costs at least one argon2 verification; server.py then
pads every failed attempt to the same fixed delay, so the answer time says nothing about whether
the user exists.

crypt(3): Python's `crypt` module is deprecated and gone in 3.13, and passlib is unmaintained (and
breaks with bcrypt ≥ 4.1). Both only ever wrapped the system's libcrypt (libxcrypt on Debian,
maintained, the library that checks /etc/shadow), so it is called directly through ctypes: every
scheme the system's own login accepts works ($y$ yescrypt, $6$, $5$, $1$ MD5 as atmoz's README
makes, $2b$ bcrypt), with no dependency. crypt() keeps its result in a static buffer, hence the
lock.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import functools
import hashlib
import hmac
import os
import threading
from collections.abc import Callable

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from ..accounts import SCRYPT_HASH, known_hash_scheme

_hasher = PasswordHasher()
# Verified against for unknown users and key-only users, so a wrong user costs the same time.
_DUMMY_HASH = _hasher.hash("sftpgate-dummy-password")
_crypt_lock = threading.Lock()


def hash_password(password: str, scheme: str = "argon2id") -> str:
    """A salted hash for `password_hash:`: argon2id (default) or scrypt in passlib's format."""
    if scheme == "scrypt":
        ln, r, p = 15, 8, 1
        salt = os.urandom(16)
        digest = hashlib.scrypt(
            password.encode(), salt=salt, n=1 << ln, r=r, p=p, maxmem=_scrypt_mem(ln, r), dklen=32
        )
        return f"$scrypt$ln={ln},r={r},p={p}${_ab64(salt)}${_ab64(digest)}"
    return _hasher.hash(password)


def verify_password(plain: str, hashed: str, password: str) -> bool:
    """Check `password` against a user's plain password or hash ("" and "" = no password)."""
    scheme = known_hash_scheme(hashed) if hashed else None
    if scheme != "argon2":
        _verify_argon2(_DUMMY_HASH, password)  # the same floor of cost for every path
    if scheme == "argon2":
        return _verify_argon2(hashed, password)
    if scheme == "scrypt":
        return _verify_scrypt(hashed, password)
    if scheme == "crypt":
        return _verify_crypt(hashed, password)
    if plain:
        return hmac.compare_digest(plain.encode(), password.encode())
    return False


def _verify_argon2(hashed: str, password: str) -> bool:
    try:
        return _hasher.verify(hashed, password)
    except (VerificationError, InvalidHashError):
        return False


def _ab64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=").replace("+", ".")


def _ab64_decode(text: str) -> bytes:
    text = text.replace(".", "+")
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _scrypt_mem(ln: int, r: int) -> int:
    return 129 * r * (1 << ln) + (1 << 20)


def _verify_scrypt(hashed: str, password: str) -> bool:
    m = SCRYPT_HASH.match(hashed)
    if m is None:
        return False
    ln, r, p = int(m.group(1)), int(m.group(2)), int(m.group(3))
    if not (1 <= ln <= 20 and 1 <= r <= 32 and 1 <= p <= 16):
        return False  # parameters this large would let one login eat gigabytes
    try:
        salt, expected = _ab64_decode(m.group(4)), _ab64_decode(m.group(5))
        digest = hashlib.scrypt(
            password.encode(),
            salt=salt,
            n=1 << ln,
            r=r,
            p=p,
            maxmem=_scrypt_mem(ln, r) * p,
            dklen=len(expected),
        )
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(digest, expected)


@functools.cache
def _libcrypt() -> Callable[[bytes, bytes], bytes | None]:
    name = ctypes.util.find_library("crypt")
    lib = ctypes.CDLL(name) if name else ctypes.CDLL(None)  # musl keeps crypt() in libc
    fn = lib.crypt
    fn.restype = ctypes.c_char_p
    fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    return fn  # type: ignore[no-any-return]


def _verify_crypt(hashed: str, password: str) -> bool:
    if "\0" in password:
        return False  # C would stop at the NUL and check a shorter password
    try:
        crypt = _libcrypt()
    except (OSError, AttributeError):
        return False
    with _crypt_lock:
        out = crypt(password.encode(), hashed.encode())
    return out is not None and hmac.compare_digest(out, hashed.encode())
