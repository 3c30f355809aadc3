"""Imports run one way (DESIGN.md): site_node -> omop_etl, federation; federation -/-> site_node;
omop_etl imports neither; the synthetic generator imports only omop_etl's vocabulary and units, and no
product package imports the generator. A violation would let coordinator code reach site data, or make
a site's behaviour depend on the stand-in for its EHR."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "omop_etl": {"site_node", "federation", "twinfed", "synthetic"},
    "federation": {"site_node", "twinfed", "synthetic"},
    "site_node": {"twinfed", "synthetic"},
    "synthetic": {"site_node", "federation", "twinfed"},
}
SYNTHETIC_MAY_IMPORT = ("omop_etl.vocabulary", "omop_etl.units")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_run_one_way(package):
    offenders = [
        f"{path.relative_to(ROOT)} imports {sorted(_imports(path) & FORBIDDEN[package])}"
        for path in sorted((ROOT / package).rglob("*.py"))
        if _imports(path) & FORBIDDEN[package]
    ]
    assert not offenders, offenders


def _modules(path: Path) -> set[str]:
    """Every absolute module a file imports, whole (omop_etl.vocabulary.check_digits, not omop_etl)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_the_generator_takes_only_vocabulary_and_units_from_the_data_layer():
    offenders = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in sorted((ROOT / "synthetic").rglob("*.py"))
        for module in sorted(_modules(path))
        if module.startswith("omop_etl")
        and not any(module == allowed or module.startswith(allowed + ".") for allowed in SYNTHETIC_MAY_IMPORT)
    ]
    assert not offenders, offenders


SITE_MAY_IMPORT = ("federation.contract", "federation.twins", "federation.common")
SHARED_LAYERS = ("contract", "twins", "common")  # what both sides import must not pull the coordinator in


def _federation_offenders(package_root: Path, allowed: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in sorted(package_root.rglob("*.py"))
        for module in sorted(_modules(path))
        if (module == "federation" or module.startswith("federation."))
        and not any(module == a or module.startswith(a + ".") for a in allowed)
    ]


def test_a_site_imports_only_the_contract_the_twin_kinds_and_the_common_layer():
    """A site node never imports the coordinator, the deployment or the local consortium."""
    offenders = _federation_offenders(ROOT / "site_node", SITE_MAY_IMPORT)
    assert not offenders, offenders


@pytest.mark.parametrize("layer", SHARED_LAYERS)
def test_the_shared_layers_stay_below_the_coordinator(layer):
    allowed = {"contract": ("federation.contract", "federation.common"),
               "twins": ("federation.contract", "federation.twins", "federation.common"),
               "common": ("federation.common",)}[layer]  # fmt: skip
    offenders = _federation_offenders(ROOT / "federation" / layer, allowed)
    assert not offenders, offenders
