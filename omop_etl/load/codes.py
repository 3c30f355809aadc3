"""Source codes -> OMOP concepts, the OHDSI way, with a cache so each distinct code is looked up once.

For a FHIR coding (system, code): find the source concept by vocabulary and code; if it is standard
it is its own target, else follow its 'Maps to' relationship to a standard concept; codes the
vocabulary does not hold may be mapped by the site in `source_to_concept_map`. A code that maps
nowhere gets concept_id 0 and keeps its source value (OHDSI convention), and is counted.

Which vocabulary a system is: the FHIR systems of OMOP vocabularies are known (VOCABULARY_BY_FHIR_SYSTEM);
any other system is a site's local code system, found by the `vocabulary` row whose vocabulary_reference is
the system URI (what `twinfed vocab map --system URI --vocabulary-id ID` writes), or else taken as the
vocabulary id itself when it fits varchar(20) (e.g. `code_system: ASTER-LAB` in a CSV mapping). Codes
mapped by `source_to_concept_map` are counted too, so the load report says how much the site's own
mappings carried.
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
    by_site_map: bool = False  # the target came from the site's source_to_concept_map


UNMAPPED = Resolved(0, 0, UNMAPPED_DOMAIN)
VOCABULARY_ID_LENGTH = 20  # varchar(20): a system this short may be its own source_vocabulary_id


def _table(metadata: MetaData, name: str):
    return next(t for t in metadata.tables.values() if t.name == name)


class CodeResolver:
    """Resolves (system, code) pairs in bulk against the database vocabulary."""

    def __init__(self, metadata: MetaData) -> None:
        self._concept = _table(metadata, "concept")
        self._relationship = _table(metadata, "concept_relationship")
        self._stcm = _table(metadata, "source_to_concept_map")
        self._vocabulary_table = _table(metadata, "vocabulary")
        self._cache: dict[tuple[str, str], Resolved] = {}
        self._local: dict[str, str | None] = {}  # local FHIR system -> vocabulary_id (None: not a vocabulary)
        self.unmapped: Counter[tuple[str, str]] = Counter()
        self.site_mapped: Counter[tuple[str, str]] = Counter()  # codes mapped by source_to_concept_map

    def vocabulary_of(self, connection: Connection, systems: set[str]) -> dict[str, str | None]:
        """The vocabulary_id of each FHIR system: an OMOP vocabulary's, a registered local one, or the system text
        itself when it is short enough to be a vocabulary id (None when it is none of these)."""
        unknown = {s for s in systems if s not in VOCABULARY_BY_FHIR_SYSTEM and s not in self._local}
        if unknown:
            vocabulary = self._vocabulary_table
            registered: dict[str, str] = {}
            names = sorted(unknown)
            for start in range(0, len(names), 500):
                query = (
                    select(vocabulary.c.vocabulary_reference, vocabulary.c.vocabulary_id)
                    .where(vocabulary.c.vocabulary_reference.in_(names[start : start + 500]))
                    .order_by(vocabulary.c.vocabulary_id)
                )
                for reference, vocabulary_id in connection.execute(query):
                    registered.setdefault(reference, vocabulary_id)
            for system in unknown:
                fallback = system if 0 < len(system) <= VOCABULARY_ID_LENGTH else None
                self._local[system] = registered.get(system, fallback)
        return {s: VOCABULARY_BY_FHIR_SYSTEM.get(s) or self._local.get(s) for s in systems}

    def resolve(self, connection: Connection, codes: set[tuple[str, str]]) -> dict[tuple[str, str], Resolved]:
        """Resolve every (system, code); new ones are looked up with a few queries per vocabulary."""
        missing = [c for c in codes if c not in self._cache]
        vocabularies = self.vocabulary_of(connection, {system for system, _ in missing})
        by_vocabulary: dict[str, dict[str, set[str]]] = {}  # vocabulary -> code -> systems asking for it
        for system, code in missing:
            vocabulary = vocabularies[system]
            if vocabulary is None:
                self._cache[(system, code)] = UNMAPPED
            else:
                by_vocabulary.setdefault(vocabulary, {}).setdefault(code, set()).add(system)
        system_of: dict[str, list[str]] = {}
        for system, vocabulary in VOCABULARY_BY_FHIR_SYSTEM.items():
            system_of.setdefault(vocabulary, []).append(system)
        for vocabulary, asked in by_vocabulary.items():
            found = self._lookup(connection, vocabulary, sorted(asked))
            for code, systems in asked.items():
                result = found.get(code, UNMAPPED)
                for system in systems | set(system_of.get(vocabulary, ())):
                    self._cache[(system, code)] = result
        return {c: self._cache[c] for c in codes}

    def count_unmapped(self, system: str, code: str) -> None:
        self.unmapped[(system, code)] += 1

    def count_site_mapped(self, system: str, code: str) -> None:
        self.site_mapped[(system, code)] += 1

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
                    select(stcm.c.source_code, stcm.c.target_concept_id, concept.c.domain_id, stcm.c.source_concept_id)
                    .select_from(stcm.outerjoin(concept, concept.c.concept_id == stcm.c.target_concept_id))
                    .where(stcm.c.source_vocabulary_id == vocabulary, stcm.c.source_code.in_(unresolved))
                    .where(stcm.c.invalid_reason.is_(None))
                )
                # Several targets for one code: the lowest non-zero concept id wins (documented simplification).
                best: dict[str, tuple[int, str | None, int]] = {}
                for code, target_id, domain, stcm_source_id in rows:
                    target = int(target_id)
                    kept = best.get(code)
                    if kept is None or (target and (not kept[0] or target < kept[0])):
                        best[code] = (target, domain, int(stcm_source_id or 0))
                for code, (target, domain, stcm_source_id) in best.items():
                    source_id = found[code].source_concept_id if code in found else stcm_source_id
                    found[code] = Resolved(source_id, target, domain or UNMAPPED_DOMAIN, by_site_map=bool(target))
        return found
