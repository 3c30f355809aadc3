"""The model card a study ends with: what was trained, on whose data, at what privacy cost, how well.

JSON for machines, HTML (with plots) for people. It opens with what the model is for and is not (the
study's intended use and limitations) and whose data trained it (the cohort and outcome in words, the
sites and the training-set sizes they disclosed). It records the study hash and twin code version (what
every site approved), the participating sites with the cohort and consent snapshot hashes they reported
and the epsilon each spent (training and evaluation each alone, and composed), every round's
participation, which round's model is the study's model and why, and its held-out evaluation in the twin
kind's own terms (federation.twins), each figure with its 95% interval, and how each site's evaluation
left it (DP histograms, exact aggregates under the cell floor, or withheld). A value that could not be
released says why ("withheld (cell floor)"); it is never NaN. A study run without differential privacy
says so in its first line. The final weights are saved beside it.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
from pathlib import Path

import numpy as np
import torch

from federation.contract import StudySpec, canonical_json, study_hash, twin_code_version
from federation.contract.receipts import Participation, read_receipts
from federation.twins import kind_of
from federation.twins.cards import epsilon_text, period_text


def _sites(folder: Path) -> dict[str, dict]:
    sites: dict[str, dict] = {}
    for receipt in read_receipts(folder / "receipts.jsonl"):
        for site in receipt.sites:
            entry = sites.setdefault(site.label, {"rounds_trained": 0, "refusals": []})
            if site.status in (Participation.TRAINED, Participation.EVALUATED):
                entry["differentially_private"] = site.differentially_private
                for name in ("epsilon_spent", "epsilon_ceiling", "epsilon_training", "epsilon_evaluation"):
                    if getattr(site, name) is not None:
                        entry[name] = getattr(site, name)
            if site.status == Participation.TRAINED:
                entry["rounds_trained"] += 1
                if site.num_examples is not None:  # the count the site disclosed (0 under its cell floor)
                    entry["training_examples"] = site.num_examples
                entry["data_period"] = site.data_period  # its last training round's (None: withheld)
                entry["cohort_snapshot"] = site.cohort_snapshot
                entry["consent_snapshot"] = site.consent_snapshot
            elif site.status == Participation.EVALUATED and site.evaluation is not None:
                entry["evaluation_release"] = site.evaluation.mode.value
            elif site.status != Participation.EVALUATED:
                entry["refusals"].append(
                    {
                        "round": receipt.server_round,
                        "phase": receipt.phase if receipt.part is None else f"{receipt.phase} ({receipt.part})",
                        "status": site.status.value,
                        "code": site.code,
                        "reason": site.reason,
                    }
                )
    return sites


def _card(folder: Path, spec: StudySpec, result) -> dict:
    sites = _sites(folder)
    private = spec.privacy.private and all(s.get("differentially_private", True) for s in sites.values())
    kind = kind_of(spec.model)
    test = kind.pooled_type.model_validate(result.evaluation) if result.evaluation else None
    metrics = kind.card_metrics(test)
    if test is None:
        metrics = {
            name: (result.selection or value) if name.endswith("_text") else value for name, value in metrics.items()
        }
    return {
        "study": {
            "id": spec.study.id,
            "title": spec.study.title,
            "hash": study_hash(spec),
            "twin_code_version": twin_code_version(),
            "sponsor": spec.study.sponsor,
            "description": spec.study.description,
            "intended_use": spec.study.intended_use,
            "limitations": spec.study.limitations,
            "spec": json.loads(canonical_json(spec)),
        },
        "training_data": _training_data(spec, sites, getattr(result, "held_out_site", None)),
        "run": {"status": result.status, "reason": result.reason, "completed_rounds": result.completed_rounds},
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "privacy": {
            "differentially_private": private,
            "statement": _privacy_statement(spec, private),
            "training_epsilon_target": spec.privacy.target_epsilon,
            "evaluation_epsilon_target": spec.evaluation.epsilon if spec.privacy.private else None,
            "evaluation_releases_planned": spec.evaluation_releases(),
        },
        "model": {
            "kind": spec.model.kind,
            "description": kind.describe(spec.model, spec.evaluation),
            "weights_file": "final-model.pt",
            "parameters": int(sum(np.asarray(v).size for v in result.weights.values())),
            "selected_round": result.selected_round,
            "selection": result.selection,
        },
        "sites": sites,
        "aggregation": {
            "strategy": spec.federation.strategy,
            "secure_aggregation_requested": spec.federation.secure_aggregation,
            # rounds whose updates the coordinator saw only as a weighted mean (SecAgg+)
            "secure_rounds": [row["round"] for row in result.history if row.get("secure_aggregation")],
            "rounds": [row["round"] for row in result.history],
        },
        "evaluation": {
            "part": "test",
            "split": spec.evaluation.split.model_dump(mode="json"),
            "threshold": spec.evaluation.threshold,
            "held_out_site": getattr(result, "held_out_site", None),  # leave-one-site-out: the only site tested
            "pooled": result.evaluation,
        },
        # The headline figures, flat, for scripts (the kind's); the full pooled evaluation is under evaluation.pooled.
        "metrics": metrics,
        "history": result.history,
    }


def _training_data(spec: StudySpec, sites: dict[str, dict], held_out: str | None) -> dict:
    """Whose data trained the model, in words and the sites' disclosed counts (TRIPOD: the source of data,
    the participants, the outcome)."""
    trained = {name: site.get("training_examples") for name, site in sorted(sites.items()) if site["rounds_trained"]}
    counts = [n for n in trained.values() if n is not None]
    return {
        "cohort": spec.cohort.summary(),
        "outcome": spec.outcome.summary(),
        "split": spec.evaluation.split.model_dump(mode="json"),
        "sites": trained,
        "training_examples": sum(counts) if counts else None,
        # The months each site's training examples cover, trimmed and coarsened under its cell floor (None: the
        # site withheld it: too few patients, or its policy's disclose_data_period is false).
        "periods": {name: site.get("data_period") for name, site in sorted(sites.items()) if site["rounds_trained"]},
        "held_out_site": held_out,
    }


def _training_html(card: dict) -> str:
    esc = html.escape
    study, data = card["study"], card["training_data"]
    use = study.get("intended_use") or "not stated in the study file (study.intended_use)"
    limits = study.get("limitations") or "not stated in the study file (study.limitations)"
    periods = data.get("periods", {})
    sites = ", ".join(
        f"{esc(name)} ({'count not disclosed' if n is None else 'under its cell floor' if n == 0 else n}; "
        f"{esc(period_text(periods.get(name)))})"
        for name, n in data["sites"].items()
    )
    if data["training_examples"]:
        total = f"{data['training_examples']} training examples in all (each site's count in its last round)"
    else:
        total = "no training examples disclosed"
    held_out = (
        f"<p>Site <b>{esc(data['held_out_site'])}</b> was held out: it trained in no round and alone evaluated the "
        "model (external validation).</p>"
        if data.get("held_out_site")
        else ""
    )
    return f"""<h2>Intended use and limitations</h2>
