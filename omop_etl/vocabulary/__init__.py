"""The vocabulary subset bundled with twinfed, and the code-system URIs FHIR uses for each vocabulary.

The bundled subset is small (core_concepts.csv plus a few verified procedure concepts) and is loaded
once per process. It is the source of every code the synthetic generator emits, so generated data and
the vocabulary the ETL loads can never drift apart.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from omop_etl.vocabulary.check_digits import is_valid_loinc, is_valid_snomed

__all__ = [
    "FHIR_SYSTEM_BY_VOCABULARY",
    "VOCABULARY_BY_FHIR_SYSTEM",
    "Concept",
    "ConceptCatalog",
    "bundled_catalog",
    "is_valid_loinc",
    "is_valid_snomed",
]

FHIR_SYSTEM_BY_VOCABULARY: dict[str, str] = {
    "LOINC": "http://loinc.org",
    "SNOMED": "http://snomed.info/sct",
    "RxNorm": "http://www.nlm.nih.gov/research/umls/rxnorm",
    "UCUM": "http://unitsofmeasure.org",
}
VOCABULARY_BY_FHIR_SYSTEM: dict[str, str] = {
    **{uri: vocab for vocab, uri in FHIR_SYSTEM_BY_VOCABULARY.items()},
    # Code systems hospitals send that the bundled subset does not hold but a full Athena load does.
    "http://hl7.org/fhir/sid/icd-10-cm": "ICD10CM",
    "http://hl7.org/fhir/sid/icd-10": "ICD10",
    "http://hl7.org/fhir/sid/icd-9-cm": "ICD9CM",
    "http://hl7.org/fhir/sid/cvx": "CVX",
    "http://hl7.org/fhir/sid/ndc": "NDC",
    "http://www.ama-assn.org/go/cpt": "CPT4",
}

_BUNDLED_FILES = ("core_concepts.csv", "supplementary_concepts.csv")


@dataclass(frozen=True, slots=True)
class Concept:
    """One row of the OMOP CONCEPT table (the columns twinfed uses)."""

    concept_id: int
    concept_name: str
    domain_id: str
    vocabulary_id: str
    concept_class_id: str
    standard_concept: str
    concept_code: str

    @property
    def fhir_system(self) -> str:
        """The FHIR `Coding.system` URI for this concept's vocabulary."""
        return FHIR_SYSTEM_BY_VOCABULARY[self.vocabulary_id]


class ConceptCatalog:
    """Look concepts up by OMOP id or by (vocabulary, source code)."""

    def __init__(self, concepts: list[Concept]) -> None:
        self._by_id = {c.concept_id: c for c in concepts}
        self._by_code = {(c.vocabulary_id, c.concept_code): c for c in concepts if c.concept_code}

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self):
        return iter(self._by_id.values())

    def by_id(self, concept_id: int) -> Concept:
        """The concept with this id; KeyError names the id when it is not bundled."""
        try:
            return self._by_id[concept_id]
        except KeyError:
            raise KeyError(f"concept_id {concept_id} is not in the bundled vocabulary") from None

    def by_code(self, vocabulary_id: str, code: str) -> Concept | None:
        """The concept for a source code, or None when the code is unknown to this vocabulary subset."""
        return self._by_code.get((vocabulary_id, code))

    def by_fhir_coding(self, system: str, code: str) -> Concept | None:
        """The concept for a FHIR Coding (system URI + code), or None when unknown."""
        vocabulary_id = VOCABULARY_BY_FHIR_SYSTEM.get(system)
        return None if vocabulary_id is None else self.by_code(vocabulary_id, code)


@lru_cache(maxsize=1)
def bundled_catalog() -> ConceptCatalog:
    """The bundled vocabulary subset, read once per process."""
    concepts: list[Concept] = []
    package = resources.files("omop_etl.vocabulary")
    for name in _BUNDLED_FILES:
        with package.joinpath(name).open(encoding="utf-8", newline="") as handle:
            for row in csv.DictReader(handle):
                concepts.append(
                    Concept(
                        concept_id=int(row["concept_id"]),
                        concept_name=row["concept_name"],
                        domain_id=row["domain_id"],
                        vocabulary_id=row["vocabulary_id"],
                        concept_class_id=row["concept_class_id"],
                        standard_concept=row["standard_concept"],
                        concept_code=row["concept_code"],
                    )
                )
    return ConceptCatalog(concepts)
