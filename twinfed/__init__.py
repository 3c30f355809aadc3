"""twinfed: federated learning for multi-hospital digital twins.

This module is only the console front door; the work lives in `omop_etl`, `site_node` and `federation`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("twinfed")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
