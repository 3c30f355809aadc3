"""Consortium key material: the CA, the SuperLink's TLS certificate, one key pair per hospital, and the registry.

Flower secures a deployment with two independent mechanisms, and a consortium needs both:

* TLS between every SuperNode (and the `flwr` CLI) and the SuperLink. The SuperNodes verify the
  SuperLink's certificate against the consortium CA (`--root-certificates`); it is not mutual TLS.
* SuperNode authentication: each hospital holds an EC private key (OpenSSH format); the SuperLink,
  started with `--enable-supernode-auth`, only lets in nodes whose public key was registered.

Everything is created here with the `cryptography` library (no openssl subprocess, so the same code runs
on any host) and laid out in one folder the coordinator keeps:

```
DIR/consortium.yaml                 the registry: sites, their public keys and fingerprints, CA fingerprint
DIR/ca/ca.key (0600), ca.crt        the consortium CA; ca.key never leaves the coordinator
DIR/superlink/server.key (0600), server.pem, ca.crt      the SuperLink's TLS identity
DIR/sites/<site>/<site>.key (0600), <site>.pub, ca.crt   the bundle handed to one hospital
```

A hospital may instead generate its own key pair (`twinfed site keygen`) and send only the public key
(`twinfed provision add-site DIR SITE --public-key FILE`), so the private key never leaves the hospital.
Existing material is never overwritten: a re-issued key would silently lock a hospital out.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from federation.common.keys import (
    ProvisionError,
    certificate_fingerprint,
    new_node_key,
    parse_public_key,
    public_key_line,
    ssh_fingerprint,
    write_private_key,
    write_public_file,
)

CONSORTIUM_FILE = "consortium.yaml"
# The same rule as the site file's site_id (site_node.config.SiteConfig): ids appear in file names and logs.
SITE_ID_PATTERN = r"^[a-z0-9][a-z0-9_.-]{1,63}$"
LOOPBACK = "127.0.0.1"  # always in the SuperLink certificate (see init_consortium)
CA_VALID_DAYS = 5 * 365
SERVER_VALID_DAYS = 2 * 365
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


# ---------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class ConsortiumLayout:
    """Where each file of a consortium folder lives; the one place other modules learn the paths from."""

    root: Path

    @property
    def registry(self) -> Path:
        return self.root / CONSORTIUM_FILE

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def ca_key(self) -> Path:
        return self.ca_dir / "ca.key"

    @property
    def ca_cert(self) -> Path:
        return self.ca_dir / "ca.crt"

    @property
    def superlink_dir(self) -> Path:
        return self.root / "superlink"

    @property
    def server_key(self) -> Path:
        return self.superlink_dir / "server.key"

    @property
    def server_cert(self) -> Path:
        return self.superlink_dir / "server.pem"

    @property
    def superlink_ca(self) -> Path:
        return self.superlink_dir / "ca.crt"

    @property
    def sites_dir(self) -> Path:
        return self.root / "sites"

    def site_dir(self, site_id: str) -> Path:
        return self.sites_dir / site_id

    def site_key(self, site_id: str) -> Path:
        return self.site_dir(site_id) / f"{site_id}.key"

    def site_public_key(self, site_id: str) -> Path:
        return self.site_dir(site_id) / f"{site_id}.pub"

    def site_ca(self, site_id: str) -> Path:
        return self.site_dir(site_id) / "ca.crt"


# -------------------------------------------------------------------------------------------- registry


class SiteEntry(BaseModel):
    """One hospital allowed to join: its SuperNode public key is what the SuperLink checks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=SITE_ID_PATTERN)
    public_key: str = Field(description="OpenSSH public key line of the site's SuperNode key (EC, NIST curve).")
    fingerprint: str = Field(description="SHA256 fingerprint of the public key, as `ssh-keygen -l` prints it.")
    added_at: dt.datetime
    key_origin: Literal["issued", "site-generated"] = Field(
        description="issued: the coordinator generated the private key and handed it over; "
        "site-generated: the private key never left the hospital."
    )

    @model_validator(mode="after")
    def _fingerprint_matches(self) -> SiteEntry:
        actual = ssh_fingerprint(parse_public_key(self.public_key, f"site {self.id}"))
        if actual != self.fingerprint:
            raise ValueError(f"site {self.id}: fingerprint {self.fingerprint} does not match its public key ({actual})")
        return self


class SuperLinkEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    hosts: list[str] = Field(min_length=1, description="Names and addresses in the server certificate (SAN).")
    certificate_fingerprint: str


