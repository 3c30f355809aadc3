"""The key that signs the audit chain, kept outside the governance database.

A hash chain alone shows edits to whoever re-verifies, but anyone who can write the database and the head
file can rewrite both consistently. Each entry (and the head file) is therefore signed with an Ed25519 key
held in a file beside the site's other keys: someone with access to the database alone (a database
administrator, a PostgreSQL server shared with other systems, a restored backup) cannot forge an entry, add
one past the head, or rewrite the chain. Someone who holds both the key file and the database can; that
is what the consortium's receipts of each round's audit head are for (`twinfed site audit verify
--receipts`).

Ed25519 because a signature costs tens of microseconds and verifying a long chain stays fast, and because
the public half lets an auditor verify without being able to sign.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


class AuditKeyError(RuntimeError):
    """The audit signing key cannot be read or written; the message names the file and what to do."""


@dataclass(frozen=True)
class AuditKey:
    """An Ed25519 key pair that signs audit entries; `path` is where its private half is kept (mode 0600)."""

    path: Path
    private: Ed25519PrivateKey

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the raw public key, for a steward to note down or compare."""
        raw = self.public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return hashlib.sha256(raw).hexdigest()

    def sign(self, message: str) -> str:
        return base64.b64encode(self.private.sign(message.encode("utf-8"))).decode("ascii")

    def verifies(self, message: str, signature: str | None) -> bool:
        """True when `signature` is this key's signature of `message` (False for a missing or garbled one)."""
        if not signature:
            return False
        try:
            self.public.verify(base64.b64decode(signature, validate=True), message.encode("utf-8"))
        except (InvalidSignature, ValueError):
            return False
        return True


def load_audit_key(path: Path) -> AuditKey | None:
    """The key at `path`, or None when the file does not exist (a site that never signed its chain)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        private = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise AuditKeyError(
            f"{path}: the audit signing key cannot be read ({exc}). Restore it from the site's key backup; "
            "without it the audit chain cannot be verified or continued."
        ) from None
    if not isinstance(private, Ed25519PrivateKey):
        raise AuditKeyError(f"{path}: the audit signing key must be an Ed25519 key (found {type(private).__name__}).")
    return AuditKey(path, private)


def create_audit_key(path: Path) -> AuditKey:
    """Write a new key at `path` (mode 0600, never over an existing file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        loaded = load_audit_key(path)  # another process created it first: use theirs
        assert loaded is not None
        return loaded
    except OSError as exc:
        raise AuditKeyError(f"{path}: the audit signing key cannot be written ({exc}).") from None
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
        out.flush()
        os.fsync(out.fileno())
    return AuditKey(path, private)
