"""What a hospital runs: site configuration and policy, consent, privacy ledger, audit log, local DP training.

This package may import `omop_etl` and `federation` (the study contract); nothing imports it.
"""