<p><b>Intended use:</b> {esc(use)}</p>
<p><b>Limitations:</b> {esc(limits)}</p>
<h2>Training data</h2>
<p><b>Cohort:</b> {esc(data["cohort"])}. <b>Outcome:</b> {esc(data["outcome"])}.</p>
<p><b>Sites that trained</b> (training examples each disclosed; the months their index dates cover, from the
month of the k-th earliest to that of the k-th latest, k the site's cell floor): {sites or "none"};
{esc(total)}.</p>{held_out}"""


def _privacy_statement(spec: StudySpec, private: bool) -> str:
    if not private:
        return (
            "NOT DIFFERENTIALLY PRIVATE: this study ran with privacy mode 'none' at sites whose policy allows it; "
            "its updates and evaluations carry no DP guarantee (exact evaluation aggregates stayed under each "
            "site's cell-count floor)."
        )
    return (
        f"Differentially private at the patient level: each site spent at most epsilon "
        f"{spec.privacy.target_epsilon:g} on training and {spec.evaluation.epsilon:g} on evaluation releases "
        "(composed in its ledger; actual figures per site below)."
    )


def _series(history: list[dict], part: str, metric: str) -> tuple[list[float], list[float], list[float]]:
    def pick(row: dict, key: str) -> float:
        estimate = (row.get(part) or {}).get(metric) or {}
        value = estimate.get(key)
        return np.nan if value is None else value

    return ([pick(r, "value") for r in history], [pick(r, "low") for r in history], [pick(r, "high") for r in history])


def _legend(axis) -> None:
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=7)


def _figure_png(history: list[dict], metric: str, label: str, test: dict | None, selected: int | None = None) -> str:
    """The run at a glance: the pooled selection metric per round, epsilon per site, participation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [row["round"] for row in history]
    figure, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for part, colour in (("validation", "tab:blue"), ("test", "tab:green")):
        value, low, high = _series(history, part, metric)
        if not np.all(np.isnan(value)):
            axes[0].plot(rounds, value, marker="o", color=colour, label=f"pooled {part} {label}")
            axes[0].fill_between(rounds, low, high, alpha=0.2, color=colour)
    final = (test or {}).get(metric) or {}
    if final.get("value") is not None:
        at = selected if selected is not None else (rounds[-1] if rounds else 1)
        low, high = final.get("low"), final.get("high")
        error = [[final["value"] - low], [high - final["value"]]] if low is not None else None
        axes[0].errorbar([at], [final["value"]], yerr=error, fmt="s", color="tab:green", capsize=4,
                         label=f"study model (round {at}), test")  # fmt: skip
    if rounds:
        axes[0].set_xlim(min(rounds) - 0.5, max(rounds) + 0.5)
    axes[0].set(title=f"Held-out {label} (95% interval)", xlabel="round", ylabel=label, ylim=(0.4, 1.0))
    _legend(axes[0])
    sites = sorted({s for row in history for s in row.get("epsilon", {})})
    for site in sites:
        axes[1].plot(rounds, [row.get("epsilon", {}).get(site, np.nan) for row in history], marker="o", label=site)
    axes[1].set(title="Epsilon per site after each round", xlabel="round", ylabel="epsilon (cumulative, composed)")
    if sites:
        axes[1].legend(fontsize=7)
    statuses = [p.value for p in Participation if p != Participation.EVALUATED]
    bottom = np.zeros(len(rounds))
    for status in statuses:
        counts = np.array([sum(1 for v in row.get("participation", {}).values() if v == status) for row in history])
        if counts.any():
            axes[2].bar(rounds, counts, bottom=bottom, label=status)
            bottom += counts
    axes[2].set(title="Participation per round", xlabel="round", ylabel="sites")
    _legend(axes[2])
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _site_row(name: str, site: dict) -> str:
    esc = html.escape
    events = [
        f"round {r['round']} {r['phase']}: {r['status']} {r['code'] or ''} {r['reason'] or ''}"
        for r in site["refusals"]
    ]
    privacy = (
        "not DP"
        if site.get("differentially_private") is False
        else f"{epsilon_text(site.get('epsilon_training'))} / {epsilon_text(site.get('epsilon_evaluation'))} / "
        f"{epsilon_text(site.get('epsilon_spent'))} of {site.get('epsilon_ceiling') or 0:g}"
    )
    return (
        f"<tr><td>{esc(name)}</td><td>{site['rounds_trained']}</td><td>{esc(privacy)}</td>"
        f"<td>{esc(site.get('evaluation_release', '-'))}</td>"
        f"<td><code>{esc((site.get('cohort_snapshot') or '')[:16])}</code></td>"
        f"<td><code>{esc((site.get('consent_snapshot') or '')[:16])}</code></td>"
        f"<td>{'<br>'.join(esc(e) for e in events) or '-'}</td></tr>"
    )


def _html(card: dict, spec: StudySpec) -> str:
    esc = html.escape
    study, run, privacy = card["study"], card["run"], card["privacy"]
    pooled = card["evaluation"]["pooled"]
    kind = kind_of(spec.model)
    test = kind.pooled_type.model_validate(pooled) if pooled else None
    rows = "".join(_site_row(name, site) for name, site in sorted(card["sites"].items()))
    label = kind.selection_label
    selected = card["model"].get("selected_round")
    image = _figure_png(card["history"], kind.selection_metric, label, pooled, selected) if card["history"] else ""
    figure = f'<img alt="rounds" src="data:image/png;base64,{image}" style="width:100%">' if image else ""
    banner = (
        f'<p style="background:#fdd;padding:8px;font-weight:bold">{esc(privacy["statement"])}</p>'
        if not privacy["differentially_private"]
        else f"<p><b>{esc(privacy['statement'])}</b></p>"
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Model card: {esc(study["id"])}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}td,th{{border:1px solid #ccc;padding:4px 8px;
vertical-align:top}}table{{border-collapse:collapse}}code{{font-size:90%}}</style></head><body>
{banner}
<h1>Model card: {esc(study["title"])}</h1>
<p>Study <b>{esc(study["id"])}</b>, hash <code>{esc(study["hash"])}</code>,
twin code {esc(study["twin_code_version"])}.
Run {esc(run["status"])}: {esc(run["reason"])}. Model: {esc(card["model"]["description"])},
{card["model"]["parameters"]} parameters ({esc(card["model"]["weights_file"])}).</p>
<p>{esc(aggregation_text(card.get("aggregation", {})))}</p>
{_training_html(card)}
<h2>Held-out performance of the study's model (pooled over sites)</h2>
{kind.card_html(spec, test, card["model"]["selection"] or "")}
{figure}
<h2>Sites</h2><table><tr><th>site</th><th>rounds trained</th>
<th>epsilon: training / evaluation / composed of ceiling</th><th>evaluation release</th>
<th>cohort snapshot</th><th>consent snapshot</th><th>refusals, failures, time-outs</th></tr>{rows}</table>
<p>Each study's epsilon composes its training rounds and its evaluation releases in one accountant at the site;
the composed figure is below the sum of the two. Created {esc(card["created_at"])}. Receipts of every round:
receipts.jsonl.</p></body></html>"""


def aggregation_text(aggregation: dict) -> str:
    rounds, secure = aggregation.get("rounds", []), aggregation.get("secure_rounds", [])
    strategy = aggregation.get("strategy", "?")
    if rounds and len(secure) == len(rounds):
        how = "every round with secure aggregation (SecAgg+): the coordinator saw only the weighted mean of updates"
    elif secure:
        how = (
            f"secure aggregation (SecAgg+) in rounds {', '.join(map(str, secure))} of {len(rounds)}; in the others "
            "the coordinator saw each site's update"
        )
    else:
        how = "without secure aggregation: the coordinator saw each site's update"
    return f"Aggregation: {strategy}, {how}."


def write_model_card(folder: Path, spec: StudySpec, result) -> Path:
    """Write model-card.json, model-card.html and final-model.pt into `folder`; returns the HTML path."""
    folder.mkdir(parents=True, exist_ok=True)
    card = _card(folder, spec, result)
    weights = {name: torch.from_numpy(np.asarray(value)) for name, value in result.weights.items()}
    torch.save(weights, folder / "final-model.pt")
    (folder / "model-card.json").write_text(json.dumps(card, indent=2, default=str), encoding="utf-8")
    path = folder / "model-card.html"
    path.write_text(_html(card, spec), encoding="utf-8")
    return path
