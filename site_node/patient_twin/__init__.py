"""The patient twin at its hospital (issue 12): `PatientTwin` answers one patient's forecast and what-if
scenarios from the study's model, at the site only; `TwinSite` is the site as a query sees it;
`load_scenarios` reads scenario files.

The names are loaded on first use (PEP 562): `twinfed --help` and every other command import this
package's command module, and must not pay for torch to do so.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from site_node.patient_twin.answer import TwinAnswer
    from site_node.patient_twin.query import PatientTwin, TwinQueryError, TwinSite, resolve_person
    from site_node.patient_twin.scenario import Scenario, ScenarioError, load_scenarios

_WHERE = {
    "PatientTwin": "query",
    "TwinAnswer": "answer",
    "TwinQueryError": "query",
    "TwinSite": "query",
    "resolve_person": "query",
    "Scenario": "scenario",
    "ScenarioError": "scenario",
    "load_scenarios": "scenario",
}

__all__ = ["PatientTwin", "Scenario", "ScenarioError", "TwinAnswer", "TwinQueryError", "TwinSite", "load_scenarios",
           "resolve_person"]  # fmt: skip


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"site_node.patient_twin.{_WHERE[name]}"), name)
