"""CSV extracts from a data warehouse, loaded through a YAML column mapping.

Many hospitals start from a warehouse dump rather than a FHIR server. A mapping file says which CSV
it describes and which column holds what; each row then becomes the same draft a FHIR record would,
and goes through the same checks, code mapping, unit conversion, quarantine and id map:

    # labs.yaml
    file: labs.csv                 # relative to this YAML file
    kind: measurement              # measurement | observation | condition | drug | procedure
    id: lab_id                     # column with a stable record id (re-runs update instead of duplicating)
    patient: patient_id            # column with the patient id ...
    patient_id_is: mrn             # ... as a FHIR Patient id (fhir_id) or a medical record number (mrn)
    code: loinc                    # column with the code ...
    code_system: http://loinc.org  # ... and its code system (or code_system_column)
    value: value                   # optional: numeric value
    unit: unit                     # optional: UCUM unit
    time: taken_at                 # ISO date or date-time
    encounter: encounter_id        # optional: FHIR Encounter id
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from omop_etl.fhir.drafts import EventDraft
from omop_etl.fhir.mappers.base import Reject, check_code_format, date_parts
from omop_etl.load.batches import Batch, Extracted

KIND_TO_DRAFT = {
    "measurement": "observation",
    "observation": "observation",
    "condition": "condition",
    "drug": "drug",
    "procedure": "procedure",
}
HINT = {
    "measurement": "lab",
    "observation": "ehr",
    "condition": "encounter-diagnosis",
    "drug": "administration",
    "procedure": "procedure",
}


class CsvMapping(BaseModel):
    """A YAML column mapping for one CSV extract."""

    model_config = ConfigDict(extra="forbid")

    file: str
    kind: Literal["measurement", "observation", "condition", "drug", "procedure"]
    id: str
    patient: str
    patient_id_is: Literal["fhir_id", "mrn"] = "fhir_id"
    code: str
    code_system: str | None = None
    code_system_column: str | None = None
    value: str | None = None
    unit: str | None = None
    time: str
    end_time: str | None = None
    encounter: str | None = None
    delimiter: str = ","

    @model_validator(mode="after")
    def _system(self) -> CsvMapping:
        if (self.code_system is None) == (self.code_system_column is None):
            raise ValueError("give either code_system (one system for all rows) or code_system_column")
        return self

    def columns(self) -> set[str]:
        return {
            c
            for c in (
                self.id,
                self.patient,
                self.code,
                self.code_system_column,
                self.value,
                self.unit,
                self.time,
                self.end_time,
                self.encounter,
            )
            if c
        }


class MappingError(ValueError):
    """A mapping file or its CSV does not fit together; the message names file, row and column."""


def load_mapping(path: Path) -> tuple[CsvMapping, Path]:
    """The mapping in a YAML file and the path of the CSV it describes."""
    try:
        mapping = CsvMapping.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    except (OSError, yaml.YAMLError) as exc:
        raise MappingError(f"{path}: cannot read the CSV mapping: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(file)'}: {e['msg']}" for e in exc.errors())
        raise MappingError(f"{path}: the CSV mapping is invalid: {problems}") from None
    csv_path = (path.parent / mapping.file).resolve()
    if not csv_path.is_file():
        raise MappingError(f"{path}: the CSV file {csv_path} it describes does not exist")
    try:
        with csv_path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
            header = next(csv.reader(handle, delimiter=mapping.delimiter), [])
    except (OSError, csv.Error) as exc:
        raise MappingError(f"{csv_path}: cannot read the header row of the CSV {path.name} describes: {exc}") from None
    missing = sorted(mapping.columns() - set(header))
    if missing:
        raise MappingError(f"{csv_path}: columns {', '.join(missing)} named in {path.name} are not in the header")
    return mapping, csv_path


def is_mapping_file(path: Path) -> bool:
    """A YAML file that looks like a CSV mapping (has `file:` and `kind:`)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "file" in data and "kind" in data


