"""The one error a cohort build raises for problems with the site's data or the request."""

from __future__ import annotations


class CohortError(ValueError):
    """The cohort cannot be built from this database; the message says what is wrong and what to check.

    A ValueError because the cause is the input (the database content, the schema name, the key), not a
    fault of the program: the site node reports it to the data steward instead of retrying.
    """
