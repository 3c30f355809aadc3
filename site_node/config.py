"""The site configuration hospital IT writes once: which OMOP database, where governance lives, which policy.

The SuperNode is started with `--node-config site-config=/path/site.yaml`, so this file is the one place
that ties a Flower node to a hospital's data and rules. Relative paths (and relative SQLite paths) are
resolved against the file's own folder, so a site folder can be moved or mounted anywhere.

The file is read through federation.common.yaml_files: at most 64 KiB and 20 levels deep, no key twice,
so a wrong file (a data export, a truncated copy, a loop of aliases) is a sentence, not a crash or a hang.
Database URLs are parsed and paths checked when the file loads, so a typo is named with its field here
rather than met later as an exception inside a command.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from federation.common.validation import describe
from federation.common.yaml_files import YamlLimits, read_yaml_file
from omop_etl.database import normalise_url
from omop_etl.identity import load_or_create_secret
from site_node.hospital_twin.config import HospitalConfig

# A site file is ten lines; 64 KiB leaves room for any comments and refuses a wrong file at once.
SITE_FILE = YamlLimits(
    what="a site configuration file",
    max_bytes=64 * 2**10,
    max_depth=20,
    max_values=5_000,
    hint="a site file is a dozen settings (see configs/site-example.yaml); is it the right file?",
)
# A schema name goes into SQL as an identifier (CREATE SCHEMA, search paths): a plain PostgreSQL name only.
SCHEMA_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,62}$"


class SiteConfigError(ValueError):
    """The site configuration cannot be read or is invalid; the message names the file and field."""


def _database_url(value: str) -> str:
    """A URL SQLAlchemy can open. The message does not repeat the URL: it may carry a password."""
    try:
        make_url(normalise_url(value))
    except ArgumentError:
        raise ValueError(
            "is not a database URL (write it as sqlite:///omop.sqlite or postgresql://user@host:5432/omop)"
        ) from None
    if "\0" in value:
        raise ValueError("a database URL cannot hold a NUL character")
    return value


def _plain_path(value: Path | None) -> Path | None:
    if value is not None and "\0" in str(value):
        raise ValueError("a path cannot hold a NUL character")
    return value


class OmopSource(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(description="SQLAlchemy URL of the site's OMOP CDM v5.4 database.")
    schema_name: str | None = Field(
        None, alias="schema", pattern=SCHEMA_NAME, description="PostgreSQL schema holding the CDM tables."
    )

    _url = field_validator("url")(_database_url)


class SiteConfig(BaseModel):
    """One hospital's site node."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    site_id: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{1,63}$")
    name: str = ""
    omop: OmopSource
    governance_db: str = Field(description="SQLAlchemy URL of the site's governance database (ledger, audit).")
    governance_schema: str | None = Field(
        None, pattern=SCHEMA_NAME, description="PostgreSQL schema for the governance tables."
    )
    policy: Path = Field(description="The data steward's policy file.")
    secret_file: Path = Field(description="The site secret (the one the ETL uses); keys the train/test split.")
    audit_head_file: Path | None = Field(
        None, description="Where the audit log's head is mirrored, outside the database (detects truncation)."
    )
    audit_key_file: Path | None = Field(
        None,
        description="The Ed25519 key that signs the audit chain, outside the database (default: beside the head "
        "file, with the suffix .key). Keep it where the database's users cannot read it, and back it up.",
    )
    hospital: HospitalConfig | None = Field(
        None, description="The hospital twin's wards, beds and shifts (docs/twins.md); absent: no hospital twin."
    )
    base_dir: Path = Field(Path("."), exclude=True)

    _url = field_validator("governance_db")(_database_url)
    _paths = field_validator("policy", "secret_file", "audit_head_file", "audit_key_file")(_plain_path)

    def split_key(self) -> bytes:
        return derive_split_key(self.secret_file)

    @property
    def audit_head(self) -> Path:
        return self.audit_head_file or self.policy.parent / f"{self.site_id}-audit.head"

    @property
    def audit_key(self) -> Path:
        return self.audit_key_file or self.audit_head.with_suffix(".key")


