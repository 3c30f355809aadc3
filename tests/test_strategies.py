"""Server-side aggregation (federation.coordinator.strategies): the arithmetic of every rule against hand computations
and Flower's own strategies, robustness to one poisoned site, rejection of bad updates by name, and exact
resumption from a saved state."""

from __future__ import annotations

import io
import math
from typing import get_args

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam as FlowerFedAdam
from flwr.serverapp.strategy import FedYogi as FlowerFedYogi
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean as flower_trim_mean
from pydantic import ValidationError

from federation.contract.spec import FederationSpec
from federation.coordinator.strategies import (
    STRATEGIES,
    AggregationError,
    Aggregator,
    SiteUpdate,
    UpdateRejected,
    make_aggregator,
)

ALL_STRATEGIES = list(get_args(FederationSpec.model_fields["strategy"].annotation))
ETA, BETA1, BETA2, TAU = 0.1, 0.9, 0.99, 1e-3


def _f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def _agg(strategy: str, **settings: float) -> Aggregator:
    return make_aggregator(FederationSpec(strategy=strategy, **settings))


def _random_round(rng: np.random.Generator, sites: int = 5) -> list[SiteUpdate]:
    return [
        SiteUpdate(
            f"site-{i}",
            {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=2).astype(np.float32)},
            int(rng.integers(20, 200)) if i % 3 else None,
        )
        for i in range(sites)
    ]


