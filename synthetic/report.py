"""The consortium report: an HTML page with plots of how the synthetic hospitals differ and what they hold.

Written to OUT/report/index.html by `twinfed synth`. Plots: age and case mix per site, outcome rates
next to the best achievable AUROC, missingness per measurement, injected defects, and two drug
responses measured from the exported FHIR files themselves (glucose after insulin, systolic pressure
after furosemide), which show that the responses are in the data, not just in the generator.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import orjson
import pandas as pd

from synthetic.consortium import INDEX_FILE

GLUCOSE_CODES = {"2345-7", "2339-0"}
SBP_CODE = "8480-6"
MMOL_PER_MG_GLUCOSE = 1 / 18.016


def _load(out_dir: Path) -> tuple[dict, list[dict]]:
    index = orjson.loads((out_dir / INDEX_FILE).read_bytes())
    truths = [orjson.loads((out_dir / site["ground_truth"]).read_bytes()) for site in index["sites"]]
    return index, truths


RESPONSES = {"insulin": ("865098", "glucose"), "furosemide": ("4603", "sbp")}  # drug RxNorm code, measure


def _drug_responses(export_dir: Path, window_hours: float = 8.0) -> dict[str, pd.DataFrame]:
    """Glucose around insulin lispro doses and systolic pressure around IV furosemide, from the export.

    One pass over each file. Each frame has one row per (dose, measurement) with the hours relative to
    the dose and the value in canonical units (glucose mg/dL, pressure mmHg); broken lines are skipped.
    """
    drug_of = {code: name for name, (code, _) in RESPONSES.items()}
    doses: dict[str, list[tuple[str, float]]] = {name: [] for name in RESPONSES}
    for line in (export_dir / "MedicationAdministration.ndjson").open("rb"):
        try:
            r = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        code = ((r.get("medicationCodeableConcept") or {}).get("coding") or [{}])[0].get("code")
        if code in drug_of and "effectiveDateTime" in r and "subject" in r:
            doses[drug_of[code]].append((r["subject"]["reference"], _hours(r["effectiveDateTime"])))
    values: dict[str, list[tuple[str, float, float]]] = {"glucose": [], "sbp": []}
    for line in (export_dir / "Observation.ndjson").open("rb"):
        if b"2345-7" not in line and b"2339-0" not in line and SBP_CODE.encode() not in line:
            continue
        try:
            r = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if "subject" not in r or "effectiveDateTime" not in r:
            continue
        code = ((r.get("code") or {}).get("coding") or [{}])[0].get("code")
        if code in GLUCOSE_CODES and "valueQuantity" in r:
            q = r["valueQuantity"]
            measure, value = "glucose", q["value"] / MMOL_PER_MG_GLUCOSE if q.get("code") == "mmol/L" else q["value"]
        elif "component" in r:
            measure, value = "sbp", r["component"][0]["valueQuantity"]["value"]
        else:
            continue
        values[measure].append((r["subject"]["reference"], _hours(r["effectiveDateTime"]), float(value)))
    frames = {}
    for name, (_, measure) in RESPONSES.items():
        dose_frame = pd.DataFrame(doses[name], columns=["patient", "dose_time"])
        value_frame = pd.DataFrame(values[measure], columns=["patient", "time", "value"])
        joined = dose_frame.merge(value_frame, on="patient")
        joined["hours"] = joined["time"] - joined["dose_time"]
        keep = (joined["hours"] >= -2) & (joined["hours"] < window_hours)
        keep &= (joined["value"] > 20) & (joined["value"] < 1000)
        frames[name] = joined.loc[keep, ["patient", "hours", "value"]]
    return frames


def _hours(stamp: str) -> float:
    try:
        return pd.Timestamp(stamp[:19]).value / 3.6e12
    except ValueError:
        return float("nan")


def write_report(out_dir: Path) -> Path:
    """Write OUT/report/index.html (and its PNG figures); return the HTML path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index, truths = _load(out_dir)
    report_dir = out_dir / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    sites = [t["site_id"] for t in truths]
    colors = plt.get_cmap("tab10")(np.arange(len(sites)) % 10)
    figures: list[tuple[str, str]] = []

    def save(fig, name: str, caption: str) -> None:
        fig.tight_layout()
        fig.savefig(report_dir / name, dpi=110)
        plt.close(fig)
        figures.append((name, caption))

    # 1. Who the hospitals treat.
    fig, (ax_age, ax_mix) = plt.subplots(1, 2, figsize=(12, 4))
    export_date = pd.Timestamp(truths[0]["export_date"])
    for color, t in zip(colors, truths, strict=True):
        ages = [(export_date - pd.Timestamp(p["birth_date"])).days / 365.25 for p in t["patients"]]
        ax_age.hist(
            ages, bins=30, range=(0, 100), histtype="step", linewidth=1.8, color=color, label=t["site_id"], density=True
        )
    ax_age.set(title="Age at export", xlabel="years", ylabel="density")
    ax_age.legend()
    reasons = sorted({s["reason"] for t in truths for s in t["stays"]})
    width = 0.8 / max(len(truths), 1)
    for k, (color, t) in enumerate(zip(colors, truths, strict=True)):
        counts = pd.Series([s["reason"] for s in t["stays"]]).value_counts(normalize=True)
        ax_mix.bar(
            np.arange(len(reasons)) + k * width,
            [counts.get(r, 0) for r in reasons],
            width,
            color=color,
            label=t["site_id"],
        )
    ax_mix.set_xticks(np.arange(len(reasons)) + width * (len(truths) - 1) / 2, reasons, rotation=35, ha="right")
    ax_mix.set(title="Case mix of inpatient stays", ylabel="share of stays")
    save(fig, "population.png", "Hospitals differ in age and case mix (non-IID sites).")

    # 2. Outcomes and the best achievable discrimination.
    outcomes = ["in_hospital_death", "los_over_7_days", "readmission_30d"]
    fig, (ax_rate, ax_auc) = plt.subplots(1, 2, figsize=(12, 4))
    for k, (color, t) in enumerate(zip(colors, truths, strict=True)):
        x = np.arange(len(outcomes)) + k * width
        ax_rate.bar(x, [t["outcomes"][o]["observed_rate"] for o in outcomes], width, color=color, label=t["site_id"])
        ax_auc.bar(
            x, [t["outcomes"][o]["bayes_optimal_auroc"] for o in outcomes], width, color=color, label=t["site_id"]
        )
    for ax, title in ((ax_rate, "Observed outcome rate"), (ax_auc, "Bayes-optimal AUROC (ceiling for any model)")):
        ax.set_xticks(np.arange(len(outcomes)) + width * (len(truths) - 1) / 2, outcomes)
        ax.set_title(title)
    ax_auc.set_ylim(0.5, 1.0)
    ax_rate.legend()
    save(
        fig,
        "outcomes.png",
        "Outcome rates and the best AUROC a model could reach with full knowledge of the latent state.",
    )

    # 3. Missingness.
    items = [i for i in truths[0]["missingness"] if i not in ("height", "bmi", "hba1c")]
    fig, ax = plt.subplots(figsize=(12, 4))
    for k, (color, t) in enumerate(zip(colors, truths, strict=True)):
        ax.bar(
            np.arange(len(items)) + k * width,
            [t["missingness"].get(i, {}).get("missing_rate", 0) for i in items],
            width,
            color=color,
            label=t["site_id"],
        )
    ax.set_xticks(np.arange(len(items)) + width * (len(truths) - 1) / 2, items, rotation=35, ha="right")
    ax.set(title="Scheduled inpatient measurements that were not recorded", ylabel="missing share")
    ax.legend()
    save(
        fig,
        "missingness.png",
        "Missingness per measurement and site; stable patients are skipped more often (informative).",
    )

    # 4. Drug responses measured from the exports.
    fig, (ax_ins, ax_furo) = plt.subplots(1, 2, figsize=(12, 4))
    for color, site in zip(colors, index["sites"], strict=True):
        responses = _drug_responses(out_dir / site["fhir_export"])
        for ax, name in ((ax_ins, "insulin"), (ax_furo, "furosemide")):
            frame = responses[name]
            if frame.empty:
                continue
            frame["bin"] = np.floor(frame["hours"]).astype(int)
            means = frame.groupby("bin")["value"].mean()
            ax.plot(means.index, means.values, marker="o", color=color, label=site["site_id"])
    ax_ins.set(title="Glucose around an insulin lispro dose", xlabel="hours since dose", ylabel="glucose (mg/dL)")
    ax_furo.set(title="Systolic pressure around IV furosemide", xlabel="hours since dose", ylabel="mmHg")
    for ax in (ax_ins, ax_furo):
        ax.axvline(0, color="grey", linestyle=":")
        ax.legend()
    save(fig, "drug_response.png", "Drug responses read back from the FHIR exports: the effect is in the data.")

    # 5. Defects.
    kinds = sorted({k for t in truths for k in t["defects"]["by_kind"]})
    fig, ax = plt.subplots(figsize=(12, 3.8))
    for k, (color, t) in enumerate(zip(colors, truths, strict=True)):
        ax.bar(
            np.arange(len(kinds)) + k * width,
            [t["defects"]["by_kind"].get(kind, 0) for kind in kinds],
            width,
            color=color,
            label=t["site_id"],
        )
    ax.set_xticks(np.arange(len(kinds)) + width * (len(truths) - 1) / 2, kinds, rotation=25, ha="right")
    ax.set(title="Injected defects (each listed with file and line in the ground truth)", ylabel="records")
    ax.legend()
    save(fig, "defects.png", "Broken records per kind and site.")

    rows = "".join(
        f"<tr><td>{html.escape(t['site_name'])}</td><td>{t['site_id']}</td><td>{len(t['patients']):,}</td>"
        f"<td>{len(t['stays']):,}</td><td>{sum(t['export_files'].values()):,}</td>"
        f"<td>{t['outcomes']['in_hospital_death']['observed_rate']:.1%}</td>"
        f"<td>{t['consent']['denying_research']} ({t['consent']['denying_rate']:.1%})</td>"
        f"<td>{t['defects']['total']:,} ({t['defects']['rate_per_record']:.2%})</td>"
        f"<td>{t['profile']['units']['glucose']}, {t['profile']['units']['creatinine']}, "
        f"{t['profile']['units']['temperature']}</td></tr>"
        for t in truths
    )
    images = "".join(
        f'<figure><img src="{name}" alt="{html.escape(cap)}"><figcaption>{html.escape(cap)}</figcaption></figure>'
        for name, cap in figures
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>twinfed synthetic consortium</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1250px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child,th:first-child{{text-align:left}}
figure{{margin:1.5em 0}}img{{max-width:100%}}figcaption{{color:#555}}</style></head><body>
<h1>Synthetic hospital consortium</h1>
<p>Seed {index["config"]["seed"]}, {len(truths)} hospitals, export date {truths[0]["export_date"]}.
The FHIR exports are in <code>&lt;site&gt;/fhir/</code>; the ground truth used for these plots is in
<code>ground-truth/</code> and would not exist at a real hospital.</p>
<table><tr><th>hospital</th><th>site id</th><th>patients</th><th>stays</th><th>resources</th><th>in-hospital death</th>
<th>research opt-outs</th><th>injected defects</th><th>units (glucose, creatinine, temperature)</th></tr>{rows}</table>
{images}
</body></html>"""
    target = report_dir / "index.html"
    target.write_text(page, encoding="utf-8")
    return target
