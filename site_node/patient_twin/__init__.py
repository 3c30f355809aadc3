"""The patient twin at its hospital (issue 12): `PatientTwin` answers one patient's forecast and what-if
scenarios from the study's model, at the site only; `load_scenarios` reads scenario files."""

from site_node.patient_twin.query import PatientTwin, TwinAnswer, TwinQueryError, resolve_person
from site_node.patient_twin.scenario import Scenario, ScenarioError, load_scenarios

__all__ = ["PatientTwin", "Scenario", "ScenarioError", "TwinAnswer", "TwinQueryError", "load_scenarios",
           "resolve_person"]  # fmt: skip