def _not_utf8(header: list[str], values: list[str]) -> str | None:
    """The first column holding bytes that are not UTF-8 (read as surrogate escapes), or None.

    The CSV is decoded with errors="surrogateescape" so that one badly encoded row is one quarantined
    record instead of an error that loses the rows decoded with it.
    """
    for number, value in enumerate(values):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return header[number] if number < len(header) else f"#{number + 1}"
    return None


def extract_csv(batch: Batch, mapping: CsvMapping) -> Extracted:
    """Rows of a CSV batch (already split by the csv module, header in batch.header) -> drafts."""
    out = Extracted(batch.file_id, batch.file_name, batch.batch_no, "row")
    header = batch.header or []
    rows = (dict(zip(header, values, strict=False)) for values in batch.rows)
    resource_type = f"CSV:{mapping.kind}"
    for offset, row in enumerate(rows):
        position = batch.first_position + offset
        raw = mapping.delimiter.join(batch.rows[offset]).encode("utf-8", "surrogateescape")
        bad_column = _not_utf8(header, batch.rows[offset])
        record_id = (row.get(mapping.id) or "").strip() if bad_column is None else ""
        index = out.add(position, resource_type, record_id or None, raw)
        try:
            if bad_column is not None:
                raise Reject(
                    "invalid_encoding",
                    f"row {position} of {Path(batch.file_name).name} is not UTF-8 text (column {bad_column}); "
                    "save the extract as UTF-8 and re-run the load",
                )
            if not record_id:
                raise Reject("missing_value", f"column {mapping.id} (the record id) is empty")
            patient = (row.get(mapping.patient) or "").strip()
            if not patient:
                raise Reject("missing_reference", f"column {mapping.patient} (the patient) is empty")
            patient_ref = f"MRN:{patient}" if mapping.patient_id_is == "mrn" else patient
            system = mapping.code_system or (row.get(mapping.code_system_column or "") or "").strip()
            code = (row.get(mapping.code) or "").strip()
            if not system or not code:
                raise Reject("missing_code", f"column {mapping.code} (or its code system) is empty")
            check_code_format(system, code)
            start, start_dt = date_parts((row.get(mapping.time) or "").strip() or None, mapping.time)
            if start is None:
                raise Reject("missing_date", f"column {mapping.time} is empty")
            end, end_dt = date_parts((row.get(mapping.end_time or "") or "").strip() or None, mapping.end_time or "")
            value = None
            if mapping.value and (row.get(mapping.value) or "").strip():
                try:
                    value = float(row[mapping.value])
                except ValueError:
                    raise Reject(
                        "schema_violation", f"column {mapping.value} holds '{row[mapping.value]}', not a number"
                    ) from None
            unit = (row.get(mapping.unit or "") or "").strip() or None
            encounter = (row.get(mapping.encounter or "") or "").strip() or None
        except Reject as reject:
            out.quarantine(index, reject.rule, reject.detail)
            continue
        out.patients[index] = patient_ref
        out.drafts.append(
            EventDraft(
                record=index,
                kind=KIND_TO_DRAFT[mapping.kind],
                key=f"CSV/{Path(mapping.file).name}/{record_id}",
                patient_ref=patient_ref,
                encounter_ref=encounter,
                code=(system, code, ""),
                start=start,
                start_datetime=start_dt,
                end=end,
                end_datetime=end_dt,
                type_hint=HINT[mapping.kind],
                value=value,
                unit_code=unit,
            )
        )
    if batch.damage is not None:
        rule, reason = batch.damage
        position = batch.first_position + len(batch.rows)
        index = out.add(position, resource_type, None, b"")
        detail = (
            f"{Path(batch.file_name).name} cannot be read from data row {position} on: {reason}. The rows before "
            "were read; save the extract again as UTF-8 CSV and re-run the load."
        )
        out.quarantine(index, rule, detail)
    for index, status in enumerate(out.status):
        if status == "skipped":
            out.raw.pop(index, None)
    return out