SITE_FILE_HEADER = "# twinfed site node (see docs/hospital-it.md). Relative paths are taken from this folder.\n"
POLICY_FILE_HEADER = "# The data steward's policy (see docs/data-steward.md); binding on every study at this site.\n"


def write_site_folder(
    folder: Path,
    site_id: str,
    omop_url: str,
    secret_file: str | Path,
    policy: Mapping[str, object],
    *,
    omop_schema: str | None = None,
    name: str = "",
) -> Path:
    """A site folder in the one layout every site uses: site.yaml and policy.yaml, the governance database
    (governance.sqlite, created on first use) and the audit head file beside them. Returns the site file.

    `secret_file` is written as given: relative paths are taken from the folder, like every path here.
    """
    folder.mkdir(parents=True, exist_ok=True)
    omop: dict[str, object] = {"url": omop_url}
    if omop_schema:
        omop["schema"] = omop_schema
    site: dict[str, object] = {"site_id": site_id, **({"name": name} if name else {})}
    site |= {
        "omop": omop,
        "governance_db": "sqlite:///governance.sqlite",
        "policy": "policy.yaml",
        "secret_file": str(secret_file),
        "audit_head_file": "audit.head",
    }
    (folder / "policy.yaml").write_text(
        POLICY_FILE_HEADER + yaml.safe_dump(dict(policy), sort_keys=False), encoding="utf-8"
    )
    site_file = folder / "site.yaml"
    site_file.write_text(SITE_FILE_HEADER + yaml.safe_dump(site, sort_keys=False), encoding="utf-8")
    return site_file


def derive_split_key(secret_file: Path) -> bytes:
    """A key derived from the site secret: the split is stable per patient and unknowable elsewhere."""
    secret, _ = load_or_create_secret(secret_file, create=False)
    return hmac.new(secret, b"twinfed train/validation/test split v1", hashlib.sha256).digest()


def _resolve_url(url: str, base: Path) -> str:
    """Make a relative SQLite path absolute against the config folder; other URLs pass through."""
    parsed = make_url(normalise_url(url))
    if parsed.get_backend_name() == "sqlite" and parsed.database and not Path(parsed.database).is_absolute():
        return f"sqlite:///{(base / parsed.database).resolve()}"
    return url


def load_site_config(path: Path) -> SiteConfig:
    """Read and validate a site file; relative paths are taken from the file's folder.

    Every problem is a `SiteConfigError` naming the file and the field; the values given are not repeated
    (a database URL may carry a password).
    """
    path = Path(path)
    raw = read_yaml_file(path, SITE_FILE, SiteConfigError)
    if not isinstance(raw, dict):
        raise SiteConfigError(f"{path}: a site configuration is a mapping (site_id, omop, governance_db, policy, ...)")
    try:
        config = SiteConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(describe(exc, SiteConfig, "site file", show_values=False))
        raise SiteConfigError(f"{path}: the site configuration is not valid: {problems}") from None
    try:
        base = path.resolve().parent
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python 3.11)
        raise SiteConfigError(f"{path}: cannot find the site file's folder: {exc}") from None

    def local(p: Path | None) -> Path | None:
        return None if p is None else (p if p.is_absolute() else (base / p).resolve())

    try:
        return config.model_copy(
            update={
                "omop": config.omop.model_copy(update={"url": _resolve_url(config.omop.url, base)}),
                "governance_db": _resolve_url(config.governance_db, base),
                "policy": local(config.policy),
                "secret_file": local(config.secret_file),
                "audit_head_file": local(config.audit_head_file),
                "audit_key_file": local(config.audit_key_file),
                "base_dir": base,
            }
        )
    except (ArgumentError, OSError, RuntimeError, ValueError) as exc:  # a path that cannot be resolved
        raise SiteConfigError(f"{path}: a path in the site file cannot be resolved: {type(exc).__name__}") from None