GLOBAL0 = {"w": np.zeros((3, 2), dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}


# --- FedAvg / FedProx --------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox"])
def test_weighted_mean_by_hand(strategy):
    global_weights = {"w": np.zeros((2, 2), np.float32), "b": np.zeros(2, np.float32)}
    updates = [
        SiteUpdate("a", {"w": np.full((2, 2), 1.0, np.float32), "b": _f32(1, 2)}, 10),
        SiteUpdate("b", {"w": np.full((2, 2), 2.0, np.float32), "b": _f32(3, 4)}, 30),
        SiteUpdate("c", {"w": np.full((2, 2), 4.0, np.float32), "b": _f32(0, 0)}, 60),
    ]
    new = _agg(strategy).aggregate(global_weights, updates)
    # w: (10*1 + 30*2 + 60*4) / 100 = 3.1;  b: ([10, 20] + [90, 120] + [0, 0]) / 100
    np.testing.assert_allclose(new["w"], np.full((2, 2), 3.1), rtol=1e-6)
    np.testing.assert_allclose(new["b"], [1.0, 1.4], rtol=1e-6)
    assert list(new) == ["w", "b"] and all(a.dtype == np.float32 for a in new.values())


def test_withheld_count_weighs_the_mean_of_the_others():
    global_weights = {"x": _f32(0)}
    updates = [SiteUpdate("a", {"x": _f32(1)}, 10), SiteUpdate("b", {"x": _f32(4)}, None)]
    updates.append(SiteUpdate("c", {"x": _f32(2)}, 30))
    # b weighs (10 + 30) / 2 = 20: (10*1 + 20*4 + 30*2) / 60 = 2.5
    np.testing.assert_allclose(_agg("fedavg").aggregate(global_weights, updates)["x"], [2.5], rtol=1e-6)


def test_all_counts_withheld_gives_equal_weights():
    updates = [SiteUpdate(s, {"x": _f32(v)}, None) for s, v in (("a", 1), ("b", 4), ("c", 2))]
    np.testing.assert_allclose(_agg("fedavg").aggregate({"x": _f32(0)}, updates)["x"], [7 / 3], rtol=1e-6)


# --- FedAdam / FedYogi -------------------------------------------------------------------------------

# Two rounds on a two-coordinate model. Round 2's second coordinate has delta^2 < v_1, so Yogi's sign flips
# there while it does not in the first coordinate.
ROUNDS = [
    [SiteUpdate("a", {"x": _f32(2.0, -3.0)}, 10), SiteUpdate("b", {"x": _f32(3.0, -1.0)}, 30)],
    [SiteUpdate("a", {"x": _f32(1.5, -1.05)}, 10), SiteUpdate("b", {"x": _f32(2.5, -1.13)}, 10)],
]
MEANS = [(2.75, -1.5), (2.0, -1.09)]  # example-weighted means of the rounds above, by hand


def _by_hand(yogi: bool) -> list[list[float]]:
    """Reddi et al. Algorithm 2 written out per coordinate with Python floats."""
    x, m, v, history = [1.0, -1.0], [0.0, 0.0], [0.0, 0.0], []
    for mean in MEANS:
        for i in range(2):
            delta = mean[i] - x[i]
            m[i] = BETA1 * m[i] + (1 - BETA1) * delta
            if yogi:
                v[i] = v[i] - (1 - BETA2) * delta**2 * math.copysign(1.0, v[i] - delta**2)
            else:
                v[i] = BETA2 * v[i] + (1 - BETA2) * delta**2
            x[i] = x[i] + ETA * m[i] / (math.sqrt(v[i]) + TAU)
        history.append(list(x))
    return history


@pytest.mark.parametrize("strategy", ["fedadam", "fedyogi"])
def test_server_optimiser_two_rounds_by_hand(strategy):
    aggregator = _agg(strategy)
    weights = {"x": _f32(1.0, -1.0)}
    expected = _by_hand(yogi=strategy == "fedyogi")
    for updates, want in zip(ROUNDS, expected, strict=True):
        weights = aggregator.aggregate(weights, updates)
        np.testing.assert_allclose(weights["x"], want, rtol=1e-6)
    # Round 1 is the same for both (v_0 = 0): delta = (1.75, -0.5), m = 0.1 delta, sqrt(v) = 0.1 |delta|.
    np.testing.assert_allclose(expected[0], [1 + 0.1 * 0.175 / 0.176, -1 - 0.1 * 0.05 / 0.051], rtol=1e-12)
    state = aggregator.state_dict()
    assert state["rounds"] == 2 and set(state) >= {"m/x", "v/x"}


def test_adam_and_yogi_differ_where_the_sign_flips():
    adam, yogi = _by_hand(yogi=False), _by_hand(yogi=True)
    assert adam[0] == yogi[0] and adam[1] != yogi[1]


def _flower_reply(weights: dict[str, np.ndarray], num_examples: int) -> Message:
    """A train reply as Flower's strategies receive it from a SuperNode (metadata as the SuperLink sets it)."""
    metadata = Metadata(
        run_id=1, message_id="", src_node_id=2, dst_node_id=1, reply_to_message_id="instruction",
        group_id="1", created_at=0.0, ttl=3600.0, message_type="train",
    )  # fmt: skip
    content = RecordDict(
        {
            "arrays": ArrayRecord({key: Array(value) for key, value in weights.items()}),
            "metrics": MetricRecord({"num-examples": num_examples}),
        }
    )
    return Message(content=content, metadata=metadata)


@pytest.mark.parametrize("strategy", ["fedadam", "fedyogi"])
def test_server_optimiser_matches_flower(strategy):
    """Three rounds against Flower's FedAdam/FedYogi on the same arrays. Flower's FedAdam scales eta by a
    bias correction that Reddi et al.'s algorithm does not have; it is divided out here so that the test
    checks everything else (moments, pseudo-gradient, step) is the same arithmetic."""
    flower_cls = FlowerFedAdam if strategy == "fedadam" else FlowerFedYogi
    flower = flower_cls(eta=ETA, beta_1=BETA1, beta_2=BETA2, tau=TAU)
    ours = _agg(strategy)
    rng = np.random.default_rng(7)
    weights = {key: value.copy() for key, value in GLOBAL0.items()}
    for server_round in (1, 2, 3):
        updates = [
            SiteUpdate(f"s{i}", {k: (v + rng.normal(size=v.shape)).astype(np.float32) for k, v in weights.items()}, n)
            for i, n in enumerate((40, 100, 60))
        ]
        if strategy == "fedadam":
            flower.eta = ETA * (1 - BETA1 ** (server_round + 1)) / math.sqrt(1 - BETA2 ** (server_round + 1))
        flower.current_arrays = {key: value.copy() for key, value in weights.items()}
        replies = [_flower_reply(update.weights, update.num_examples) for update in updates]
        flower_arrays, _ = flower.aggregate_train(server_round, replies)
        weights = ours.aggregate(weights, updates)
        for key, value in weights.items():
            np.testing.assert_allclose(value, flower_arrays[key].numpy(), rtol=2e-5, atol=1e-6)


# --- robust rules ------------------------------------------------------------------------------------


def test_one_poisoned_site_cannot_drag_robust_rules():
    """One of four sites sends its weights x1e6: FedAvg follows it, trimmed mean and median do not."""
    rng = np.random.default_rng(0)
    base = {"w": rng.normal(size=(4, 3)), "b": rng.normal(size=3)}
    sites = [{k: (v + 0.01 * rng.normal(size=v.shape)).astype(np.float32) for k, v in base.items()} for _ in range(4)]
    honest_mean = {k: np.mean([site[k] for site in sites[:3]], axis=0) for k in base}
    sites[3] = {k: v * np.float32(1e6) for k, v in sites[3].items()}
    updates = [SiteUpdate(f"h{i}", site, 100) for i, site in enumerate(sites)]
    global_weights = {k: np.zeros_like(v, dtype=np.float32) for k, v in base.items()}

    def distance(strategy: str) -> float:
        new = _agg(strategy).aggregate(global_weights, updates)
        return max(float(np.abs(new[k] - honest_mean[k]).max()) for k in base)

    assert distance("fedavg") > 1e4
    assert distance("trimmed_mean") < 0.05
    assert distance("median") < 0.05


def test_trimmed_mean_cuts_at_least_one_from_each_end():
    """Four sites at 0.2 cut one each end (floor(0.8) would cut none, as Flower's trim_mean does)."""
    updates = [SiteUpdate(s, {"x": _f32(v, -v)}, 1) for s, v in (("a", 1), ("b", 2), ("c", 6), ("d", 100))]
    new = _agg("trimmed_mean").aggregate({"x": _f32(0, 0)}, updates)
    np.testing.assert_allclose(new["x"], [4.0, -4.0])
    stacked = np.stack([u.weights["x"] for u in updates])
    np.testing.assert_allclose(flower_trim_mean(stacked, 0.2), [27.25, -27.25])  # Flower: plain mean here


def test_trimmed_mean_matches_flower_where_the_cut_agrees():
    rng = np.random.default_rng(3)
    updates = _random_round(rng, sites=10)
    new = _agg("trimmed_mean", trim_fraction=0.2).aggregate(GLOBAL0, updates)
    for key in GLOBAL0:
        expected = flower_trim_mean(np.stack([u.weights[key] for u in updates]).astype(np.float64), 0.2)
        np.testing.assert_allclose(new[key], expected, rtol=1e-6)


def test_median_by_hand():
    four = [SiteUpdate(s, {"x": _f32(v)}, 1) for s, v in (("a", 1), ("b", 2), ("c", 3), ("d", 100))]
    assert _agg("median").aggregate({"x": _f32(0)}, four)["x"][0] == pytest.approx(2.5)
    assert _agg("median").aggregate({"x": _f32(0)}, [*four, SiteUpdate("e", {"x": _f32(-7)}, 1)])["x"][0] == 2


@pytest.mark.parametrize("strategy", ["trimmed_mean", "median"])
def test_robust_rules_refuse_fewer_than_three_updates(strategy):
    two = [SiteUpdate("a", {"x": _f32(1)}, 5), SiteUpdate("b", {"x": _f32(2)}, 5)]
    with pytest.raises(AggregationError, match="at least 3"):
        _agg(strategy).aggregate_with_report({"x": _f32(0)}, two)
    # Four arrived, but two were unusable: still refused, and the refusal names them.
    four = [*two, SiteUpdate("c", {"x": _f32(np.nan)}, 5), SiteUpdate("d", {"x": _f32(1, 2)}, 5)]
    with pytest.raises(AggregationError) as refused:
        _agg(strategy).aggregate_with_report({"x": _f32(0)}, four)
    assert set(refused.value.rejected) == {"c", "d"} and "c:" in str(refused.value)


# --- rejection of bad updates ------------------------------------------------------------------------


def test_bad_updates_are_dropped_and_named():
    good = [
        SiteUpdate("good-1", {"w": np.ones((3, 2), np.float32), "b": _f32(1, 1)}, 10),
        SiteUpdate("good-2", {"w": np.full((3, 2), 3.0, np.float32), "b": _f32(3, 3)}, 30),
    ]
    nan_w = np.ones((3, 2), np.float32)
    nan_w[1, 0] = np.nan
    bad = [
        SiteUpdate("nan", {"w": nan_w, "b": _f32(1, 1)}, 10),
        SiteUpdate("inf", {"w": np.ones((3, 2), np.float32), "b": _f32(np.inf, 1)}, 10),
        SiteUpdate("shape", {"w": np.ones((2, 3), np.float32), "b": _f32(1, 1)}, 10),
        SiteUpdate("missing", {"w": np.ones((3, 2), np.float32)}, 10),
        SiteUpdate("extra", {"w": np.ones((3, 2), np.float32), "b": _f32(1, 1), "c": _f32(0)}, 10),
        SiteUpdate("count", {"w": np.ones((3, 2), np.float32), "b": _f32(1, 1)}, 0),
        SiteUpdate("text", {"w": np.full((3, 2), "x"), "b": _f32(1, 1)}, 10),
    ]
    weights, rejected = _agg("fedavg").aggregate_with_report(GLOBAL0, [good[0], *bad, good[1]])
    np.testing.assert_allclose(weights["w"], np.full((3, 2), 2.5), rtol=1e-6)  # (10*1 + 30*3) / 40
    assert list(rejected) == ["nan", "inf", "shape", "missing", "extra", "count", "text"]
    assert "'w'" in rejected["nan"] and "non-finite" in rejected["nan"]
    assert "(2, 3)" in rejected["shape"] and "(3, 2)" in rejected["shape"]
    assert "'b'" in rejected["missing"] and "'c'" in rejected["extra"]
    assert "num_examples" in rejected["count"] and "dtype" in rejected["text"]


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_strict_aggregate_raises_and_leaves_state_unchanged(strategy):
    aggregator = _agg(strategy)
    updates = _random_round(np.random.default_rng(1))
    before = aggregator.state_dict()
    broken = SiteUpdate("broken", {"w": np.ones((3, 3), np.float32), "b": _f32(0, 0)}, 10)
    with pytest.raises(UpdateRejected) as raised:
        aggregator.aggregate(GLOBAL0, [*updates, broken])
    assert raised.value.site_id == "broken" and "shape" in raised.value.reason
    assert set(raised.value.rejected) == {"broken"}
    assert _same_state(aggregator.state_dict(), before)


def test_every_update_rejected_refuses_the_round():
    aggregator = _agg("fedadam")
    updates = [SiteUpdate(s, {"w": np.ones((3, 2), np.float32)}, 5) for s in ("a", "b")]
    with pytest.raises(AggregationError) as refused:
        aggregator.aggregate_with_report(GLOBAL0, updates)
    assert set(refused.value.rejected) == {"a", "b"} and aggregator.state_dict()["rounds"] == 0


def test_duplicate_sites_and_broken_global_model_are_programming_errors():
    update = SiteUpdate("a", {"x": _f32(1)}, 5)
    with pytest.raises(ValueError, match="more than one update"):
        _agg("fedavg").aggregate({"x": _f32(0)}, [update, update])
    with pytest.raises(ValueError, match="non-finite"):
        _agg("fedavg").aggregate({"x": _f32(np.nan)}, [update])


# --- state: resume exactly ---------------------------------------------------------------------------


def _same_state(a: dict[str, object], b: dict[str, object]) -> bool:
    return set(a) == set(b) and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def _through_npz(state: dict[str, object]) -> dict[str, object]:
    """Save and reload the state as a checkpoint file would, without pickle."""
    buffer = io.BytesIO()
    np.savez(buffer, **state)
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as loaded:
        return {key: loaded[key] for key in loaded.files}


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_resumed_round_three_equals_uninterrupted(strategy):
    rng = np.random.default_rng(11)
    rounds = [_random_round(rng) for _ in range(3)]

    uninterrupted, weights = _agg(strategy), GLOBAL0
    for updates in rounds:
        weights = uninterrupted.aggregate(weights, updates)

    first, resumed_weights = _agg(strategy), GLOBAL0
    for updates in rounds[:2]:
        resumed_weights = first.aggregate(resumed_weights, updates)
    resumed = _agg(strategy)
    resumed.load_state_dict(_through_npz(first.state_dict()))
    resumed_weights = resumed.aggregate(resumed_weights, rounds[2])

    for key in weights:
        assert np.array_equal(weights[key], resumed_weights[key]), key
    assert _same_state(resumed.state_dict(), uninterrupted.state_dict())


def test_state_from_other_strategy_or_settings_is_refused():
    adam = _agg("fedadam")
    adam.aggregate(*_one_round())
    with pytest.raises(ValueError, match="belongs to strategy 'fedadam'"):
        _agg("fedyogi").load_state_dict(adam.state_dict())
    with pytest.raises(ValueError, match="server_learning_rate"):
        _agg("fedadam", server_learning_rate=0.5).load_state_dict(adam.state_dict())
    without_v = {k: v for k, v in adam.state_dict().items() if not k.startswith("v/")}
    fresh = _agg("fedadam")
    with pytest.raises(ValueError, match="moments"):
        fresh.load_state_dict(without_v)
    assert fresh.state_dict()["rounds"] == 0
    with pytest.raises(ValueError, match="trim_fraction"):
        _agg("trimmed_mean", trim_fraction=0.3).load_state_dict(_agg("trimmed_mean").state_dict())


def _one_round() -> tuple[dict[str, np.ndarray], list[SiteUpdate]]:
    return GLOBAL0, _random_round(np.random.default_rng(5))


# --- the registry and the study contract -------------------------------------------------------------


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_make_aggregator_for_every_strategy(strategy):
    aggregator = _agg(strategy)
    assert isinstance(aggregator, Aggregator) and aggregator.name == strategy
    assert aggregator.state_dict()["rounds"] == 0
    weights = aggregator.aggregate(*_one_round())
    assert set(weights) == set(GLOBAL0) and all(np.isfinite(a).all() for a in weights.values())


def test_registry_covers_exactly_the_contract():
    assert set(STRATEGIES) == set(ALL_STRATEGIES)


def test_settings_reach_the_aggregators():
    adam = _agg("fedadam", server_learning_rate=0.5, server_beta1=0.8, server_beta2=0.95, server_tau=1e-2)
    assert adam.hyperparameters() == {
        "server_learning_rate": 0.5, "server_beta1": 0.8, "server_beta2": 0.95, "server_tau": 1e-2,
    }  # fmt: skip
    assert _agg("trimmed_mean", trim_fraction=0.3).trim_fraction == 0.3


def test_spec_defaults_and_ranges():
    spec = FederationSpec()
    assert (spec.server_learning_rate, spec.server_beta1, spec.server_beta2, spec.server_tau) == (0.1, 0.9, 0.99, 1e-3)
    assert spec.trim_fraction == 0.2
    for bad in (
        {"trim_fraction": 0.5},
        {"trim_fraction": 0.0},
        {"server_beta1": 1.0},
        {"server_beta2": -0.1},
        {"server_tau": 0.0},
        {"server_learning_rate": 0.0},
    ):
        with pytest.raises(ValidationError):
            FederationSpec(**bad)
