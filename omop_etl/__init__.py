"""Source EHR data into OMOP CDM v5.4: schema, vocabulary, FHIR R4 and CSV extraction, load, data quality.

This package imports neither `site_node`, `federation` nor the synthetic generator.
"""