class Consortium(BaseModel):
    """DIR/consortium.yaml: who may join, and which CA vouches for the SuperLink."""

    model_config = ConfigDict(extra="forbid")

    format_version: Literal[1] = 1
    name: str
    created_at: dt.datetime
    ca_fingerprint: str
    superlink: SuperLinkEntry
    sites: list[SiteEntry] = Field(default_factory=list)

    @field_validator("sites")
    @classmethod
    def _unique(cls, sites: list[SiteEntry]) -> list[SiteEntry]:
        for attribute in ("id", "fingerprint"):
            seen: set[str] = set()
            for site in sites:
                value = getattr(site, attribute)
                if value in seen:
                    raise ValueError(f"two sites share the {attribute} {value}")
                seen.add(value)
        return sites

    def site(self, site_id: str) -> SiteEntry | None:
        return next((s for s in self.sites if s.id == site_id), None)


def load_consortium(root: Path) -> Consortium:
    """Read and validate DIR/consortium.yaml, with errors that name the file and the field."""
    path = ConsortiumLayout(Path(root)).registry
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProvisionError(
            f"{path} does not exist: {root} is not a consortium folder. Create one with `twinfed provision init`."
        ) from None
    except (OSError, yaml.YAMLError) as exc:
        raise ProvisionError(f"{path}: cannot read the consortium registry: {exc}") from None
    try:
        return Consortium.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in exc.errors())
        raise ProvisionError(f"{path}: the consortium registry is not valid: {problems}") from None


def _save_consortium(root: Path, consortium: Consortium) -> None:
    """Replace the registry atomically: a crash never leaves a half-written list of who may join."""
    path = ConsortiumLayout(root).registry
    text = (
        "# twinfed consortium registry, written by `twinfed provision`. The SuperLink admits exactly these\n"
        "# SuperNode keys (`twinfed coordinator start` registers them). Compare fingerprints with each site.\n"
        + yaml.safe_dump(consortium.model_dump(mode="json"), sort_keys=False, width=1_000_000)
    )
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ primitives


