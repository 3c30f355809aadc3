"""Pseudonymous keys for source records, keyed with a secret that only the site holds.

No source identifier enters OMOP (GDPR data minimisation). `person_source_value` is HMAC-SHA256 of
the FHIR Patient id, and the ETL's own bookkeeping (the id map, quarantine, consent registry) is keyed
by hashes too. Without the secret nobody can link an OMOP person back to a hospital id, even by hashing
every possible MRN; with it, the site re-derives the same keys on every run, which is what keeps OMOP
ids stable and re-runs free of duplicates.

The secret lives outside the database (default ~/.config/twinfed/site-secret, mode 0600). Losing it
would make every record look new, so the database remembers a fingerprint of the secret and the ETL
refuses to run with a different one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path

SECRET_ENV = "TWINFED_SITE_SECRET_FILE"
DEFAULT_SECRET_FILE = Path.home() / ".config" / "twinfed" / "site-secret"


class SecretError(RuntimeError):
    """The site secret is missing, unreadable or not the one this database was loaded with."""


def secret_path(explicit: Path | None = None) -> Path:
    """Where the site secret is: the explicit path, else $TWINFED_SITE_SECRET_FILE, else the default."""
    if explicit is not None:
        return explicit
    env = os.environ.get(SECRET_ENV)
    return Path(env) if env else DEFAULT_SECRET_FILE


# What to do about a missing secret, worded for whoever asks. The site node has no --secret-file option: it
# reads the path from its site file, so its default names that setting; the ETL commands pass ETL_HINT.
SITE_NODE_HINT = (
    "Set secret_file in the site file (site.yaml) to the secret this site has used so far (the file `twinfed etl "
    "--secret-file` loaded the OMOP database with, or the one `twinfed site init` created), restoring it from "
    "backup if it was lost"
)
ETL_HINT = "Pass --secret-file with the file used for earlier loads, restoring it from backup if it was lost"


def load_or_create_secret(path: Path, *, create: bool = True, hint: str = SITE_NODE_HINT) -> tuple[bytes, bool]:
    """Read the site secret (hex) from `path`, creating a new random one when allowed. Returns (secret, created).

    `hint` ends the error for a missing secret (create=False): which setting points at the secret depends on
    the caller (the site file for the site node, --secret-file for the ETL commands).
    """
    if path.exists():
        try:
            text = path.read_text(encoding="ascii").strip()
            secret = bytes.fromhex(text)
        except (OSError, ValueError) as exc:
            raise SecretError(
                f"The site secret file {path} cannot be read as hex ({exc}). Restore it from backup."
            ) from None
        if len(secret) < 32:
            raise SecretError(f"The site secret in {path} is shorter than 32 bytes; it is not one twinfed wrote.")
        return secret, False
    if not create:
        raise SecretError(f"No site secret at {path}. {hint}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_bytes(32)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="ascii") as handle:
        handle.write(secret.hex() + "\n")
    return secret, True


class SiteKeys:
    """Keyed hashes of source identifiers for one site."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret
        self._mac_key = hashlib.sha256(b"twinfed record keys v1" + secret).digest()  # BLAKE2b keys are <= 64 bytes

    @property
    def fingerprint(self) -> str:
        """A value that identifies the secret without revealing it (stored in the database)."""
        return hmac.new(self._secret, b"twinfed site secret fingerprint v1", hashlib.sha256).hexdigest()[:32]

    def key(self, reference: str) -> bytes:
        """16-byte key of a source record, e.g. `Observation/123#8480-6`.

        Keyed BLAKE2b (a MAC by design, ~10x faster than HMAC in Python): the ETL computes one per record.
        """
        return hashlib.blake2b(reference.encode("utf-8"), key=self._mac_key, digest_size=16).digest()

    def keyed_hex(self, message: str) -> str:
        """HMAC-SHA256 of `message` under the site secret, hex: a stable pseudonym that reveals nothing."""
        return hmac.new(self._secret, message.encode(), hashlib.sha256).hexdigest()

    def person_source_value(self, patient_id: str) -> str:
        """What OMOP stores in person_source_value: base64url of HMAC-SHA256 (43 characters)."""
        digest = hmac.new(self._secret, f"Patient/{patient_id}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
