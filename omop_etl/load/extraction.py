"""Which extractor a batch goes to (the worker processes' entry point): CSV rows to the CSV extractor, a
Bundle or NDJSON lines to the FHIR extractor.
"""

from __future__ import annotations

from omop_etl.fhir.extract import extract_bundle, extract_ndjson
from omop_etl.load.batches import Batch, Extracted
from omop_etl.load.csv_extract import extract_csv


def extract_batch(batch: Batch) -> Extracted:
    """Worker entry point."""
    if batch.kind == "csv":
        return extract_csv(batch, batch.mapping)
    return extract_bundle(batch) if batch.kind == "bundle" else extract_ndjson(batch)