def _mkdir_private(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _san(host: str) -> x509.GeneralName:
    """An IP address goes in the SAN as an IP entry (TLS clients do not match IPs against DNS entries)."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    name = host.rstrip(".")
    if not name or len(name) > 253 or not all(_DNS_LABEL.match(label) for label in name.split(".")):
        raise ProvisionError(
            f"--host {host!r} is neither an IP address nor a DNS name; give the name or address the hospitals "
            "will dial to reach the SuperLink."
        )
    return x509.DNSName(name)


def _ca_certificate(key: ec.EllipticCurvePrivateKey, name: str) -> x509.Certificate:
    subject = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, name), x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")]
    )
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )


def _server_certificate(
    key: ec.EllipticCurvePrivateKey, hosts: list[str], ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate
) -> x509.Certificate:
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=SERVER_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )


def _check_site_id(site_id: str) -> None:
    if not re.match(SITE_ID_PATTERN, site_id):
        raise ProvisionError(
            f"site id {site_id!r} is not valid: use 2-64 lowercase letters, digits, '.', '_' or '-', starting with "
            "a letter or digit (the same id as in the site's site.yaml)."
        )


def _refuse_existing(paths: list[Path]) -> None:
    existing = [p for p in paths if p.exists()]
    if existing:
        raise ProvisionError(
            f"{existing[0]} already exists; refusing to overwrite existing key material"
            + (f" (and {len(existing) - 1} more file(s))" if len(existing) > 1 else "")
            + ". Move it away first if you really mean to re-issue it."
        )


# ------------------------------------------------------------------------------------------ operations


@dataclass(frozen=True)
class IssuedSite:
    entry: SiteEntry
    folder: Path  # the bundle to hand to the hospital
    private_key: Path | None  # None when the site generated its own key


def init_consortium(root: Path, hosts: list[str], site_ids: list[str], name: str = "twinfed consortium") -> Consortium:
    """Create the CA, the SuperLink certificate for `hosts`, and one key bundle per site in a new folder.

    Every target is checked before anything is written, so a refusal leaves the folder as it was.
    """
    root = Path(root)
    layout = ConsortiumLayout(root)
    if not hosts:
        raise ProvisionError(
            "name at least one --host: the DNS name or IP address the hospitals will dial to reach the SuperLink "
            "(it goes into the server certificate; e.g. --host fl.consortium.example.org --host 127.0.0.1)."
        )
    # The SuperLink reaches its own API at 127.0.0.1 when it listens on 0.0.0.0 (to launch ServerApps, and
    # our health check and flwr CLI connection do the same) and verifies the certificate there.
    hosts = list(dict.fromkeys([*hosts, LOOPBACK]))
    for host in hosts:
        _san(host)
    for site_id in site_ids:
        _check_site_id(site_id)
    if len(set(site_ids)) != len(site_ids):
        raise ProvisionError("the same --site is given twice; each hospital gets one key.")
    targets = [
        layout.registry,
        layout.ca_key,
        layout.ca_cert,
        layout.server_key,
        layout.server_cert,
        layout.superlink_ca,
    ]
    for site_id in site_ids:
        targets += [layout.site_key(site_id), layout.site_public_key(site_id), layout.site_ca(site_id)]
    _refuse_existing(targets)

    _mkdir_private(layout.ca_dir)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = _ca_certificate(ca_key, name)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    write_private_key(layout.ca_key, ca_key)
    write_public_file(layout.ca_cert, ca_pem)

    _mkdir_private(layout.superlink_dir)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = _server_certificate(server_key, hosts, ca_key, ca_cert)
    write_private_key(layout.server_key, server_key)
    write_public_file(layout.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    write_public_file(layout.superlink_ca, ca_pem)

    consortium = Consortium(
        name=name,
        created_at=_now(),
        ca_fingerprint=certificate_fingerprint(ca_cert),
        superlink=SuperLinkEntry(hosts=hosts, certificate_fingerprint=certificate_fingerprint(server_cert)),
    )
    for site_id in site_ids:
        consortium.sites.append(_issue_site(layout, site_id, None).entry)
    _save_consortium(root, consortium)
    return consortium


def add_site(root: Path, site_id: str, public_key_file: Path | None = None) -> IssuedSite:
    """Admit one more hospital: issue its key bundle, or register the public key it generated itself.

    Only that site's files are written; a site id or key already in the registry is refused.
    """
    root = Path(root)
    layout = ConsortiumLayout(root)
    consortium = load_consortium(root)
    _check_site_id(site_id)
    if consortium.site(site_id) is not None:
        raise ProvisionError(
            f"site {site_id} is already in {layout.registry}; refusing to issue it a second key. "
            "Its bundle is in " + str(layout.site_dir(site_id)) + "."
        )
    public_key = None
    if public_key_file is not None:
        try:
            text = Path(public_key_file).read_text(encoding="ascii")
        except FileNotFoundError:
            raise ProvisionError(f"{public_key_file} does not exist; expected the site's <site>.pub file.") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ProvisionError(f"{public_key_file}: cannot read the public key: {exc}") from None
        public_key = parse_public_key(text, str(public_key_file))
        fingerprint = ssh_fingerprint(public_key)
        clash = next((s for s in consortium.sites if s.fingerprint == fingerprint), None)
        if clash is not None:
            raise ProvisionError(
                f"{public_key_file} is the key of site {clash.id} already ({fingerprint}); each hospital needs "
                "its own key pair."
            )
    targets = [layout.site_public_key(site_id), layout.site_ca(site_id)]
    if public_key is None:
        targets.append(layout.site_key(site_id))
    _refuse_existing(targets)
    issued = _issue_site(layout, site_id, public_key)
    consortium.sites.append(issued.entry)
    _save_consortium(root, consortium)
    return issued


def _issue_site(layout: ConsortiumLayout, site_id: str, public_key: ec.EllipticCurvePublicKey | None) -> IssuedSite:
    """Write one hospital's bundle: its key pair (unless it brought its own public key) and the CA certificate."""
    folder = layout.site_dir(site_id)
    _mkdir_private(layout.sites_dir)
    _mkdir_private(folder)
    private_path = None
    if public_key is None:
        key = new_node_key()
        private_path = layout.site_key(site_id)
        write_private_key(private_path, key, openssh=True)
        public_key = key.public_key()
    line = public_key_line(public_key, f"{site_id}@twinfed")
    write_public_file(layout.site_public_key(site_id), (line + "\n").encode("ascii"))
    write_public_file(layout.site_ca(site_id), layout.ca_cert.read_bytes())
    entry = SiteEntry(
        id=site_id,
        public_key=line,
        fingerprint=ssh_fingerprint(public_key),
        added_at=_now(),
        key_origin="issued" if private_path is not None else "site-generated",
    )
    return IssuedSite(entry=entry, folder=folder, private_key=private_path)
