"""The site's SuperNode identity key: generated at the hospital, checked before the SuperNode starts.

A hospital that generates its own key pair sends the coordinator only the public key
(`twinfed provision add-site DIR SITE --public-key SITE.pub`), so the private key never leaves the
hospital. Flower loads the private key in OpenSSH format and accepts EC keys on NIST curves; we issue
P-384, the curve verified with Flower 1.42's SuperNode authentication.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from federation.common.keys import (
    NIST_CURVES,
    ProvisionError,
    new_node_key,
    public_key_line,
    ssh_fingerprint,
    write_private_key,
    write_public_file,
)


class SiteKeyError(ValueError):
    """The site key cannot be created or used; the message names the file and what to do."""


@dataclass(frozen=True)
class SiteKeys:
    private_key: Path
    public_key: Path
    fingerprint: str


def generate_site_keys(folder: Path, site_id: str) -> SiteKeys:
    """Write FOLDER/<site>.key (0600, OpenSSH) and FOLDER/<site>.pub; never overwrites either."""
    folder = Path(folder)
    private_path, public_path = folder / f"{site_id}.key", folder / f"{site_id}.pub"
    for path in (private_path, public_path):
        if path.exists():
            raise SiteKeyError(
                f"{path} already exists; refusing to overwrite a site key (the coordinator may have registered "
                "it). Move it away first if you really mean to replace it."
            )
    folder.mkdir(parents=True, exist_ok=True)
    key = new_node_key()
    try:
        write_private_key(private_path, key, openssh=True)
        write_public_file(public_path, (public_key_line(key.public_key(), f"{site_id}@twinfed") + "\n").encode())
    except ProvisionError as exc:
        raise SiteKeyError(str(exc)) from None
    return SiteKeys(private_path, public_path, ssh_fingerprint(key.public_key()))


def load_site_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The SuperNode's private key as Flower will load it, refused when missing, unreadable or exposed.

    Like ssh, we refuse a key that other users can read: whoever holds it can join the consortium as
    this hospital.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except FileNotFoundError:
        raise SiteKeyError(
            f"{path} does not exist; expected this site's SuperNode private key (<site>.key from the coordinator's "
            "bundle, or from `twinfed site keygen`)."
        ) from None
    except OSError as exc:
        raise SiteKeyError(f"{path}: cannot read the site's private key ({exc.strerror}).") from None
    if stat.S_IMODE(mode) & 0o077:
        raise SiteKeyError(
            f"{path} can be read by other users (mode {stat.S_IMODE(mode):04o}); whoever holds it can join the "
            f"consortium as this hospital. Run: chmod 600 {path}"
        )
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise SiteKeyError(
            f"{path} is not an unencrypted OpenSSH private key; Flower needs the <site>.key file as issued by "
            "`twinfed provision` or `twinfed site keygen`."
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, NIST_CURVES):
        raise SiteKeyError(
            f"{path} is not an ECDSA key on a NIST curve; Flower's SuperNode authentication accepts only those. "
            "Generate one with `twinfed site keygen`."
        )
    return key


def fingerprint_of(key: ec.EllipticCurvePrivateKey) -> str:
    """The fingerprint the coordinator's registry lists for this key (compare the two when in doubt)."""
    return ssh_fingerprint(key.public_key())
