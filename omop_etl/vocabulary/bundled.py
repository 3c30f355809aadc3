"""Load the bundled vocabulary subset into the CDM vocabulary tables of an empty OMOP database.

The ETL resolves every source code through CONCEPT and CONCEPT_RELATIONSHIP ('Maps to'). A fresh
database (tests, the demo, a site that has not loaded Athena yet) would otherwise resolve nothing, so
the first load writes the small subset twinfed ships. A site that loaded its own Athena download keeps
it: this loader writes only into an empty CONCEPT table and never touches a full vocabulary.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import MetaData, Table, delete, select
from sqlalchemy.engine import Connection

from omop_etl.bulk import insert_rows
from omop_etl.vocabulary import bundled_catalog

__all__ = ["BUNDLED_VOCABULARY_VERSION", "load_bundled_vocabulary"]

# Short on purpose: cdm_source.vocabulary_version is varchar(20), and it is copied from the 'None' row.
BUNDLED_VOCABULARY_VERSION = "twinfed bundled v1"

VALID_START = dt.date(1970, 1, 1)
VALID_END = dt.date(2099, 12, 31)

# Names and references as Athena's VOCABULARY.csv spells them (to our knowledge). vocabulary_concept_id is
# written as 0 for every row: the real ids of the vocabulary concepts (domain 'Metadata') are not verified
# against an Athena release, and a wrong id would be worse than the "no matching concept" id.
_VOCABULARY_INFO: dict[str, tuple[str, str]] = {
    "None": ("OMOP Standardized Vocabularies", "OMOP generated"),
    "LOINC": (
        "Logical Observation Identifiers Names and Codes (Regenstrief Institute)",
        "http://loinc.org/downloads/loinc",
    ),
    "SNOMED": (
        "Systematic Nomenclature of Medicine - Clinical Terms (IHTSDO)",
        "http://www.nlm.nih.gov/research/umls/licensedcontent/snomedctfiles.html",
    ),
    "RxNorm": ("RxNorm (NLM)", "http://www.nlm.nih.gov/research/umls/rxnorm/docs/rxnormfiles.html"),
    "UCUM": (
        "Unified Code for Units of Measure (Regenstrief Institute)",
        "http://aurora.regenstrief.org/~ucum/ucum.html#section-Alphabetic-Index",
    ),
    "Gender": ("OMOP Gender", "OMOP generated"),
    "Race": ("Race and Ethnicity Code Set (USBC)", "http://www.cdc.gov/nchs/data/dvs/Race_Ethnicity_CodeSet.pdf"),
    "Ethnicity": ("OMOP Ethnicity", "OMOP generated"),
    "Visit": ("OMOP Visit", "OMOP generated"),
    "Type Concept": ("OMOP Type Concept", "OMOP generated"),
    "CDM": ("OMOP Common DataModel", "https://github.com/OHDSI/CommonDataModel"),
}

_CONCEPT_COLUMNS = (
    "concept_id", "concept_name", "domain_id", "vocabulary_id", "concept_class_id", "standard_concept",
    "concept_code", "valid_start_date", "valid_end_date", "invalid_reason",
)  # fmt: skip
_VOCABULARY_COLUMNS = (
    "vocabulary_id", "vocabulary_name", "vocabulary_reference", "vocabulary_version", "vocabulary_concept_id",
)  # fmt: skip
_RELATIONSHIP_COLUMNS = (
    "concept_id_1", "concept_id_2", "relationship_id", "valid_start_date", "valid_end_date", "invalid_reason",
)  # fmt: skip


def cdm_table(metadata: MetaData, name: str) -> Table:
    """The CDM table `name` of `metadata`, whose keys carry the schema (`cdm.concept`) when one is set."""
    key = f"{metadata.schema}.{name}" if metadata.schema else name
    table = metadata.tables.get(key)
    if table is None:
        table = next((t for t in metadata.tables.values() if t.name == name), None)
    if table is None:
        raise KeyError(f"The CDM metadata has no table '{name}'; build it with omop_etl.schema.cdm_metadata().")
    return table


def load_bundled_vocabulary(connection: Connection, metadata: MetaData) -> int:
    """Write the bundled concepts, their vocabularies and 'Maps to' rows when CONCEPT is empty.

    Returns the number of rows written, or 0 when CONCEPT already holds concepts (a previous bundled load
    or a site's Athena vocabulary, which must never be mixed with or replaced by this subset). Runs in the
    caller's transaction, so the three tables are written together or not at all.
    """
    concept = cdm_table(metadata, "concept")
    if connection.execute(select(concept.c.concept_id).limit(1)).first() is not None:
        return 0
    vocabulary = cdm_table(metadata, "vocabulary")
    relationship = cdm_table(metadata, "concept_relationship")

    concepts = sorted(bundled_catalog(), key=lambda c: c.concept_id)
    concept_rows: list[tuple[object, ...]] = [
        (0, "No matching concept", "Metadata", "None", "Undefined", None, "No matching concept",
         VALID_START, VALID_END, None),
    ]  # fmt: skip
    concept_rows += [
        (c.concept_id, c.concept_name, c.domain_id, c.vocabulary_id, c.concept_class_id, c.standard_concept or None,
         c.concept_code, VALID_START, VALID_END, None)
        for c in concepts
    ]  # fmt: skip

    vocabulary_ids = sorted({"None", *(c.vocabulary_id for c in concepts)})
    vocabulary_rows = []
    for vocabulary_id in vocabulary_ids:
        name, reference = _VOCABULARY_INFO.get(vocabulary_id, (vocabulary_id, "twinfed bundled subset"))
        vocabulary_rows.append((vocabulary_id, name, reference, BUNDLED_VOCABULARY_VERSION, 0))

    # OHDSI convention: every standard concept 'Maps to' itself, so the ETL resolves a source code the same
    # way whether it is standard already (LOINC, SNOMED) or needs mapping (ICD10CM in a full vocabulary).
    relationship_rows = [
        (c.concept_id, c.concept_id, "Maps to", VALID_START, VALID_END, None)
        for c in concepts
        if c.standard_concept == "S"
    ]

    # CONCEPT is empty, so any vocabulary rows are leftovers (e.g. a hand-made table); replace ours.
    connection.execute(delete(vocabulary).where(vocabulary.c.vocabulary_id.in_(vocabulary_ids)))
    written = insert_rows(connection, concept, concept_rows, _CONCEPT_COLUMNS)
    written += insert_rows(connection, vocabulary, vocabulary_rows, _VOCABULARY_COLUMNS)
    written += insert_rows(connection, relationship, relationship_rows, _RELATIONSHIP_COLUMNS)
    return written
