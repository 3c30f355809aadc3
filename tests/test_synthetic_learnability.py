"""The data are a useful twin testbed, not noise: outcomes depend on the state the export shows, and drug
responses can be read off the export. Features are built from the FHIR files alone, the way a modeller
without the ground truth would."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from tests.fhir_export import clean_resources, sites

FIRST_DAY = {  # LOINC -> feature: the last value recorded in the first 24 hours
    "85354-9": "sbp",
    "8867-4": "heart_rate",
    "9279-1": "resp_rate",
    "59408-5": "spo2",
    "8310-5": "temperature",
    "32693-4": "lactate",
    "2160-0": "creatinine",
    "6690-2": "wbc",
    "1988-5": "crp",
    "1751-7": "albumin",
}
TO_CANONICAL = {"[degF]": lambda v: (v - 32) * 5 / 9, "umol/L": lambda v: v / 88.42, "mmol/L": lambda v: v * 18.016}


def _hours(stamp: str) -> float:
    return dt.datetime.fromisoformat(stamp).replace(tzinfo=None).timestamp() / 3600


def _value(quantity: dict) -> float:
    convert = TO_CANONICAL.get(quantity["code"])
    return convert(quantity["value"]) if convert else quantity["value"]


def _stays_with_first_day_features(out) -> pd.DataFrame:
    frames = []
    for site_id, export_dir, truth in sites(out):
        births = {p["id"]: dt.date.fromisoformat(p["birthDate"]) for p in clean_resources(export_dir, "Patient", truth)}
        stays = {}
        for e in clean_resources(export_dir, "Encounter", truth):
            if e["class"]["code"] != "IMP" or e["status"] != "finished":
                continue
            start, end = _hours(e["period"]["start"]), _hours(e["period"]["end"])
            if end - start <= 24:
                continue  # the prediction is made 24 h after admission, for patients still in hospital
            patient = e["subject"]["reference"].split("/")[1]
            stays[e["id"]] = {
                "site": site_id,
                "start": start,
                "age": (dt.date.fromisoformat(e["period"]["start"][:10]) - births[patient]).days / 365.25,
                "died": e["hospitalization"]["dischargeDisposition"]["coding"][0]["code"] == "exp",
                "long_stay": end - start > 7 * 24,
            }
        latest: dict[tuple[str, str], tuple[float, float]] = {}
        for o in clean_resources(export_dir, "Observation", truth):
            encounter = o["encounter"]["reference"].split("/")[1]
            stay = stays.get(encounter)
            code = o["code"]["coding"][0]["code"]
            if stay is None or code not in FIRST_DAY:
                continue
            hour = _hours(o["effectiveDateTime"]) - stay["start"]
            if hour > 24:
                continue
            quantity = o["component"][0]["valueQuantity"] if code == "85354-9" else o["valueQuantity"]
            key = (encounter, FIRST_DAY[code])
            if key not in latest or latest[key][0] < hour:
                latest[key] = (hour, _value(quantity))
        for (encounter, feature), (_, value) in latest.items():
            stays[encounter][feature] = value
        frames.append(pd.DataFrame.from_dict(stays, orient="index"))
    return pd.concat(frames)


def test_a_simple_model_on_first_day_data_predicts_outcomes_far_better_than_chance(medium_consortium):
    data = _stays_with_first_day_features(medium_consortium)
    features = ["age", *FIRST_DAY.values()]
    x = data.reindex(columns=features).astype(float)
    missing = x.isna().astype(float).add_suffix("_missing")
    x = pd.concat([x.fillna(x.median()), missing], axis=1).to_numpy()
    for outcome, floor in (("died", 0.70), ("long_stay", 0.60)):
        y = data[outcome].to_numpy(dtype=bool)
        x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.35, random_state=0, stratify=y)
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x_train, y_train)
        auroc = roc_auc_score(y_test, model.predict_proba(x_test)[:, 1])
        assert auroc > floor, f"{outcome}: AUROC {auroc:.3f} from first-day vitals and labs"
        assert data[outcome].mean() < 0.5  # not a trivial majority-class problem


def test_insulin_lowers_glucose_at_the_sliding_scale_threshold(medium_consortium):
    """Regression discontinuity at 180 mg/dL: just above it patients get insulin, just below they do not."""
    for site_id, export_dir, truth in sites(medium_consortium):
        rows = []
        for o in clean_resources(export_dir, "Observation", truth):
            if o["code"]["coding"][0]["code"] in ("2345-7", "2339-0"):
                rows.append((o["subject"]["reference"], _hours(o["effectiveDateTime"]), _value(o["valueQuantity"])))
        glucose = pd.DataFrame(rows, columns=["patient", "t", "value"]).sort_values(["patient", "t"])
        glucose["next_value"] = glucose.groupby("patient")["value"].shift(-1)
        glucose["gap"] = glucose.groupby("patient")["t"].shift(-1) - glucose["t"]
        glucose = glucose[(glucose["gap"] > 2) & (glucose["gap"] <= 6)]
        change = glucose["next_value"] - glucose["value"]
        below = change[(glucose["value"] > 160) & (glucose["value"] <= 180)]
        above = change[(glucose["value"] > 180) & (glucose["value"] <= 200)]
        assert len(below) > 100 and len(above) > 100, site_id
        assert below.mean() - above.mean() > 12, f"{site_id}: insulin effect {below.mean() - above.mean():.1f} mg/dL"


def test_furosemide_lowers_systolic_pressure(medium_consortium):
    for site_id, export_dir, truth in sites(medium_consortium):
        doses = [
            (a["subject"]["reference"], _hours(a["effectiveDateTime"]))
            for a in clean_resources(export_dir, "MedicationAdministration", truth)
            if a["medicationCodeableConcept"]["coding"][0]["code"] == "4603" and "effectiveDateTime" in a
        ]
        pressure = pd.DataFrame(
            [
                (o["subject"]["reference"], _hours(o["effectiveDateTime"]), o["component"][0]["valueQuantity"]["value"])
                for o in clean_resources(export_dir, "Observation", truth)
                if o["code"]["coding"][0]["code"] == "85354-9"
            ],
            columns=["patient", "t", "sbp"],
        )
        joined = pd.DataFrame(doses, columns=["patient", "dose"]).merge(pressure, on="patient")
        joined["since"] = joined["t"] - joined["dose"]
        before = joined[(joined["since"] > -2) & (joined["since"] <= 0)]["sbp"]
        after = joined[(joined["since"] > 0.5) & (joined["since"] <= 2.5)]["sbp"]
        assert len(before) > 30 and len(after) > 30, site_id
        assert before.mean() - after.mean() > 3, f"{site_id}: {before.mean():.1f} -> {after.mean():.1f} mmHg"
        assert np.isfinite(after.mean())
