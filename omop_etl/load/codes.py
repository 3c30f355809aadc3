"""Source codes -> OMOP concepts, the OHDSI way, with a cache so each distinct code is looked up once.

For a FHIR coding (system, code): find the source concept by vocabulary and code; if it is standard
it is its own target, else follow its 'Maps to' relationship to a standard concept; codes the
vocabulary does not hold may be mapped by the site in `source_to_concept_map`. A code that maps
nowhere gets concept_id 0 and keeps its source value (OHDSI convention), and is counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from sqlalchemy import MetaData, and_, select
from sqlalchemy.engine import Connection

from omop_etl.vocabulary import VOCABULARY_BY_FHIR_SYSTEM

UNMAPPED_DOMAIN = ""


@dataclass(frozen=True)
class Resolved:
    """What a source code maps to."""

    source_concept_id: int  # the concept of the code itself (0 when the vocabulary lacks it)
    concept_id: int  # the standard concept to store (0 when unmapped)
    domain: str  # domain of the standard concept ("" when unmapped)


UNMAPPED = Resolved(0, 0, UNMAPPED_DOMAIN)


def _table(metadata: MetaData, name: str):
    return next(t for t in metadata.tables.values() if t.name == name)


class CodeResolver:
    """Resolves (system, code) pairs in bulk against the database vocabulary."""

    def __init__(self, metadata: MetaData) -> None:
        self._concept = _table(metadata, "concept")
        self._relationship = _table(metadata, "concept_relationship")
        self._stcm = _table(metadata, "source_to_concept_map")
        self._cache: dict[tuple[str, str], Resolved] = {}
        self.unmapped: Counter[tuple[str, str]] = Counter()

    def resolve(self, connection: Connection, codes: set[tuple[str, str]]) -> dict[tuple[str, str], Resolved]:
        """Resolve every (system, code); new ones are looked up with a few queries per vocabulary."""
        missing = [c for c in codes if c not in self._cache]
        by_vocabulary: dict[str, list[str]] = {}
        for system, code in missing:
            vocabulary = VOCABULARY_BY_FHIR_SYSTEM.get(system)
            if vocabulary is None:
                self._cache[(system, code)] = UNMAPPED
            else:
                by_vocabulary.setdefault(vocabulary, []).append(code)
        system_of = {}
        for system, vocabulary in VOCABULARY_BY_FHIR_SYSTEM.items():
            system_of.setdefault(vocabulary, []).append(system)
        for vocabulary, code_list in by_vocabulary.items():
            found = self._lookup(connection, vocabulary, code_list)
            for code in code_list:
                result = found.get(code, UNMAPPED)
                for system in system_of[vocabulary]:
                    self._cache[(system, code)] = result
        return {c: self._cache[c] for c in codes}

    def count_unmapped(self, system: str, code: str) -> None:
        self.unmapped[(system, code)] += 1

    def _lookup(self, connection: Connection, vocabulary: str, codes: list[str]) -> dict[str, Resolved]:
        concept, relationship = self._concept, self._relationship
        target = concept.alias("target")
        found: dict[str, Resolved] = {}
        for start in range(0, len(codes), 5000):
            chunk = codes[start : start + 5000]
            query = (
                select(
                    concept.c.concept_code,
                    concept.c.concept_id,
                    concept.c.standard_concept,
                    concept.c.domain_id,
                    target.c.concept_id,
                    target.c.domain_id,
                )
                .select_from(
                    concept.outerjoin(
                        relationship,
                        and_(
                            relationship.c.concept_id_1 == concept.c.concept_id,
                            relationship.c.relationship_id == "Maps to",
                            relationship.c.invalid_reason.is_(None),
                        ),
                    ).outerjoin(
                        target,
                        and_(target.c.concept_id == relationship.c.concept_id_2, target.c.standard_concept == "S"),
                    )
                )
                .where(concept.c.vocabulary_id == vocabulary, concept.c.concept_code.in_(chunk))
                .order_by(concept.c.concept_code, target.c.concept_id)
            )
            for code, source_id, standard, domain, target_id, target_domain in connection.execute(query):
                if code in found and found[code].concept_id:
                    continue  # several 'Maps to' targets: keep the first (documented simplification)
                if target_id is not None:
                    found[code] = Resolved(source_id, target_id, target_domain)
                elif standard == "S":
                    found[code] = Resolved(source_id, source_id, domain)
                else:
                    found[code] = Resolved(source_id, 0, UNMAPPED_DOMAIN)
            unresolved = [c for c in chunk if c not in found or not found[c].concept_id]
            if unresolved:
                stcm = self._stcm
                rows = connection.execute(
                    select(stcm.c.source_code, stcm.c.target_concept_id, concept.c.domain_id)
                    .select_from(stcm.outerjoin(concept, concept.c.concept_id == stcm.c.target_concept_id))
                    .where(stcm.c.source_vocabulary_id == vocabulary, stcm.c.source_code.in_(unresolved))
                    .where(stcm.c.invalid_reason.is_(None))
                )
                for code, target_id, domain in rows:
                    source_id = found[code].source_concept_id if code in found else 0
                    found[code] = Resolved(source_id, int(target_id), domain or UNMAPPED_DOMAIN)
        return found
