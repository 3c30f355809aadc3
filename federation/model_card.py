"""The model card a study ends with: what was trained, on whose data, at what privacy cost, how well.

JSON for machines, HTML (with plots) for people. It records the study hash and twin code version (what
every site approved), the participating sites with the cohort and consent snapshot hashes they reported
and the epsilon each spent, every round's participation, and the pooled held-out metrics with their
95% intervals. The final weights are saved beside it.
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

from federation.receipts import Participation, read_receipts
from federation.study import StudySpec, canonical_json, study_hash, twin_code_version


def _card(folder: Path, spec: StudySpec, result) -> dict:
    receipts = read_receipts(folder / "receipts.jsonl")
    sites: dict[str, dict] = {}
    for receipt in receipts:
        for site in receipt.sites:
            entry = sites.setdefault(site.label, {"rounds_trained": 0, "refusals": []})
            if site.status == Participation.TRAINED:
                entry["rounds_trained"] += 1
                entry["epsilon_spent"] = site.epsilon_spent
                entry["epsilon_ceiling"] = site.epsilon_ceiling
                entry["cohort_snapshot"] = site.cohort_snapshot
                entry["consent_snapshot"] = site.consent_snapshot
            elif site.status != Participation.EVALUATED:
                entry["refusals"].append(
                    {
                        "round": receipt.server_round,
                        "phase": receipt.phase,
                        "status": site.status.value,
                        "code": site.code,
                        "reason": site.reason,
                    }
                )
    final = result.history[-1] if result.history else {}
    return {
        "study": {
            "id": spec.study.id,
            "title": spec.study.title,
            "hash": study_hash(spec),
            "twin_code_version": twin_code_version(),
            "spec": json.loads(canonical_json(spec)),
        },
        "run": {"status": result.status, "reason": result.reason, "completed_rounds": result.completed_rounds},
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model": {
            "kind": spec.model.kind,
            "weights_file": "final-model.pt",
            "parameters": int(sum(np.asarray(v).size for v in result.weights.values())),
        },
        "sites": sites,
        "aggregation": {
            "strategy": spec.federation.strategy,
            "secure_aggregation_requested": spec.federation.secure_aggregation,
            # rounds whose updates the coordinator saw only as a weighted mean (SecAgg+)
            "secure_rounds": [row["round"] for row in result.history if row.get("secure_aggregation")],
            "rounds": [row["round"] for row in result.history],
        },
        "metrics": {
            "held_out_auroc": final.get("auroc"),
            "held_out_auroc_95ci": [final.get("auroc_low"), final.get("auroc_high")],
            "auroc_pooled_over_sites": final.get("auroc_sites"),
            "held_out_loss": final.get("loss"),
            "held_out_brier": final.get("brier"),
            "per_site_auroc": final.get("site_auroc"),
        },
        "history": result.history,
    }


def _figure_png(history: list[dict]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [row["round"] for row in history]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    auroc = [row.get("auroc") or np.nan for row in history]
    low = [row.get("auroc_low") or np.nan for row in history]
    high = [row.get("auroc_high") or np.nan for row in history]
    axes[0].plot(rounds, auroc, marker="o", label="pooled AUROC")
    axes[0].fill_between(rounds, low, high, alpha=0.2, label="95% interval")
    loss_axis = axes[0].twinx()
    loss_axis.plot(rounds, [row.get("loss") or np.nan for row in history], color="tab:red", marker=".", label="loss")
    axes[0].set(title="Held-out AUROC and loss", xlabel="round", ylabel="AUROC")
    loss_axis.set_ylabel("loss")
    sites = sorted({s for row in history for s in row.get("epsilon", {})})
    for site in sites:
        axes[1].plot(rounds, [row.get("epsilon", {}).get(site, np.nan) for row in history], marker="o", label=site)
    axes[1].set(title="Epsilon spent per site", xlabel="round", ylabel="epsilon (cumulative)")
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
    axes[2].legend(fontsize=7)
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
    return (
        f"<tr><td>{esc(name)}</td><td>{site['rounds_trained']}</td>"
        f"<td>{site.get('epsilon_spent') or 0:.3f} / {site.get('epsilon_ceiling') or 0:g}</td>"
        f"<td><code>{esc((site.get('cohort_snapshot') or '')[:16])}</code></td>"
        f"<td><code>{esc((site.get('consent_snapshot') or '')[:16])}</code></td>"
        f"<td>{'<br>'.join(esc(e) for e in events) or '-'}</td></tr>"
    )


def _metric(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _html(card: dict) -> str:
    esc = html.escape
    metrics, study, run = card["metrics"], card["study"], card["run"]
    auroc, (low, high) = metrics["held_out_auroc"], metrics["held_out_auroc_95ci"]
    auroc_text = (
        f"{auroc:.3f} (95% CI {low:.3f}-{high:.3f}, {metrics['auroc_pooled_over_sites']} sites)"
        if auroc is not None
        else "n/a"
    )
    rows = "".join(_site_row(name, site) for name, site in sorted(card["sites"].items()))
    image = _figure_png(card["history"]) if card["history"] else ""
    figure = f'<img alt="rounds" src="data:image/png;base64,{image}" style="width:100%">' if image else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Model card: {esc(study["id"])}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{border:1px solid #ccc;padding:4px 8px;
vertical-align:top}}table{{border-collapse:collapse}}code{{font-size:90%}}</style></head><body>
<h1>Model card: {esc(study["title"])}</h1>
<p>Study <b>{esc(study["id"])}</b>, hash <code>{esc(study["hash"])}</code>,
twin code {esc(study["twin_code_version"])}.
Run {esc(run["status"])}: {esc(run["reason"])}. Model: {esc(card["model"]["kind"])},
{card["model"]["parameters"]} parameters ({esc(card["model"]["weights_file"])}).</p>
<p>{esc(aggregation_text(card.get("aggregation", {})))}</p>
<h2>Held-out performance (pooled over sites)</h2>
<p>AUROC {esc(auroc_text)}; loss {_metric(metrics["held_out_loss"])}; Brier {_metric(metrics["held_out_brier"])}.
Each site evaluates on its own held-out patients and sends aggregates only; counts under a site's cell-count
floor are withheld, and such sites are not weighted in the pooled AUROC.</p>
{figure}
<h2>Sites</h2><table><tr><th>site</th><th>rounds trained</th><th>epsilon spent / ceiling</th>
<th>cohort snapshot</th><th>consent snapshot</th><th>refusals, failures, time-outs</th></tr>{rows}</table>
<p>Created {esc(card["created_at"])}. Receipts of every round: receipts.jsonl.</p></body></html>"""


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
    path.write_text(_html(card), encoding="utf-8")
    return path
