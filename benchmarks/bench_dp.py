"""Benchmark: the cost of differential privacy in local training, one epoch DP-SGD vs the same epoch without.

Risk models from the registry (logistic regression, MLP) on synthetic tabular data shaped like a site's
cohort (20,000 x 40 and 50,000 x 64), batch 256 and 64, at 1 and 2 torch threads:

* no DP: `train_plain` (shuffled batches, autograd, torch.optim), the reference;
* DP, single-pass ghost clipping: `train_dp` as sites run it (Poisson sampling, clipping, noise, RDP
  accountant steps);
* DP, Opacus ghost clipping: `train_dp(engine="opacus")`, the same loop with Opacus' own modules;
* for context, the stock Opacus pipeline (`make_private(grad_sample_mode="ghost")` with its Poisson
  DataLoader) against a stock DataLoader loop, the setting of the earlier x2.6 measurement.

Each figure is the median of several timed epochs after a warm-up; the three variants alternate within
each repetition so a change in machine load hits them alike. Epoch times exclude the per-round epsilon
computation, which is reported once. Target (issue): DP overhead <= 2x.
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.machine import write_section
from federation.contract.spec import LogisticRegressionSpec, MlpSpec, PrivacySpec, TrainingSpec
from federation.twins import build_model
from site_node.training import epsilon_of, train_dp, train_plain

REPEATS = 5
TARGET = 2.0
NOISE_MULTIPLIER = 1.0
WORKLOADS = [
    ("logistic regression", LogisticRegressionSpec(), 20_000, 40),
    ("MLP 40-64-32-1", MlpSpec(hidden=[64, 32]), 20_000, 40),
    ("logistic regression", LogisticRegressionSpec(), 50_000, 64),
    ("MLP 64-128-128-1", MlpSpec(hidden=[128, 128]), 50_000, 64),
]


def _data(n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(n, d)).astype(np.float32)
    logits = features @ rng.normal(size=d) / np.sqrt(d) - 1.5
    return features, (rng.random(n) < 1 / (1 + np.exp(-logits))).astype(np.float32)


def _stock_epoch(model: nn.Module, features: np.ndarray, labels: np.ndarray, batch: int, private: bool) -> float:
    """One epoch the way tutorials write it: TensorDataset + DataLoader, and for DP `make_private`."""
    dataset = TensorDataset(torch.from_numpy(features), torch.from_numpy(labels))
    loader = DataLoader(dataset, batch_size=batch, shuffle=not private)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    criterion: Callable = nn.BCEWithLogitsLoss()
    if private:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = PrivacyEngine(accountant="rdp")
            model, optimizer, criterion, loader = engine.make_private(
                module=model,
                optimizer=optimizer,
                criterion=criterion,
                data_loader=loader,
                noise_multiplier=NOISE_MULTIPLIER,
                max_grad_norm=1.0,
                grad_sample_mode="ghost",
            )
    began = time.perf_counter()
    for x, y in loader:
        optimizer.zero_grad()
        loss = criterion(model(x).squeeze(-1), y)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - began


def _measure(spec, n: int, d: int, batch: int) -> dict:
    features, labels = _data(n, d)
    model = build_model(spec, d, seed=0)
    training = TrainingSpec(rounds=1, local_epochs=1, batch_size=batch, learning_rate=0.05)
    privacy = PrivacySpec(target_epsilon=10.0)
    delta = 1 / (10 * n)

    def dp(engine: str) -> float:
        return train_dp(
            model, features, labels, training=training, privacy=privacy, noise_multiplier=NOISE_MULTIPLIER,
            delta=delta, engine=engine,
        ).seconds  # fmt: skip

    variants: dict[str, Callable[[], float]] = {
        "plain": lambda: train_plain(model, features, labels, training=training).seconds,
        "single_pass": lambda: dp("single-pass"),
        "opacus": lambda: dp("opacus"),
    }
    if batch == 256:
        variants["stock_plain"] = lambda: _stock_epoch(build_model(spec, d), features, labels, batch, False)
        variants["stock_opacus"] = lambda: _stock_epoch(build_model(spec, d), features, labels, batch, True)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for run in variants.values():  # warm-up
        run()
    for _ in range(REPEATS):
        for name, run in variants.items():
            times[name].append(run())
    result = {name: statistics.median(values) for name, values in times.items()}
    result["steps"] = -(-n // batch)
    return result


def _accounting_seconds() -> dict[str, float]:
    """The per-round epsilon computation, which does not depend on the data size or the epoch count."""
    out = {}
    for accountant in ("rdp", "prv"):
        began = time.perf_counter()
        epsilon_of([(NOISE_MULTIPLIER, 256 / 20_000, 79 * 5)], 1e-6, accountant)
        out[accountant] = time.perf_counter() - began
    return out


def main() -> None:
    load_before = os.getloadavg()[0]
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for batch in (256, 64):
            for label, spec, n, d in WORKLOADS:
                r = _measure(spec, n, d, batch)
                r.update(label=label, n=n, d=d, batch=batch, threads=threads)
                rows.append(r)
                print(
                    f"{threads} thr, batch {batch:>3}, {label:<20} {n:>6,} x {d}: no DP {r['plain'] * 1e3:6.1f} ms, "
                    f"DP single-pass {r['single_pass'] * 1e3:6.1f} ms (x{r['single_pass'] / r['plain']:.2f}), "
                    f"DP Opacus ghost {r['opacus'] * 1e3:6.1f} ms (x{r['opacus'] / r['plain']:.2f})",
                    flush=True,
                )
    load_after = os.getloadavg()[0]
    accounting = _accounting_seconds()
    write_section("dp-overhead", _report(rows, accounting, load_before, load_after))


def _report(rows: list[dict], accounting: dict[str, float], load_before: float, load_after: float) -> str:
    table = [
        "| threads | batch | model | data | no DP | DP single-pass ghost | overhead | DP Opacus ghost | overhead "
        "| per-step cost, no DP / single-pass / Opacus |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_step = " / ".join(f"{r[k] / r['steps'] * 1e6:.0f}" for k in ("plain", "single_pass", "opacus"))
        table.append(
            f"| {r['threads']} | {r['batch']} | {r['label']} | {r['n']:,} x {r['d']} | {r['plain'] * 1e3:.0f} ms "
            f"| {r['single_pass'] * 1e3:.0f} ms | **x{r['single_pass'] / r['plain']:.2f}** "
            f"| {r['opacus'] * 1e3:.0f} ms | x{r['opacus'] / r['plain']:.2f} | {per_step} µs |"
        )
    stock = [
        "| threads | model | data | stock DataLoader, no DP | stock `make_private` ghost | overhead |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "stock_plain" in r:
            stock.append(
                f"| {r['threads']} | {r['label']} | {r['n']:,} x {r['d']} | {r['stock_plain'] * 1e3:.0f} ms "
                f"| {r['stock_opacus'] * 1e3:.0f} ms | x{r['stock_opacus'] / r['stock_plain']:.2f} |"
            )
    worst = max(r["single_pass"] / r["plain"] for r in rows)
    met = "yes" if worst <= TARGET else "no"
    return (
        "### DP-SGD overhead in local training (one epoch, DP vs no DP, same model and data)\n\n"
        f"Target (issue): DP overhead <= x{TARGET:g}. Noise multiplier {NOISE_MULTIPLIER:g}, clipping 1.0, "
        f"Poisson sampling at q = batch / n, SGD; median of {REPEATS} timed epochs after a warm-up, the "
        "variants alternating. 'No DP' is `train_plain` (shuffled batches, autograd, torch.optim); "
        "'single-pass ghost' is `train_dp` as sites run it; 'Opacus ghost' is the same loop with Opacus' "
        'fast-gradient-clipping module, optimizer and loss (`engine="opacus"`). Epoch times exclude '
        f"computing epsilon, a fixed cost per round: {accounting['rdp'] * 1e3:.0f} ms with RDP, "
        f"{accounting['prv'] * 1e3:.0f} ms with PRV (5 rounds of history).\n\n"
        + "\n".join(table)
        + f"\n\nTarget met: {met} (worst single-pass overhead x{worst:.2f}). Load average (1 min) "
        f"{load_before:.2f} before the run, {load_after:.2f} after; other processes share the 2 cores, so "
        "figures move by some 10-20% between runs.\n\n"
        "Why Opacus' ghost clipping alone stays above x2 here: these models are so small that a step costs "
        "tens of microseconds of arithmetic and hundreds of Python and dispatch overhead. Opacus' ghost "
        "mode adds per step a second backward pass, forward and backward hooks on every layer, a copy of "
        "each gradient, a zero tensor per parameter for the noise and the optimizer wrapper; its Poisson "
        "sampler draws n uniforms per step (O(n) instead of O(q n)). `train_dp` keeps the same DP-SGD "
        "step (flat clipping at C with Opacus' clip factor, Gaussian noise sigma C on the sum, division by "
        "q n, the Opacus accountant stepped once per step, empty batches included) but computes it in one "
        "pass (book-keeping ghost clipping, `site_node/training/ghost.py`) and samples batches as "
        "Binomial(n, q) sizes with uniform subsets, the same distribution as independent inclusion. "
        "Tests check both against per-example autograd and Opacus. Part of the gain is that this "
        "backward pass is written out instead of recorded by autograd, which a non-private loop could do "
        "as well; the reference here is the ordinary autograd loop a site would otherwise run, with the "
        "same in-memory batching (index tensors, no DataLoader).\n\n"
        "For context, the stock pipeline (TensorDataset + DataLoader, no DP, against `make_private` with "
        "its DPDataLoader), batch 256, where per-example collation dominates both:\n\n"
        + "\n".join(stock)
        + "\n\nReproduce: `.venv/bin/python -m benchmarks.bench_dp`."
    )


if __name__ == "__main__":
    main()
