"""Source EHR data into OMOP CDM v5.4, and the synthetic consortium that stands in for real hospitals.

This package imports neither `site_node` nor `federation`.
"""
