"""Keys and certificates as both sides handle them: a node's EC key pair (OpenSSH public key lines and
fingerprints, private keys written 0600 and never over an existing file) and reading a PEM certificate.
The consortium's provisioning (federation.deploy.provision) issues them; a site node generates and checks its own.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

# Flower accepts any NIST curve for SuperNode keys; P-384 is what we issue (verified with Flower 1.42).
NIST_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


class ProvisionError(ValueError):
    """Key material cannot be created or read; the message names the file and what to do."""


def new_node_key() -> ec.EllipticCurvePrivateKey:
    """A SuperNode identity key: EC P-384, the curve verified with Flower's node authentication."""
    return ec.generate_private_key(ec.SECP384R1())


def public_key_line(key: ec.EllipticCurvePublicKey, comment: str = "") -> str:
    """The OpenSSH public key line (`ecdsa-sha2-nistp384 AAAA... comment`) that `flwr supernode register` reads."""
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode("ascii")
    return f"{line} {comment}" if comment else line


def parse_public_key(text: str, source: str) -> ec.EllipticCurvePublicKey:
    """An OpenSSH EC public key on a NIST curve, the only kind Flower's node authentication accepts."""
    try:
        key = serialization.load_ssh_public_key(text.strip().encode("ascii"))
    except (ValueError, UnsupportedAlgorithm, UnicodeEncodeError) as exc:
        raise ProvisionError(
            f"{source} is not an OpenSSH public key ({exc}); expected one line like 'ecdsa-sha2-nistp384 AAAA...', "
            "as written by `twinfed site keygen` or `ssh-keygen -t ecdsa -b 384`."
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, NIST_CURVES):
        raise ProvisionError(
            f"{source} is not an ECDSA key on a NIST curve (P-256, P-384, P-521); Flower's SuperNode authentication "
            "accepts only those. Generate one with `twinfed site keygen`."
        )
    return key


def ssh_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """`SHA256:...` exactly as `ssh-keygen -l` prints it, so two people can compare it over the phone."""
    blob = base64.b64decode(public_key_line(key).split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")


def certificate_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate in the colon form `openssl x509 -fingerprint -sha256` prints."""
    return "SHA256:" + cert.fingerprint(hashes.SHA256()).hex(":").upper()


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create a file that must not exist yet, with its final mode from the first byte on.

    O_EXCL makes "never overwrite" hold even against a concurrent run; creating with the mode (rather
    than chmod afterwards) leaves no moment in which a private key is readable by others.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise ProvisionError(f"{path} already exists; refusing to overwrite existing key material.") from None
    try:
        os.fchmod(fd, mode)  # the umask may have removed bits we asked for (0644 public files)
        os.write(fd, data)
    finally:
        os.close(fd)


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey, openssh: bool = False) -> None:
    """A private key file, mode 0600: OpenSSH format for SuperNode keys (what Flower loads), PEM otherwise."""
    fmt = serialization.PrivateFormat.OpenSSH if openssh else serialization.PrivateFormat.PKCS8
    data = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    _write_new(path, data, 0o600)


def write_public_file(path: Path, data: bytes) -> None:
    _write_new(path, data, 0o644)


def load_certificate(path: Path) -> x509.Certificate:
    """A PEM certificate, with a sentence naming the file when it is missing or not a certificate."""
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except FileNotFoundError:
        raise ProvisionError(f"{path} does not exist; expected the consortium CA certificate (ca.crt).") from None
    except ValueError:
        raise ProvisionError(f"{path} is not a PEM certificate; expected the consortium CA certificate.") from None
