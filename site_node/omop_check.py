"""The site node's side of onboarding an OMOP database: which concepts a study needs, the doctor's OMOP
checks, and the site secret `twinfed site init` uses or creates.

The OMOP checks themselves are in omop_etl.cdm_check (they are about OMOP only); this module adds what only
the site node knows: the study (its concept ids) and the site secret's place in a site folder. The CLI
renders what these functions return.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from federation.common.diagnostics import Check
from federation.contract import StudyError, StudySpec, load_study
from omop_etl.cdm_check import check_cdm, stored_secret_fingerprint
from omop_etl.database import DatabaseUnavailable, missing_sqlite_file, normalise_url, open_engine, redact
from omop_etl.identity import SecretError, SiteKeys, load_or_create_secret, secret_path

EXAMPLE_STUDY = Path(__file__).resolve().parents[1] / "configs" / "study-inpatient-mortality.yaml"
GENDER_CONCEPTS = {8507: "gender: male", 8532: "gender: female"}


def study_concepts(spec: StudySpec) -> dict[int, str]:
    """Every concept id a study names (cohort, covariates, outcome; gender when it is a covariate), labelled.

    Walks the spec rather than listing its fields, so a covariate kind added later is checked too: any
    field whose name ends in `concept_ids` counts, labelled with the nearest `name` (the covariate) or the
    field's path.
    """
    found: dict[int, str] = {}

    def walk(value: object, path: str, label: str | None) -> None:
        if isinstance(value, BaseModel):
            name = getattr(value, "name", None)
            here = name if isinstance(name, str) and name else label
            for field in type(value).model_fields:
                walk(getattr(value, field), f"{path}.{field}" if path else field, here)
                if field.endswith("concept_ids"):
                    for concept_id in getattr(value, field) or []:
                        found.setdefault(int(concept_id), here or (f"{path}.{field}" if path else field))
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item, path, label)

    walk(spec, "", None)
    if "gender" in spec.covariates.demographics:
        for concept_id, label in GENDER_CONCEPTS.items():
            found.setdefault(concept_id, label)
    return found


def omop_checks(
    db: str, schema: str | None = None, study: Path | None = None, secret_file: Path | None = None
) -> list[Check]:
    """The doctor's OMOP rows: tables and columns, cdm_source, the study's concepts, row counts, the secret.

    `study` defaults to the example study shipped in configs/ (when present in this installation).
    """
    checks: list[Check] = []
    concepts: dict[int, str] = {}
    path = study or EXAMPLE_STUDY
    if path.exists():
        try:
            spec = load_study(path)
            concepts = study_concepts(spec)
        except StudyError as exc:
            checks.append(Check("study concepts", "fail", f"Cannot read the study to check its concepts: {exc}"))
    elif study is not None:
        checks.append(Check("study concepts", "fail", f"There is no study file {study}."))
    else:
        checks.append(
            Check("study concepts", "warn", "the example study is not in this installation; pass --study FILE")
        )
    report = check_cdm(db, schema, concepts, secret_file)
    checks.extend(Check(f.name, f.status, f.detail) for f in report.findings)
    return checks


class SiteSecretError(RuntimeError):
    """The site secret cannot be used for this site; the message says which file to use instead."""


class SiteSecret(BaseModel):
    """The secret a new site node uses: where it is, whether it was created now, and how it was checked."""

    model_config = ConfigDict(frozen=True)

    path: Path
    created: bool
    fingerprint: str
    database_fingerprint: str | None = None  # what `twinfed etl` stored in the OMOP database, if it loaded it
    database_note: str = ""  # why the secret could not be compared with the database, if it could not


def _database_fingerprint(omop_url: str, omop_schema: str | None) -> tuple[str | None, str]:
    """(fingerprint stored by `twinfed etl`, note when the database could not be read). Never creates a file."""
    if missing_sqlite_file(omop_url) is not None:
        return None, f"the OMOP database file of {redact(omop_url)} does not exist yet"
    try:
        engine = open_engine(omop_url)
    except DatabaseUnavailable as exc:
        return None, str(exc)
    try:
        with engine.connect() as connection:
            return stored_secret_fingerprint(connection, omop_schema), ""
    except Exception as exc:
        reason = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or ["error"])[0]
        return None, f"{redact(omop_url)} could not be read ({reason})"
    finally:
        engine.dispose()


def _in_folder(url: str, folder: Path | None) -> str:
    """A relative SQLite path as the site file will read it: relative to the site folder."""
    try:
        parsed = make_url(normalise_url(url))
    except ArgumentError:
        return url
    if folder is None or parsed.get_backend_name() != "sqlite" or not parsed.database:
        return url
    path = Path(parsed.database)
    return url if path.is_absolute() or parsed.database == ":memory:" else f"sqlite:///{(folder / path).resolve()}"


def provide_site_secret(
    secret_file: Path | None, omop_url: str, omop_schema: str | None = None, site_folder: Path | None = None
) -> SiteSecret:
    """Use the secret at `secret_file` (default: $TWINFED_SITE_SECRET_FILE or ~/.config/twinfed/site-secret,
    the ETL's default too), or create it there (mode 0600) when it does not exist.

    When `twinfed etl` loaded the OMOP database, the database holds the fingerprint of its secret: a
    different existing secret is refused, and so is creating a new one, because the site node would then
    split the patients differently from the secret the data was keyed with. A relative SQLite path in
    `omop_url` is taken from `site_folder`, as the site file takes it. Raises SiteSecretError.
    """
    path = secret_path(secret_file).expanduser().resolve()
    omop_url = _in_folder(omop_url, site_folder)
    stored, note = _database_fingerprint(omop_url, omop_schema)
    where = redact(omop_url) + (f" (schema {omop_schema})" if omop_schema else "")
    if path.exists():
        try:
            secret, _ = load_or_create_secret(path, create=False)
        except SecretError as exc:
            raise SiteSecretError(str(exc)) from None
        fingerprint = SiteKeys(secret).fingerprint
        if stored is not None and stored != fingerprint:
            raise SiteSecretError(
                f"The site secret {path} (fingerprint {fingerprint[:12]}) is not the one twinfed etl loaded the OMOP "
                f"database {where} with (fingerprint {stored[:12]}). Pass --secret-file with the secret file those "
                "loads used (twinfed etl --secret-file)."
            )
        return SiteSecret(path=path, created=False, fingerprint=fingerprint, database_fingerprint=stored,
                          database_note=note)  # fmt: skip
    if stored is not None:
        raise SiteSecretError(
            f"There is no site secret at {path}, but twinfed etl loaded the OMOP database {where} with a secret "
            f"(fingerprint {stored[:12]}). Pass --secret-file with the secret file those loads used, restoring it "
            "from backup if needed; a new secret would not match the loaded data."
        )
    try:
        secret, _ = load_or_create_secret(path, create=True)
    except OSError as exc:
        raise SiteSecretError(
            f"Cannot create the site secret at {path}: {exc.strerror or exc}. Choose a writable place with "
            "--secret-file."
        ) from None
    return SiteSecret(path=path, created=True, fingerprint=SiteKeys(secret).fingerprint, database_note=note)
