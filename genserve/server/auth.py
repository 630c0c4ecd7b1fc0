"""API keys: who may call, and what a job records about who did.

A key is never stored.  A job's owner is HMAC-SHA256(secret, key): the secret is 32 random bytes
in `<results_dir>/.secret` (mode 0600, made on the first start with keys), so the owner of a
stored result is the same after a restart, while the files under results_dir (job.json, the job
store) never let anyone recover a key, nor test guesses against it without the secret.

A presented key is checked in constant time: its HMAC (fixed length, whatever the key's length)
is compared with `hmac.compare_digest` against the HMAC of every configured key, all of them,
never `in` (which stops at the first equal one, and compares byte by byte).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from .service import ApiError

SECRET_FILE = ".secret"
SECRET_BYTES = 32


def load_secret(results_dir: str | os.PathLike) -> bytes:
    """The results directory's owner secret, made (mode 0600) when it has none.

    Made in a private temporary file then linked into place, so a second server starting on the
    same directory at the same moment either links first or reads the one that did: never two
    secrets, never a half-written one.  An existing secret of the wrong size is an error, not
    replaced: a new secret would orphan every stored owner.
    """
    d = Path(results_dir)
    path = d / SECRET_FILE
    if not path.exists():
        tmp = d / f"{SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(SECRET_BYTES))
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process made it first: use theirs
        finally:
            tmp.unlink(missing_ok=True)
    st = path.stat()
    if stat.S_IMODE(st.st_mode) & 0o077:
        # Readable by others (copied with a permissive umask, say): the secret is only worth
        # something while nobody else can read it.
        os.chmod(path, 0o600)
    secret = path.read_bytes()
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"{path}: {len(secret)} bytes, expected {SECRET_BYTES}; it keys the "
                         "owners of stored jobs: restore it, or remove it together with them")
    return secret


def owner_of(secret: bytes, key: str) -> str:
    """The owner a job records for `key`: hex HMAC-SHA256 (64 characters)."""
    return hmac.new(secret, key.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


def bearer(authorization: str) -> str:
    """The key of an `Authorization: Bearer KEY` header ('' when there is none)."""
    scheme, _, key = authorization.strip().partition(" ")
    return key.strip() if scheme.lower() == "bearer" else ""


class Keys:
    """The configured API keys, held only as their owners (HMACs)."""

    def __init__(self, keys: tuple[str, ...], results_dir: str | os.PathLike):
        self.enabled = bool(keys)
        self.secret = load_secret(results_dir) if keys else b""
        self._owners = [owner_of(self.secret, k).encode() for k in keys]

    def owner(self, authorization: str) -> str | None:
        """The caller's owner; None when the server takes no keys; 401 for a missing or unknown
        key.  Every configured key is compared (the time does not say which one matched)."""
        if not self.enabled:
            return None
        key = bearer(authorization)
        who = owner_of(self.secret, key).encode()
        found = False
        for known in self._owners:
            found |= hmac.compare_digest(who, known)
        if not key or not found:
            raise ApiError(401, "missing or unknown API key (Authorization: Bearer KEY)",
                           "invalid_api_key")
        return who.decode()
